"""A few pre-training steps of the tiny model on a fixed batch, in one process or as one rank of several.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_pretrain_worker.py OUT_DIR

Each rank takes its share of the images (and their texts), in 2 accumulation micro-steps per optimizer step, and
saves its weights after the first step, its final weights and its final visual dictionary to OUT_DIR/rank<r>.pt.
test_train.py runs the same steps on the whole batch in one process and compares. BatchNorm is frozen and dropout
is off, so one process and two ranks compute the same thing; MVM masking is off (its draws are random per rank);
MLM targets differ in number per rank, which is what the global averaging in train.pretraining_loss is for.
"""

import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import soho  # noqa: E402
import train  # noqa: E402

N_IMAGES, STEPS, MICRO = 4, 3, 2  # MICRO: accumulation micro-steps per optimizer step


def global_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (4 * N_IMAGES, 9), generator=g)
    itm = torch.tensor([1, 1, 0, 0]).repeat(N_IMAGES)
    labels = torch.full_like(ids, soho.IGNORE)
    for t in range(4 * N_IMAGES):
        if itm[t]:
            n = 1 + t % 5  # 1 to 5 masked words per matched text: the ranks hold different counts
            labels[t, 1:1 + n] = ids[t, 1:1 + n]
    image_mask = torch.ones(N_IMAGES, 256, 256, dtype=torch.bool)
    image_mask[1, :, 192:] = False
    return dict(images=torch.randn(N_IMAGES, 3, 256, 256, generator=g), image_mask=image_mask, input_ids=ids,
                text_mask=torch.ones_like(ids, dtype=torch.bool), itm_label=itm, mlm_labels=labels,
                img_index=torch.arange(N_IMAGES).repeat_interleave(4))


def micro_batches(batch, rank, world_size):
    """This rank's MICRO micro-batches of one step. Micro-step k of the global batch holds the same images
    whatever the number of ranks (images k*G .. (k+1)*G - 1, G = N_IMAGES / MICRO), split between the ranks, so
    one process and two ranks normalise each micro-step's loss by the same global counts."""
    per_micro = N_IMAGES // MICRO
    per_rank = per_micro // world_size
    out = []
    for k in range(MICRO):
        first = k * per_micro + rank * per_rank
        imgs, txts = slice(first, first + per_rank), slice(4 * first, 4 * (first + per_rank))
        out.append(dict(images=batch["images"][imgs], image_mask=batch["image_mask"][imgs],
                        input_ids=batch["input_ids"][txts], text_mask=batch["text_mask"][txts],
                        itm_label=batch["itm_label"][txts], mlm_labels=batch["mlm_labels"][txts],
                        img_index=batch["img_index"][txts] - first))
    return out


def run(rank, world_size, vd_options=False):
    """Returns (parameters after the first step, final parameters, final VD) of STEPS pre-training steps, each
    taken by train.optimizer_step (the step that trains) with MICRO accumulation micro-steps, so no_sync on the
    first, clipping, and an enabled gradient scaler (fp16's path: the loss scaled, the gradients unscaled before
    clipping; exact in fp32, the scale being a power of two). vd_options: with the dictionary options beyond
    the paper (k-means start from the first step's features, restarts after 1 idle update), whose draws must be
    the same on every rank."""
    torch.manual_seed(0)
    cfg = replace(soho.PRESETS["tiny"], dropout=0.0, backbone_bn="frozen", mvm_prob=0.0, vd_gamma=0.5,
                  vd_init="random", vd_restart_after=0)
    if vd_options:
        cfg = replace(cfg, vd_init="features", vd_restart_after=1)
    model = soho.SOHO(cfg)
    tcfg = train.TrainConfig(lr=1e-3, lr_backbone=1e-2, global_batch=N_IMAGES,
                             batch_per_gpu=N_IMAGES // MICRO // world_size)
    optimizers = train.build_optimizers(model, tcfg, "pretrain")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)
    ctx = train.Context(rank, world_size, 0, torch.device("cpu"), "off")
    net = train.wrap_ddp(model, ctx.device, 0) if torch.distributed.is_initialized() else model
    batches = micro_batches(global_batch(), rank, world_size)
    first_step = None
    for step in range(STEPS):
        train.optimizer_step(net, model, iter(batches), optimizers, scaler, tcfg, ctx, step)
        if first_step is None:
            first_step = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return first_step, params, model.visual_dictionary.embed.clone()


if __name__ == "__main__":
    rank, world_size, _, _ = train.setup_distributed()
    first_step, params, vd = run(rank, world_size)
    _, _, vd_options = run(rank, world_size, vd_options=True)
    torch.save({"first_step": first_step, "params": params, "vd": vd, "vd_options": vd_options},
               os.path.join(sys.argv[1], f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
