"""experiments/miniature.py: --pretrained's NAME=CHECKPOINT pairs and --report's tables (mean and range over
seeds, computed here by hand)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import miniature  # noqa: E402


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
