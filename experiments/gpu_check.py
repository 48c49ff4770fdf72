"""
The GPU check (README, "Speed"): on a machine with one GPU, in under 8 minutes, one summary table of what has never
been measured on an accelerator here (the r101 speed of Sec. 4.5 in bf16, the memory and speed of r101 pre-training
steps under AMP, and NCCL). Without a GPU it runs a smoke mode of the same checks that finishes in seconds.

    bash experiments/gpu_check.sh                       # GPU: the full check; no GPU: the smoke mode
    python experiments/gpu_check.py --smoke             # the smoke mode on any machine
    python experiments/gpu_check.py --json check.json   # also write the table as JSON

Full mode (an accelerator is present; CUDA on the machines this was written for, but nothing here names it):

  speed        evaluate.measure_speed, the code of `evaluate.py --task speed`: r101, 600x1000 image, 16 text +
               160 visual tokens, bf16 autocast. Batch 1: ms per image-text pair of the CNN, the transformer and
               the whole pipeline, against the paper's 44 ms per pair (23 ms in the transformer) on a V100. Then
               --speed-batch pairs per call: the batched throughput in pairs/s.
  retrieval    evaluate.score_all_pairs, the scoring loop of `evaluate.py --task retrieval`, over precomputed
               visual tokens (the CNN runs once per image): pairs/s at 1,024 pairs per forward, and the time that
               exhaustive COCO 5K retrieval (25,000 captions x 5,000 images = 125M pairs) would take on this GPU.
  pre-training r101, 16 images of 600x1000 per GPU with 4 texts each (the paper's batch per GPU), random batches
               from data.random_batch (the keys and shapes of data.py's batches), one optimizer step each as train.py
               takes it: SOHO.pretrain_losses, train.pretraining_loss, backward, clipping, SGD + AdamW
               (train.build_optimizers, the r101 recipe), the Eq. 4 update. bf16, and fp16 with
               torch.amp.GradScaler, each with and without gradient checkpointing: images/s (median step) and peak
               memory (max_memory_allocated over model, optimizer states and the step). The ResNet is trained, as
               after the first 10 epochs of the recipe (frozen before), which is the larger footprint.
  NCCL         with 2 or more GPUs: `torchrun --nproc_per_node 2 train.py` (tiny preset, synthetic world, a few
               steps); train.py picks NCCL for GPUs. With one GPU it is skipped, and the table says so.

Smoke mode (no accelerator, or --smoke): the tiny preset at 128x192, 2 images per pre-training step, 2 timed
steps, bf16 autocast on the CPU and fp16 where the CPU's autocast allows it (else fp32, said in the note). Peak
memory is an accelerator statistic: "n/a" on the CPU. The table has the same rows; the lines after it say what
was skipped and why.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import evaluate  # noqa: E402
import soho  # noqa: E402
import train  # noqa: E402
from soho import SOHO  # noqa: E402

PAPER_MS_PER_PAIR, PAPER_TRANSFORMER_MS = 44.0, 23.0  # Sec. 4.5: r101, 600x1000, one V100
COCO5K_PAIRS = 25_000 * 5_000
FULL = dict(preset="r101", size=(600, 1000), images_per_step=16, steps=5, warmup=2, speed_repeats=20,
            speed_warmup=5, speed_batch=32, pairs=(16, 256), pair_batch=1024)
SMOKE = dict(preset="tiny", size=(128, 192), images_per_step=2, steps=2, warmup=1, speed_repeats=2,
             speed_warmup=1, speed_batch=4, pairs=(8, 16), pair_batch=64)


# ----------------------------------------------------------------------------------------------------------------
# 1. Device and its statistics, without naming a vendor
# ----------------------------------------------------------------------------------------------------------------


def pick_device(requested):
    """--device if given, else the current accelerator if there is one (torch.accelerator, torch >= 2.6; CUDA's
    check on older torch), else the CPU."""
    if requested:
        return torch.device(requested)
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend(device):
    """torch.cuda, torch.xpu, ... for an accelerator; None for the CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def device_name(device):
    b = backend(device)
    if b is not None and hasattr(b, "get_device_name"):
        return b.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} thread(s))"


