# %% [markdown]
# # Eq. 5: the straight-through gradient
#
# > "Since the argmin operation is not differentiable, the gradient back propagation will be stopped by the visual
# > dictionary. To make the visual feature encoder trainable, we follow [41] to update $f(v_i)$ by:
# > $$f(v_i) = sg[d_{h_i} - v_i] + v_i, \tag{5}$$
# > where $sg[\cdot]$ is the stop gradient operator." (Sec. 3.2)
#
# In `soho.py` this is `straight_through(v, d)`, written `(d - v).detach() + v`. Forward, the value is $d_{h_i}$
# (Eq. 3); backward, the bracket is a constant, so $\partial f / \partial v = I$: the gradient that arrives at
# $f(v_i)$ is passed to $v_i$ unchanged, and nothing reaches the dictionary.

# %%
import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import soho, train  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %% [markdown]
# One dimension first: a dictionary of four scalars and a sweep of $v$.

# %%
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

# %% [markdown]
# Now the model. One visual token of one image; a loss on its VD embedding alone, $L = u \cdot f(v_i)$ with a
# random direction $u$. Without Eq. 5 the token's value $d_{h_i}$ has no path back to the image. With it, the
# gradient reaches $v_i$ as exactly $u$, and from there every pixel in the token's receptive field.

# %%
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

# %%
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

# %% [markdown]
# ## What this notebook claims

# %%
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
