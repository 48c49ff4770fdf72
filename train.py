"""
Train SOHO: pre-training (Sec. 3, 4.1) and the four downstream fine-tunings (Sec. 4.2), from a laptop CPU to many
GPUs.

    python train.py                                        # tiny preset, synthetic world, CPU, a few minutes
    python train.py --task vqa --init runs/pretrain/ckpt.pt
    python train.py --data DIR --vocab FILE                # a vocab.txt (e.g. BERT's), weights from scratch
    torchrun --nproc_per_node 8 train.py --preset r101 --data DIR --bert DIR --resnet FILE
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py --preset r101 ...

Any field of TrainConfig or SOHOConfig can be overridden as --key=value (type-checked). Rerunning with the same
--out continues from the latest checkpoint; --fresh starts over.
"""

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

import data
import soho
import synthetic
from soho import SOHO, SOHOConfig

# ----------------------------------------------------------------------------------------------------------------
# Config: the paper's recipe per task; the presets' comments carry the batch arithmetic
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    task: str = "pretrain"  # pretrain | retrieval | vqa | nlvr2 | snli-ve
    preset: str = "tiny"  # a key of soho.PRESETS
    data: str = ""  # the --data layout (see data.py); empty: the built-in synthetic world
    out: str = ""  # run folder; empty: runs/<task>
    init: str = ""  # a pre-trained SOHO checkpoint to fine-tune from
    init_any_preset: bool = False  # allow --init from a checkpoint trained at another preset than --preset
    bert: str = ""  # a Hugging Face BERT directory (config.json, vocab.txt, weights), or a folder with vocab.txt alone
    vocab: str = ""  # a WordPiece vocab.txt; empty: --bert DIR's, else the --data folder's (--init: the checkpoint's)
    resnet: str = ""  # a torchvision ImageNet ResNet state dict (resnet101-*.pth)
    retrieval_source: str = "coco"  # coco | flickr30k
    train_split: str = "train"  # the split trained on; vqa: train (train2014) | train+val (the paper, test server)
    itm_negatives: str = "random"  # pre-training mismatches: random (the paper) | subject | hard (data.NEGATIVES)
    text_only: bool = False  # the control that cannot see: every image replaced by one constant image
    subject_from_epoch: int = -1  # from this epoch on (0-based; -1: never) the third text is a "subject" mismatch
    mlm_prob: float = 0.15  # pre-training: the share of each text's tokens that MLM masks (BERT's 15%)
    itm_weight: float = 1.0  # pre-training: ITM's weight in Eq. 9 (the paper: 1, equal weights; the tiny recipe: 5)
    # batch: `batch_per_gpu` examples per forward; gradient accumulation fills `global_batch` (examples per step)
    batch_per_gpu: int = 16
    global_batch: int = 16
    epochs: int = 8
    max_steps: int = 0  # stop after this many optimizer steps in all (0: run all epochs); for tests and smoke runs
    # optimizers (Sec. 4.1): SGD for the visual backbone, AdamW for the transformer and heads
    backbone_optimizer: str = "sgd"  # sgd (the paper, for an ImageNet ResNet) | adamw (a ResNet from scratch)
    lr_backbone: float = 1e-2
    weight_decay_backbone: float = 5e-4
    momentum: float = 0.9
    lr: float = 1e-4
    weight_decay: float = 1e-2
    lr_milestones: tuple = (5, 7)  # epochs at which the learning rates are multiplied by lr_decay
    lr_decay: float = 0.1
    warmup_steps: int = 50  # linear warm-up from 1/3 of the rates, as the official code
    freeze_backbone_epochs: int = 0  # Sec. 3.2: the ResNet is frozen while the VD cold-starts
    grad_clip: float = 10.0  # max gradient norm (0: off), as the official code
    amp: str = "auto"  # bf16 | fp16 | off | auto (bf16 on a GPU that has it, fp16 on older GPUs, off on CPU)
    channels_last: bool = True  # the convolutions in NHWC (torch.channels_last): the same model up to float
    # rounding, ~8% faster tiny pre-training steps on a 2-core CPU (README, "Two commands"); what PyTorch
    # recommends for convolutions on GPU tensor cores
    num_workers: int = 2
    worker_nice: int = 10  # data workers run this much nicer (lower CPU priority) than training (Unix; 0: off). On
    # a CPU with few cores, a worker that takes a core in the middle of a parallel op stalls every thread of it;
    # niced, workers mostly fill the cores' idle moments (README, "Two commands"). The data are the same
    group_by_aspect: bool = True  # each step's images all landscape or all not (the official code's GroupSampler),
    # so that less of each batch is padding: mixed, a batch pads to the widest and the tallest image (a 600x1000
    # and a 1000x600 give 1000x1000); see AspectGroupedSampler
    skip_bad_images: bool = False  # skip unreadable images (logged and counted) instead of stopping
    seed: int = 1337
    log_every: int = 10  # steps between progress-bar / log.jsonl updates
    save_every: int = 500  # steps between checkpoints (also at every epoch end and at the end)


# The paper's recipe, per task, for the paper presets (r18, r101). Batches are counted in examples: images for
# pre-training (each with 4 texts), image-text pairs otherwise, images pairs + sentence for NLVR2.
PAPER_RECIPES = {
    # 4,096 image-text pairs per step = 1,024 images x 4 texts (2 matched, 2 mismatched). 16 images per GPU (as the
    # official code): on 32 GPUs that is 512 images per forward and 2 accumulation steps; on 8 GPUs, 8 steps.
    "pretrain": dict(batch_per_gpu=16, global_batch=1024, epochs=40, lr_milestones=(25, 35), lr_decay=0.1,
                     freeze_backbone_epochs=10, warmup_steps=1000),
    # Sec. 4.2.1: t = 24 aligned pairs per mini-batch, the other 23 captions are each image's negatives. t is a
    # per-GPU quantity (the pairs of one forward score each other), so each GPU builds its own 24 x 24 pairs.
    "retrieval": dict(batch_per_gpu=24, global_batch=24, epochs=20, lr_milestones=(3, 5, 9, 13), lr_decay=0.5,
                      warmup_steps=500),
    # Sec. 4.2.2: batch 256, 18 epochs, lr x0.1 at epochs 12 and 16; BCE with soft scores. 32 per GPU x 8 GPUs.
    "vqa": dict(batch_per_gpu=32, global_batch=256, epochs=18, lr_milestones=(12, 16), lr_decay=0.1,
                warmup_steps=500),
    # Sec. 4.2.3: as VQA with half the batch (two images per example): 128 = 16 per GPU x 8 GPUs.
    "nlvr2": dict(batch_per_gpu=16, global_batch=128, epochs=18, lr_milestones=(12, 16), lr_decay=0.1,
                  warmup_steps=500),
    # Sec. 4.2.4: batch 128, 6 epochs, lr 1e-4 then 1e-5 after epoch 4.
    "snli-ve": dict(batch_per_gpu=16, global_batch=128, epochs=6, lr_milestones=(4,), lr_decay=0.1,
                    warmup_steps=500),
}

