"""experiments/miniature.py: --pretrained's NAME=CHECKPOINT pairs, --report's tables (mean and range over
seeds, computed here by hand) and the scores split into statements about the scene and about the shapes."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import data  # noqa: E402
import miniature  # noqa: E402
import synthetic  # noqa: E402


def test_pretrained_checkpoints_names_each_pretraining(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"")
    b.write_bytes(b"")
    assert miniature.pretrained_checkpoints("") == {}
    assert miniature.pretrained_checkpoints(str(a)) == {"vd128": str(a)}  # a bare path is the default's
    assert miniature.pretrained_checkpoints(f"no-vd={a},vd32={b}") == {"no-vd": str(a), "vd32": str(b)}
    with pytest.raises(SystemExit, match="unknown pre-training"):
        miniature.pretrained_checkpoints(f"vd64={a}")
    with pytest.raises(SystemExit, match="no checkpoint"):
        miniature.pretrained_checkpoints(f"vd512={tmp_path / 'missing.pt'}")


def test_report_gives_mean_and_range_over_seeds(tmp_path, capsys):
    rows = [{"key": "pretrain/no-vd", "minutes": None, "checkpoint": "x.pt",
             "final": {"mlm_acc": 0.7, "mvm_acc": 0.0, "heldout_itm_acc": 0.912, "heldout_itm_matched_acc": 0.998,
                       "heldout_itm_mismatched_acc": 0.826}}]
    for init, values in (("scratch", (50.0, 52.0, 57.0)), ("no-vd", (60.0, 61.0, 65.0))):
        for seed, v in enumerate(values):
            rows.append({"key": f"nlvr2/{init}/seed{seed}", "task": "nlvr2", "init": init, "seed": seed,
                         "metrics": {"accuracy": v}})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    miniature.report(str(path))
    out = capsys.readouterr().out
    assert "| NLVR2 (accuracy) | 53.0 (50.0-57.0, 3 seeds) | 62.0 (60.0-65.0, 3 seeds) |" in out
    assert "| retrieval (mean of TR and IR R@1) | not run | not run |" in out
    assert "| no-vd | given | 0.70 | - | 0.912 (0.998 / 0.826) | - | - |" in out  # no VD: no MVM, no entries


def test_report_splits_scene_from_shapes(tmp_path, capsys):
    rows = [{"key": f"snli-ve/{init}/seed{seed}", "task": "snli-ve", "init": init, "seed": seed,
             "metrics": {"accuracy": 50.0},
             "by_kind": {"scene": scene, "objects": 40.0, "n_scene": 48, "n_objects": 252}}
            for init, scenes in (("scratch", (50.0, 52.0)), ("vd128", (90.0, 100.0)))
            for seed, scene in enumerate(scenes)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    miniature.report(str(path))
    out = capsys.readouterr().out
    assert ("| SNLI-VE (accuracy) (48 / 252) | 51.0 (50.0-52.0, 2 seeds) / 40.0 (40.0-40.0, 2 seeds) | "
            "95.0 (90.0-100.0, 2 seeds) / 40.0 (40.0-40.0, 2 seeds) |") in out


@pytest.fixture(scope="module")
def bigger_world(tmp_path_factory):
    """Enough NLVR2 sentences (16) that both kinds, scene and shapes, occur."""
    root = str(tmp_path_factory.mktemp("world160"))
    synthetic.write_synthetic_world(root, seed=0, n_images=160)
    return root


def test_scene_and_objects_scores_each_kind_apart(bigger_world):
    """Predictions right exactly on the statements about the background score 100 on the scene and 0 on the
    shapes, for each task; a count mismatch or a mix-up of the two kinds would show."""
    root = bigger_world
    lines = [r for _, r in data.read_json_lines(os.path.join(root, "nlvr2", "train.json"), "NLVR2")]
    wrong = {"True": 0, "False": 1}  # the class id of the other label
    predictions = {r["identifier"]: 1 - wrong[r["label"]] if "background" in r["sentence"] else wrong[r["label"]]
                   for r in lines}
    split = miniature.scene_and_objects("nlvr2", {"split": "train", "predictions": predictions}, root)
    n_scene = sum("background" in r["sentence"] for r in lines)
    assert split == {"scene": 100.0, "objects": 0.0, "n_scene": n_scene, "n_objects": len(lines) - n_scene}
    assert 0 < n_scene < len(lines)

    lines = [r for _, r in data.read_json_lines(os.path.join(root, "snli-ve", "snli_ve_train.jsonl"), "SNLI-VE")]
    other = {"entailment": "neutral", "neutral": "contradiction", "contradiction": "entailment"}
    predictions = {r["pairID"]: r["gold_label"] if "background" in r["sentence2"] else other[r["gold_label"]]
                   for r in lines}
    split = miniature.scene_and_objects("snli-ve", {"split": "train", "predictions": predictions}, root)
    assert (split["scene"], split["objects"]) == (100.0, 0.0) and split["n_scene"] > 0

    vqa = os.path.join(root, "vqa")
    questions = data.read_json(os.path.join(vqa, data.VQA_QUESTION_FILES["val2014"]), "")["questions"]
    annotations = data.read_json(os.path.join(vqa, data.VQA_ANNOTATION_FILES["val2014"]), "")["annotations"]
    asked = {q["question_id"]: q["question"] for q in questions}
    answers = [{"question_id": a["question_id"],
                "answer": a["multiple_choice_answer"] if "background" in asked[a["question_id"]] else "no answer"}
               for a in annotations]
    split = miniature.scene_and_objects("vqa", {"answers_file": answers}, root)
    assert split["scene"] > 90.0 and split["objects"] == 0.0 and split["n_scene"] > 0
    data.write_json(os.path.join(root, "answers.json"), answers)  # as evaluate.main returns it: a path
    assert miniature.scene_and_objects("vqa", {"answers_path": os.path.join(root, "answers.json")}, root) == split
    assert miniature.scene_and_objects("retrieval", {}, root) is None


@pytest.mark.parametrize("no_scratch", [False, True])
def test_no_scratch_fine_tunes_only_from_the_pretrainings(tmp_path, monkeypatch, no_scratch):
    """--no-scratch leaves out every fine-tuning without --init, and only those; results name each run once."""
    ckpt = tmp_path / "given.pt"
    ckpt.write_bytes(b"")
    fine_tunings = []

    def fake_train(flags):
        fine_tunings.append(flags)
        return {"loss": 1.0}

    monkeypatch.setattr(miniature.train, "main", fake_train)
    monkeypatch.setattr(miniature.train, "load_checkpoint", lambda path: {"metrics": {"heldout_itm_acc": 0.9}})
    monkeypatch.setattr(miniature.evaluate, "main", lambda flags: {"metrics": {"tr_r1": 10.0, "ir_r1": 20.0}})
    out = tmp_path / "out"
    miniature.main(["--out", str(out), "--tasks", "retrieval", "--seeds", "0,1", "--pretrainings", "vd128",
                    "--pretrained", str(ckpt), *(["--no-scratch"] if no_scratch else [])])
    inits = [f[f.index("--init") + 1] if "--init" in f else "scratch" for f in fine_tunings]
    assert inits == ([] if no_scratch else ["scratch", "scratch"]) + [str(ckpt), str(ckpt)]
    keys = [json.loads(line)["key"] for line in open(out / "results.jsonl")]
    scratch = [] if no_scratch else ["retrieval/scratch/seed0", "retrieval/scratch/seed1"]
    assert keys == [*scratch, "pretrain/vd128", "retrieval/vd128/seed0", "retrieval/vd128/seed1"]
