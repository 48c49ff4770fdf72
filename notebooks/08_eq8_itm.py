# %% [markdown]
# # Eq. 8: image-text matching
#
# > "We apply a binary classifier $\phi(\cdot)$ on the joint embedding feature of [CLS] token to predict whether the
# > input image and text are matched or not. ITM task is driven by the following loss function:
# > $$\mathcal{L}_{\text{ITM}} = -\mathbb{E}_{(\mathcal{W}, f(\mathcal{V})) \sim D} \log p(y | \phi(\mathcal{W}, f(\mathcal{V}))), \tag{8}$$
# > where $y \in \{0, 1\}$ indicates whether the image and text is matched (y = 1) or not (y = 0)." (Sec. 3.3)
#
# $\phi$ is `SOHO.itm_head`, a linear layer on the pooled state: BERT's pooler on [CLS] at r18 / r101; the tiny preset
# pools [CLS] plus the mean of the text's states (`pool_text_mean`, beyond the paper: with [CLS] alone the tiny model
# waited at chance for a seed-dependent 300 to over 1,500 steps, README). `SOHO.pretrain_losses` returns the ITM term
# and `SOHO.itm_scores` the per-pair $\log p(y = 1)$. Each image of a pre-training batch comes with four texts:
# two of its captions ($y = 1$) and two captions of random other images ($y = 0$). A random caption is distributed
# exactly like a matched one, so only the image can tell them apart (the "hard" negatives of
# `itm_negatives="hard"` are not: a model that never sees the image learns to spot them by their wording).

# %%
import math

import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import data, train  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %%
model, ckpt = train.load_model(helpers.pretrained())
dataset = data.build_dataset("pretrain", "train", ckpt["data_root"], helpers.tokenizer(ckpt), model.config, seed=0)
batch = dataset.collate([dataset[i] for i in range(8)])
for row in range(4):
    print(f"y = {int(batch['itm_label'][row])}  (caption of image {int(batch['text_source'][row])}): "
          f"{batch['texts'][row]}")

# %% [markdown]
# `itm_scores` scores each (visual tokens, text) row pair. Pre-training feeds the transformer $f(\mathcal{V})$,
# so we ask `image_tokens` for the VD features too (`downstream_use_vd`; downstream tasks use the features before
# the VD, Sec. 4.2).

# %%
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

# %% [markdown]
# One minute of pre-training is not enough to learn ITM on this world ($L_{ITM} \approx \ln 2$). To watch Eq. 8 at
# work, we minimise it alone on this one batch for 60 steps: the classifier learns to tell this batch's pairs
# apart (mostly by memorising its captions, which is all one batch can teach).

# %%
torch.manual_seed(0)
model.train()
trainable = [p for n, p in model.named_parameters() if not n.startswith("backbone")]
optimizer = torch.optim.AdamW(trainable, lr=1e-3)
curve = []
for step in range(60):
    itm = model.pretrain_losses(batch)["itm"]  # Eq. 8 as a LossTerm: summed -log p(y | phi), count, correct
    optimizer.zero_grad()
    itm.mean.backward()
    optimizer.step()
    curve.append(itm.mean.item())
after = p_match(model)
print(f"L_ITM: {curve[0]:.3f} -> {curve[-1]:.3f}")

# %%
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

# %% [markdown]
# ## A model that has learned Eq. 8: does it look at the image?
#
# One batch teaches memorising, not seeing. The model of the default `python train.py` run (1,515 steps, kept in
# `notebooks/demo/`) has learned ITM on thousands of pairs. We score it on 64 scenes drawn fresh from the
# synthetic world's generator, each with its own caption and with the caption of the next scene, first with the
# real images, then with every image replaced by one grey image. A model that reads only the text cannot tell the
# two kinds apart; one that looks at the image can.

# %%
demo, demo_info, demo_tok = helpers.demo_model()
scenes, captions, images, image_mask = helpers.fresh_scenes(64, seed=8)
ids, text_mask = demo_tok.encode_batch(captions + captions[1:] + captions[:1])  # [own captions ; the next scene's]
y_fresh = torch.cat([torch.ones(64), torch.zeros(64)])  # own caption: 1, the next scene's: 0

def p_match_demo(imgs):
    with torch.no_grad():
        visual, visual_mask = demo.pretrain_visual_tokens(imgs, image_mask)
        idx = torch.arange(64).repeat(2)
        return demo.itm_scores(visual[idx], visual_mask[idx], ids, text_mask).exp()

real, blank = p_match_demo(images), p_match_demo(torch.zeros_like(images))
acc = lambda p: ((p > 0.5).float() == y_fresh).float().mean().item()
print(f"held-out ITM of the run (train.py's last line): {demo_info['metrics']['heldout_itm_acc']:.3f}")
print(f"fresh scenes: accuracy {acc(real):.3f} with the images, {acc(blank):.3f} with every image blanked")
print(f"  p(match) own caption {real[:64].mean():.2f}, another scene's {real[64:].mean():.2f}; "
      f"blanked {blank[:64].mean():.2f} and {blank[64:].mean():.2f}")

# %%
fig, ax = plt.subplots(figsize=(6, 2.6))
bins = torch.linspace(0, 1, 21)
ax.hist(real[:64], bins, alpha=0.6, label="own caption", color="tab:green")
ax.hist(real[64:], bins, alpha=0.6, label="another scene's caption", color="tab:red")
ax.hist(blank, bins, histtype="step", color="k", label="images blanked (both kinds)")
ax.set_xlabel("p(match)"); ax.set_ylabel("pairs"); ax.legend(fontsize=7); ax.set_title("the default run's ITM head")
plt.tight_layout()

# %% [markdown]
# ## What this notebook claims

# %%
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
# the default run's ITM head looks at the image: well above chance on fresh scenes, back to chance when blanked
assert acc(real) > 0.75 and abs(acc(blank) - 0.5) < 0.15
print("all claims hold")