# tiny: the paper's recipe cannot start from ImageNet and BERT weights here (nothing is downloaded), so it trains
# everything from scratch, and three things change (README, "Does the model look at the image?"):
# - the ResNet gets AdamW, not SGD at 1e-2 (a rate for fine-tuning ImageNet weights: a random ResNet moves 1% in
#   300 steps), and is never frozen (the freeze protects ImageNet features while the VD starts; there are none);
# - pre-training runs 15 epochs of ~100 steps (16 images x 4 texts): ITM sits at chance (loss ln 2) for its first
#   ~250-950 steps and only then learns to compare text with image; the rate drops x0.1 for the last 2 epochs.
#   ITM weighs 5 in Eq. 9 (itm_weight, beyond the paper): at initialisation its gradient at the shared
#   transformer is ~1/35 of MLM's, and AdamW scales a shared weight's step by all of them together; with the
#   pooler's text mean (soho.py's tiny preset) this made the wait end by step ~940 in 14 of 15 runs on world v3
#   (10 seeds, batches grouped and not; one waited until ~1,360) and in 7 of 7 on world v4 (README, "Does the
#   model look at the image?");
# - fine-tuning keeps the paper's shape (few epochs, rate dropped late) with smaller batches.
TINY_BACKBONE = dict(backbone_optimizer="adamw", weight_decay_backbone=1e-2, freeze_backbone_epochs=0)
TINY_RECIPES = {
    "pretrain": dict(TINY_BACKBONE, batch_per_gpu=16, global_batch=16, epochs=15, lr_milestones=(13,),
                     warmup_steps=50, lr=1e-3, lr_backbone=1e-3, itm_weight=5.0),
    "retrieval": dict(TINY_BACKBONE, batch_per_gpu=12, global_batch=12, epochs=2, lr_milestones=(1,), lr_decay=0.5,
                      warmup_steps=20, lr=5e-4, lr_backbone=5e-4),
    "vqa": dict(TINY_BACKBONE, batch_per_gpu=32, global_batch=32, epochs=2, lr_milestones=(1,), warmup_steps=20,
                lr=5e-4, lr_backbone=5e-4),
    "nlvr2": dict(TINY_BACKBONE, batch_per_gpu=16, global_batch=16, epochs=4, lr_milestones=(3,), warmup_steps=20,
                  lr=5e-4, lr_backbone=5e-4),
    "snli-ve": dict(TINY_BACKBONE, batch_per_gpu=32, global_batch=32, epochs=2, lr_milestones=(1,), warmup_steps=20,
                    lr=5e-4, lr_backbone=5e-4),
}


def recipe(task, preset):
    """The default TrainConfig fields of a task at a preset."""
    if task not in PAPER_RECIPES:
        raise ValueError(f"unknown task {task!r}; choose one of {list(soho.TASKS)}")
    return (TINY_RECIPES if preset == "tiny" else PAPER_RECIPES)[task]


# ----------------------------------------------------------------------------------------------------------------
# Command line: a few named options, then --key=value for any config field
# ----------------------------------------------------------------------------------------------------------------


def _convert(name, text, typ, current):
    """Convert the string `text` to the type of a config field, or raise a clear error."""
    try:
        if typ is bool or isinstance(current, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, tuple) or typ is tuple:
            return tuple(int(x) if x.strip().lstrip("-").isdigit() else float(x) for x in text.split(",") if x)
        if isinstance(current, int) or typ is int:
            return int(text)
        if isinstance(current, float) or typ is float:
            return float(text)
        return text
    except ValueError:
        kind = {"bool": "true or false", "int": "an integer", "float": "a number",
                "tuple": "comma-separated numbers"}.get(type(current).__name__, type(current).__name__)
        raise SystemExit(f"--{name}={text}: expected {kind} (the field's default is {current!r})") from None


