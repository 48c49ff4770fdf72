"""
The paper's claims in miniature, on the synthetic world, on a CPU (README, "Results in miniature").

    python experiments/miniature.py [--seeds 0,1,2] [--steps 150] [--out runs/miniature]

1. Pre-training helps (Tables 2-6 against models without it): each downstream task fine-tuned from the tiny
   pre-trained checkpoint, against the same fine-tuning from no pre-training, same steps and seed.
2. The visual dictionary helps (Table 7): pre-train without the VD and with VD sizes 32, 128 and 512, fine-tune each.

Every run is train.py and evaluate.py as a user would call them; results are appended to <out>/results.jsonl as
they come, so a stopped run keeps what it measured, and a rerun skips what is already there. Every score is on
held-out data: pre-training's ITM on COCO val images, retrieval on the test images, VQA on val2014 (fine-tuning
trains on train2014 only), NLVR2 on dev, SNLI-VE on test. "text-only" pre-trains the control that sees one
constant image instead of every image.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import train  # noqa: E402

PRETRAININGS = {"vd128": [], "no-vd": ["--use_vd=false"], "vd32": ["--vd_size=32"], "vd512": ["--vd_size=512"],
                "text-only": ["--text_only=true"]}
# task -> (fine-tuning flags, evaluation flags, function picking the headline metric from the evaluation result)
FINE_TUNING = {
    "retrieval": (["--batch_per_gpu=8", "--global_batch=8"], ["--split", "test", "--max-images", "50"],
                  lambda r: next(iter(r["metrics"].values()))),
    "vqa": (["--batch_per_gpu=16", "--global_batch=16"], ["--split", "val", "--max-examples", "500"],
            lambda r: {"vqa_acc": r["metrics"]["overall"]}),
    "nlvr2": (["--batch_per_gpu=8", "--global_batch=8"], ["--split", "dev"],
              lambda r: {k: r["metrics"][k] for k in ("accuracy", "consistency")}),
    "snli-ve": (["--batch_per_gpu=16", "--global_batch=16"], ["--split", "test"],
                lambda r: {"accuracy": r["metrics"]["accuracy"]}),
}


def done_keys(path):
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        return {json.loads(line)["key"] for line in f if line.strip()}


def record(path, key, **fields):
    with open(path, "a") as f:
        f.write(json.dumps({"key": key, **fields}) + "\n")
    print(f"[miniature] {key}: {fields}", flush=True)


def report(path):
    """Markdown tables of results.jsonl: mean (and spread) over seeds per task and initialisation."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    cells = {}
    for r in rows:
        if "task" not in r:
            continue
        m = r["metrics"]
        value = {"retrieval": lambda: (m["tr_r1"] + m["ir_r1"]) / 2, "vqa": lambda: m["vqa_acc"],
                 "nlvr2": lambda: m["accuracy"], "snli-ve": lambda: m["accuracy"]}[r["task"]]()
        cells.setdefault((r["task"], r["init"]), []).append(value)
    inits = [i for i in ["scratch", *PRETRAININGS] if any(k[1] == i for k in cells)]
    lines = ["| task (metric) | " + " | ".join(inits) + " |", "| --- |" + " --- |" * len(inits)]
    names = {"retrieval": "retrieval (mean of TR and IR R@1)", "vqa": "VQA (accuracy)",
             "nlvr2": "NLVR2 (accuracy)", "snli-ve": "SNLI-VE (accuracy)"}
    for task in FINE_TUNING:
        out = []
        for init in inits:
            v = cells.get((task, init), [])
            if not v:
                out.append("not run")
            elif len(v) == 1:
                out.append(f"{v[0]:.1f}")
            else:
                out.append(f"{sum(v) / len(v):.1f} ({min(v):.1f}-{max(v):.1f}, {len(v)} seeds)")
        lines.append(f"| {names[task]} | " + " | ".join(out) + " |")
    pre = [r for r in rows if r["key"].startswith("pretrain/")]
    lines += ["", "| pre-training | minutes | MLM acc | MVM acc | held-out ITM acc (matched / mismatched) | "
              "VD entries used (share of k) | VD perplexity |", "| --- | --- | --- | --- | --- | --- | --- |"]
    nan = float("nan")
    for r in pre:
        f = r["final"]
        minutes = "given" if r.get("checkpoint") else f"{r['minutes']:.1f}"
        vd = "vd_used" in f  # without the VD there is no MVM and no dictionary to report
        lines.append(f"| {r['key'].split('/')[1]} | {minutes} | {f.get('mlm_acc', 0):.2f} | "
                     + (f"{f.get('mvm_acc', nan):.2f}" if vd else "-")
                     + f" | {f.get('heldout_itm_acc', nan):.3f} "
                     f"({f.get('heldout_itm_matched_acc', nan):.3f} / "
                     f"{f.get('heldout_itm_mismatched_acc', nan):.3f}) | "
                     + (f"{f['vd_used']:.3f} | {f.get('vd_ppl', nan):.1f}" if vd else "- | -") + " |")
    print("\n".join(lines))


