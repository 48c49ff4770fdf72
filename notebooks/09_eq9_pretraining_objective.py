# %% [markdown]
# # Eq. 9: the pre-training objective
#
# > "The visual feature encoder, VD-based image embedding module and the cross-modal Transformer is end-to-end
# > jointly trainable. We assign equal loss weight to the three pre-training objectives, and thus the full
# > pre-training objective of SOHO is:
# > $$\mathcal{L}_{Pre-training} = \mathcal{L}_{MLM} + \mathcal{L}_{MVM} + \mathcal{L}_{ITM}. \tag{9}$$" (Sec. 3.3)
#
# In `soho.py` this is `pretraining_objective(mlm, mvm, itm)`. `train.pretraining_loss` calls it with each term
# averaged over its targets (masked words, masked visual tokens, text-image pairs) on all ranks. Below: a
# pre-training run of the tiny model with `train.py`, then one step taken apart.

# %%
import matplotlib.pyplot as plt
import torch

import helpers  # notebooks/helpers.py: the synthetic world, a briefly pre-trained tiny SOHO, plotting
import data, soho, train  # the repository's modules: helpers put its root on sys.path
torch.manual_seed(0);

# %%
ckpt_path = helpers.pretrained()  # train.main(...) with the arguments printed below, unless already done
log = helpers.read_log(ckpt_path)
run = __import__("json").load(open(ckpt_path.replace("ckpt.pt", "config.json")))
print(f"{run['steps_per_epoch']} steps per epoch, the ResNet frozen for the first "
      f"{run['train']['freeze_backbone_epochs']} epoch(s)")
print("step ", " ".join(f"{x:6d}" for x in log["step"]))
for k in ("loss", "mlm", "mvm", "itm"):
    print(f"{k:5s}", " ".join(f"{x:6.2f}" for x in log[k]))

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
ax.stackplot(log["step"], log["mlm"], log["mvm"], log["itm"], labels=["L_MLM", "L_MVM", "L_ITM"], alpha=0.7)
ax.plot(log["step"], log["loss"], "k.-", label="L_Pre-training (Eq. 9)")
frozen = run["steps_per_epoch"] * run["train"]["freeze_backbone_epochs"]
ax.axvline(frozen, ls="--", c="gray"); ax.text(frozen + 0.5, max(log["loss"]) * 0.95, "ResNet unfrozen", fontsize=8)
ax.set_xlabel("step (each point: mean of 5 steps)"); ax.set_ylabel("loss"); ax.legend(fontsize=8)
ax.set_title("tiny SOHO, synthetic world, 16 images x 4 texts per step");

# %% [markdown]
# One step taken apart: the three terms of a batch, Eq. 9, and the gradient of the sum reaching every part of
# the model: the ResNet (through Eq. 5), the transformer and the three heads. The dictionary gets none; Eq. 4
# moves it after the step.

# %%
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

# %% [markdown]
# ## What this notebook claims

# %%
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
