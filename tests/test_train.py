"""Tests of train.py: the command line, the schedule, distributed equivalence, resume exactness, AMP, failures,
and a few steps of every task on a small synthetic world."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import data
import ddp_pretrain_worker as worker
import soho
import synthetic
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num_workers=0", "--log_every=1", "--warmup_steps=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    synthetic.write_synthetic_world(root, seed=0, n_images=120)  # bigger than conftest.py's: full batches
    return root


def run_train(world, out, *extra):
    return train.main(["--data", world, "--out", str(out), *FAST, *extra])


# ---- command line and schedule -------------------------------------------------------------------------------


def test_overrides_are_type_checked_and_unknown_keys_rejected():
    cfg, model_overrides, _ = train.parse_args(["--task", "vqa", "--epochs=3", "--vd_size=64", "--amp=bf16",
                                                "--lr_milestones=2,3", "--gradient_checkpointing=true"])
    assert cfg.epochs == 3 and cfg.amp == "bf16" and cfg.lr_milestones == (2, 3) and cfg.out == "runs/vqa"
    assert model_overrides == {"vd_size": 64, "gradient_checkpointing": True}
    with pytest.raises(SystemExit):
        train.parse_args(["--vd_sise=64"])
    with pytest.raises(SystemExit, match="expected an integer"):
        train.parse_args(["--epochs=three"])


def test_paper_recipe_defaults():
    cfg, _, _ = train.parse_args(["--preset", "r101"])
    assert (cfg.global_batch, cfg.epochs, cfg.lr_milestones, cfg.freeze_backbone_epochs) == (1024, 40, (25, 35), 10)
    assert (cfg.lr, cfg.weight_decay, cfg.lr_backbone, cfg.weight_decay_backbone, cfg.momentum) == \
        (1e-4, 1e-2, 1e-2, 5e-4, 0.9)
    cfg, _, _ = train.parse_args(["--preset", "r101", "--task", "snli-ve"])
    assert (cfg.global_batch, cfg.epochs, cfg.lr_milestones) == (128, 6, (4,))


def test_itm_weight_scales_the_itm_term_of_eq9_alone():
    """--itm_weight=w: the ITM head's gradient is w times the paper's (w = 1), the MLM decoder's is unchanged."""
    cfg = soho.PRESETS["tiny"]
    batch = data.random_batch("pretrain", cfg, 2, image_size=(128, 128), text_len=8)
    grads = {}
    for w in (1.0, 5.0):
        torch.manual_seed(0)
        model = soho.SOHO(cfg).train()
        out = model.pretrain_losses(batch, torch.Generator().manual_seed(0))
        loss, _ = train.pretraining_loss(out, 1, batch["itm_label"], itm_weight=w)
        loss.backward()
        grads[w] = (model.itm_head.weight.grad.clone(), model.mlm_bias.grad.clone())
    torch.testing.assert_close(grads[5.0][0], 5 * grads[1.0][0])
    torch.testing.assert_close(grads[5.0][1], grads[1.0][1])
    assert grads[1.0][0].abs().sum() > 0


def test_lr_schedule_warms_up_then_steps_down():
    cfg = train.TrainConfig(warmup_steps=10, lr_milestones=(2, 3), lr_decay=0.1)
    m = lambda step: train.lr_multiplier(step, 100, cfg)
    assert m(0) == pytest.approx(1 / 3) and m(5) == pytest.approx(2 / 3) and m(10) == 1.0
    assert m(199) == 1.0 and m(200) == pytest.approx(0.1) and m(300) == pytest.approx(0.01)


def test_aspect_grouped_sampler_gives_steps_of_one_orientation():
    """Each step's images are all landscape or all not, except the few mixed steps that pool the remainders; an
    epoch takes every example at most once and leaves out fewer than a global batch; the examples of a step are
    the same for 1 process x 16 as for 2 ranks x 4 x 2 micro-steps; and epochs are shuffled differently."""
    landscape = np.random.default_rng(0).random(203) < 0.4
    G = 16
    one = train.AspectGroupedSampler(landscape, G, G, 0, 1, seed=7, epoch=0)
    steps = np.array(list(one)).reshape(-1, G)  # [steps, G]
    assert len(steps) == train.AspectGroupedSampler.steps_per_epoch(landscape, G) == len(one) // G == 203 // G
    mixed = [s for s in steps if landscape[s].any() and not landscape[s].all()]
    remainders = int(landscape.sum()) % G + int((~landscape).sum()) % G
    assert len(mixed) == remainders // G <= 1
    assert len(set(steps.ravel())) == steps.size and 203 - steps.size < G
    ranks = [list(train.AspectGroupedSampler(landscape, G, 4, r, 2, seed=7, epoch=0)) for r in range(2)]
    for t, step in enumerate(steps):
        assert set(ranks[0][8 * t:8 * t + 8]) | set(ranks[1][8 * t:8 * t + 8]) == set(step)
    other_epoch = list(train.AspectGroupedSampler(landscape, G, G, 0, 1, seed=7, epoch=1))
    assert other_epoch != steps.ravel().tolist() and sorted(other_epoch) != other_epoch
    # batch_arithmetic counts the grouped steps: 1 landscape example and 15 others give no step of 16 on their own
    cfg = train.TrainConfig(global_batch=16, batch_per_gpu=16, epochs=2)
    assert train.batch_arithmetic(cfg, 16, 1, np.array([True] + [False] * 15)) == (1, 1, 2)
    assert train.AspectGroupedSampler.steps_per_epoch(np.array([True] * 17 + [False] * 15), 16) == 2


