# %% [markdown]
# # Eq. 1: the trainable visual encoder
#
# > "Given an input image $\mathcal{I}$, we get its feature $\mathcal{V}$ by:
# > $$\mathcal{V} = E(\mathcal{I}, \theta) \in \mathbf{R}^{l \times c}, \tag{1}$$
# > where $E(\cdot, \theta)$ is the visual feature encoder with parameter $\theta$. l denotes the number of embedded
# > feature vectors, and c is the embedded dimension. We adopt ResNet [15] pretrained on ImageNet [8] followed by a
# > $1 \times 1$ convolutional layer and a $2 \times 2$ max pooling layer as the architecture of the encoder E."
# > (Sec. 3.1)
#
# In `soho.py` this is `encode(images, image_mask, backbone, projection)`. The ResNet ends at stride 32, the 1x1
# convolution maps its channels to $c$ = `hidden_size`, and the 2x2 max pooling halves the grid once more, so each
# of the $l = g_h g_w$ visual tokens covers a 64x64 pixel cell. Images of a batch have different sizes and are
# zero-padded bottom/right; `encode` also returns which tokens cover real pixels.

# %%
import math

import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import data, soho  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %% [markdown]
# Three images of the synthetic world with different sizes, prepared as the data pipeline does
# (`data.resize_image` to the tiny preset's 256-pixel short side, `data.image_to_tensor`, `data.pad_images`):

# %%
paths, sizes = [], set()
for p in helpers.image_paths(60):
    size = data.load_image(p).size
    if size not in sizes:
        sizes.add(size)
        paths.append(p)
paths = paths[:3]
images, image_mask, pil = helpers.load_batch(paths)
print("image sizes (w x h):", [im.size for im in pil])
print("padded batch:", tuple(images.shape), "  mask of real pixels:", tuple(image_mask.shape))

# %% [markdown]
# The tiny preset's encoder: a narrow ResNet-18 trained from scratch (no ImageNet weights here), so $\theta$ is
# random in this notebook. The shapes are what matter.

# %%
cfg = soho.PRESETS["tiny"]
model = soho.SOHO(cfg).eval()
V, valid, (gh, gw) = soho.encode(images, image_mask, model.backbone, model.projection)
print(f"ResNet-{cfg.resnet_depth}: {model.backbone.out_channels} channels at stride 32 -> 1x1 conv to "
      f"c = {cfg.hidden_size} -> 2x2 max pool")
print(f"V: {tuple(V.shape)} = [B, l, c], l = gh * gw = {gh} * {gw}")
print("real tokens per image:", valid.sum(1).tolist())

# %% [markdown]
# Top: each image in the padded canvas with its 64x64 token cells; hatched cells hold only padding (`valid` is
# False there). Bottom: the tokens $v_i$ drawn as colours, their first three principal components (over the real
# tokens of the batch) mapped to RGB; padding tokens are white.

# %%
basis = helpers.pca_basis(V[valid])
fig, axes = plt.subplots(2, 3, figsize=(9, 6))
for b in range(3):
    helpers.show_tokens(axes[0, b], pil[b], (gh, gw), hatch=(~valid[b]).tolist(),
                        title=f"{pil[b].width}x{pil[b].height}: {int(valid[b].sum())} real tokens")
    rgb = helpers.to_rgb(V[b], basis, ref=V[valid])
    rgb[~valid[b].numpy()] = 1.0
    axes[1, b].imshow(rgb.reshape(gh, gw, 3))
    axes[1, b].set_title(f"V[{b}]: {gh}x{gw} tokens, c = {V.shape[-1]}")
    axes[1, b].set_xticks([]); axes[1, b].set_yticks([])
plt.tight_layout()

# %% [markdown]
# "Trainable": E is updated by the pre-training and downstream losses. Any loss computed from $\mathcal{V}$
# sends a gradient to the ResNet and to the 1x1 convolution (`SOHO.encode` is `soho.encode` with the model's own
# modules). The tiny preset starts each residual block as the identity (`zero_init_residual`: the last BatchNorm
# of each residual branch has weight 0), so at initialisation the convolutions inside a branch, such as
# `layer4.1.conv2`, get no gradient until training moves that weight away from 0:

# %%
V2, valid2, grid2 = model.encode(images, image_mask)
loss = V2[valid2].pow(2).mean()
loss.backward()
for name in ("backbone.conv1.weight", "backbone.layer4.1.conv2.weight", "projection.weight"):
    print(f"|d loss / d {name}| = {model.get_parameter(name).grad.norm():.3g}")

# %% [markdown]
# ## What this notebook claims

# %%
H, W = images.shape[-2:]
# l = gh * gw tokens of width c: one per 64x64 cell of the padded batch (a partial cell at the border counts)
assert V.shape == (len(paths), gh * gw, cfg.hidden_size)
assert (gh, gw) == (math.ceil(H / 64), math.ceil(W / 64))
# a token is real exactly when its cell holds a real pixel of its own image
for b, im in enumerate(pil):
    expected = torch.zeros(gh, gw, dtype=torch.bool)
    expected[:math.ceil(im.height / 64), :math.ceil(im.width / 64)] = True
    assert torch.equal(valid[b].view(gh, gw), expected), b
# SOHO.encode is Eq. 1 with the model's encoder
assert grid2 == (gh, gw) and torch.equal(valid2, valid)
torch.testing.assert_close(V2, V)
# trainable: the gradient reaches both parts of E
assert model.backbone.conv1.weight.grad.abs().sum() > 0
assert model.projection.weight.grad.abs().sum() > 0
print("all claims hold")
