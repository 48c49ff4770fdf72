"""
The paper's claims in miniature, on the synthetic world, on a CPU (README, "Results in miniature").

    python experiments/miniature.py [--seeds 0,1,2] [--steps 150] [--out runs/miniature] [--no-scratch]

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
import data  # noqa: E402
import evaluate  # noqa: E402
import synthetic  # noqa: E402
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


def about_the_scene(text):
    """Whether a question or statement of the synthetic world is about the scene (its background) rather than
    the shapes: the pre-trained model sees the scene and not the shapes (README), so the two are scored apart."""
    return "background" in text.lower()


def scene_and_objects(task, result, data_root):
    """The evaluation's score split into the questions/statements about the scene and the others:
    {"scene": score, "objects": score, "n_scene": count, "n_objects": count} (VQA: accuracy, the others: share
    correct; in percent). VQA's answers are read from result["answers_path"], where evaluate.py wrote them (or
    from result["answers_file"]). Retrieval has no such split (every caption names the scene): None."""
    hits = {True: [], False: []}
    if task == "vqa":
        vqa_dir = os.path.join(data_root, "vqa")
        questions = data.read_json(os.path.join(vqa_dir, data.VQA_QUESTION_FILES["val2014"]), "VQA questions")
        annotations = data.read_json(os.path.join(vqa_dir, data.VQA_ANNOTATION_FILES["val2014"]), "VQA answers")
        questions, annotations = questions["questions"], annotations["annotations"]
        text = {q["question_id"]: q["question"] for q in questions}
        human = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
        answers = result.get("answers_file") or data.read_json(result["answers_path"], "VQA answers file")
        for row in answers:
            qid = row["question_id"]
            hits[about_the_scene(text[qid])].append(evaluate.vqa_accuracy(row["answer"], human[qid]))
    elif task == "nlvr2":
        lines = data.read_json_lines(os.path.join(data_root, "nlvr2", f"{result['split']}.json"), "NLVR2")
        truth = {r["identifier"]: (r["sentence"], int(r["label"] == "True")) for _, r in lines}
        for identifier, prediction in result["predictions"].items():
            sentence, label = truth[identifier]
            hits[about_the_scene(sentence)].append(float(prediction == label))
    elif task == "snli-ve":
        path = os.path.join(data_root, "snli-ve", f"snli_ve_{result['split']}.jsonl")
        lines = data.read_json_lines(path, "SNLI-VE")
        truth = {r["pairID"]: (r["sentence2"], r["gold_label"]) for _, r in lines}
        for pair_id, prediction in result["predictions"].items():
            hypothesis, label = truth[pair_id]
            hits[about_the_scene(hypothesis)].append(float(prediction == label))
    else:
        return None
    mean = lambda v: 100.0 * sum(v) / len(v) if v else float("nan")
    return {"scene": mean(hits[True]), "objects": mean(hits[False]), "n_scene": len(hits[True]),
            "n_objects": len(hits[False])}


def done_keys(path):
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        return {json.loads(line)["key"] for line in f if line.strip()}


def record(path, key, **fields):
    with open(path, "a") as f:
        f.write(json.dumps({"key": key, **fields}) + "\n")
    print(f"[miniature] {key}: {fields}", flush=True)


def spread(values):
    """"mean (lowest-highest, n seeds)" of a cell's values; one value as it is."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{sum(values) / len(values):.1f} ({min(values):.1f}-{max(values):.1f}, {len(values)} seeds)"


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
            out.append(spread(v) if v else "not run")
        lines.append(f"| {names[task]} | " + " | ".join(out) + " |")
    lines += ["", "The same, split: about the scene (the background) / about the shapes (how many of each)",
              "", "| task | " + " | ".join(inits) + " |", "| --- |" + " --- |" * len(inits)]
    for task in ("vqa", "nlvr2", "snli-ve"):
        out = []
        for init in inits:
            split = [r["by_kind"] for r in rows if r.get("task") == task and r["init"] == init and r.get("by_kind")]
            out.append(" / ".join(spread([b[k] for b in split]) for k in ("scene", "objects")) if split else "-")
        counts = next((f" ({r['by_kind']['n_scene']} / {r['by_kind']['n_objects']})" for r in rows
                       if r.get("task") == task and r.get("by_kind")), "")
        lines.append(f"| {names[task]}{counts} | " + " | ".join(out) + " |")
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


def main(argv=None):
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
    p.add_argument("--no-scratch", action="store_true", help="fine-tune only from the pre-trainings (to split one "
                   "measurement between processes: one of them runs scratch)")
    p.add_argument("--report", action="store_true", help="print the tables of what <out>/results.jsonl holds")
    args = p.parse_args(argv)
    if args.report:
        return report(os.path.join(args.out, "results.jsonl"))
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    done = done_keys(results)
    seeds = [int(s) for s in args.seeds.split(",")]
    inits = ([] if args.no_scratch else ["scratch"]) + [i for i in args.pretrainings.split(",") if i]
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
                       metrics=pick(result), train_final=fine,
                       by_kind=scene_and_objects(task, result, synthetic.default_data_root()))


if __name__ == "__main__":
    main()
