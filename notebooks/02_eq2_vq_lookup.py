# %% [markdown]
# # Eq. 2: the nearest dictionary entry
#
# > "We define a visual dictionary (VD) as a matrix $\mathcal{D} \in \mathbf{R}^{k \times c}$ which contains k
# > embedding vectors with c-dim. The $j^{th}$ embedding vector is denoted as $d_j$. For visual feature $v_i$, we
# > compute it mapping index by searching nearest neighbor in $\mathcal{D}$, denoted as:
# > $$h_i = \operatorname{argmin}_j \|v_i - d_j\|_2. \tag{2}$$" (Sec. 3.2)
#
# (The paper's typeset formula writes the index of the argmin as $i$; the search runs over the entries $j$.)
#
# In `soho.py` this is `vq_lookup(v, dictionary)`. It expands $\|v - d\|^2 = \|v\|^2 - 2 v \cdot d + \|d\|^2$
# and drops $\|v\|^2$, which is the same for every $j$: one $[N, k]$ matrix product, in fp32 even under
# autocast. Below, the dictionary and encoder are those of a tiny SOHO pre-trained for a minute on the synthetic
# world (`helpers.pretrained()`, which runs `train.py` the first time).

# %%
import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import soho, train  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %%
model, ckpt = train.load_model(helpers.pretrained())
D = model.visual_dictionary.embed  # [k, c]
images, image_mask, pil = helpers.load_batch(helpers.image_paths(6))
with torch.no_grad():
    V, valid, grid = model.encode(images, image_mask)  # Eq. 1
h = soho.vq_lookup(V.reshape(-1, V.shape[-1]), D).view(V.shape[:2])  # Eq. 2: [B, l]
print(f"D: {tuple(D.shape)} = [k, c]   V: {tuple(V.shape)}   h: {tuple(h.shape)}, dtype {h.dtype}")
print("entries chosen by the real tokens of these images:", sorted(h[valid].unique().tolist()))

# %% [markdown]
# Each token labelled and coloured by its index $h_i$. Neighbouring cells often share an index, which is why
# masked visual modeling masks by index rather than by token (notebook 07).

# %%
used = h[valid].unique()
fig, axes = plt.subplots(2, 3, figsize=(9, 6.4))
for b, ax in enumerate(axes.flat):
    labels = [int(j) if ok else None for j, ok in zip(h[b], valid[b])]
    colors = [c if ok else (0, 0, 0, 0) for c, ok in zip(helpers.entry_colors(h[b], used), valid[b])]
    helpers.show_tokens(ax, pil[b], grid, labels=labels, colors=colors)
plt.suptitle("h_i = argmin_j ||v_i - d_j|| for every visual token")
plt.tight_layout()

# %% [markdown]
# One token seen from the dictionary's side: its Euclidean distance to each of the $k$ entries (computed
# directly with `torch.cdist`, as a check), sorted. Eq. 2 takes the smallest.

# %%
i = int(valid[0].nonzero()[len(valid[0].nonzero()) // 2])  # a token in the middle of image 0
dist = torch.cdist(V[0, i][None].double(), D.double())[0]  # ||v_i - d_j||_2 for every j
order = dist.argsort()
fig, ax = plt.subplots(figsize=(8, 2.6))
ax.bar(range(len(dist)), dist[order].numpy(), width=1.0, color="lightgray")
ax.bar([0], [dist[order[0]].item()], width=1.0, color="tab:red", label=f"nearest: entry {int(order[0])} = h_i")
ax.set_xlabel("entries j, sorted by distance"); ax.set_ylabel("||v_i - d_j||")
ax.set_title(f"token {i} of image 0: Eq. 2 picks entry {int(h[0, i])}")
ax.legend(loc="lower right");

# %% [markdown]
# ## What this notebook claims

# %%
v = V[valid]  # [N, c], the real tokens
dist = torch.cdist(v.double(), D.double())  # [N, k], float64
# h_i is a nearest entry: its distance equals the minimum (up to the fp32 arithmetic of vq_lookup)
gap = dist.gather(1, h[valid][:, None])[:, 0] - dist.min(1).values
assert (gap <= 1e-4 * dist.min(1).values.clamp(min=1)).all(), gap.max()
print(f"h equals the float64 argmin for {(h[valid] == dist.argmin(1)).float().mean():.1%} of the tokens")
# the model's VisualDictionary.lookup returns the same indices
h2, _ = model.visual_dictionary.lookup(V)
assert torch.equal(h2, h)
# a tie goes to the lowest index: duplicate entry 0 at the end, nothing changes
assert torch.equal(soho.vq_lookup(v, torch.cat([D, D[:1]])), h[valid])
# indices are integers in [0, k) and carry no gradient
assert h.dtype == torch.long and 0 <= int(h.min()) and int(h.max()) < D.shape[0] and not h.requires_grad
print("all claims hold")
