# %% [markdown]
# # Eq. 3: the visual dictionary embedding
#
# > "We define visual dictionary embedding as a mapping function f, which maps $v_i$ to $\mathcal{D}$ by:
# > $$f(v_i) = d_{h_i}, \tag{3}$$
# > which uses the nearest embedding vector to represent the visual feature. We denote $f^{-1}(j)$ as an inverse
# > mapping function, which maps the index j back to a group of visual features." (Sec. 3.2)
#
# In `soho.py` this is `vd_embed(h, dictionary)`: a row lookup, `dictionary[h]`. Together with Eq. 2 it replaces
# every visual token by its nearest dictionary entry, so the transformer sees at most $k$ distinct visual vectors,
# a "visual vocabulary" as it sees $|vocab|$ distinct word vectors.

# %%
import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import soho, train  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %%
model, ckpt = train.load_model(helpers.pretrained())
D = model.visual_dictionary.embed
images, image_mask, pil = helpers.load_batch(helpers.image_paths(6))
with torch.no_grad():
    V, valid, grid = model.encode(images, image_mask)  # Eq. 1
h = soho.vq_lookup(V.reshape(-1, V.shape[-1]), D).view(V.shape[:2])  # Eq. 2
fV = soho.vd_embed(h, D)  # Eq. 3: [B, l, c]
print(f"V {tuple(V.shape)} -> h {tuple(h.shape)} -> f(V) {tuple(fV.shape)}")
err = (V - fV).norm(dim=-1)[valid] / V.norm(dim=-1)[valid]
print(f"relative quantisation error ||v - f(v)|| / ||v||: mean {err.mean():.2f}, max {err.max():.2f}")

# %% [markdown]
# $\mathcal{V}$ and $f(\mathcal{V})$ side by side, each token drawn as the RGB of its first three principal
# components (one basis, fitted on the real tokens). $f$ is constant on each group $f^{-1}(j)$: tokens with one
# index get one colour.

# %%
basis = helpers.pca_basis(V[valid])
fig, axes = plt.subplots(3, 3, figsize=(8, 8))
for row, b in enumerate(range(3)):
    helpers.show_tokens(axes[row, 0], pil[b], grid, labels=[int(j) if ok else None for j, ok in zip(h[b], valid[b])],
                        title="image, h")
    for col, (x, name) in enumerate(((V, "V"), (fV, "f(V)")), start=1):
        rgb = helpers.to_rgb(x[b], basis, ref=V[valid])
        rgb[~valid[b].numpy()] = 1.0
        axes[row, col].imshow(rgb.reshape(*grid, 3))
        axes[row, col].set_title(f"{name}: {len(x[b][valid[b]].unique(dim=0))} distinct tokens")
for ax in axes.flat:
    ax.set_xticks([]); ax.set_yticks([])
plt.tight_layout()

# %% [markdown]
# The inverse mapping: the size $|f^{-1}(j)|$ of each group over these six images.

# %%
sizes = torch.bincount(h[valid], minlength=D.shape[0])
used = sizes.nonzero()[:, 0]
fig, ax = plt.subplots(figsize=(7, 2.4))
ax.bar([str(int(j)) for j in used], sizes[used].numpy(), color="tab:blue")
ax.set_xlabel("entry j"); ax.set_ylabel("|f^-1(j)|")
ax.set_title(f"{len(used)} of k = {D.shape[0]} entries represent the {int(valid.sum())} real tokens");

# %% [markdown]
# ## What this notebook claims

# %%
# f(v_i) = d_{h_i}, row by row
for b in range(V.shape[0]):
    for i in range(V.shape[1]):
        assert torch.equal(fV[b, i], D[h[b, i]])
# f is constant on each group f^-1(j): as many distinct vectors as distinct indices
assert len(fV[valid].unique(dim=0)) == len(h[valid].unique())
# f(v) is the entry nearest to v: no entry is closer
dist = torch.cdist(V[valid].double(), D.double())
nearest = (V[valid] - fV[valid]).double().norm(dim=-1)
assert (nearest <= dist.min(1).values * (1 + 1e-4) + 1e-6).all()
# the model's VisualDictionary.lookup is Eq. 2 then Eq. 3
h2, d2 = model.visual_dictionary.lookup(V)
assert torch.equal(h2, h) and torch.equal(d2, fV)
print("all claims hold")