def parse_args(argv=None):
    """Returns (TrainConfig, SOHOConfig overrides dict, flags)."""
    p = argparse.ArgumentParser(
        description="Train SOHO. Any TrainConfig or SOHOConfig field can also be set as --key=value; "
        "e.g. --vd_size=1024 --epochs=2 --amp=bf16 --gradient_checkpointing=true.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="TrainConfig fields: " + ", ".join(f.name for f in fields(TrainConfig))
        + "\nSOHOConfig fields: " + ", ".join(f.name for f in fields(SOHOConfig)),
    )
    p.add_argument("--task", default="pretrain", choices=list(soho.TASKS))
    p.add_argument("--preset", default="tiny", choices=list(soho.PRESETS))
    p.add_argument("--data", default="", help="data root (see data.py); default: the synthetic world")
    p.add_argument("--init", default="", help="a pre-trained SOHO checkpoint to fine-tune from")
    p.add_argument("--bert", default="", help="Hugging Face BERT directory (config.json, vocab.txt, weights); a folder "
                   "with vocab.txt alone means BERT's vocabulary with random weights")
    p.add_argument("--vocab", default="", help="WordPiece vocab.txt (default: --bert DIR's, else the --data folder's)")
    p.add_argument("--resnet", default="", help="torchvision ImageNet ResNet state dict, e.g. resnet101-63fe2227.pth")
    p.add_argument("--out", default="", help="run folder (default runs/<task>)")
    p.add_argument("--fresh", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--resume", default="", help="continue from this checkpoint file (default: <out>/ckpt.pt)")
    args, rest = p.parse_known_args(argv)

    cfg = TrainConfig(task=args.task, preset=args.preset)
    cfg = dataclasses.replace(cfg, **recipe(args.task, args.preset))
    for name in ("data", "init", "bert", "vocab", "resnet", "out"):
        setattr(cfg, name, getattr(args, name))
    train_fields = {f.name: f for f in fields(TrainConfig)}
    model_fields = {f.name: f for f in fields(SOHOConfig)}
    model_overrides = {}
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            p.error(f"unrecognised argument {item!r}; overrides are written --key=value")
        key, value = item[2:].split("=", 1)
        key = key.replace("-", "_")
        if key in train_fields:
            setattr(cfg, key, _convert(key, value, train_fields[key].type, getattr(cfg, key)))
        elif key in model_fields:
            model_overrides[key] = _convert(key, value, model_fields[key].type,
                                            getattr(soho.PRESETS[args.preset], key))
        else:
            p.error(f"unknown config key {key!r}. TrainConfig: {sorted(train_fields)}; "
                    f"SOHOConfig: {sorted(model_fields)}")
    cfg.out = cfg.out or os.path.join("runs", cfg.task)
    return cfg, model_overrides, args


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python train.py` sets none of them
# ----------------------------------------------------------------------------------------------------------------


def setup_distributed():
    """Returns (rank, world_size, local_rank, device). Starts a process group only under torchrun: NCCL when
    this process has a GPU, gloo otherwise (the same code runs on CPU, which is how the tests run it)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, 0, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=dist.get_default_backend_for_device(device))
    return rank, world_size, local_rank, device


def autocast_context(device, amp):
    """torch.amp autocast for amp in {"bf16", "fp16", "off"}; bf16 works on CPU too."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_amp(amp, device):
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "off"  # bf16 autocast runs on CPU but is slower there than fp32


def wrap_ddp(model, device, local_rank):
    """DistributedDataParallel without buffer syncing at each forward: it would copy rank 0's VD (a buffer) over
    the others; the VD stays identical on all ranks because Eq. 4 all-reduces its statistics instead."""
    sync_off = ({"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                else {"broadcast_buffers": False})  # the older name (deprecated in recent PyTorch)
    return DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, **sync_off)


def all_reduce_sum(t):
    """Sum over ranks (a no-op without a process group); returns a new tensor."""
    t = t.clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------------------------------------------
# Losses: pre-training terms averaged over all targets of all ranks; downstream losses per task
# ----------------------------------------------------------------------------------------------------------------


def pretraining_loss(out, world_size, itm_label, itm_weight=1.0):
    """Eq. 9 from the model's loss terms, each averaged over the targets of *all* ranks.

    Ranks hold different numbers of masked words and masked visual tokens. DDP averages gradients over ranks, so
    each rank scales its sum by world_size / (global count): the result is the gradient of the global mean, the
    same as one process on the whole batch. Returns (loss, stats for logging: global sums and counts).
    """
    names = ("mlm", "mvm", "itm")
    rows = [torch.stack([out[n].sum.detach().float(), out[n].count.float(), out[n].correct.float()])
            for n in names]  # sum, count, correct of each term
    # ITM accuracy on the matched and on the mismatched texts apart: a model that ignores the image can score
    # well on one kind by always answering it, never on both
    correct, matched = out["itm_correct"].float(), (itm_label == 1).float()
    for kind in (matched, 1.0 - matched):
        rows.append(torch.stack([(correct * kind).sum(), kind.sum(), kind.sum()]))
    totals = all_reduce_sum(torch.stack(rows))  # [5, 3]: one collective for everything
    means = [out[n].sum * world_size / totals[i, 1].clamp(min=1) for i, n in enumerate(names)]
    totals = totals.cpu()  # one device-to-host copy per micro-step, for logging
    stats = {}
    for i, n in enumerate(names):
        stats[n], stats[n + "_acc"] = totals[i, :2], totals[i, [2, 1]]
    stats["itm_matched_acc"], stats["itm_mismatched_acc"] = totals[3, :2], totals[4, :2]
    return soho.pretraining_objective(*means, itm_weight=itm_weight), stats


def reduce_stats(local):
    """{name: (sum, count)} of this rank -> {name: [sum, count]} summed over all ranks, on the CPU; one collective
    and one device-to-host copy for all of them."""
    device = local["loss"][0].device
    packed = torch.stack([torch.stack([torch.as_tensor(v, device=device).float() for v in pair])
                          for pair in local.values()])  # [n, 2]
    totals = all_reduce_sum(packed).cpu()
    return dict(zip(local, totals))


def downstream_loss(task, logits, batch):
    """The fine-tuning losses of Sec. 4.2. Returns (loss, {name: (sum, count)} of this rank, for logging)."""
    if task == "retrieval":
        # Sec. 4.2.1: image i with caption i is aligned, with the other t - 1 captions unaligned: binary labels
        t = logits.shape[0]
        labels = torch.eye(t, dtype=torch.long, device=logits.device).flatten()
        flat = logits.reshape(t * t, 2).float()
        loss = F.cross_entropy(flat, labels)
        top1 = (logits[..., 1] - logits[..., 0]).argmax(1) == torch.arange(t, device=logits.device)
        return loss, {"loss": (loss.detach(), 1), "pair_acc": ((flat.argmax(1) == labels).sum(), t * t),
                      "batch_r1": (top1.sum(), t)}
    if task == "vqa":
        # BCE with soft scores, times the number of answers (as the official code), i.e. summed over answers
        targets = batch["targets"]
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]
        score = targets.gather(1, logits.argmax(1, keepdim=True)).sum()  # the VQA score of the top answer
        return loss, {"loss": (loss.detach(), 1), "vqa_score": (score, targets.shape[0])}
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"loss": (loss.detach(), 1), "acc": ((logits.argmax(1) == labels).sum(), labels.numel())}


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the step, so a resumed run needs no scheduler state
# ----------------------------------------------------------------------------------------------------------------


def lr_multiplier(step, steps_per_epoch, cfg):
    """Linear warm-up from 1/3 over warmup_steps, then x lr_decay at each milestone epoch passed."""
    warm = 1.0 if step >= cfg.warmup_steps else 1 / 3 + (2 / 3) * step / max(1, cfg.warmup_steps)
    epoch = step / steps_per_epoch
    return warm * cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_milestones)


def set_learning_rates(optimizers, multiplier):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier


def build_optimizers(model, cfg, task):
    """SGD (momentum) for the ResNet, AdamW for everything else that the task trains (Sec. 4.1); with
    backbone_optimizer="adamw" (the tiny preset, a ResNet from scratch) the ResNet gets an AdamW of its own.
    Returns (backbone optimizer, transformer optimizer). Biases and normalisation weights get no AdamW weight
    decay, as BERT."""
    trainable = {id(p) for p in model.task_parameters(task)}
    for p in model.parameters():
        p.requires_grad = id(p) in trainable
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in backbone_ids]
    decay = [p for n, p in rest if p.ndim >= 2]
    no_decay = [p for n, p in rest if p.ndim < 2]
    if cfg.backbone_optimizer == "adamw":
        sgd = torch.optim.AdamW([{"params": backbone, "base_lr": cfg.lr_backbone}], lr=cfg.lr_backbone,
                                weight_decay=cfg.weight_decay_backbone, eps=1e-6)
    elif cfg.backbone_optimizer == "sgd":
        sgd = torch.optim.SGD([{"params": backbone, "base_lr": cfg.lr_backbone}], lr=cfg.lr_backbone,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay_backbone)
    else:
        raise SystemExit(f"--backbone_optimizer={cfg.backbone_optimizer}: expected sgd or adamw")
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
                               {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr}], lr=cfg.lr, eps=1e-6)
    return sgd, adamw


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue, written to a temporary file and renamed
# ----------------------------------------------------------------------------------------------------------------


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, payload):
    """torch.save to path + '.tmp', then an atomic rename: a crash during the save keeps the previous checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """The dict that train.py saved at `path`; a missing, unreadable or foreign file (a plain state dict, say) is a
    SystemExit that names the file and says what it holds instead."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise SystemExit(f"{path}: not a readable checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            holds = f"a plain state dict of {len(ckpt)} tensors (first key {next(iter(ckpt))!r})"
        elif isinstance(ckpt, dict):
            holds = f"a dict with the keys {sorted(map(str, ckpt))[:12]}"
        else:
            holds = f"a {type(ckpt).__name__}"
        raise SystemExit(f"{path}: not a SOHO checkpoint: it holds {holds}. A SOHO checkpoint, as train.py writes "
                         "it, is a dict with 'model' (the state dict), 'model_config' (the SOHOConfig fields), "
                         "'train_config', 'task' and 'vocab_path'. Weights of BERT or of a torchvision ResNet go in "
                         "with --bert DIR and --resnet FILE") from None
    return ckpt


def load_model(path, device="cpu"):
    """A SOHO model from a checkpoint, in eval mode, with the checkpoint dict (for evaluate.py and notebooks)."""
    ckpt = load_checkpoint(path)
    model = SOHO(SOHOConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def init_from_pretrained(model, state, path, task):
    """Fine-tuning starts from a pre-trained checkpoint's weights `state` (read from `path`): every weight is
    taken except the task's own head (e.g. VQA's answer count differs). Anything else that does not fit is an
    error."""
    own = model.state_dict()
    head_prefix = {"vqa": "vqa_head.", "nlvr2": "nlvr2_head.", "snli-ve": "snli_ve_head."}.get(task, "~")
    skipped = [k for k in state if k.startswith(head_prefix)]
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(head_prefix))
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or mismatched:
        raise SystemExit(f"--init {path} does not fit this model: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {mismatched}. Fine-tune with the preset and overrides it was trained with.")
    model.load_state_dict(state, strict=False)
    return skipped


# ----------------------------------------------------------------------------------------------------------------
# Data: the resumable, sharded loader
# ----------------------------------------------------------------------------------------------------------------


class SkipSampler(Sampler):
    """The sampler of one epoch, less its first `skip` indices: a resumed run continues mid-epoch."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


class AspectGroupedSampler(Sampler):
    """One rank's indices for one epoch, such that the images of each optimizer step are all landscape (wider than
    tall) or all not, as the official code's batches (mmdet's GroupSampler). A batch is padded to its widest and
    its tallest image, so a mixed one pays for a square (COCO at 600x1000: 1000x1000 where a grouped batch is
    600x1000; the synthetic world: 320x320 where a grouped one is 320x256, 20% fewer pixels).

    The unit is the whole step, global_batch examples, the same on every rank (the permutations come from a
    generator seeded by seed + epoch): each orientation's examples are shuffled and cut into steps, the remainders
    of both are pooled into mixed steps (so no more than global_batch - 1 examples an epoch are left out, as with
    drop_last), and the steps are shuffled. Within a step, micro-step m of rank r takes the examples
    [(m * world_size + r) * batch_per_gpu, ... + batch_per_gpu): the set of examples of a step does not depend on
    the number of ranks or of accumulation micro-steps.

    landscape: [n] bool numpy array (ImageTextDataset.landscape_flags)."""

    def __init__(self, landscape, global_batch, batch_per_gpu, rank, world_size, seed, epoch):
        self.landscape = np.asarray(landscape, dtype=bool)
        self.global_batch, self.batch_per_gpu = global_batch, batch_per_gpu
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch

    @staticmethod
    def steps_per_epoch(landscape, global_batch):
        """Optimizer steps in an epoch: the grouped steps of each orientation, then the mixed ones."""
        counts = [int(np.sum(landscape)), int(np.sum(~np.asarray(landscape, dtype=bool)))]
        return sum(c // global_batch for c in counts) + sum(c % global_batch for c in counts) // global_batch

    def steps(self):
        """[steps_per_epoch, global_batch] int64: the examples of each step of this epoch, in order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        G, grouped, rest = self.global_batch, [], []
        for flag in (True, False):
            idx = np.flatnonzero(self.landscape == flag)
            idx = idx[torch.randperm(len(idx), generator=g).numpy()]
            n = len(idx) // G * G
            grouped.append(idx[:n].reshape(-1, G))  # [n / G, G]
            rest.append(idx[n:])
        rest = np.concatenate(rest)
        rest = rest[torch.randperm(len(rest), generator=g).numpy()]
        mixed = rest[:len(rest) // G * G].reshape(-1, G)  # [steps of both orientations, G]
        steps = np.concatenate(grouped + [mixed])
        return steps[torch.randperm(len(steps), generator=g).numpy()]

    def __iter__(self):
        b, W = self.batch_per_gpu, self.world_size
        for step in self.steps():
            micro = step.reshape(-1, W, b)  # [accumulation micro-steps, ranks, batch_per_gpu]
            yield from micro[:, self.rank].reshape(-1).tolist()

    def __len__(self):
        return self.steps_per_epoch(self.landscape, self.global_batch) * self.global_batch // self.world_size


def make_loader(dataset, cfg, epoch, skip_examples, rank, world_size, landscape=None):
    """This rank's DataLoader for one epoch, less the examples a resumed run already took. landscape: the data
    set's landscape_flags (group_by_aspect) or None (plain shuffling)."""
    if landscape is not None:
        sampler = AspectGroupedSampler(landscape, cfg.global_batch, cfg.batch_per_gpu, rank, world_size, cfg.seed,
                                       epoch)
    else:  # drop_last: every rank runs the same number of steps, and each step has a full batch
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.batch_per_gpu, sampler=SkipSampler(sampler, skip_examples),
                      num_workers=cfg.num_workers, collate_fn=dataset.collate, drop_last=True,
                      persistent_workers=False, pin_memory=False,
                      worker_init_fn=functools.partial(nice_worker, cfg.worker_nice),
                      # a generator of its own: building the loader must not draw from the global RNG, or a
                      # resumed run would continue from a different random state than a straight one
                      generator=torch.Generator().manual_seed(cfg.seed + epoch))


def nice_worker(nice, worker_id=None):
    """A DataLoader worker_init_fn: the worker runs `nice` steps nicer than the process that started it (where the
    OS has niceness; a module-level function with functools.partial, so that spawned workers can pickle it)."""
    if nice and hasattr(os, "nice"):
        os.nice(nice)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class VDHealth:
    """How much of the visual dictionary is in use: the fraction of entries chosen over the last steps, and
    the perplexity exp(H(p)) of the assignment distribution p (k if all entries were used equally)."""

    def __init__(self, k):
        self.counts = torch.zeros(k)

    def add(self, counts):
        # summed where the counts live (a GPU: no device-to-host copy per step); summary reads them once
        self.counts = self.counts.to(counts.device) + counts.float()

    def summary(self):
        counts = self.counts.cpu()
        self.counts = torch.zeros_like(self.counts)
        total = counts.sum()
        if total == 0:
            return {}
        p = counts / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"vd_used": (counts > 0).float().mean().item(), "vd_ppl": entropy.exp().item()}


@dataclass
class Context:
    """Where this process runs, fixed for the whole run (train.py and evaluate.py pass it around)."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp: str  # bf16 | fp16 | off (resolved, never "auto")

    @property
    def master_process(self):
        return self.rank == 0


def make_context(amp="auto"):
    rank, world_size, local_rank, device = setup_distributed()
    return Context(rank, world_size, local_rank, device, resolve_amp(amp, device))


@dataclass
class Progress:
    """Where a run stands; a resumed run continues from here."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0


def train(cfg, model_overrides, args=None):
    """Train one task; returns the last logged metrics (with the held-out ITM numbers after pre-training)."""
    ctx = make_context(cfg.amp)
    cfg, ckpt, resume_path = resume_config(cfg, args)
    data_root = prepare_data_root(cfg, ckpt, resume_path, ctx)
    init_ckpt = load_checkpoint(cfg.init) if cfg.init and not ckpt else None  # read once, used four times
    check_init_preset(cfg, init_ckpt)
    vocab_path, bert_weights = resolve_vocabulary(cfg, ckpt, init_ckpt, data_root, resume_path, ctx.master_process)
    torch.manual_seed(cfg.seed)  # the same initial weights and VD on every rank
    model_cfg = resolve_configs(cfg, model_overrides, ckpt, init_ckpt)
    model_cfg, tokenizer, dataset = build_data(cfg, model_cfg, vocab_path, bert_weights, data_root)
    model = build_model(cfg, model_cfg, model_overrides, bert_weights, init_ckpt, bool(ckpt), ctx.master_process)
    del init_ckpt
    model.to(ctx.device)
    if cfg.channels_last:  # before the optimizers, whose state tensors take their parameters' layout
        model.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(model, cfg, cfg.task)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=(ctx.amp == "fp16"))
    landscape = dataset.landscape_flags(progress=ctx.master_process) if cfg.group_by_aspect else None
    accum, steps_per_epoch, total_steps = batch_arithmetic(cfg, len(dataset), ctx.world_size, landscape)
    progress = restore_checkpoint(ckpt, model, optimizers, scaler) if ckpt else Progress()
    seed_this_rank(cfg.seed, ctx, ckpt)
    meta = {"task": cfg.task, "model_config": asdict(model_cfg), "train_config": asdict(cfg),
            "vocab_path": vocab_path, "data_root": data_root, "answers": getattr(dataset, "answer_vocab", None),
            "retrieval_source": cfg.retrieval_source}  # what every checkpoint of this run says about it
    if ctx.master_process:
        announce(cfg, ctx, model, meta, accum, steps_per_epoch, total_steps, len(dataset), progress, bool(ckpt))

    # --- the loop ------------------------------------------------------------------------------------------------
    log = TrainingLog(cfg, model_cfg, ctx, total_steps, progress.step, fresh=not ckpt)
    saved_step = progress.step if ckpt else -1
    net, frozen = None, None
    while progress.step < total_steps:
        net, frozen = model_for_epoch(model, cfg, ctx, progress.epoch, net, frozen)
        skip = progress.step_in_epoch * cfg.global_batch // ctx.world_size  # examples this rank has seen
        batches = iter(make_loader(dataset, cfg, progress.epoch, skip, ctx.rank, ctx.world_size,
                                       landscape))
        model.train()
        while progress.step_in_epoch < steps_per_epoch and progress.step < total_steps:
            set_learning_rates(optimizers, lr_multiplier(progress.step, steps_per_epoch, cfg))
            log.add(*optimizer_step(net, model, batches, optimizers, scaler, cfg, ctx, progress.step))
            progress.step += 1
            progress.step_in_epoch += 1
            if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                log.write(progress, optimizers)
            if progress.step % cfg.save_every == 0:
                saved_step = save_training_state(cfg.out, model, optimizers, scaler, progress, meta, log.last, ctx)
        if progress.step_in_epoch >= steps_per_epoch:
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            skipped_images = getattr(dataset, "num_skipped", 0)
            if ctx.master_process and skipped_images:
                print(f"epoch {progress.epoch}: skipped {skipped_images} unreadable image(s) so far (see above)")
            saved_step = save_training_state(cfg.out, model, optimizers, scaler, progress, meta, log.last, ctx)
    log.close()
    if cfg.task == "pretrain":
        log.last.update(heldout_itm(model, cfg, data_root, tokenizer, model_cfg, ctx))
        saved_step = -1  # the checkpoint carries the held-out numbers
    if saved_step != progress.step:  # the end fell between checkpoints: save where we stopped
        save_training_state(cfg.out, model, optimizers, scaler, progress, meta, log.last, ctx)
    if ctx.master_process:
        print_summary(cfg, log)
    if dist.is_initialized():
        dist.barrier()
    return log.last


def optimizer_step(net, model, batches, optimizers, scaler, cfg, ctx, step):
    """One optimizer step on one global batch. Returns ({name: [sum, count]} of the loss statistics over all ranks,
    the VD's assignment counts (None without a VD update), seconds waiting for data, seconds computing).

    global_batch = batch_per_gpu x world_size x accum: this rank draws `accum` micro-batches from `batches`, and
    each one's loss is divided by accum, so the gradient is the mean over micro-steps. DDP all-reduces gradients
    on the last micro-step only (no_sync on the others). With fp16 the gradient scaler scales the loss and
    unscales the gradients before clipping, so the clipping sees true gradients. Then both optimizers step, and
    the VD takes its Eq. 4 update, once per step, from the statistics of the whole global batch."""
    accum = accumulation_steps(cfg, ctx.world_size)
    totals, wait, compute = {}, 0.0, 0.0
    for micro in range(accum):
        t0 = time.time()
        batch = to_device(next_batch(batches), ctx.device)
        t1 = time.time()
        sync = micro == accum - 1 or not isinstance(net, DDP)
        with (contextlib.nullcontext() if sync else net.no_sync()), autocast_context(ctx.device, ctx.amp):
            out = net(cfg.task, batch)
            loss, stats = task_loss(cfg.task, out, batch, ctx.world_size, cfg.itm_weight)
            check_finite(stats, step, cfg.task)
            scaler.scale(loss / accum).backward()  # the mean over micro-steps
        for name, s in stats.items():
            totals[name] = totals[name] + s.double() if name in totals else s.double()
        wait, compute = wait + t1 - t0, compute + time.time() - t1
    for opt in optimizers:
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    vd_counts = None
    if model.visual_dictionary is not None and cfg.task == "pretrain":
        vd_counts = model.visual_dictionary.update()  # Eq. 4, once per optimizer step, on the global batch
    return totals, vd_counts, wait, compute


def next_batch(batches):
    """The next batch; with --skip_bad_images a batch whose every image was unreadable is None: take the next."""
    batch = next(batches)
    while batch is None:
        batch = next(batches)
    return batch


def task_loss(task, out, batch, world_size, itm_weight=1.0):
    """(loss, {name: [sum, count]} over all ranks) of a forward's output: Eq. 9 for pre-training, Sec. 4.2's
    losses for the downstream tasks."""
    if task == "pretrain":
        return pretraining_loss(out, world_size, batch["itm_label"], itm_weight)
    loss, stats = downstream_loss(task, out, batch)
    return loss, reduce_stats(stats)


# ----------------------------------------------------------------------------------------------------------------
# Setting up a run: resume, data, configs, model, batch arithmetic (in the order train() calls them)
# ----------------------------------------------------------------------------------------------------------------


# TrainConfig fields that came after runs were saved, with the value such a run had: resuming it gives the field this
# value and not today's default, so that the run goes on as it began.
FIELDS_ADDED_LATER = {"group_by_aspect": False}  # batches were shuffled plainly before AspectGroupedSampler
# (worker_nice is not here: it changes no result, so an old run resumes with today's default)


def resume_config(cfg, args):
    """(cfg, checkpoint or None, its path). A run whose --out holds a checkpoint (or given --resume FILE) continues
    with the checkpoint's TrainConfig; only the stopping point, logging and loader workers may change."""
    resume_path = args.resume if args and args.resume else os.path.join(cfg.out, "ckpt.pt")
    if not os.path.isfile(resume_path) or (args and args.fresh):
        return cfg, None, resume_path
    ckpt = load_checkpoint(resume_path)
    if ckpt["task"] != cfg.task:
        raise SystemExit(f"{resume_path} is a {ckpt['task']} checkpoint, not {cfg.task}: pass --out or --fresh")
    saved = {**FIELDS_ADDED_LATER, **ckpt["train_config"]}
    cfg = dataclasses.replace(TrainConfig(**{**saved, "lr_milestones": tuple(saved["lr_milestones"])}),
                              max_steps=cfg.max_steps, log_every=cfg.log_every, save_every=cfg.save_every,
                              num_workers=cfg.num_workers)
    return cfg, ckpt, resume_path


def prepare_data_root(cfg, ckpt, resume_path, ctx):
    """The data folder: --data, else the resumed run's, else the synthetic world (rank 0 writes it if missing)."""
    data_root = cfg.data or (ckpt["data_root"] if ckpt else "")
    if not data_root:
        data_root = synthetic.default_data_root()
        if ctx.master_process:
            synthetic.ensure_synthetic_world(data_root)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait until rank 0 has written the world
    elif not os.path.isdir(data_root):
        given = "--data" if cfg.data else f"the data folder of {resume_path}:"
        raise SystemExit(f"{given} {data_root} does not exist (expected a folder in the layout of data.py's "
                         "docstring; leave --data out for the synthetic world)")
    return data_root


def resolve_configs(cfg, model_overrides, ckpt, init_ckpt):
    """The model's SOHOConfig. Each field comes from the first of these that sets it:

        resumed checkpoint  >  --key=value  >  --init checkpoint  >  --preset (soho.PRESETS)

    (a resumed run keeps its own architecture; fine-tuning keeps the pre-trained one's). build_data then sets
    the two fields the data decide: vocab_size (the vocabulary's, unless --bert brings weights) and num_answers
    (VQA's answer list). The TrainConfig follows the same order, resolved earlier: resumed checkpoint (less the
    stopping point and logging, see resume_config) > --key=value and the named flags > recipe(task, preset) >
    TrainConfig's defaults (parse_args)."""
    if ckpt:
        return SOHOConfig(**ckpt["model_config"])
    if init_ckpt:
        return dataclasses.replace(SOHOConfig(**init_ckpt["model_config"]), **model_overrides)
    return soho.config_from_preset(cfg.preset, **model_overrides)


def build_data(cfg, model_cfg, vocab_path, bert_weights, data_root):
    """(model_cfg with the fields the data decide, tokenizer, training data set); see resolve_configs."""
    tokenizer = data.Tokenizer.from_vocab(vocab_path, model_cfg.max_text_len)
    if not bert_weights:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    dataset = build_train_dataset(cfg, data_root, tokenizer, model_cfg)
    if cfg.task == "vqa":
        model_cfg = dataclasses.replace(model_cfg, num_answers=len(dataset.answer_vocab))
    return model_cfg, tokenizer, dataset


def build_model(cfg, model_cfg, model_overrides, bert_weights, init_ckpt, resumed, master_process):
    """SOHO at model_cfg, on the CPU. Its weights: a resumed run's come later (restore_checkpoint, with the
    optimizers); else --init's (all but a new task head); else --bert's BERT and --resnet's ResNet; else random."""
    fresh = not resumed and not cfg.init
    if bert_weights and fresh:
        model = SOHO.from_pretrained(cfg.preset, bert=cfg.bert, resnet=cfg.resnet or None,
                                     **{**asdict(model_cfg), **model_overrides, "vocab_size": model_cfg.vocab_size})
    else:
        model = SOHO(model_cfg)
        if cfg.resnet and fresh:
            soho.load_resnet_weights(model.backbone, cfg.resnet)
    if init_ckpt:
        skipped = init_from_pretrained(model, init_ckpt["model"], cfg.init, cfg.task)
        if master_process:
            print(f"initialised from {cfg.init}" + (f" (new {cfg.task} head)" if skipped else ""))
    return model


def accumulation_steps(cfg, world_size):
    """Micro-steps per optimizer step: global_batch = batch_per_gpu x world_size x accumulation steps."""
    per_step = cfg.batch_per_gpu * world_size
    if cfg.global_batch % per_step:
        raise SystemExit(f"global_batch {cfg.global_batch} is not a multiple of batch_per_gpu {cfg.batch_per_gpu} x "
                         f"{world_size} processes; change --batch_per_gpu or --global_batch")
    return cfg.global_batch // per_step


def batch_arithmetic(cfg, n_examples, world_size, landscape=None):
    """(accumulation micro-steps, optimizer steps per epoch, steps in all); landscape: as make_loader's."""
    accum = accumulation_steps(cfg, world_size)
    if landscape is not None:
        steps_per_epoch = AspectGroupedSampler.steps_per_epoch(landscape, cfg.global_batch)
    else:
        steps_per_epoch = n_examples // cfg.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"the {cfg.task} data set has {n_examples} examples, fewer than one global batch "
                         f"({cfg.global_batch})")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return accum, steps_per_epoch, total_steps


def seed_this_rank(seed, ctx, ckpt):
    """Per-rank randomness from here on (dropout, MVM masking); a resumed run at the same world size continues
    each rank's own random state."""
    torch.manual_seed(seed + ctx.rank)
    np.random.seed(seed + ctx.rank)
    random.seed(seed + ctx.rank)
    if ckpt and ckpt["world_size"] == ctx.world_size:
        set_rng_state(ckpt["rng"][ctx.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])


def announce(cfg, ctx, model, meta, accum, steps_per_epoch, total_steps, n_examples, progress, resumed):
    """Write <out>/config.json and print the run's shape (rank 0)."""
    data.write_json(os.path.join(cfg.out, "config.json"),
                    {"train": meta["train_config"], "model": meta["model_config"], "world_size": ctx.world_size,
                     "amp": ctx.amp, "accumulation_steps": accum, "steps_per_epoch": steps_per_epoch,
                     "data_root": meta["data_root"], "vocab_path": meta["vocab_path"]}, indent=2)
    print(f"{cfg.task} | preset {cfg.preset} | {soho.count_parameters(model) / 1e6:.1f}M parameters | "
          f"{ctx.world_size} process(es) on {ctx.device.type} | amp {ctx.amp}\n"
          f"global batch {cfg.global_batch} = {cfg.batch_per_gpu} per process x {ctx.world_size} x {accum} "
          f"accumulation step(s) | split {cfg.train_split}: {n_examples} examples, {steps_per_epoch} "
          f"steps/epoch, {total_steps} steps" + (f" | resuming at step {progress.step}" if resumed else ""))


def model_for_epoch(model, cfg, ctx, epoch, net, frozen):
    """(the module the loop calls, whether the ResNet is frozen) for this epoch. Sec. 3.2: the ResNet stays
    frozen for the first epochs of pre-training (the VD's cold start). DDP is rebuilt when that changes, because
    it registers the trained parameters once, at construction."""
    freeze = cfg.task == "pretrain" and epoch < cfg.freeze_backbone_epochs
    if net is not None and freeze == frozen:
        return net, frozen
    for p in model.backbone.parameters():
        p.requires_grad = not freeze
    return (wrap_ddp(model, ctx.device, ctx.local_rank) if dist.is_initialized() else model), freeze


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints of a run, and its log
# ----------------------------------------------------------------------------------------------------------------


def save_training_state(out, model, optimizers, scaler, progress, meta, metrics, ctx):
    """Write <out>/ckpt.pt: everything a resumed run needs (weights, VD, optimizers, scaler, progress, every rank's
    random state) and what evaluate.py reads (meta: task, configs, vocabulary, data, answers). Every rank must call
    it (the random states are gathered); rank 0 writes. Returns the step saved."""
    rngs = rng_state()
    if dist.is_initialized():
        rngs = [None] * ctx.world_size
        dist.all_gather_object(rngs, rng_state())
    if ctx.master_process:
        save_checkpoint(os.path.join(out, "ckpt.pt"), {
            "model": model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
            "scaler": scaler.state_dict(), **asdict(progress), "rng": rngs, "world_size": ctx.world_size,
            **meta, "metrics": metrics})
    return progress.step


def restore_checkpoint(ckpt, model, optimizers, scaler):
    """Load a resumed run's weights, optimizers and scaler; returns its Progress."""
    model.load_state_dict(ckpt["model"])
    for opt, state in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(state)
    scaler.load_state_dict(ckpt["scaler"])
    return Progress(ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"])


class TrainingLog:
    """The loss statistics since the last log line ({name: [sum, count]}, already summed over ranks), how much of
    the VD is in use, and the time spent waiting for data against computing; every log_every steps, one line of
    <out>/log.jsonl and the progress bar's text (rank 0). `last` holds the last logged metrics."""

    def __init__(self, cfg, model_cfg, ctx, total_steps, initial_step, fresh):
        self.task, self.master_process, self.started = cfg.task, ctx.master_process, time.time()
        self.itm_weight = cfg.itm_weight
        self.vd_health = VDHealth(model_cfg.vd_size) if model_cfg.use_vd and cfg.task == "pretrain" else None
        self.window = defaultdict(lambda: torch.zeros(2, dtype=torch.float64))
        self.last, self.wait_time, self.compute_time = {}, 0.0, 0.0
        self.path = os.path.join(cfg.out, "log.jsonl")
        if self.master_process and fresh and os.path.isfile(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log; a resumed one appends to its own
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not self.master_process,
                        dynamic_ncols=True, desc=cfg.task)

    def add(self, stats, vd_counts, wait, compute):
        """One optimizer step's results (optimizer_step's return value)."""
        for name, s in stats.items():
            self.window[name] += s
        if vd_counts is not None:
            self.vd_health.add(vd_counts)
        self.wait_time, self.compute_time = self.wait_time + wait, self.compute_time + compute
        self.bar.update(1)

    def write(self, progress, optimizers):
        """The means of the window (then emptied), the VD's use, the learning rates and the share of time spent
        waiting for data, into `last`, log.jsonl and the progress bar."""
        m = {"step": progress.step, "epoch": progress.epoch}
        for name, (s, c) in self.window.items():
            m[name] = (s / max(c, 1)).item()
        if self.task == "pretrain":
            m["loss"] = soho.pretraining_objective(m.get("mlm", 0.0), m.get("mvm", 0.0), m.get("itm", 0.0),
                                                   self.itm_weight)  # Eq. 9, as minimised
        if self.vd_health:
            m.update(self.vd_health.summary())
        m["lr"] = optimizers[1].param_groups[0]["lr"]
        m["lr_backbone"] = optimizers[0].param_groups[0]["lr"]
        m["data_wait"] = self.wait_time / max(self.wait_time + self.compute_time, 1e-9)
        self.last = m
        self.window.clear()
        if self.master_process:
            self.bar.set_postfix_str(format_metrics(self.last))
            with open(self.path, "a") as f:
                f.write(json.dumps(self.last) + "\n")

    def close(self):
        self.bar.close()


def check_init_preset(cfg, init_ckpt):
    """--init from a checkpoint of another preset would train its architecture with this preset's recipe: refuse,
    unless --init_any_preset=true."""
    init_preset = ((init_ckpt or {}).get("train_config") or {}).get("preset")
    if init_preset and init_preset != cfg.preset and not cfg.init_any_preset:
        raise SystemExit(f"--init {cfg.init} was trained at preset {init_preset!r}, this run is at preset "
                         f"{cfg.preset!r}: the model would keep the checkpoint's {init_preset} architecture "
                         f"and train with the {cfg.preset} recipe. Pass --preset {init_preset}, or "
                         "--init_any_preset=true to fine-tune it so anyway")


def resolve_vocabulary(cfg, ckpt, init_ckpt, data_root, resume_path, master_process):
    """The vocabulary: --vocab FILE, else --bert DIR's vocab.txt, else the data folder's; a run continues with its
    own, and fine-tuning takes the --init checkpoint's (its word embeddings are that vocabulary's) unless --vocab
    says otherwise (e.g. the checkpoint came from another machine). Returns (vocab_path, whether --bert holds
    weights, i.e. a config.json)."""
    bert_weights = bool(cfg.bert) and os.path.isfile(os.path.join(cfg.bert, "config.json"))
    if ckpt:
        vocab_path, vocab_from = ckpt["vocab_path"], f"the vocabulary of {resume_path}"
    elif init_ckpt and not cfg.vocab:
        vocab_path, vocab_from = init_ckpt["vocab_path"], f"the vocabulary of --init {cfg.init}"
    elif cfg.vocab:
        vocab_path, vocab_from = cfg.vocab, "--vocab"
    elif cfg.bert:
        vocab_path, vocab_from = os.path.join(cfg.bert, "vocab.txt"), "--bert"
    else:
        vocab_path, vocab_from = os.path.join(data_root, "vocab.txt"), "the data folder's"
    if not os.path.isfile(vocab_path):
        raise SystemExit(f"no vocabulary at {vocab_path} ({vocab_from}): pass --vocab FILE (a WordPiece vocab.txt, "
                         "one token per line, e.g. bert-base-uncased's) or --bert DIR (a folder with vocab.txt: a "
                         "Hugging Face BERT directory, or vocab.txt alone for BERT's vocabulary with random weights)")
    bert_vocab = os.path.join(cfg.bert, "vocab.txt")
    if cfg.vocab and bert_weights and not ckpt and not cfg.init and os.path.isfile(bert_vocab):
        with open(cfg.vocab, "rb") as a, open(bert_vocab, "rb") as b:
            if a.read() != b.read():
                raise SystemExit(f"--vocab {cfg.vocab} differs from {bert_vocab}, whose token ids the BERT weights "
                                 f"of --bert {cfg.bert} were trained with: leave out --vocab")
    if cfg.bert and not bert_weights and not ckpt and not cfg.init:
        weights = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(cfg.bert, n))]
        if weights:
            raise SystemExit(f"--bert {cfg.bert} holds {weights[0]} but no config.json, which the weights need; "
                             "copy BERT's config.json there (or keep vocab.txt alone for random weights)")
        if master_process:
            print(f"--bert {cfg.bert} holds no config.json, only vocab.txt: " + (
                f"BERT's vocabulary ({vocab_path}), random weights" if not cfg.vocab else
                f"random weights, and the vocabulary of --vocab {vocab_path}"))
    return vocab_path, bert_weights


def build_train_dataset(cfg, data_root, tokenizer, model_cfg):
    # seed: each example's randomness (negatives, MLM masks) is a function of (seed, epoch, index), so it does
    # not depend on the number of ranks or workers, and a resumed run sees the same batches as a straight one
    opts = {"skip_bad_images": cfg.skip_bad_images, "seed": cfg.seed, "text_only": cfg.text_only}
    if cfg.task == "retrieval":
        opts["source"] = cfg.retrieval_source
    if cfg.task == "pretrain":
        opts.update(negatives=cfg.itm_negatives, mlm_prob=cfg.mlm_prob, subject_from_epoch=cfg.subject_from_epoch)
    return data.build_dataset(cfg.task, cfg.train_split, data_root, tokenizer, model_cfg, **opts)


def heldout_itm(model, cfg, data_root, tokenizer, model_cfg, ctx):
    """Pre-training's ITM accuracy on held-out images (COCO's Karpathy val, which pre-training never sees), never
    on the training batches: {"heldout_itm_acc", "heldout_itm_matched_acc", "heldout_itm_mismatched_acc"}."""
    import evaluate  # evaluate.py imports this module: import it here, not at the top

    try:
        dataset = data.build_dataset("pretrain", "val", data_root, tokenizer, model_cfg, seed=0,
                                     text_only=cfg.text_only)
    except data.DataError as e:  # e.g. VG alone, no COCO val: the run itself is fine, say what is missing
        if ctx.master_process:
            print(f"no held-out ITM: {e}")
        return {}
    m = evaluate.itm_accuracy(model, dataset, ctx, cfg.batch_per_gpu, workers=cfg.num_workers)
    if m is None:  # not rank 0
        return {}
    return {"heldout_itm_acc": m["accuracy"], "heldout_itm_matched_acc": m["matched"],
            "heldout_itm_mismatched_acc": m["mismatched"], "heldout_images": m["images"]}


def check_finite(stats, step, task):
    """Stop on a non-finite loss, naming the step and the terms; the last checkpoint on disk stays as it was.

    `stats` are already summed over the ranks and hold every loss term, so a NaN on any rank shows on all of
    them: every rank stops at the same step, with no collective of its own."""
    if not all(torch.isfinite(v).all() for v in stats.values()):
        terms = ", ".join(f"{k}={(v[0] / max(float(v[1]), 1)):.4g}" for k, v in stats.items())
        raise FloatingPointError(f"non-finite {task} loss at step {step + 1} ({terms}); stopping. The last "
                                 f"checkpoint is untouched: lower the learning rate or try --amp=off")


def format_metrics(m):
    keys = ["loss", "mlm", "mvm", "itm", "mlm_acc", "mvm_acc", "itm_acc", "itm_matched_acc", "itm_mismatched_acc",
            "vd_used", "vd_ppl", "pair_acc",
            "batch_r1", "vqa_score", "acc", "lr"]
    return " ".join(f"{k}={m[k]:.3g}" for k in keys if k in m)


def print_summary(cfg, log):
    task, m, wait_time, compute_time = cfg.task, log.last, log.wait_time, log.compute_time
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    print(f"\ndone in {(time.time() - log.started) / 60:.1f} min; checkpoint: {ckpt}")
    print("reached (mean over the last logging window): " + format_metrics(m))
    if "heldout_itm_acc" in m:
        print(f"held-out ITM ({m['heldout_images']} COCO val images never trained on, 4 texts each): "
              f"accuracy {m['heldout_itm_acc']:.3f}, matched {m['heldout_itm_matched_acc']:.3f}, "
              f"mismatched {m['heldout_itm_mismatched_acc']:.3f}" + (" (text-only control)" if cfg.text_only else ""))
    print(f"share of step time spent waiting for data ({cfg.num_workers} workers): "
          f"{100 * wait_time / max(wait_time + compute_time, 1e-9):.1f}%")
    data_flag = f" --data {cfg.data}" if cfg.data else ""
    if task == "pretrain":
        print("next: fine-tune and evaluate, e.g.\n"
              f"  python train.py --task vqa --init {ckpt}{data_flag}\n"
              f"  python evaluate.py --task vd --checkpoint {ckpt}")
    else:
        print(f"next: python evaluate.py --task {task} --checkpoint {ckpt}{data_flag}")


def main(argv=None):
    cfg, model_overrides, args = parse_args(argv)
    try:
        return train(cfg, model_overrides, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
