# %% [markdown]
# # Eq. 4: the momentum update of the visual dictionary
#
# > "The visual dictionary $\mathcal{D}$ is randomly initialized, and further updated by a moving average operation
# > in one mini-batch, which is denoted as:
# > $$\hat{d}_j = \gamma * d_j + (1 - \gamma) * \frac{\sum_{h_i = j} v_i}{|f^{-1}(j)|}, \tag{4}$$
# > where $\hat{d}_j$ indicates the updated embedding vector of $d_j$, and $\gamma$ is a momentum coefficient whose
# > value range is [0,1]. Note that Eqn. 4 will only be applied when $|f^{-1}(j)| \neq 0$." (Sec. 3.2)
#
# In `soho.py` this is `ema_update(dictionary, v, h, gamma)`: it returns a new dictionary and leaves the entries
# that no feature chose as they were. The dictionary gets no gradient; Eq. 4 is the only thing that changes it.
# `ema_update` is literally two steps, `assignment_statistics` (the per-entry sums and counts) and then
# `ema_update_from_statistics`, and those are the two functions training calls: `VisualDictionary.accumulate`
# adds the statistics of each forward, and `update`, once per optimizer step, all-reduces them over the ranks
# (`all_reduce_statistics`, the only collective) and applies Eq. 4 with the model's `vd_gamma` = 0.9.

# %%
import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import soho, train  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %% [markdown]
# A worked example in two dimensions: three entries, three features, $\gamma = 0.9$.

# %%
D = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])  # k = 3 entries d_0, d_1, d_2
v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 1.0]])  # 3 features
h = soho.vq_lookup(v, D)  # Eq. 2
D_new = soho.ema_update(D, v, h, gamma=0.9)  # Eq. 4
print("h =", h.tolist(), "  (entry 2 is chosen by no feature)")
for j in range(3):
    print(f"d_{j}: {D[j].tolist()} -> {[round(x, 4) for x in D_new[j].tolist()]}")

# %% [markdown]
# $\hat d_0 = 0.9 \cdot (0,0) + 0.1 \cdot \tfrac{(1,0) + (0,1)}{2} = (0.05, 0.05)$,
# $\hat d_1 = 0.9 \cdot (4,0) + 0.1 \cdot (5,1) = (4.1, 0.1)$, and $d_2$ stays where it was.
#
# Now real features: the tokens of 24 synthetic images from the pre-trained encoder, held fixed, and a
# dictionary that starts as the paper's does, `torch.randn(k, c)` (`VisualDictionary`'s default; the tiny preset
# starts from features instead, see below). Alternating Eq. 2 and Eq. 4 on this one batch is an online k-means
# with momentum: the chosen entries drift towards the features they represent.

# %%
model, ckpt = train.load_model(helpers.pretrained())
images, image_mask, pil = helpers.load_batch(helpers.image_paths(24))
with torch.no_grad():
    V, valid, grid = model.encode(images, image_mask)
v = V[valid]  # [N, c]
k, c, gamma = model.config.vd_size, v.shape[1], model.config.vd_gamma
D0 = soho.VisualDictionary(k, c, gamma).embed.clone()  # randomly initialised, as at step 0
history, errors, used = [D0], [], []
D = D0
for step in range(30):
    h = soho.vq_lookup(v, D)  # Eq. 2
    errors.append(((v - soho.vd_embed(h, D)) ** 2).sum(1).mean().item())  # mean ||v - f(v)||^2
    used.append(len(h.unique()))
    D = soho.ema_update(D, v, h, gamma)  # Eq. 4
    history.append(D)
print(f"{len(v)} features, k = {k}, gamma = {gamma}: {used[0]} entries chosen at first, {used[-1]} at the end")

# %% [markdown]
# Left: the features (grey) and the dictionary in the plane of the features' first two principal components.
# Each chosen entry leaves a trail from its random start (x) to where Eq. 4 took it (dot); entries never chosen
# (small blue dots) do not move. Right: the quantisation error falls at every step.

# %%
basis = helpers.pca_basis(v, q=2)
project = lambda x: ((x.double() - basis[0]) @ basis[1]).numpy()
H = torch.stack(history)  # [steps + 1, k, c]
moved = (H[-1] != H[0]).any(1)
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
p = project(v)
ax.scatter(p[:, 0], p[:, 1], s=6, c="lightgray", label="features v_i")
still = project(H[0][~moved])
ax.scatter(still[:, 0], still[:, 1], s=4, c="tab:blue", alpha=0.3, label="entries never chosen")
for j in moved.nonzero()[:, 0]:
    trail = project(H[:, j])
    ax.plot(trail[:, 0], trail[:, 1], "-", lw=1)
    ax.plot(*trail[0], "kx", ms=5)
    ax.plot(*trail[-1], "o", ms=5)