def device_count(device):
    b = backend(device)
    return b.device_count() if b is not None and hasattr(b, "device_count") else 0


def reset_peak_memory(device):
    b = backend(device)
    if b is not None and hasattr(b, "reset_peak_memory_stats"):
        b.empty_cache()
        b.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    b = backend(device)
    if b is not None and hasattr(b, "max_memory_allocated"):
        return b.max_memory_allocated(device) / 2**30
    return None


# ----------------------------------------------------------------------------------------------------------------
# 2. The checks
# ----------------------------------------------------------------------------------------------------------------


def row(check, setting, value, unit, note=""):
    return {"check": check, "setting": setting, "value": value, "unit": unit, "note": note}


def check_speed(p, device, amp):
    """Sec. 4.5 through evaluate.measure_speed at batch 1, then the batched throughput."""
    torch.manual_seed(0)
    model = SOHO(soho.config_from_preset(p["preset"])).to(device)
    setting = f"{p['preset']} {p['size'][0]}x{p['size'][1]}, {amp}"
    rows = []
    one = evaluate.measure_speed(model, p["size"], device, amp, p["speed_repeats"], p["speed_warmup"],
                                 batch=1, pretrain_images=1)
    ms, tokens = one["ms_per_pair"], one["sequence_length"]
    paper = p["preset"] == "r101" and tuple(p["size"]) == (600, 1000)
    rows.append(row("speed b1 CNN", setting, ms["cnn"], "ms/pair"))
    rows.append(row("speed b1 transformer", f"{setting}, {tokens} tokens", ms["transformer"], "ms/pair",
                    f"paper: {PAPER_TRANSFORMER_MS:g} ms on a V100" if paper else "paper's setting: r101 only"))
    rows.append(row("speed b1 total", setting, ms["total"], "ms/pair",
                    f"paper: {PAPER_MS_PER_PAIR:g} ms/pair on a V100 (x{ms['total'] / PAPER_MS_PER_PAIR:.2f})"
                    if paper else "paper's setting: r101 only"))
    batched = evaluate.measure_speed(model, p["size"], device, amp, p["speed_repeats"], p["speed_warmup"],
                                     batch=p["speed_batch"], pretrain_images=1)
    rows.append(row("speed batched", f"{setting}, {p['speed_batch']} pairs per call",
                    1000.0 / batched["ms_per_pair"]["total"], "pairs/s", "CNN, VD and transformer for every pair"))
    visual_tokens = one["visual_tokens"]
    del model
    return rows, visual_tokens


def check_retrieval(p, device, amp, visual_tokens):
    """evaluate.score_all_pairs over precomputed visual tokens: the transformer's pairs/s, and COCO 5K from it."""
    torch.manual_seed(0)
    model = SOHO(soho.config_from_preset(p["preset"])).to(device).eval()
    cfg = model.config
    n_img, n_txt = p["pairs"]
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(n_img, visual_tokens, cfg.hidden_size, generator=g).to(device)
    valid = torch.ones(n_img, visual_tokens, dtype=torch.bool, device=device)
    ids = torch.randint(5, cfg.vocab_size, (n_txt, 16), generator=g).to(device)
    tmask = torch.ones_like(ids, dtype=torch.bool)

    # rank=1 only hides evaluate.py's progress bar (rank 0 draws it); nothing else in score_all_pairs reads it
    ctx = train.Context(rank=1, world_size=1, local_rank=0, device=device, amp=amp)

    def score():
        evaluate.score_all_pairs(model, visual, valid, ids, tmask, p["pair_batch"], ctx)
    score()  # warm-up
    seconds = statistics.median(evaluate.timed(score, device) for _ in range(3))
    pairs_per_s = n_img * n_txt / seconds
    hours = COCO5K_PAIRS / pairs_per_s / 3600
    return [row("retrieval scoring", f"{p['preset']}, 16+{visual_tokens} tokens, {amp}, pair batch {p['pair_batch']}",
                pairs_per_s, "pairs/s", f"COCO 5K, 125M pairs: {hours:.1f} h of transformer on this device")]