def test_grouped_batches_pad_less(world):
    """On the synthetic world (landscape, square and portrait images), grouped steps are padded to fewer pixels
    than plainly shuffled ones, and only the rare mixed step reaches a square of the longest side."""
    cfg = train.TrainConfig(batch_per_gpu=8, global_batch=8, num_workers=0)
    tok = data.Tokenizer.from_vocab(os.path.join(world, "vocab.txt"), max_len=24)
    ds = data.build_dataset("pretrain", "train", world, tok, soho.PRESETS["tiny"], seed=0)
    pixels = {}
    for grouped in (True, False):
        loader = train.make_loader(ds, cfg, 0, 0, 0, 1, ds.landscape_flags() if grouped else None)
        pixels[grouped] = [b["images"].shape[-2] * b["images"].shape[-1] for b in loader]
    assert np.mean(pixels[True]) < 0.9 * np.mean(pixels[False])
    assert sum(p == 320 * 320 for p in pixels[True]) <= 1


# ---- distributed ---------------------------------------------------------------------------------------------


def test_two_gloo_ranks_match_one_process(tmp_path):
    """2 ranks on half batches each, through train.optimizer_step with 2 accumulation micro-steps: the same
    weights as one process on the whole batch after each step, and bit-identical VDs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    os.path.join(REPO, "tests", "ddp_pretrain_worker.py"), str(tmp_path)],
                   check=True, env=env, cwd=REPO, timeout=300)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    first_step, params, vd = worker.run(rank=0, world_size=1)
    assert torch.equal(r0["vd"], r1["vd"]), "the visual dictionaries of the two ranks must be bit-identical"
    torch.testing.assert_close(r0["vd"], vd, rtol=1e-5, atol=1e-5)
    assert set(r0["first_step"]) == set(first_step)
    for name, p in first_step.items():
        torch.testing.assert_close(r0["first_step"][name], p, rtol=1e-4, atol=1e-6, msg=name)
    for name, p in params.items():
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        torch.testing.assert_close(r0["params"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    # the options beyond the paper draw features from all ranks: still bit-identical across ranks, and not the
    # random start (the k-means start and the restarts did happen)
    assert torch.equal(r0["vd_options"], r1["vd_options"])
    assert not torch.allclose(r0["vd_options"], r0["vd"])


# ---- checkpoints -------------------------------------------------------------------------------------------------


def test_resume_is_exact(world, tmp_path):
    args = ["--batch_per_gpu=4", "--global_batch=8", "--save_every=100", "--vd_size=32"]  # 2 accumulation steps
    run_train(world, tmp_path / "straight", *args, "--max_steps=4")
    run_train(world, tmp_path / "resumed", *args, "--max_steps=2")
    run_train(world, tmp_path / "resumed", *args, "--max_steps=4")  # same --out: continues from step 2
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["model"]["visual_dictionary.embed"], b["model"]["visual_dictionary.embed"])


def test_a_checkpoint_from_before_grouping_resumes_ungrouped(world, tmp_path):
    """A run saved before --group_by_aspect existed shuffled plainly; resuming it must not switch samplers."""
    run_train(world, tmp_path, "--max_steps=1", "--batch_per_gpu=4", "--global_batch=4", "--vd_size=32")
    path = tmp_path / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["train_config"]["group_by_aspect"] is True
    args = types.SimpleNamespace(resume=str(path), fresh=False)
    assert train.resume_config(train.TrainConfig(out=str(tmp_path)), args)[0].group_by_aspect is True
    del ckpt["train_config"]["group_by_aspect"]
    torch.save(ckpt, path)
    assert train.resume_config(train.TrainConfig(out=str(tmp_path)), args)[0].group_by_aspect is False


def test_channels_last_trains_the_same_model(world, tmp_path):
    """--channels_last (the default) changes the convolutions' memory layout only: the first step's losses agree
    with a contiguous run up to float rounding, and the convolution weights are really stored channels-last.
    (Later steps drift apart: AdamW's first steps move every weight by about the rate whatever its gradient's
    size, so rounding flips the sign of steps on near-zero gradients, and the VD's nearest entries follow.)"""
    args = ["--max_steps=1", "--batch_per_gpu=4", "--global_batch=4", "--vd_size=32"]
    run_train(world, tmp_path / "nhwc", *args, "--channels_last=true")
    run_train(world, tmp_path / "nchw", *args, "--channels_last=false")
    a = torch.load(tmp_path / "nhwc" / "ckpt.pt", weights_only=False)["model"]["backbone.conv1.weight"]
    b = torch.load(tmp_path / "nchw" / "ckpt.pt", weights_only=False)["model"]["backbone.conv1.weight"]
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous() and b.is_contiguous()
    logged = [json.loads(open(tmp_path / run / "log.jsonl").readline()) for run in ("nhwc", "nchw")]
    for term in ("mlm", "mvm", "itm", "loss"):
        assert logged[0][term] == pytest.approx(logged[1][term], rel=1e-5), term


def test_checkpoint_holds_everything(world, tmp_path):
    run_train(world, tmp_path, "--max_steps=1", "--batch_per_gpu=8", "--global_batch=8")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    for key in ("model", "optimizers", "scaler", "step", "epoch", "step_in_epoch", "rng", "model_config",
                "train_config", "vocab_path", "data_root"):
        assert key in ckpt, key
    assert len(ckpt["optimizers"]) == 2 and ckpt["step"] == 1
    assert os.path.isfile(tmp_path / "config.json") and os.path.isfile(tmp_path / "log.jsonl")
    model, _ = train.load_model(str(tmp_path / "ckpt.pt"))
    assert torch.equal(model.visual_dictionary.embed, ckpt["model"]["visual_dictionary.embed"])


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        train.save_checkpoint(path, {"step": 2, "unpicklable": lambda: None})
    assert torch.load(path)["step"] == 1


def test_non_finite_loss_stops_and_keeps_the_checkpoint(world, tmp_path, monkeypatch):
    real = soho.SOHO.pretrain_losses
    calls = {"n": 0}

    def sometimes_nan(self, batch, generator=None):
        out = real(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == 3:
            itm = out["itm"]
            out["itm"] = soho.LossTerm(itm.sum * float("nan"), itm.count, itm.correct)
        return out

    monkeypatch.setattr(soho.SOHO, "pretrain_losses", sometimes_nan)
    with pytest.raises(FloatingPointError, match=r"step 3 .*itm=nan"):
        run_train(world, tmp_path, "--max_steps=5", "--save_every=1", "--batch_per_gpu=8", "--global_batch=8")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2


# ---- precision and tasks -----------------------------------------------------------------------------------------


def test_bf16_autocast_step_on_cpu(world, tmp_path):
    m = run_train(world, tmp_path, "--max_steps=1", "--amp=bf16", "--batch_per_gpu=8", "--global_batch=8")
    assert m["step"] == 1 and torch.isfinite(torch.tensor(m["loss"]))


@pytest.mark.parametrize("task", ["retrieval", "vqa", "nlvr2", "snli-ve"])
def test_each_downstream_task_runs_a_few_steps(world, tmp_path, task):
    m = run_train(world, tmp_path, "--task", task, "--max_steps=2", "--batch_per_gpu=4", "--global_batch=4")
    assert m["step"] == 2 and torch.isfinite(torch.tensor(m["loss"]))


def test_fine_tuning_starts_from_a_pretrained_checkpoint(world, tmp_path):
    run_train(world, tmp_path / "pre", "--max_steps=1", "--batch_per_gpu=8", "--global_batch=8")
    run_train(world, tmp_path / "vqa", "--task", "vqa", "--init", str(tmp_path / "pre" / "ckpt.pt"),
              "--max_steps=1", "--batch_per_gpu=4", "--global_batch=4", "--lr=0", "--lr_backbone=0")
    pre = torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=False)["model"]
    vqa = torch.load(tmp_path / "vqa" / "ckpt.pt", weights_only=False)["model"]
    # with zero learning rates the shared weights are exactly the pre-trained ones
    key = "transformer.layers.0.query.weight"
    assert torch.equal(pre[key], vqa[key])


class _Priorities(torch.utils.data.Dataset):
    """Each example is the niceness of the process that loads it."""
    collate = staticmethod(list)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="needs Unix process priorities")
@pytest.mark.parametrize("nice", [0, 7])
def test_data_workers_run_nicer_than_training_by_worker_nice(nice):
    cfg = train.TrainConfig(batch_per_gpu=2, global_batch=2, num_workers=1, worker_nice=nice, group_by_aspect=False)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    loader = train.make_loader(_Priorities(), cfg, epoch=0, skip_examples=0, rank=0, world_size=1)
    seen = [p for batch in loader for p in batch]
    assert seen == [min(19, ours + nice)] * 4
    assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # training's own priority is untouched
