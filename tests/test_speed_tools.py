"""The speed tools (README, "Speed"): experiments/gpu_check.sh (its smoke mode, the CPU part of the GPU check) and
experiments/compare_speed.py (its clean exit without the optional reference packages, its equality checks against
them where they are installed, and its timing of evaluate.py's retrieval path).

Each test takes seconds on one CPU core. torchvision and transformers are optional: the tests that need them skip
where they are missing (this project's CI installs neither)."""

import importlib.util
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare_speed  # noqa: E402
import worker_contention  # noqa: E402

import soho  # noqa: E402


def run(command, timeout=180):
    # PYTHON: the shell script runs this interpreter, not whatever `python` is first on the PATH
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def table_rows(stdout):
    """The rows of gpu_check's table: [check, setting, value, unit, note], columns split at 2+ spaces."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("check "))
    rows = []
    for line in lines[start + 2:]:
        if line.startswith(("skipped:", "finished")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows.append(cells + [""] * (5 - len(cells)))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# gpu_check.sh: the smoke mode
# ----------------------------------------------------------------------------------------------------------------


def test_gpu_check_smoke_mode_prints_the_whole_table(tmp_path):
    out = tmp_path / "check.json"
    done = run(["bash", "experiments/gpu_check.sh", "--smoke", "--device", "cpu", "--json", str(out)])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    by_key = {(r[0], r[3]): r for r in rows}
    expected = [("speed b1 CNN", "ms/pair"), ("speed b1 transformer", "ms/pair"), ("speed b1 total", "ms/pair"),
                ("speed batched", "pairs/s"), ("retrieval scoring", "pairs/s"), ("NCCL 2 processes", "s")]
    for amp in ("pretrain bf16", "pretrain bf16 + ckpt", "pretrain fp16 + scaler", "pretrain fp16 + scaler + ckpt"):
        expected += [(amp, "images/s"), (amp, "GiB peak")]
    assert sorted(by_key) == sorted(expected), f"rows differ:\n{done.stdout}"
    for (check, unit), r in by_key.items():
        if unit == "GiB peak" or check.startswith("NCCL"):
            assert r[2] == "n/a", r  # an accelerator statistic, and no second GPU, on the CPU
            continue
        value = float(r[2].replace(",", ""))
        assert math.isfinite(value) and value > 0, r
    # it says what it skipped and why, and the JSON holds the same rows
    assert "skipped: NCCL 2-process run: no accelerator" in done.stdout
    assert "skipped: peak memory" in done.stdout
    assert re.search(r"^finished in \d+ s$", done.stdout, re.M)
    saved = json.loads(out.read_text())
    assert saved["mode"] == "smoke" and len(saved["rows"]) == len(rows)
    assert all(r["value"] is None or (math.isfinite(r["value"]) and r["value"] > 0) for r in saved["rows"])


# ----------------------------------------------------------------------------------------------------------------
# compare_speed.py
# ----------------------------------------------------------------------------------------------------------------


def test_compare_speed_without_the_reference_packages_says_what_it_needs():
    done = run([sys.executable, "experiments/compare_speed.py", "--pretend-missing", "torchvision,transformers"],
               timeout=60)
    assert done.returncode == 0, done.stderr
    assert "needs torchvision and transformers" in done.stdout
    assert "pip install" in done.stdout
    assert "ratio" not in done.stdout  # nothing was timed


def test_find_oracles_honours_pretend_missing():
    found = compare_speed.find_oracles(["torchvision", "transformers"])
    assert found == {"torchvision": None, "transformers": None}


def test_interleaved_alternates_the_order_and_times_both_clocks():
    calls = []
    times = compare_speed.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert set(times) == {"wall", "cpu"} and all(len(v) == 3 for t in times.values() for v in t.values())


def test_retrieval_timing_runs_evaluate_scoring_path():
    torch.manual_seed(0)
    model = soho.SOHO(soho.config_from_preset("tiny")).eval()
    r = compare_speed.time_retrieval(model, n_images=3, n_texts=5, size=(64, 96), text_tokens=8, pair_batch=4)
    assert r["pairs"] == 15 and r["visual_tokens"] == 2  # a 64x96 image is one row of two 64-pixel cells
    for key in ("cnn_s", "pairs_s", "pairs_per_s", "ms_per_pair"):
        assert math.isfinite(r[key]) and r[key] > 0, key


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_fuse_equals_transformers_bert_with_the_same_weights(tmp_path):
    import transformers
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(config)
    bert.save_pretrained(tmp_path / "bert")
    model = soho.SOHO.from_pretrained("tiny", bert=str(tmp_path / "bert"))
    inputs = compare_speed.fuse_inputs(2, 6, 10, model.config, torch.Generator().manual_seed(0))
    checks = compare_speed.check_fuse(model, bert, inputs)  # asserts equal outputs and gradients
    assert checks["output_max_abs_diff"] < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_trunk_equals_torchvision_resnet_with_the_same_weights(tmp_path):
    try:
        import torchvision
    except Exception as e:  # installed for another torch: as good as missing
        pytest.skip(f"torchvision does not import: {e}")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    compare_speed.randomise_batchnorm(tv, torch.Generator().manual_seed(0))
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    trunk = soho.ResNet(18)
    soho.load_resnet_weights(trunk, str(tmp_path / "resnet18.pth"))
    checks = compare_speed.check_trunk(trunk, torch.nn.Sequential(*list(tv.children())[:-2]),
                                       torch.randn(1, 3, 64, 96))
    assert checks["output_max_abs_diff"] <= 1e-4 * max(checks["output_scale"], 1.0)


def test_worker_contention_times_each_setting_twice(capsys):
    times = worker_contention.main(["--steps", "1", "--batch", "2", "--threads", "1", "--duty", "0.5"])
    assert list(times) == ["alone", "beside a neighbour", "beside a neighbour at nice 19"]
    assert all(len(t) == 2 and all(0 < s < 60 for s in t) for t in times.values())
    assert "ms/step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        worker_contention.main(["--duty", "0"])


def test_a_neighbour_stops_when_told():
    calls = []
    assert worker_contention.time_steps(lambda: calls.append(1), 3, duty=0.2, nice=5) > 0
    assert len(calls) == 3 and not multiprocessing.active_children()