def pretrain_steps(p, device, amp, checkpointing):
    """Median seconds of one optimizer step, taken by train.optimizer_step (train.py's own step: forward of
    SOHO.pretrain_losses under autocast, Eq. 9, backward through the gradient scaler, clipping, SGD + AdamW, the
    Eq. 4 update) on one process with no accumulation; and the peak memory. Returns (images/s, peak GiB or None,
    last loss)."""
    reset_peak_memory(device)
    torch.manual_seed(0)
    cfg = soho.config_from_preset(p["preset"], gradient_checkpointing=checkpointing)
    model = SOHO(cfg).to(device).train()
    n = p["images_per_step"]
    tcfg = train.TrainConfig(preset=p["preset"], **{**train.recipe("pretrain", p["preset"]),
                                                      "batch_per_gpu": n, "global_batch": n})
    optimizers = train.build_optimizers(model, tcfg, "pretrain")
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
    ctx = train.Context(rank=0, world_size=1, local_rank=0, device=device, amp=amp)
    batches = itertools.repeat(train.to_device(data.random_batch("pretrain", cfg, n, image_size=p["size"], text_len=16), device))

    times, loss = [], None
    for i in range(p["warmup"] + p["steps"]):
        evaluate.synchronize(device)
        t0 = time.perf_counter()
        stats = train.optimizer_step(model, model, batches, optimizers, scaler, tcfg, ctx, i)[0]
        evaluate.synchronize(device)
        if i >= p["warmup"]:
            times.append(time.perf_counter() - t0)
        loss = sum(float(stats[k][0] / stats[k][1].clamp(min=1)) for k in ("mlm", "mvm", "itm"))
    peak = peak_memory_gib(device)
    del model, optimizers, batches
    return n / statistics.median(times), peak, loss


def check_pretraining(p, device, smoke):
    """bf16 and fp16 (+ GradScaler), each with and without gradient checkpointing: two rows each."""
    rows, skipped = [], []
    setting = (f"{p['preset']}, {p['images_per_step']} img x 4 txt, {p['size'][0]}x{p['size'][1]}, "
               f"{p['steps']} steps")
    for amp in ("bf16", "fp16"):
        for checkpointing in (False, True):
            name = f"pretrain {amp}{' + scaler' if amp == 'fp16' else ''}{' + ckpt' if checkpointing else ''}"
            used, note = amp, ""
            try:
                images_per_s, peak, loss = pretrain_steps(p, device, used, checkpointing)
            except Exception as e:  # fp16 autocast on a CPU whose torch lacks it: fall back to fp32, say so
                if not smoke:
                    raise
                used, note = "off", f"fp32: {amp} failed on {device.type} ({type(e).__name__})"
                skipped.append(f"{name}: {amp} autocast failed on {device.type}: {e}; measured in fp32 instead")
                images_per_s, peak, loss = pretrain_steps(p, device, used, checkpointing)
            if not math.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss}")
            note = note or f"loss {loss:.2f}"
            rows.append(row(name, setting, images_per_s, "images/s", note))
            rows.append(row(name, setting, peak, "GiB peak",
                            "max_memory_allocated" if peak is not None else "n/a on the CPU"))
            if peak is None and "peak memory" not in " ".join(skipped):
                skipped.append("peak memory: an accelerator statistic (max_memory_allocated), n/a on the CPU")
    return rows, skipped


