"""Write the read-along notebooks from the cells below and execute them in place, with their outputs.

    python notebooks/build_notebooks.py                  # write every notebook from this file, then execute it
    python notebooks/build_notebooks.py --execute-only   # re-execute the committed notebooks as they are
    python notebooks/build_notebooks.py 04 09            # only the notebooks whose names start with 04 or 09

This file is the source of the notebooks: edit the cells here, not in Jupyter (tests/test_notebooks.py checks
that the two agree). Each notebook runs in a fresh kernel with notebooks/ as its working directory. All of them
share one cache folder ($SOHO_NB_CACHE; a fresh temporary one per invocation unless it is set), so the synthetic
world is written and the tiny model pre-trained once per build; a notebook run alone makes them itself.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.dirname(os.path.abspath(__file__))
KERNEL = "python3"
CELL_TIMEOUT = 300  # seconds
MAX_BYTES = 1_500_000


def md(text):
    return ("markdown", text.strip("\n"))


def code(text):
    return ("code", text.strip("\n"))


SETUP = code('''
import sys; sys.path.insert(0, "..")  # the repository root: soho.py, data.py, train.py
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import data, soho, train
import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
torch.manual_seed(0);
''')

NOTEBOOKS = {}

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["01_eq1_visual_encoder"] = [
    md(r'''
# Eq. 1: the trainable visual encoder

> "Given an input image $\mathcal{I}$, we get its feature $\mathcal{V}$ by:
> $$\mathcal{V} = E(\mathcal{I}, \theta) \in \mathbf{R}^{l \times c}, \tag{1}$$
> where $E(\cdot, \theta)$ is the visual feature encoder with parameter $\theta$. l denotes the number of embedded
> feature vectors, and c is the embedded dimension. We adopt ResNet [15] pretrained on ImageNet [8] followed by a
> $1 \times 1$ convolutional layer and a $2 \times 2$ max pooling layer as the architecture of the encoder E."
> (Sec. 3.1)

In `soho.py` this is `encode(images, image_mask, backbone, projection)`. The ResNet ends at stride 32, the 1x1
convolution maps its channels to $c$ = `hidden_size`, and the 2x2 max pooling halves the grid once more, so each
of the $l = g_h g_w$ visual tokens covers a 64x64 pixel cell. Images of a batch have different sizes and are
zero-padded bottom/right; `encode` also returns which tokens cover real pixels.
'''),
    SETUP,
    md('''
Three images of the synthetic world with different sizes, prepared as the data pipeline does
(`data.resize_image` to the tiny preset's 256-pixel short side, `data.image_to_tensor`, `data.pad_images`):
'''),
    code('''
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
'''),
    md('''
The tiny preset's encoder: a narrow ResNet-18 trained from scratch (no ImageNet weights here), so $\\theta$ is
random in this notebook. The shapes are what matter.
'''),
    code('''
cfg = soho.PRESETS["tiny"]
model = soho.SOHO(cfg).eval()
V, valid, (gh, gw) = soho.encode(images, image_mask, model.backbone, model.projection)
print(f"ResNet-{cfg.resnet_depth}: {model.backbone.out_channels} channels at stride 32 -> 1x1 conv to "
      f"c = {cfg.hidden_size} -> 2x2 max pool")
print(f"V: {tuple(V.shape)} = [B, l, c], l = gh * gw = {gh} * {gw}")
print("real tokens per image:", valid.sum(1).tolist())
'''),
    md('''
Top: each image in the padded canvas with its 64x64 token cells; hatched cells hold only padding (`valid` is
False there). Bottom: the tokens $v_i$ drawn as colours, their first three principal components (over the real
tokens of the batch) mapped to RGB; padding tokens are white.
'''),
    code('''
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
'''),
    md('''
"Trainable": E is updated by the pre-training and downstream losses. Any loss computed from $\\mathcal{V}$
sends a gradient to the ResNet and to the 1x1 convolution (`SOHO.encode` is `soho.encode` with the model's own
modules):
'''),
    code('''
V2, valid2, grid2 = model.encode(images, image_mask)
loss = V2[valid2].pow(2).mean()
loss.backward()
for name in ("backbone.conv1.weight", "backbone.layer4.1.conv2.weight", "projection.weight"):
    print(f"|d loss / d {name}| = {model.get_parameter(name).grad.norm():.3g}")
'''),
    md('## What this notebook claims'),
    code('''
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
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["02_eq2_vq_lookup"] = [
    md(r'''
# Eq. 2: the nearest dictionary entry

> "We define a visual dictionary (VD) as a matrix $\mathcal{D} \in \mathbf{R}^{k \times c}$ which contains k
> embedding vectors with c-dim. The $j^{th}$ embedding vector is denoted as $d_j$. For visual feature $v_i$, we
> compute it mapping index by searching nearest neighbor in $\mathcal{D}$, denoted as:
> $$h_i = \operatorname{argmin}_j \|v_i - d_j\|_2. \tag{2}$$" (Sec. 3.2)

(The paper's typeset formula writes the index of the argmin as $i$; the search runs over the entries $j$.)

In `soho.py` this is `vq_lookup(v, dictionary)`. It expands $\|v - d\|^2 = \|v\|^2 - 2 v \cdot d + \|d\|^2$
and drops $\|v\|^2$, which is the same for every $j$: one $[N, k]$ matrix product, in fp32 even under
autocast. Below, the dictionary and encoder are those of a tiny SOHO pre-trained for a minute on the synthetic
world (`helpers.pretrained()`, which runs `train.py` the first time).
'''),
    SETUP,
    code('''
model, ckpt = train.load_model(helpers.pretrained())
D = model.visual_dictionary.embed  # [k, c]
images, image_mask, pil = helpers.load_batch(helpers.image_paths(6))
with torch.no_grad():
    V, valid, grid = model.encode(images, image_mask)  # Eq. 1
h = soho.vq_lookup(V.reshape(-1, V.shape[-1]), D).view(V.shape[:2])  # Eq. 2: [B, l]
print(f"D: {tuple(D.shape)} = [k, c]   V: {tuple(V.shape)}   h: {tuple(h.shape)}, dtype {h.dtype}")
print("entries chosen by the real tokens of these images:", sorted(h[valid].unique().tolist()))
'''),
    md('''
Each token labelled and coloured by its index $h_i$. Neighbouring cells often share an index, which is why
masked visual modeling masks by index rather than by token (notebook 07).
'''),
    code('''
used = h[valid].unique()
fig, axes = plt.subplots(2, 3, figsize=(9, 6.4))
for b, ax in enumerate(axes.flat):
    labels = [int(j) if ok else None for j, ok in zip(h[b], valid[b])]
    colors = [c if ok else (0, 0, 0, 0) for c, ok in zip(helpers.entry_colors(h[b], used), valid[b])]
    helpers.show_tokens(ax, pil[b], grid, labels=labels, colors=colors)
plt.suptitle("h_i = argmin_j ||v_i - d_j|| for every visual token")
plt.tight_layout()
'''),
    md('''
One token seen from the dictionary's side: its Euclidean distance to each of the $k$ entries (computed
directly with `torch.cdist`, as a check), sorted. Eq. 2 takes the smallest.
'''),
    code('''
i = int(valid[0].nonzero()[len(valid[0].nonzero()) // 2])  # a token in the middle of image 0
dist = torch.cdist(V[0, i][None].double(), D.double())[0]  # ||v_i - d_j||_2 for every j
order = dist.argsort()
fig, ax = plt.subplots(figsize=(8, 2.6))
ax.bar(range(len(dist)), dist[order].numpy(), width=1.0, color="lightgray")
ax.bar([0], [dist[order[0]].item()], width=1.0, color="tab:red", label=f"nearest: entry {int(order[0])} = h_i")
ax.set_xlabel("entries j, sorted by distance"); ax.set_ylabel("||v_i - d_j||")
ax.set_title(f"token {i} of image 0: Eq. 2 picks entry {int(h[0, i])}")
ax.legend(loc="lower right");
'''),
    md('## What this notebook claims'),
    code('''
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
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["03_eq3_vd_embed"] = [
    md(r'''
# Eq. 3: the visual dictionary embedding

> "We define visual dictionary embedding as a mapping function f, which maps $v_i$ to $\mathcal{D}$ by:
> $$f(v_i) = d_{h_i}, \tag{3}$$
> which uses the nearest embedding vector to represent the visual feature. We denote $f^{-1}(j)$ as an inverse
> mapping function, which maps the index j back to a group of visual features." (Sec. 3.2)

In `soho.py` this is `vd_embed(h, dictionary)`: a row lookup, `dictionary[h]`. Together with Eq. 2 it replaces
every visual token by its nearest dictionary entry, so the transformer sees at most $k$ distinct visual vectors,
a "visual vocabulary" as it sees $|vocab|$ distinct word vectors.
'''),
    SETUP,
    code('''
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
'''),
    md('''
$\\mathcal{V}$ and $f(\\mathcal{V})$ side by side, each token drawn as the RGB of its first three principal
components (one basis, fitted on the real tokens). $f$ is constant on each group $f^{-1}(j)$: tokens with one
index get one colour.
'''),
    code('''
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
'''),
    md('The inverse mapping: the size $|f^{-1}(j)|$ of each group over these six images.'),
    code('''
sizes = torch.bincount(h[valid], minlength=D.shape[0])
used = sizes.nonzero()[:, 0]
fig, ax = plt.subplots(figsize=(7, 2.4))
ax.bar([str(int(j)) for j in used], sizes[used].numpy(), color="tab:blue")
ax.set_xlabel("entry j"); ax.set_ylabel("|f^-1(j)|")
ax.set_title(f"{len(used)} of k = {D.shape[0]} entries represent the {int(valid.sum())} real tokens");
'''),
    md('## What this notebook claims'),
    code('''
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
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["04_eq4_ema_update"] = [
    md(r'''
# Eq. 4: the momentum update of the visual dictionary

> "The visual dictionary $\mathcal{D}$ is randomly initialized, and further updated by a moving average operation
> in one mini-batch, which is denoted as:
> $$\hat{d}_j = \gamma * d_j + (1 - \gamma) * \frac{\sum_{h_i = j} v_i}{|f^{-1}(j)|}, \tag{4}$$
> where $\hat{d}_j$ indicates the updated embedding vector of $d_j$, and $\gamma$ is a momentum coefficient whose
> value range is [0,1]. Note that Eqn. 4 will only be applied when $|f^{-1}(j)| \neq 0$." (Sec. 3.2)

In `soho.py` this is `ema_update(dictionary, v, h, gamma)`: it returns a new dictionary and leaves the entries
that no feature chose as they were. The dictionary gets no gradient; Eq. 4 is the only thing that changes it.
`train.py` applies it once per optimizer step (`VisualDictionary.accumulate` per forward, then `update`), with
the model's `vd_gamma` = 0.9.
'''),
    SETUP,
    md('A worked example in two dimensions: three entries, three features, $\\gamma = 0.9$.'),
    code('''
D = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])  # k = 3 entries d_0, d_1, d_2
v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 1.0]])  # 3 features
h = soho.vq_lookup(v, D)  # Eq. 2
D_new = soho.ema_update(D, v, h, gamma=0.9)  # Eq. 4
print("h =", h.tolist(), "  (entry 2 is chosen by no feature)")
for j in range(3):
    print(f"d_{j}: {D[j].tolist()} -> {[round(x, 4) for x in D_new[j].tolist()]}")
'''),
    md(r'''
$\hat d_0 = 0.9 \cdot (0,0) + 0.1 \cdot \tfrac{(1,0) + (0,1)}{2} = (0.05, 0.05)$,
$\hat d_1 = 0.9 \cdot (4,0) + 0.1 \cdot (5,1) = (4.1, 0.1)$, and $d_2$ stays where it was.

Now real features: the tokens of 24 synthetic images from the pre-trained encoder, held fixed, and a
dictionary that starts as the model's does, `torch.randn(k, c)`. Alternating Eq. 2 and Eq. 4 on this one
batch is an online k-means with momentum: the chosen entries drift towards the features they represent.
'''),
    code('''
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
'''),
    md('''
Left: the features (grey) and the dictionary in the plane of the features' first two principal components.
Each chosen entry leaves a trail from its random start (x) to where Eq. 4 took it (dot); entries never chosen
(small blue dots) do not move. Right: the quantisation error falls at every step.
'''),
    code('''
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
'''),
    md('''
Most of the random entries are never chosen: they lie far from every feature, and Eq. 4 moves only chosen
entries, so they stay dead for good. The paper freezes the ResNet for the first epochs
(`freeze_backbone_epochs`) so that the chosen entries can settle, but that does not revive the others. Beyond
the paper, `soho.py` offers two remedies from the VQ literature: `vd_init="features"` starts the entries from a
k-means of the first step's features (`kmeans_init`; the tiny preset's default), and `vd_restart_after=N`
moves an entry unused for N updates onto a current feature (`restart_dead_entries`). The README's "Differences"
table gives their measured use of the entries and why the tiny preset starts from features but does not restart.

## What this notebook claims
'''),
    code('''
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
print("all claims hold")
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["05_eq5_straight_through"] = [
    md(r'''
# Eq. 5: the straight-through gradient

> "Since the argmin operation is not differentiable, the gradient back propagation will be stopped by the visual
> dictionary. To make the visual feature encoder trainable, we follow [41] to update $f(v_i)$ by:
> $$f(v_i) = sg[d_{h_i} - v_i] + v_i, \tag{5}$$
> where $sg[\cdot]$ is the stop gradient operator." (Sec. 3.2)

In `soho.py` this is `straight_through(v, d)`, written `(d - v).detach() + v`. Forward, the value is $d_{h_i}$
(Eq. 3); backward, the bracket is a constant, so $\partial f / \partial v = I$: the gradient that arrives at
$f(v_i)$ is passed to $v_i$ unchanged, and nothing reaches the dictionary.
'''),
    SETUP,
    md('One dimension first: a dictionary of four scalars and a sweep of $v$.'),
    code('''
D = torch.tensor([[-1.2], [-0.3], [0.4], [1.3]])  # k = 4, c = 1
v = torch.linspace(-2, 2, 401)[:, None].requires_grad_()
h = soho.vq_lookup(v, D)  # Eq. 2
d = soho.vd_embed(h, D)  # Eq. 3: the value, but no gradient path to v
f = soho.straight_through(v, d)  # Eq. 5
f.sum().backward()
print("d.requires_grad:", d.requires_grad, "  f.requires_grad:", f.requires_grad)
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3))
ax.plot(v.detach(), f.detach(), label="forward: f(v) = d_h (a staircase)")
ax.plot(v.detach(), v.detach(), "--", c="gray", label="what backward differentiates: v")
ax.plot(D[:, 0], D[:, 0], "ko", ms=4, label="entries d_j")
ax.set_xlabel("v"); ax.legend(fontsize=7)
ax2.plot(v.detach(), v.grad, c="tab:green")
ax2.set_ylim(-0.1, 1.2); ax2.set_xlabel("v"); ax2.set_title("d f / d v through Eq. 5: 1 everywhere")
plt.tight_layout()
'''),
    md('''
Now the model. One visual token of one image; a loss on its VD embedding alone, $L = u \\cdot f(v_i)$ with a
random direction $u$. Without Eq. 5 the token's value $d_{h_i}$ has no path back to the image. With it, the
gradient reaches $v_i$ as exactly $u$, and from there every pixel in the token's receptive field.
'''),
    code('''
model, ckpt = train.load_model(helpers.pretrained())
images, image_mask, pil = helpers.load_batch(helpers.image_paths(2))
images.requires_grad_()
V, valid, grid = model.encode(images, image_mask)  # Eq. 1, with gradient
V.retain_grad()
h, d = model.visual_dictionary.lookup(V)  # Eq. 2, 3
print("without Eq. 5: d requires grad?", d.requires_grad)
tokens = soho.straight_through(V, d)  # Eq. 5
i = grid[1] + 1  # the token in row 1, column 1
u = torch.randn(V.shape[-1])
L = (tokens[0, i] * u).sum()
L.backward()
print("with Eq. 5: dL/dv_i == u ?", torch.equal(V.grad[0, i], u))
'''),
    code('''
pixel_grad = images.grad[0].abs().sum(0)  # [H, W]
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
r, col = divmod(i, grid[1])
helpers.show_tokens(axes[0], pil[0], grid, labels=[("$v_i$" if k == i else None) for k in range(grid[0] * grid[1])],
                    title=f"token {i}: its 64x64 cell")
axes[1].imshow(pixel_grad.log1p(), cmap="magma")
axes[1].add_patch(plt.Rectangle((col * 64, r * 64), 64, 64, fill=False, ec="c", lw=1.5))
axes[1].set_xlim(0, grid[1] * 64); axes[1].set_ylim(grid[0] * 64, 0)
axes[1].set_title("|dL/dI| per pixel, through Eq. 5"); axes[1].set_xticks([]); axes[1].set_yticks([])
plt.tight_layout()
'''),
    md('## What this notebook claims'),
    code('''
# forward: the value is the dictionary entry (Eq. 3), up to the rounding of (d - v) + v
torch.testing.assert_close(tokens, d, rtol=0, atol=1e-5)
# backward: the gradient passes to v unchanged: d f / d v = 1 (1-D), and dL/dv_i = u for the model's token
assert torch.equal(v.grad, torch.ones_like(v.grad))
assert torch.equal(V.grad[0, i], u) and V.grad[0, torch.arange(V.shape[1]) != i].abs().sum() == 0
# ... and on to the pixels, while Eq. 3 alone has no gradient path at all
assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() == 0
assert not d.requires_grad
# nothing reaches the dictionary, even one that asks for a gradient
D_param = D.clone().requires_grad_()
x = torch.randn(5, 1, requires_grad=True)
soho.straight_through(x, soho.vd_embed(soho.vq_lookup(x, D_param), D_param)).sum().backward()
assert D_param.grad is None and torch.equal(x.grad, torch.ones_like(x))
print("all claims hold")
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["06_eq6_mlm"] = [
    md(r'''
# Eq. 6: masked language modeling

> "The goal of MLM is to predict the masked word tokens based on other word tokens $\mathcal{W}_{\backslash i}$
> and all image features $f(\mathcal{V})$ by minimizing the negative log-likelihood. The learning target can be
> formulated as:
> $$\mathcal{L}_{\text{MLM}} = -\mathbb{E}_{(\mathcal{W}, f(\mathcal{V})) \sim D} \log p(w_i | \mathcal{W}_{\backslash i}, f(\mathcal{V})), \tag{6}$$
> where D indicate hereinafter the whole training dataset. We adopt the same masking strategy used in BERT [10]."
> (Sec. 3.3)

Two pieces: `data.mask_tokens` does BERT's masking (15% of the real words are chosen; of those 80% become
`[MASK]`, 10% a random word, 10% stay) and writes the labels; `SOHO.pretrain_losses` returns the MLM term: the
summed $-\log p(w_i \mid \dots)$ over the chosen words, from a head whose decoder is the word embedding matrix.
As in the paper's official code, only captions that match their image are masked.
'''),
    SETUP,
    code('''
tok = helpers.tokenizer()
captions = ["a big red circle is left of a small blue square", "two yellow stars on a gray background",
            "the green triangle in the top right corner", "a purple diamond placed above an orange circle"]
ids, mask = tok.encode_batch(captions)
masked, labels = data.mask_tokens(ids, mask, tok, prob=0.15, generator=torch.Generator().manual_seed(20))
for row in range(len(captions)):
    print(" ".join(tok.tokens[t] for t in masked[row][mask[row]]))
'''),
    md('''
The same rows, token by token (the seed was picked to show all three cases): grey tokens are not predicted;
coloured ones carry a label (the original word, written below) and were replaced by `[MASK]`, by a random word,
or kept.
'''),
    code('''
kind = torch.zeros_like(ids)  # 0 not chosen, 1 [MASK], 2 random word, 3 kept
chosen = labels != -100
kind[chosen & (masked == tok.mask_id)] = 1
kind[chosen & (masked != tok.mask_id) & (masked != ids)] = 2
kind[chosen & (masked == ids)] = 3
colours = {0: "whitesmoke", 1: "orange", 2: "tomato", 3: "mediumseagreen"}
fig, ax = plt.subplots(figsize=(10, 2.8))
for row in range(len(captions)):
    for col in range(int(mask[row].sum())):
        ax.add_patch(plt.Rectangle((col, -row - 1), 0.95, 0.9, color=colours[int(kind[row, col])]))
        ax.text(col + 0.47, -row - 0.45, tok.tokens[masked[row, col]], ha="center", va="center", fontsize=7)
        if chosen[row, col]:
            ax.text(col + 0.47, -row - 0.85, tok.tokens[labels[row, col]], ha="center", fontsize=6, color="navy")
ax.set_xlim(0, ids.shape[1]); ax.set_ylim(-len(captions) - 0.1, 0); ax.axis("off")
ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in (1, 2, 3)],
          labels=["[MASK]", "random word", "kept"], loc="upper right", bbox_to_anchor=(1.0, 1.25), ncol=3);
'''),
    md('Over all captions of the synthetic pre-training set, the proportions are BERT\'s:'),
    code('''
cfg = soho.config_from_preset("tiny", vocab_size=tok.vocab_size)
dataset = data.build_dataset("pretrain", "train", helpers.world(), tok, cfg, seed=0)
all_ids, all_mask = tok.encode_batch([dataset.captions[k] for k in range(len(dataset.captions))])
m_ids, m_labels = data.mask_tokens(all_ids, all_mask, tok, generator=torch.Generator().manual_seed(0))
special = torch.isin(all_ids, torch.tensor(tok.special_ids))
candidates = all_mask & ~special
picked = m_labels != -100
share_chosen = (picked.sum() / candidates.sum()).item()
shares = [((picked & (m_ids == tok.mask_id)).sum() / picked.sum()).item(),
          ((picked & (m_ids != tok.mask_id) & (m_ids != all_ids)).sum() / picked.sum()).item(),
          ((picked & (m_ids == all_ids)).sum() / picked.sum()).item()]
print(f"{len(all_ids)} captions, {int(candidates.sum())} words: {share_chosen:.1%} chosen "
      "(15%, plus at least one per caption)")
print("of the chosen: [MASK] {:.1%}, random word {:.1%}, kept {:.1%}".format(*shares))
'''),
    md('''
The MLM term on a pre-training batch of 8 images (4 texts each, the first 2 matched), for a model at
initialisation and for the briefly pre-trained one. At initialisation the loss is about $\\ln|vocab|$: every
word is equally likely.
'''),
    code('''
batch = dataset.collate([dataset[i] for i in range(8)])
pretrained, ckpt = train.load_model(helpers.pretrained())
fresh = soho.SOHO(soho.SOHOConfig(**ckpt["model_config"])).eval()
results = {}
with torch.no_grad():
    for name, m in (("initialisation", fresh), ("pre-trained", pretrained)):
        mlm = m.pretrain_losses(batch, generator=torch.Generator().manual_seed(0))["mlm"]  # a LossTerm
        results[name] = mlm
        print(f"{name:15s} L_MLM = {mlm.mean:.3f} over {int(mlm.count)} masked words, "
              f"{int(mlm.correct)} predicted right")
print(f"ln |vocab| = {math.log(tok.vocab_size):.3f}")
'''),
    md('The MLM loss and accuracy during the pre-training run (train.py\'s log, a mean over every 5 steps):'),
    code('''
log = helpers.read_log(helpers.pretrained())
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(log["step"], log["mlm"], "o-", ms=3, label="L_MLM")
ax.set_xlabel("step"); ax.set_ylabel("L_MLM")
ax2 = ax.twinx()
ax2.plot(log["step"], log["mlm_acc"], "s--", ms=3, c="tab:orange", label="accuracy")
ax2.set_ylabel("accuracy on masked words")
fig.legend(loc="upper center", ncol=2);
'''),
    md('## What this notebook claims'),
    code('''
# BERT's masking: special tokens and padding are never chosen; labels are the original ids exactly there
assert not (picked & ~candidates).any()
assert torch.equal(m_labels[picked], all_ids[picked])
assert 0.13 < share_chosen < 0.25
assert abs(shares[0] - 0.8) < 0.05 and abs(shares[1] - 0.1) < 0.04 and abs(shares[2] - 0.1) < 0.04
# in a pre-training batch only matched captions are masked, and the MLM term counts exactly their labels
matched = batch["itm_label"] == 1
assert (batch["mlm_labels"][~matched] == -100).all() and (batch["mlm_labels"][matched] != -100).any(1).all()
assert int(results["pre-trained"].count) == int((batch["mlm_labels"] != -100).sum())
# at initialisation every word is about equally likely; pre-training lowers the loss by a lot
assert abs(results["initialisation"].mean.item() - math.log(tok.vocab_size)) < 0.5
assert results["pre-trained"].mean < results["initialisation"].mean - 0.75
print("all claims hold")
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["07_eq7_mvm_mask_by_index"] = [
    md(r'''
# Eq. 7: masked visual modeling, and `mask_by_index`

> "$$\mathcal{L}_{\text{MVM}} = -\mathbb{E}_{(\mathcal{W}, f(\mathcal{V})) \sim D} \log p(f(v_j) | \mathcal{W}, f(\mathcal{V})_{\setminus j}). \tag{7}$$
> [...] When an image feature $v_i$ is masked, its mapping index $h_i$ in VD is considered as its label. In visual
> feature maps, neighbor features may have similar values, and thus share the same mapping index. This will cause
> the model to directly copy the label from surrounding features as predictions in a lazy way. To prevent this,
> in the masking stage, we first randomly select an existing label index j, then replace all visual embedding
> vectors in $f^{-1}(j)$ with the special [MASK] token embedding vector." (Sec. 3.3)

In `soho.py` the masking is `mask_by_index(h, valid, prob, generator)`: each sample is chosen with probability
`prob` (the model's `mvm_prob` = 0.3; the paper gives no value); for a chosen sample one index $j$ is drawn
among those present in its image, and every token with that index is masked. `SOHO.pretrain_losses` replaces
the masked tokens by a learned [MASK] vector and predicts their index $h_i$ out of $k$ (the MVM term).
'''),
    SETUP,
    code('''
model, ckpt = train.load_model(helpers.pretrained())
images, image_mask, pil = helpers.load_batch(helpers.image_paths(6))
with torch.no_grad():
    V, valid, grid = model.encode(images, image_mask)
h, _ = model.visual_dictionary.lookup(V)  # Eq. 2: the labels of MVM
mvm_mask = soho.mask_by_index(h, valid, prob=1.0, generator=torch.Generator().manual_seed(0))
for b in range(len(pil)):
    j = h[b][mvm_mask[b]].unique().tolist()
    print(f"image {b}: index {j} drawn, {int(mvm_mask[b].sum())} of {int(valid[b].sum())} tokens masked")
'''),
    md('''
With `prob=1` every image gets masked. Each cell shows its index; hatched cells are masked: all cells that
share the drawn index, wherever they are in the image.
'''),
    code('''
used = h[valid].unique()
fig, axes = plt.subplots(2, 3, figsize=(9, 6.4))
for b, ax in enumerate(axes.flat):
    labels = [int(j) if ok else None for j, ok in zip(h[b], valid[b])]
    colors = [c if ok else (0, 0, 0, 0) for c, ok in zip(helpers.entry_colors(h[b], used), valid[b])]
    drawn = int(h[b][mvm_mask[b]][0])
    helpers.show_tokens(ax, pil[b], grid, labels=labels, colors=colors, hatch=mvm_mask[b].tolist(),
                        title=f"masked: all tokens with index {drawn}")
plt.tight_layout()
'''),
    md('''
Why by index: if single tokens were masked, a masked token would often have a visible neighbour with the same
index, and the label could be copied from it. Over many draws, the share of masked tokens that have a visible
4-neighbour with their own index:
'''),
    code('''
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
'''),
    md('''
Inside pre-training. `pretrain_losses` draws the MVM mask with `mask_by_index` over all pairs, with
`prob = mvm_prob` (passing the same generator reproduces it), and takes the loss on the matched pairs only:
were only matched pairs masked, a visual [MASK] would tell ITM which pairs match. The MVM term is a $k$-way
classification of each masked token's index.
'''),
    code('''
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
'''),
    md('## What this notebook claims'),
    code('''
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
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["08_eq8_itm"] = [
    md(r'''
# Eq. 8: image-text matching

> "We apply a binary classifier $\phi(\cdot)$ on the joint embedding feature of [CLS] token to predict whether the
> input image and text are matched or not. ITM task is driven by the following loss function:
> $$\mathcal{L}_{\text{ITM}} = -\mathbb{E}_{(\mathcal{W}, f(\mathcal{V})) \sim D} \log p(y | \phi(\mathcal{W}, f(\mathcal{V}))), \tag{8}$$
> where $y \in \{0, 1\}$ indicates whether the image and text is matched (y = 1) or not (y = 0)." (Sec. 3.3)

$\phi$ is `SOHO.itm_head`, a linear layer on the pooled [CLS] state; `SOHO.pretrain_losses` returns the ITM term
and `SOHO.itm_scores` the per-pair $\log p(y = 1)$. Each image of a pre-training batch comes with four texts:
two of its captions ($y = 1$) and two captions of random other images ($y = 0$). A random caption is distributed
exactly like a matched one, so only the image can tell them apart (the "hard" negatives of
`itm_negatives="hard"` are not: a model that never sees the image learns to spot them by their wording).
'''),
    SETUP,
    code('''
model, ckpt = train.load_model(helpers.pretrained())
dataset = data.build_dataset("pretrain", "train", ckpt["data_root"], helpers.tokenizer(ckpt), model.config, seed=0)
batch = dataset.collate([dataset[i] for i in range(8)])
for row in range(4):
    print(f"y = {int(batch['itm_label'][row])}  (caption of image {int(batch['text_source'][row])}): "
          f"{batch['texts'][row]}")
'''),
    md('''
`itm_scores` scores each (visual tokens, text) row pair. Pre-training feeds the transformer $f(\\mathcal{V})$,
so we ask `image_tokens` for the VD features too (`downstream_use_vd`; downstream tasks use the features before
the VD, Sec. 4.2).
'''),
    code('''
model.config.downstream_use_vd = True  # score f(V), as pre-training does

def p_match(m):
    m.eval()
    with torch.no_grad():
        visual, visual_mask = m.image_tokens(batch["images"], batch["image_mask"])
        idx = batch["img_index"]
        return m.itm_scores(visual[idx], visual_mask[idx], batch["input_ids"], batch["text_mask"]).exp()

before = p_match(model)
with torch.no_grad():
    itm0 = model.pretrain_losses(batch, generator=torch.Generator().manual_seed(0))["itm"]
print(f"L_ITM = {itm0.mean:.3f} (ln 2 = {math.log(2):.3f}), {int(itm0.correct)} of {int(itm0.count)} pairs right")
'''),
    md('''
One minute of pre-training is not enough to learn ITM on this world ($L_{ITM} \\approx \\ln 2$). To watch Eq. 8 at
work, we minimise it alone on this one batch for 30 steps: the classifier learns to tell this batch's pairs
apart (mostly by memorising its captions, which is all one batch can teach).
'''),
    code('''
torch.manual_seed(0)
model.train()
trainable = [p for n, p in model.named_parameters() if not n.startswith("backbone")]
optimizer = torch.optim.AdamW(trainable, lr=1e-3)
curve = []
for step in range(30):
    itm = model.pretrain_losses(batch)["itm"]  # Eq. 8 as a LossTerm: summed -log p(y | phi), count, correct
    optimizer.zero_grad()
    itm.mean.backward()
    optimizer.step()
    curve.append(itm.mean.item())
after = p_match(model)
print(f"L_ITM: {curve[0]:.3f} -> {curve[-1]:.3f}")
'''),
    code('''
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [1, 2]})
ax.plot(curve); ax.axhline(math.log(2), ls="--", c="gray"); ax.text(0, math.log(2) + 0.02, "ln 2")
ax.set_xlabel("step"); ax.set_ylabel("L_ITM"); ax.set_title("Eq. 8 on one batch")
x = torch.arange(len(after))
colours = ["tab:green" if y == 1 else "tab:red" for y in batch["itm_label"]]
ax2.bar(x, before, color="lightgray", label="before")
ax2.scatter(x, after, c=colours, zorder=3, s=18, label="after (green: y = 1, red: y = 0)")
ax2.set_xticks(range(2, len(after), 4), [f"image {i}" for i in range(len(after) // 4)], fontsize=7)
ax2.set_ylabel("p(y = 1)"); ax2.legend(fontsize=7, loc="center right")
plt.tight_layout()
'''),
    md('## What this notebook claims'),
    code('''
labels, source = batch["itm_label"], batch["text_source"]
# every image has 2 matched and 2 mismatched texts, and a mismatched text is never a caption of its own image
assert torch.equal(labels.view(-1, 4).sum(1), torch.full((8,), 2))
assert (source[labels == 1] == batch["img_index"][labels == 1]).all()
assert (source[labels == 0] != batch["img_index"][labels == 0]).all()
# the ITM term covers every pair; before this notebook's training it is at chance
assert int(itm0.count) == len(labels) and abs(itm0.mean.item() - math.log(2)) < 0.15
# minimising Eq. 8 separates the batch: each image's matched texts score above its mismatched ones
assert curve[-1] < 0.3
for i in range(8):
    s, y = after[4 * i:4 * i + 4], labels[4 * i:4 * i + 4]
    assert s[y == 1].min() > s[y == 0].max(), i
print("all claims hold")
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["09_eq9_pretraining_objective"] = [
    md(r'''
# Eq. 9: the pre-training objective

> "The visual feature encoder, VD-based image embedding module and the cross-modal Transformer is end-to-end
> jointly trainable. We assign equal loss weight to the three pre-training objectives, and thus the full
> pre-training objective of SOHO is:
> $$\mathcal{L}_{Pre-training} = \mathcal{L}_{MLM} + \mathcal{L}_{MVM} + \mathcal{L}_{ITM}. \tag{9}$$" (Sec. 3.3)

In `soho.py` this is `pretraining_objective(mlm, mvm, itm)`. `train.pretraining_loss` calls it with each term
averaged over its targets (masked words, masked visual tokens, text-image pairs) on all ranks. Below: a
pre-training run of the tiny model with `train.py`, then one step taken apart.
'''),
    SETUP,
    code('''
ckpt_path = helpers.pretrained()  # train.main(...) with the arguments printed below, unless already done
log = helpers.read_log(ckpt_path)
run = __import__("json").load(open(ckpt_path.replace("ckpt.pt", "config.json")))
print(f"{run['steps_per_epoch']} steps per epoch, the ResNet frozen for the first "
      f"{run['train']['freeze_backbone_epochs']} epoch(s)")
print("step ", " ".join(f"{x:6d}" for x in log["step"]))
for k in ("loss", "mlm", "mvm", "itm"):
    print(f"{k:5s}", " ".join(f"{x:6.2f}" for x in log[k]))
'''),
    code('''
fig, ax = plt.subplots(figsize=(7, 3.4))
ax.stackplot(log["step"], log["mlm"], log["mvm"], log["itm"], labels=["L_MLM", "L_MVM", "L_ITM"], alpha=0.7)
ax.plot(log["step"], log["loss"], "k.-", label="L_Pre-training (Eq. 9)")
frozen = run["steps_per_epoch"] * run["train"]["freeze_backbone_epochs"]
ax.axvline(frozen, ls="--", c="gray"); ax.text(frozen + 0.5, max(log["loss"]) * 0.95, "ResNet unfrozen", fontsize=8)
ax.set_xlabel("step (each point: mean of 5 steps)"); ax.set_ylabel("loss"); ax.legend(fontsize=8)
ax.set_title("tiny SOHO, synthetic world, 16 images x 4 texts per step");
'''),
    md('''
One step taken apart: the three terms of a batch, Eq. 9, and the gradient of the sum reaching every part of
the model: the ResNet (through Eq. 5), the transformer and the three heads. The dictionary gets none; Eq. 4
moves it after the step.
'''),
    code('''
model, ckpt = train.load_model(ckpt_path)
dataset = data.build_dataset("pretrain", "train", ckpt["data_root"], helpers.tokenizer(ckpt), model.config, seed=0)
batch = dataset.collate([dataset[i] for i in range(8)])
out = model.pretrain_losses(batch, generator=torch.Generator().manual_seed(0))
L = soho.pretraining_objective(out["mlm"].mean, out["mvm"].mean, out["itm"].mean)  # Eq. 9
L_train, stats = train.pretraining_loss(out, world_size=1, itm_label=batch["itm_label"])  # what train.py minimises
print(" + ".join(f"L_{k.upper()} {out[k].mean:.3f}" for k in ("mlm", "mvm", "itm")), f"= {L:.3f}")
L.backward()
grads = {name: model.get_submodule(name).weight.grad.norm().item()
         for name in ("backbone.conv1", "projection", "transformer.layers.0.query", "mlm_transform.dense",
                      "mvm_classifier", "itm_head")}
for name, g in grads.items():
    print(f"|grad| {name:28s} {g:.3g}")
'''),
    md('## What this notebook claims'),
    code('''
# Eq. 9: equal weights, a plain sum; train.py's loss is exactly this on one process
assert soho.pretraining_objective(1.0, 2.0, 4.0) == 7.0
torch.testing.assert_close(L_train, L)
torch.testing.assert_close(L, out["mlm"].mean + out["mvm"].mean + out["itm"].mean)
# the logged loss is the sum of the logged terms, and it fell during the run
for row in range(len(log["step"])):
    assert abs(log["loss"][row] - (log["mlm"][row] + log["mvm"][row] + log["itm"][row])) < 1e-6
assert log["loss"][-1] < log["loss"][0] - 2.0
# end-to-end: one backward reaches the encoder, the transformer and every head, but not the dictionary
assert all(g > 0 for g in grads.values()), grads
assert model.visual_dictionary.embed.grad is None and not model.visual_dictionary.embed.requires_grad
print("all claims hold")
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["10_downstream_end_to_end"] = [
    md(r'''
# A downstream task end to end: visual entailment (SNLI-VE)

> "Visual Entailment (VE) is a fine-grained visual reasoning task to predict whether an image semantically
> entails a text. [...] We follow UNITER [7] to treat the VE task as a three-way classification problem and
> predict the scores of each class by a fully-connected layer on the representation of the [CLS] token from the
> output of the Transformer." (Sec. 4.2.4)

Each example is an image (the premise) and a hypothesis sentence, labelled entailment, neutral or contradiction.
`SOHO.task_logits("snli-ve", batch)` feeds the image's visual tokens and the hypothesis to the transformer and
classifies the pooled [CLS] state with `snli_ve_head` (UNITER's two-layer head). Downstream, the visual tokens
are the encoder's features before the VD: "For downstream tasks, we find that using input features of the VD
module for visual representation is better than directly applying VD embedding" (Sec. 4.2).

The whole path on the synthetic world: the pre-trained tiny model, fine-tuned with `train.py --task snli-ve`,
evaluated on the held-out dev and test splits with `SOHO.task_logits`.
'''),
    SETUP,
    code('''
world = helpers.world()
pretrained = helpers.pretrained()
tok = helpers.tokenizer()
cfg = soho.config_from_preset("tiny", vocab_size=tok.vocab_size)
train_set = data.build_dataset("snli-ve", "train", world, tok, cfg, seed=0)
LABELS = ["entailment", "neutral", "contradiction"]
first = {}
for i in range(30):  # the first example of each label
    first.setdefault(int(train_set.labels[i]), i)
examples = train_set.collate([train_set[first[y]] for y in range(3)])
fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
for y, ax in enumerate(axes):
    ax.imshow(helpers.unnormalize(examples["images"][y]))
    ax.set_title(tok.decode(examples["input_ids"][y]) + f"\\n-> {LABELS[int(examples['labels'][y])]}", fontsize=8)
    ax.axis("off")
plt.tight_layout()
'''),
    md('Fine-tuning from the pre-trained checkpoint: 4 epochs of 9 steps of 32 examples, the rates x0.1 for the last.'),
    code('''
argv = ["--task", "snli-ve", "--init", pretrained, "--data", world, "--batch_per_gpu=32", "--global_batch=32",
        "--epochs=4", "--lr=5e-4", "--lr_milestones=3", "--warmup_steps=5", "--num_workers=0", "--log_every=3"]
finetuned = helpers.train_once("snli-ve", argv)
log = helpers.read_log(finetuned)
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(log["step"], log["loss"], "o-", ms=3, label="cross-entropy")
ax.plot(log["step"], log["acc"], "s--", ms=3, label="training accuracy")
ax.axhline(1 / 3, c="gray", ls=":", label="chance")
ax.set_xlabel("step"); ax.legend(fontsize=8);
'''),
    md('Evaluation on the dev and test splits, images and hypotheses the model has not seen:'),
    code('''
model, ckpt = train.load_model(finetuned)
tok = helpers.tokenizer(ckpt)
predictions, truth, examples = [], [], []
for split in ("dev", "test"):
    split_set = data.build_dataset("snli-ve", split, ckpt["data_root"], tok, model.config, seed=0)
    loader = torch.utils.data.DataLoader(split_set, batch_size=16, collate_fn=split_set.collate)
    with torch.no_grad():
        for batch in loader:
            logits = model.task_logits("snli-ve", batch)  # [B, 3]
            predictions.append(logits.argmax(1))
            truth.append(batch["labels"])
            for image, real, ids in zip(batch["images"], batch["image_mask"], batch["input_ids"]):
                height, width = int(real.any(1).sum()), int(real.any(0).sum())  # without the batch padding
                examples.append((image[:, :height, :width], tok.decode(ids)))
predictions, truth = torch.cat(predictions), torch.cat(truth)
accuracy = (predictions == truth).float().mean().item()
confusion = torch.zeros(3, 3, dtype=torch.long)
confusion.index_put_((truth, predictions), torch.ones_like(truth), accumulate=True)
print(f"accuracy on {len(truth)} held-out examples: {accuracy:.1%} (chance 33%)")
'''),
    code('''
fig = plt.figure(figsize=(11, 3.2))
ax = fig.add_subplot(1, 5, 1)
ax.imshow(confusion, cmap="Blues")
for (r, c), n in zip(((r, c) for r in range(3) for c in range(3)), confusion.flatten().tolist()):
    ax.text(c, r, n, ha="center", va="center")
ax.set_xticks(range(3), ["ent", "neu", "con"]); ax.set_yticks(range(3), ["ent", "neu", "con"])
ax.set_xlabel("predicted"); ax.set_ylabel("true")
for k, n in enumerate((0, 13, 26, 39)):  # four examples of four different images
    (image, text), y, p = examples[n], int(truth[n]), int(predictions[n])
    ax = fig.add_subplot(1, 5, k + 2)
    ax.imshow(helpers.unnormalize(image))
    ax.set_title(f"{text}\\ntrue {LABELS[y]}, predicted {LABELS[p]}", fontsize=7, wrap=True)
    ax.axis("off")
plt.tight_layout()
'''),
    md('''
Read the confusion matrix before the accuracy. The synthetic world's neutral hypotheses have a wording of
their own ("someone is about to ...", "made of wood"), so the text alone gives them away. Telling entailment
from contradiction needs the image (a contradiction is a true statement with one attribute changed); the
bottom two rows show how far a minute of pre-training and a minute of fine-tuning got with that.

## What this notebook claims
'''),
    code('''
# fine-tuning lowered the loss, and the model does better than chance on examples it has not seen
assert log["loss"][-1] < log["loss"][0]
assert accuracy > 0.45, accuracy
assert confusion.sum() == len(truth) and ckpt["task"] == "snli-ve"
print("all claims hold")
'''),
]

# ----------------------------------------------------------------------------------------------------------------
NOTEBOOKS["11_visual_dictionary_pictures"] = [
    md(r'''
# The visual dictionary in pictures (Fig. 3 and 4)

> "As introduce in Sec 3.2, a VD index is correlated with many visual features, where each visual feature
> corresponds to an image patch. We randomly sample some indices from VD and visualize their corresponding image
> patches. As shown in Figure 3, the VD groups meaningful and consistent image patches into different indices,
> which reflects an abstraction of visual semantics." (Sec. 4.5)

The same picture for the tiny model pre-trained for a minute on the synthetic world: every visual token of the
held-out images is one 64x64 patch; Eq. 2 gives its index; the patches are grouped by index. A minute of
training uses only a handful of the $k$ entries (the tiny run's `vd_used`), so we draw the most used ones
rather than a random sample. Black in a patch is padding: the cells of the last row or column may reach past
the image.
'''),
    SETUP,
    code('''
model, ckpt = train.load_model(helpers.pretrained())
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
'''),
    code('''
top = counts.argsort(descending=True)[:8]
g = torch.Generator().manual_seed(0)
fig, axes = plt.subplots(len(top), 9, figsize=(9, 8.4), gridspec_kw={"width_ratios": [1.6] + [1] * 8})
for row, j in enumerate(top.tolist()):
    members = (indices == j).nonzero()[:, 0]
    pick = members[torch.randperm(len(members), generator=g)[:8]]
    axes[row, 0].text(0.5, 0.5, f"entry {j}\\n{int(counts[j])} patches", ha="center", va="center", fontsize=8)
    for col in range(9):
        axes[row, col].axis("off")
    for col, p in enumerate(pick.tolist(), start=1):
        axes[row, col].imshow(patches[p])
plt.suptitle("patches grouped by their visual dictionary index")
plt.tight_layout()
'''),
    code('''
used = counts[counts > 0].sort(descending=True).values
fig, ax = plt.subplots(figsize=(6, 2.4))
ax.bar(range(len(used)), used.numpy())
ax.set_xlabel("entries, most used first"); ax.set_ylabel("patches")
ax.set_title(f"{len(used)} of {model.config.vd_size} entries hold all {len(patches)} patches");
'''),
    md('''
How alike are the patches of one entry? Two measures. In feature space, the grouping is a clustering
("The visual dictionary performs an online clustering on visual feature maps based on feature similarity, and
represents each feature vector by its cluster center", Sec. 3.2): features of one group are closer to each other
than to the features of other groups. In pixels: the share of the patches' colour variance that the index
accounts for, against a random grouping of the same sizes. Expect loose groups after a minute of training;
`python evaluate.py --task vd --checkpoint runs/pretrain/ckpt.pt` draws the same picture for a longer run.
'''),
    code('''
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
'''),
    md('## What this notebook claims'),
    code('''
# every patch sits under its nearest entry (Eq. 2), and the groups cover all patches once
assert torch.equal(soho.vq_lookup(features, model.visual_dictionary.embed), indices)
assert counts.sum() == len(patches) == len(features)
# a clustering by feature similarity: closer within a group than between groups
assert within_dist < between_dist
# the index says something about how a patch looks: more than any of 20 random groupings of the same sizes
assert by_index > by_chance
print("all claims hold")
'''),
]


# ----------------------------------------------------------------------------------------------------------------
# Writing and executing
# ----------------------------------------------------------------------------------------------------------------


def make_notebook(cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for k, (kind, source) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell.id = f"cell-{k:02d}"  # stable ids: rebuilding changes only what changed
        nb.cells.append(cell)
    return nb


def execute(path, timeout=CELL_TIMEOUT):
    """Run a notebook in a fresh kernel with notebooks/ as working directory; returns the executed notebook.
    Raises nbclient.exceptions.CellExecutionError (with the cell and traceback) when a cell fails."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
                            resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="*", help="name prefixes, e.g. 04 09 (default: all)")
    p.add_argument("--execute-only", action="store_true", help="re-execute the .ipynb files as they are")
    p.add_argument("--write-only", action="store_true", help="write the .ipynb files without executing them")
    args = p.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(o) for o in args.only)]
    own_cache = "SOHO_NB_CACHE" not in os.environ
    if own_cache:
        os.environ["SOHO_NB_CACHE"] = tempfile.mkdtemp(prefix="soho-notebooks-")
    started, failed = time.time(), []
    try:
        for name in names:
            path = os.path.join(NOTEBOOK_DIR, name + ".ipynb")
            if not args.execute_only:
                nbformat.write(make_notebook(NOTEBOOKS[name]), path)
            if args.write_only:
                continue
            t0 = time.time()
            try:
                nb = execute(path)
            except Exception as e:  # keep going: report every notebook that fails
                print(f"FAILED {name}: {e}", file=sys.stderr)
                failed.append(name)
                continue
            nbformat.write(nb, path)
            size = os.path.getsize(path)
            print(f"{name:34s} {time.time() - t0:6.1f} s  {size / 1e3:7.1f} kB"
                  + ("  TOO LARGE" if size > MAX_BYTES else ""), flush=True)
    finally:
        if own_cache:
            shutil.rmtree(os.environ.pop("SOHO_NB_CACHE"), ignore_errors=True)
    print(f"total {time.time() - started:.1f} s")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