ax.set_title("the dictionary drifting under Eq. 4"); ax.legend(loc="best", fontsize=7)
ax2.plot(errors, "o-", ms=3)
ax2.set_xlabel("update"); ax2.set_ylabel("mean ||v - f(v)||^2"); ax2.set_title("quantisation error")
plt.tight_layout()

# %% [markdown]
# Most of the random entries are never chosen: they lie far from every feature, and Eq. 4 moves only chosen
# entries, so they stay dead for good. The paper freezes the ResNet for the first epochs
# (`freeze_backbone_epochs`) so that the chosen entries can settle, but that does not revive the others. Beyond
# the paper, `soho.py` offers two remedies from the VQ literature: `vd_init="features"` starts the entries from a
# k-means of the first step's features (`kmeans_init`; the tiny preset's default), and `vd_restart_after=N`
# moves an entry unused for N updates onto a current feature (`restart_dead_entries`). The README's "Differences"
# table gives their measured use of the entries and why the tiny preset starts from features but does not restart.

# %% [markdown]
# ## The dictionary of a longer run
#
# The default `python train.py` run (1,515 steps, kept in `notebooks/demo/`) started its dictionary from a
# k-means of the first step's features. On the tokens of 64 scenes that no model trained on, we count the entries
# its dictionary uses, and those that the paper's start, `torch.randn(k, c)` followed by 30 rounds of Eq. 2 and
# Eq. 4 on the same tokens, ends up using.

# %%
demo, _, _ = helpers.demo_model()
_, _, fresh_images, fresh_mask = helpers.fresh_scenes(64, seed=4)
with torch.no_grad():
    V_fresh, valid_fresh, _ = demo.encode(fresh_images, fresh_mask)
h_fresh = soho.vq_lookup(V_fresh[valid_fresh], demo.visual_dictionary.embed)
demo_counts = torch.bincount(h_fresh, minlength=demo.config.vd_size)
p = demo_counts[demo_counts > 0].double() / demo_counts.sum()
v_fresh = V_fresh[valid_fresh]
D_random = soho.VisualDictionary(k, c, gamma).embed.clone()  # the paper's N(0, 1) start
for step in range(30):
    D_random = soho.ema_update(D_random, v_fresh, soho.vq_lookup(v_fresh, D_random), gamma)  # Eq. 2, then Eq. 4
random_used = len(soho.vq_lookup(v_fresh, D_random).unique())
print(f"{len(h_fresh)} tokens: the default run's dictionary uses {int((demo_counts > 0).sum())} of {k} entries "
      f"(perplexity {float(torch.exp(-(p * p.log()).sum())):.1f}); the N(0, 1) start, after 30 updates, "
      f"{random_used}")

# %% [markdown]
# ## What this notebook claims

# %%
# the worked example, by hand
torch.testing.assert_close(D_new, torch.tensor([[0.05, 0.05], [4.1, 0.1], [0.0, 4.0]]))
# one real update, checked entry by entry against the formula
h = soho.vq_lookup(v, D0)
D1 = soho.ema_update(D0, v, h, gamma)
for j in range(k):
    group = v[h == j]  # f^-1(j)
    if len(group) == 0:
        assert torch.equal(D1[j], D0[j]), f"empty entry {j} changed"  # |f^-1(j)| = 0: untouched
    else:
        torch.testing.assert_close(D1[j], gamma * D0[j] + (1 - gamma) * group.mean(0))
assert torch.equal(soho.ema_update(D0, v, h, 1.0), D0)  # gamma = 1: nothing moves
# the inputs are left as they were (ema_update returns a new tensor)
assert torch.equal(D0, history[0]) and torch.equal(v, V[valid])
# alternating Eq. 2 and Eq. 4 on fixed features never increases the quantisation error
assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:])), errors
assert errors[-1] < errors[0]
# how train.py applies it: statistics of several forwards accumulated, then one update equals Eq. 4 on all
vd = soho.VisualDictionary(k, c, gamma)
vd.embed.copy_(D0)
half = len(v) // 2
vd.accumulate(v[:half], h[:half]); vd.accumulate(v[half:], h[half:])
vd.update()
torch.testing.assert_close(vd.embed, D1)
# no gradient flows into the dictionary update
assert not soho.ema_update(D0, v.clone().requires_grad_(), h, gamma).requires_grad
# on the same tokens, the default run's dictionary (started from features) uses twice the entries of the N(0, 1) start
assert int((demo_counts > 0).sum()) >= 2 * random_used
print("all claims hold")
