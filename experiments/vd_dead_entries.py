"""
Dead dictionary entries, measured: how many of the k entries the visual dictionary uses under each start / restart
choice, at k = 32, 128 and 512 (README, "Differences": the choice of the default).

    python experiments/vd_dead_entries.py [--steps 300] [--out runs/vd-dead-entries]
    python experiments/vd_dead_entries.py --report

Each run is `python train.py` (tiny preset, synthetic world) with --vd_size, --vd_init and --vd_restart_after set,
stopped after --steps optimizer steps. `vd_used` and `vd_ppl` are those of the last logging window (the entries
chosen in its steps, and the perplexity of their use), as the progress bar shows them. Results are appended to
<out>/results.jsonl as they come; a rerun skips what is there.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

CHOICES = {  # name -> train.py flags
    "random (the paper)": ["--vd_init=random", "--vd_restart_after=0"],
    "k-means start": ["--vd_init=features", "--vd_restart_after=0"],
    "k-means start + restarts after 20 idle steps": ["--vd_init=features", "--vd_restart_after=20"],
}
SIZES = (32, 128, 512)


def report(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = {(r["choice"], r["k"]): r for r in rows}
    lines = ["| start / restart | " + " | ".join(f"k = {k}: used, perplexity, MVM acc" for k in SIZES) + " |",
             "| --- |" + " --- |" * len(SIZES)]
    for choice in CHOICES:
        cells = []
        for k in SIZES:
            r = by.get((choice, k))
            cells.append("not run" if r is None else
                         f"{round(r['vd_used'] * k)} of {k}, {r['vd_ppl']:.1f}, {r['mvm_acc']:.2f}")
        lines.append(f"| {choice} | " + " | ".join(cells) + " |")
    steps = {r["steps"] for r in rows}
    lines.append(f"\n(after {', '.join(map(str, sorted(steps)))} steps of the tiny pre-training)")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/vd-dead-entries")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    results = os.path.join(args.out, "results.jsonl")
    if args.report:
        return report(results)
    os.makedirs(args.out, exist_ok=True)
    done = set()
    if os.path.isfile(results):
        done = {(r["choice"], r["k"]) for r in map(json.loads, open(results)) if r}
    for choice, flags in CHOICES.items():
        for k in SIZES:
            if (choice, k) in done:
                continue
            run = os.path.join(args.out, f"{flags[0][10:]}-{flags[1][19:]}-k{k}")
            m = train.main(["--out", run, "--fresh", f"--vd_size={k}", f"--max_steps={args.steps}", *flags])
            with open(results, "a") as f:
                f.write(json.dumps({"choice": choice, "k": k, "steps": args.steps, "vd_used": m["vd_used"],
                                    "vd_ppl": m["vd_ppl"], "mvm_acc": m["mvm_acc"],
                                    "heldout_itm_acc": m.get("heldout_itm_acc")}) + "\n")
    report(results)


if __name__ == "__main__":
    main()
