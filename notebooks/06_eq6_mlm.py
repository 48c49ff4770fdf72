# %% [markdown]
# # Eq. 6: masked language modeling
#
# > "The goal of MLM is to predict the masked word tokens based on other word tokens $\mathcal{W}_{\backslash i}$
# > and all image features $f(\mathcal{V})$ by minimizing the negative log-likelihood. The learning target can be
# > formulated as:
# > $$\mathcal{L}_{\text{MLM}} = -\mathbb{E}_{(\mathcal{W}, f(\mathcal{V})) \sim D} \log p(w_i | \mathcal{W}_{\backslash i}, f(\mathcal{V})), \tag{6}$$
# > where D indicate hereinafter the whole training dataset. We adopt the same masking strategy used in BERT [10]."
# > (Sec. 3.3)
#
# Two pieces: `data.mask_tokens` does BERT's masking (15% of the real words are chosen; of those 80% become
# `[MASK]`, 10% a random word, 10% stay) and writes the labels; `SOHO.pretrain_losses` returns the MLM term: the
# summed $-\log p(w_i \mid \dots)$ over the chosen words, from a head whose decoder is the word embedding matrix.
# As in the paper's official code, only captions that match their image are masked.

# %%
import math

import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import data, soho, train  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %%
tok = helpers.tokenizer()
captions = ["a big red circle is left of a small blue square", "two yellow stars on a gray background",
            "the green triangle in the top right corner", "a purple diamond placed above an orange circle"]
ids, mask = tok.encode_batch(captions)
masked, labels = data.mask_tokens(ids, mask, tok, prob=0.15, generator=torch.Generator().manual_seed(20))
for row in range(len(captions)):
    print(" ".join(tok.tokens[t] for t in masked[row][mask[row]]))

# %% [markdown]
# The same rows, token by token (the seed was picked to show all three cases): grey tokens are not predicted;
# coloured ones carry a label (the original word, written below) and were replaced by `[MASK]`, by a random word,
# or kept.

# %%
kind = torch.zeros_like(ids)  # 0 not chosen, 1 [MASK], 2 random word, 3 kept
chosen = labels != soho.IGNORE
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

# %% [markdown]
# Over all captions of the synthetic pre-training set, the proportions are BERT's:

# %%
cfg = soho.config_from_preset("tiny", vocab_size=tok.vocab_size)
dataset = data.build_dataset("pretrain", "train", helpers.world(), tok, cfg, seed=0)
all_ids, all_mask = tok.encode_batch([dataset.captions[k] for k in range(len(dataset.captions))])
m_ids, m_labels = data.mask_tokens(all_ids, all_mask, tok, generator=torch.Generator().manual_seed(0))
special = torch.isin(all_ids, torch.tensor(tok.special_ids))
candidates = all_mask & ~special
picked = m_labels != soho.IGNORE
share_chosen = (picked.sum() / candidates.sum()).item()
shares = [((picked & (m_ids == tok.mask_id)).sum() / picked.sum()).item(),
          ((picked & (m_ids != tok.mask_id) & (m_ids != all_ids)).sum() / picked.sum()).item(),
          ((picked & (m_ids == all_ids)).sum() / picked.sum()).item()]
print(f"{len(all_ids)} captions, {int(candidates.sum())} words: {share_chosen:.1%} chosen "
      "(15%, plus at least one per caption)")
print("of the chosen: [MASK] {:.1%}, random word {:.1%}, kept {:.1%}".format(*shares))

# %% [markdown]
# The MLM term on a pre-training batch of 8 images (4 texts each, the first 2 matched), for a model at
# initialisation and for the briefly pre-trained one. At initialisation the loss is about $\ln|vocab|$: every
# word is equally likely.

# %%
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

# %% [markdown]
# The MLM loss and accuracy during the pre-training run (train.py's log, a mean over every 5 steps):

# %%
log = helpers.read_log(helpers.pretrained())
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(log["step"], log["mlm"], "o-", ms=3, label="L_MLM")
ax.set_xlabel("step"); ax.set_ylabel("L_MLM")
ax2 = ax.twinx()
ax2.plot(log["step"], log["mlm_acc"], "s--", ms=3, c="tab:orange", label="accuracy")
ax2.set_ylabel("accuracy on masked words")
fig.legend(loc="upper center", ncol=2);

# %% [markdown]
# ## What this notebook claims

# %%
# BERT's masking: special tokens and padding are never chosen; labels are the original ids exactly there
assert not (picked & ~candidates).any()
assert torch.equal(m_labels[picked], all_ids[picked])
assert 0.13 < share_chosen < 0.25
assert abs(shares[0] - 0.8) < 0.05 and abs(shares[1] - 0.1) < 0.04 and abs(shares[2] - 0.1) < 0.04
# in a pre-training batch only matched captions are masked, and the MLM term counts exactly their labels
matched = batch["itm_label"] == 1
assert (batch["mlm_labels"][~matched] == soho.IGNORE).all() and (batch["mlm_labels"][matched] != soho.IGNORE).any(1).all()
assert int(results["pre-trained"].count) == int((batch["mlm_labels"] != soho.IGNORE).sum())
# at initialisation every word is about equally likely; pre-training lowers the loss by a lot
assert abs(results["initialisation"].mean.item() - math.log(tok.vocab_size)) < 0.5
assert results["pre-trained"].mean < results["initialisation"].mean - 0.75
print("all claims hold")
