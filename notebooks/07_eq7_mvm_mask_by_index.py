# %% [markdown]
# # Eq. 7: masked visual modeling, and `mask_by_index`
#
# > "$$\mathcal{L}_{\text{MVM}} = -\mathbb{E}_{(\mathcal{W}, f(\mathcal{V})) \sim D} \log p(f(v_j) | \mathcal{W}, f(\mathcal{V})_{\setminus j}). \tag{7}$$
# > [...] When an image feature $v_i$ is masked, its mapping index $h_i$ in VD is considered as its label. In visual
# > feature maps, neighbor features may have similar values, and thus share the same mapping index. This will cause
# > the model to directly copy the label from surrounding features as predictions in a lazy way. To prevent this,
# > in the masking stage, we first randomly select an existing label index j, then replace all visual embedding
# > vectors in $f^{-1}(j)$ with the special [MASK] token embedding vector." (Sec. 3.3)
#
# In `soho.py` the masking is `mask_by_index(h, valid, prob, generator)`: each sample is chosen with probability
# `prob` (the model's `mvm_prob` = 0.3; the paper gives no value); for a chosen sample one index $j$ is drawn
# among those present in its image, and every token with that index is masked. `SOHO.pretrain_losses` replaces
# the masked tokens by a learned [MASK] vector and predicts their index $h_i$ out of $k$ (the MVM term).

# %%
import math

import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import data, soho, train  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %%
model, ckpt = train.load_model(helpers.pretrained())
images, image_mask, pil = helpers.load_batch(helpers.image_paths(6))
with torch.no_grad():
    V, valid, grid = model.encode(images, image_mask)
h, _ = model.visual_dictionary.lookup(V)  # Eq. 2: the labels of MVM
mvm_mask = soho.mask_by_index(h, valid, prob=1.0, generator=torch.Generator().manual_seed(0))
for b in range(len(pil)):
    j = h[b][mvm_mask[b]].unique().tolist()
    print(f"image {b}: index {j} drawn, {int(mvm_mask[b].sum())} of {int(valid[b].sum())} tokens masked")

# %% [markdown]
# With `prob=1` every image gets masked. Each cell shows its index; hatched cells are masked: all cells that
# share the drawn index, wherever they are in the image.

# %%
used = h[valid].unique()
fig, axes = plt.subplots(2, 3, figsize=(9, 6.4))
for b, ax in enumerate(axes.flat):
    labels = [int(j) if ok else None for j, ok in zip(h[b], valid[b])]
    colors = [c if ok else (0, 0, 0, 0) for c, ok in zip(helpers.entry_colors(h[b], used), valid[b])]
    drawn = int(h[b][mvm_mask[b]][0])
    helpers.show_tokens(ax, pil[b], grid, labels=labels, colors=colors, hatch=mvm_mask[b].tolist(),
                        title=f"masked: all tokens with index {drawn}")
plt.tight_layout()


# %% [markdown]
# Why by index: if single tokens were masked, a masked token would often have a visible neighbour with the same
# index, and the label could be copied from it. Over many draws, the share of masked tokens that have a visible
# 4-neighbour with their own index:

# %%
def copyable(mask, h, valid, grid):
    """Share of masked tokens with an unmasked real 4-neighbour of the same index."""
    gh, gw = grid
    hits = total = 0
    for b in range(h.shape[0]):
        for t in mask[b].nonzero()[:, 0].tolist():
            r, c = divmod(t, gw)
            near = [(r + dr) * gw + c + dc for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                    if 0 <= r + dr < gh and 0 <= c + dc < gw]
            hits += any(valid[b, n] and not mask[b, n] and h[b, n] == h[b, t] for n in near)
            total += 1
    return hits / max(total, 1)

g = torch.Generator().manual_seed(1)
reps = 50
hh, vv = h.repeat(reps, 1), valid.repeat(reps, 1)
by_index = soho.mask_by_index(hh, vv, 1.0, generator=g)
scores = torch.rand(vv.shape, generator=g).masked_fill(~vv, -1)  # one random real token per image
single = torch.zeros_like(vv)
single[torch.arange(len(vv)), scores.argmax(1)] = True
shares = {"one random token": copyable(single, hh, vv, grid), "mask_by_index": copyable(by_index, hh, vv, grid)}
fig, ax = plt.subplots(figsize=(5, 2.2))
ax.barh(list(shares), list(shares.values()), color=["tab:gray", "tab:blue"])
ax.set_xlim(0, 1); ax.set_xlabel("masked tokens whose label a visible neighbour gives away")
for y, s in enumerate(shares.values()):
    ax.text(s + 0.02, y, f"{s:.0%}", va="center")

# %% [markdown]
# Inside pre-training. `pretrain_losses` draws the MVM mask with `mask_by_index` over all pairs, with
# `prob = mvm_prob` (passing the same generator reproduces it), and takes the loss on the matched pairs only:
# were only matched pairs masked, a visual [MASK] would tell ITM which pairs match. The MVM term is a $k$-way
# classification of each masked token's index.

# %%
dataset = data.build_dataset("pretrain", "train", ckpt["data_root"], helpers.tokenizer(ckpt), model.config, seed=0)
batch = dataset.collate([dataset[i] for i in range(8)])
with torch.no_grad():
    out = model.pretrain_losses(batch, generator=torch.Generator().manual_seed(5))
    Vb, valid_b, _ = model.encode(batch["images"], batch["image_mask"])
    hb, _ = model.visual_dictionary.lookup(Vb)
matched = batch["itm_label"] == 1
same_mask = soho.mask_by_index(hb[batch["img_index"]], valid_b[batch["img_index"]], model.config.mvm_prob,
                               generator=torch.Generator().manual_seed(5))
mvm = out["mvm"]
print(f"MVM: {int(mvm.count)} masked tokens in {int((same_mask & matched[:, None]).any(1).sum())} of "
      f"{int(matched.sum())} matched texts (masked inputs in {int(same_mask.any(1).sum())} of {len(matched)}); L_MVM = {mvm.mean:.3f} (ln k = {math.log(model.config.vd_size):.3f}), "
      f"accuracy {mvm.correct / mvm.count.clamp(min=1):.1%}")

# %% [markdown]
# ## What this notebook claims

# %%
for b in range(len(by_index)):
    masked = by_index[b]
    # one index per masked image, and every real token with that index is masked
    assert len(hh[b][masked].unique()) == 1
    assert torch.equal(masked, vv[b] & (hh[b] == hh[b][masked][0]))
# padding is never masked; so no label can ever be copied from a visible neighbour
assert not (by_index & ~vv).any()
assert shares["mask_by_index"] == 0.0 and shares["one random token"] > 0.2
# prob is the chance that a sample is masked at all
g = torch.Generator().manual_seed(2)
assert not soho.mask_by_index(hh, vv, 0.0, generator=g).any()
rate = soho.mask_by_index(h.repeat(500, 1), valid.repeat(500, 1), 0.3, generator=g).any(1).float().mean()
assert abs(rate - 0.3) < 0.03, rate
# pretrain_losses masks all pairs with mask_by_index and predicts the tokens masked in matched pairs only
assert torch.equal(out["mvm_mask"], same_mask)
assert torch.equal(mvm.count, (same_mask & matched[:, None]).sum().float())
print("all claims hold")
