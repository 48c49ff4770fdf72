"""
How much a busy neighbour process slows the model's training step on a CPU with few cores, and how much of that a
lower priority for the neighbour gives back: the measurement behind train.py's `worker_nice` (README, "Two
commands"). A DataLoader worker is such a neighbour: it decodes and pads the next batch while the model runs.

    python experiments/worker_contention.py [--steps 15] [--duty 0.3] [--batch 16] [--threads 2]

The model is the tiny preset, training on one random pre-training batch of 256x320 images (Eq. 9, ITM weighted
as the tiny recipe), with `--threads` intra-op threads. The neighbour is one single-threaded process that computes
for `duty` of every 50 ms and sleeps the rest, at normal priority, at nice 19, or not there at all; each setting
is timed twice, in alternating order, because this kind of machine's speed drifts from minute to minute. Prints
milliseconds per step. Only ratios measured in one run mean anything.
"""

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate  # noqa: E402
import soho  # noqa: E402
import train  # noqa: E402


def neighbour(duty, nice, stop):
    """Compute (pure Python, one thread) for duty x 50 ms, sleep for the rest, until stop is set."""
    train.nice_worker(nice)  # as train.py's data workers are niced
    x = 0
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < 0.05 * duty:
            x = (x * 1103515245 + 12345) % 2147483648
        time.sleep(0.05 * (1 - duty))


def time_steps(step, steps, duty=0.0, nice=0):
    """Seconds per call of step(), with a neighbour process running (duty > 0) or not."""
    stop, other = mp.Event(), None
    if duty:
        other = mp.Process(target=neighbour, args=(duty, nice, stop), daemon=True)
        other.start()
        time.sleep(0.3)  # let it start
    try:
        return evaluate.timed(step, torch.device("cpu"), inner=steps)
    finally:
        if other is not None:
            stop.set()
            other.join()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--duty", type=float, default=0.3, help="share of the time the neighbour computes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not 0 < args.duty <= 1:
        p.error(f"--duty must be in (0, 1], got {args.duty}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = soho.PRESETS["tiny"]
    model = soho.SOHO(cfg).train().to(memory_format=torch.channels_last)
    batch = data.random_batch("pretrain", cfg, args.batch, image_size=(256, 320), text_len=14)
    itm_weight = train.recipe("pretrain", "tiny")["itm_weight"]

    def step():
        out = model("pretrain", batch)
        loss, _ = train.pretraining_loss(out, 1, batch["itm_label"], itm_weight)
        model.zero_grad(set_to_none=True)
        loss.backward()

    for _ in range(2):
        step()  # warm-up: allocator, oneDNN kernels
    settings = [("alone", 0), ("beside a neighbour", 0), ("beside a neighbour at nice 19", 19)]
    times = {name: [] for name, _ in settings}
    for r in range(2):  # A B C, then C B A: a drifting machine affects every setting alike (evaluate.median_times)
        for name, nice in (settings if r % 2 == 0 else settings[::-1]):
            duty = 0.0 if name == "alone" else args.duty
            times[name].append(time_steps(step, args.steps, duty, nice))
    print(f"tiny pre-training step, batch {args.batch} of 256x320, {args.threads} thread(s); the neighbour computes "
          f"{args.duty:.0%} of the time on one core")
    for name, _ in settings:
        ms = " and ".join(f"{1000 * t:.0f}" for t in times[name])
        print(f"  {name:30s} {ms} ms/step")
    return times


if __name__ == "__main__":
    main()
