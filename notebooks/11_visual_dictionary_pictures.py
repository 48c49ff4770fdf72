# %% [markdown]
# # The visual dictionary in pictures (Fig. 3 and 4)
#
# > "As introduce in Sec 3.2, a VD index is correlated with many visual features, where each visual feature
# > corresponds to an image patch. We randomly sample some indices from VD and visualize their corresponding image
# > patches. As shown in Figure 3, the VD groups meaningful and consistent image patches into different indices,
# > which reflects an abstraction of visual semantics." (Sec. 4.5)
#
# The same picture for the tiny model pre-trained for a minute on the synthetic world: every visual token of the
# held-out images is one 64x64 patch; Eq. 2 gives its index; the patches are grouped by index. A minute of
# training uses only part of the $k$ entries (the tiny run's `vd_used`), so we draw the most used ones
# rather than a random sample. Black in a patch is padding: the cells of the last row or column may reach past
# the image.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import soho  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %%
model, _, _ = helpers.demo_model()  # the default `python train.py` run (notebooks/demo), 1,515 steps
paths = helpers.image_paths(200)  # every image of the val2014 folder
patches, indices, features = [], [], []
for start in range(0, len(paths), 16):
    images, image_mask, pil = helpers.load_batch(paths[start:start + 16])
    with torch.no_grad():
        V, valid, grid = model.encode(images, image_mask)  # Eq. 1
    h = soho.vq_lookup(V.reshape(-1, V.shape[-1]), model.visual_dictionary.embed).view(V.shape[:2])  # Eq. 2
    for b, img in enumerate(pil):
        cells = helpers.cells(img, grid)
        for t in valid[b].nonzero()[:, 0].tolist():
            patches.append(cells[t]); indices.append(int(h[b, t])); features.append(V[b, t])
indices, features = torch.tensor(indices), torch.stack(features)
counts = torch.bincount(indices, minlength=model.config.vd_size)
print(f"{len(paths)} images, {len(patches)} patches, {int((counts > 0).sum())} of {model.config.vd_size} "
      "entries used")

# %%
top = counts.argsort(descending=True)[:8]
g = torch.Generator().manual_seed(0)
fig, axes = plt.subplots(len(top), 9, figsize=(9, 8.4), gridspec_kw={"width_ratios": [1.6] + [1] * 8})
for row, j in enumerate(top.tolist()):
    members = (indices == j).nonzero()[:, 0]
    pick = members[torch.randperm(len(members), generator=g)[:8]]
    axes[row, 0].text(0.5, 0.5, f"entry {j}\n{int(counts[j])} patches", ha="center", va="center", fontsize=8)
    for col in range(9):
        axes[row, col].axis("off")
    for col, p in enumerate(pick.tolist(), start=1):
        axes[row, col].imshow(patches[p])
plt.suptitle("patches grouped by their visual dictionary index")
plt.tight_layout()

# %%
used = counts[counts > 0].sort(descending=True).values
fig, ax = plt.subplots(figsize=(6, 2.4))
ax.bar(range(len(used)), used.numpy())
ax.set_xlabel("entries, most used first"); ax.set_ylabel("patches")
ax.set_title(f"{len(used)} of {model.config.vd_size} entries hold all {len(patches)} patches");

# %% [markdown]
# How alike are the patches of one entry? Two measures. In feature space, the grouping is a clustering
# ("The visual dictionary performs an online clustering on visual feature maps based on feature similarity, and
# represents each feature vector by its cluster center", Sec. 3.2): features of one group are closer to each other
# than to the features of other groups. In pixels: the share of the patches' colour variance that the index
# accounts for, against a random grouping of the same sizes.
# `python evaluate.py --task vd --checkpoint runs/pretrain/ckpt.pt` draws the same picture for a longer run.

# %%
same = indices[:, None] == indices[None, :]
dist = torch.cdist(features.double(), features.double())
within_dist, between_dist = dist[same].mean().item(), dist[~same].mean().item()
print(f"feature distance: {within_dist:.2f} within a group, {between_dist:.2f} between groups")

colour = torch.from_numpy(np.stack([p.reshape(-1, 3).mean(0) for p in patches]))  # [N, 3] mean RGB of each patch

def explained(groups):
    """Share of the colour variance that the grouping accounts for (1 - within-group / total variance)."""
    within = sum(((colour[groups == j] - colour[groups == j].mean(0)) ** 2).sum() for j in groups.unique())
    return 1 - (within / len(colour)) / colour.var(0, unbiased=False).sum()

g = torch.Generator().manual_seed(1)
by_index = explained(indices).item()
by_chance = max(explained(indices[torch.randperm(len(indices), generator=g)]).item() for _ in range(20))
print(f"colour variance accounted for: {by_index:.1%} by the VD index, "
      f"at most {by_chance:.1%} by 20 random groupings of the same sizes")

# %% [markdown]
# ## What this notebook claims

# %%
# every patch sits under its nearest entry (Eq. 2), and the groups cover all patches once
assert torch.equal(soho.vq_lookup(features, model.visual_dictionary.embed), indices)
assert counts.sum() == len(patches) == len(features)
# a clustering by feature similarity: closer within a group than between groups
assert within_dist < between_dist
# the index says something about how a patch looks: more than any of 20 random groupings of the same sizes
assert by_index > by_chance
print("all claims hold")