def check_nccl(device, limit_s):
    """Two ranks of train.py under torchrun when the machine has two GPUs: NCCL as train.py picks it."""
    n = device_count(device)
    if n < 2:
        reason = "no accelerator" if device.type == "cpu" else f"{n} {device.type} device(s), 2 needed"
        return [row("NCCL 2 processes", "torchrun train.py, tiny", None, "s", f"skipped: {reason}")], \
            [f"NCCL 2-process run: {reason}"]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               os.path.join(ROOT, "train.py"), "--out", out, "--fresh", "--max_steps=10", "--log_every=5",
               "--batch_per_gpu=8"]  # the tiny recipe's global batch of 16, 8 per rank
        t0 = time.time()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        except subprocess.TimeoutExpired:
            return [row("NCCL 2 processes", "torchrun train.py, tiny, 10 steps", None, "s",
                        f"FAILED: over {limit_s:.0f} s")], []
        seconds = time.time() - t0
        log = done.stdout + done.stderr
        ok = done.returncode == 0 and f"2 process(es) on {device.type}" in log
        # the backend train.setup_distributed chooses for this device: NCCL for CUDA GPUs
        chosen = torch.distributed.get_default_backend_for_device(device)
        note = f"ok: 2 ranks, backend {chosen}" if ok else f"FAILED (exit {done.returncode}): {log[-300:]!r}"
        return [row("NCCL 2 processes", "torchrun train.py, tiny, 10 steps", seconds, "s", note)], []


# ----------------------------------------------------------------------------------------------------------------
# 3. The table
# ----------------------------------------------------------------------------------------------------------------

COLUMNS = ("check", "setting", "value", "unit", "note")


def format_value(v):
    if v is None:
        return "n/a"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"


def format_table(rows):
    cells = [list(COLUMNS)] + [[r["check"], r["setting"], format_value(r["value"]), r["unit"], r["note"]]
                               for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


# ----------------------------------------------------------------------------------------------------------------
# 4. Command line
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the smoke mode (automatic without an accelerator)")
    ap.add_argument("--device", default="", help="force a device, e.g. cpu (default: the accelerator, if any)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--time-limit", type=float, default=450.0,
                    help="seconds: later checks are skipped (and said so) once the run passes this")
    args = ap.parse_args(argv)

    started = time.time()
    device = pick_device(args.device)
    smoke = args.smoke or device.type == "cpu"
    p = SMOKE if smoke else FULL
    amp = "bf16"
    print(f"gpu_check: {'smoke' if smoke else 'full'} mode on {device_name(device)} ({device}), torch "
          f"{torch.__version__}, {device_count(device)} accelerator(s)", flush=True)

    rows, skipped = [], []
    if smoke:
        skipped.append(f"{'--smoke' if args.smoke else 'no accelerator'}: the tiny preset at "
                       f"{p['size'][0]}x{p['size'][1]} instead of r101 at 600x1000, {p['images_per_step']} images "
                       f"per step instead of 16, {p['steps']} steps; the paper's numbers do not apply")

    def over_time(what):
        if time.time() - started > args.time_limit:
            skipped.append(f"{what}: the run passed --time-limit {args.time_limit:.0f} s")
            return True
        return False

    with contextlib.redirect_stdout(sys.stderr):  # whatever the library code prints stays out of the table
        speed_rows, visual_tokens = check_speed(p, device, amp)
    rows += speed_rows
    print(f"  speed done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if not over_time("retrieval scoring"):
        rows += check_retrieval(p, device, amp, visual_tokens)
    if not over_time("pre-training steps"):
        with contextlib.redirect_stdout(sys.stderr):
            more, why = check_pretraining(p, device, smoke)
        rows += more
        skipped += why
        print(f"  pre-training done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    remaining = max(30.0, args.time_limit + 30 - (time.time() - started))
    more, why = check_nccl(device, remaining)
    rows += more
    skipped += why

    print(format_table(rows))
    for line in skipped:
        print(f"skipped: {line}")
    elapsed = time.time() - started
    print(f"finished in {elapsed:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"mode": "smoke" if smoke else "full", "device": device_name(device), "torch": torch.__version__,
                       "rows": rows, "skipped": skipped, "seconds": elapsed}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