def pretrained_checkpoints(spec):
    """--pretrained: "" -> {}; "PATH" -> {"vd128": PATH}; "NAME=PATH,NAME=PATH" -> {NAME: PATH, ...}."""
    if not spec:
        return {}
    if "=" not in spec:
        return {"vd128": spec}
    given = dict(pair.split("=", 1) for pair in spec.split(","))
    unknown = sorted(set(given) - set(PRETRAININGS))
    if unknown:
        raise SystemExit(f"--pretrained: unknown pre-training(s) {unknown}; choose from {list(PRETRAININGS)}")
    missing = [path for path in given.values() if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"--pretrained: no checkpoint at {missing}")
    return given


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/miniature")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per task")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
    p.add_argument("--pretrainings", default=",".join(PRETRAININGS), help="which of " + ",".join(PRETRAININGS))
    p.add_argument("--tasks", default=",".join(FINE_TUNING))
    p.add_argument("--pretrain-args", default="", help='extra train.py flags for pre-training, e.g. "--epochs=10"')
    p.add_argument("--pretrained", default="", help="use this checkpoint of the default pre-training (e.g. "
                   "runs/pretrain/ckpt.pt from `python train.py`) as vd128 instead of pre-training again; or "
                   "comma-separated NAME=CHECKPOINT pairs for any of the pre-trainings (e.g. no-vd=runs/novd/ckpt.pt)")
    p.add_argument("--report", action="store_true", help="print the tables of what <out>/results.jsonl holds")
    args = p.parse_args()
    if args.report:
        return report(os.path.join(args.out, "results.jsonl"))
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    done = done_keys(results)
    seeds = [int(s) for s in args.seeds.split(",")]
    inits = ["scratch"] + [i for i in args.pretrainings.split(",") if i]
    given = pretrained_checkpoints(args.pretrained)
    for init in inits:
        ckpt = None
        if init != "scratch":
            run = os.path.join(args.out, f"pretrain-{init}")
            ckpt = os.path.join(run, "ckpt.pt")
            if init in given:
                ckpt = given[init]
                if f"pretrain/{init}" not in done:
                    final = train.load_checkpoint(ckpt)["metrics"]
                    record(results, f"pretrain/{init}", minutes=None, final=final, checkpoint=ckpt)
            elif f"pretrain/{init}" not in done:
                t0 = time.time()
                # the tiny default recipe, as `python train.py`, unless --pretrain-args says otherwise
                m = train.main(["--out", run, *PRETRAININGS[init], *args.pretrain_args.split()])
                record(results, f"pretrain/{init}", minutes=(time.time() - t0) / 60, final=m)
        for task in args.tasks.split(","):
            ft_flags, eval_flags, pick = FINE_TUNING[task]
            for seed in seeds:
                key = f"{task}/{init}/seed{seed}"
                if key in done:
                    continue
                run = os.path.join(args.out, f"{task}-{init}-seed{seed}")
                flags = ["--task", task, "--out", run, f"--max_steps={args.steps}", f"--seed={seed}", *ft_flags]
                if ckpt:
                    flags += ["--init", ckpt]  # (scratch: the tiny model from random weights)
                t0 = time.time()
                fine = train.main(flags)
                result = evaluate.main(["--task", task, "--checkpoint", os.path.join(run, "ckpt.pt"), *eval_flags])
                record(results, key, task=task, init=init, seed=seed, minutes=(time.time() - t0) / 60,
                       metrics=pick(result), train_final=fine)


if __name__ == "__main__":
    main()
