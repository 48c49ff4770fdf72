"""Tests of evaluate.py: the official metrics on hand-computed cases, sharded evaluation under 2 gloo ranks against
one process, the visual-dictionary picture and the speed task. Every expected number is worked out by hand in the
comments, never with the function under test."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import soho
from evaluate import nlvr2_metrics, retrieval_fold_metrics, retrieval_metrics, vqa_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--workers", "0", "--batch-size", "1"]  # batch 1: an image's features do not depend on its batch-mates

# ---- retrieval_metrics ---------------------------------------------------------------------------------------


def test_retrieval_two_captions_per_image():
    # 3 images, texts 0,1 -> image 0, texts 2,3 -> image 1, texts 4,5 -> image 2
    scores = torch.tensor([
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],   # image 0: best own 0.9, no wrong text >= 0.9          -> TR rank 0
        [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],   # image 1: best own 0.5, wrong 0.7 and 0.6 above       -> TR rank 2
        [0.1, 0.2, 0.3, 0.4, 0.05, 0.0],  # image 2: best own 0.05, wrong 0.1 0.2 0.3 0.4 above  -> TR rank 4
    ])
    m = retrieval_metrics(scores, [0, 0, 1, 1, 2, 2])
    # TR: ranks 0, 2, 4 -> R@1 1/3, R@5 3/3, R@10 3/3
    assert m["tr_r1"] == pytest.approx(100 / 3) and m["tr_r5"] == 100 and m["tr_r10"] == 100
    # IR, column by column (own image's score, wrong images at least as high):
    # t0 0.9: none -> 0;  t1 0.1: 0.6, 0.2 -> 2;  t2 0.5: 0.8 -> 1;  t3 0.1: 0.2, 0.4 -> 2;  t4, t5: both -> 2
    assert m["ir_r1"] == pytest.approx(100 / 6) and m["ir_r5"] == 100 and m["ir_r10"] == 100
    assert set(m) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"}


def test_retrieval_recall_at_5_and_10():
    # 12 images, text t belongs to image t. Column t: the own image scores 0.5 and exactly t wrong images score
    # 1.0 (the first t images other than t), so text t's image ranks t: IR R@1 = 1/12, R@5 = 5/12, R@10 = 10/12.
    n = 12
    scores = torch.zeros(n, n)
    for t in range(n):
        scores[t, t] = 0.5
        for i in [i for i in range(n) if i != t][:t]:
            scores[i, t] = 1.0
    m = retrieval_metrics(scores, torch.arange(n))
    assert m["ir_r1"] == pytest.approx(100 / 12)
    assert m["ir_r5"] == pytest.approx(500 / 12)
    assert m["ir_r10"] == pytest.approx(1000 / 12)
    # with one text per image, TR on the transposed matrix is the same question
    mt = retrieval_metrics(scores.t(), torch.arange(n))
    assert (mt["tr_r1"], mt["tr_r5"], mt["tr_r10"]) == (m["ir_r1"], m["ir_r5"], m["ir_r10"])


def test_retrieval_ties_go_against_the_ground_truth():
    # IR: text 0 (image 0) ties with image 1 at the top -> rank 1: not at R@1, at R@5
    m = retrieval_metrics(torch.tensor([[0.5], [0.5], [0.1]]), [0])
    assert (m["ir_r1"], m["ir_r5"]) == (0.0, 100.0)
    # TR: image 0's own text ties with image 1's text -> rank 1 -> miss; image 1: own 0.9 > 0.1 -> hit
    m = retrieval_metrics(torch.tensor([[0.5, 0.5], [0.1, 0.9]]), [0, 1])
    assert m["tr_r1"] == 50.0


def test_retrieval_constant_scores_give_zero_and_own_ties_do_not_hurt():
    # every pair scores the same: each ground truth ties with 11 wrong candidates -> rank 11 -> 0 at R@1, 5, 10
    m = retrieval_metrics(torch.zeros(12, 12), torch.arange(12))
    assert all(v == 0.0 for v in m.values())
    # two captions of the same image tied at the top are not competitors: rank 0
    m = retrieval_metrics(torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.2, 0.8]]), [0, 0, 1])
    assert m["tr_r1"] == 100.0


def test_retrieval_a_caption_beyond_the_first_five():
    # image 0 has 6 captions (texts 0-5), image 1 has 5 (texts 6-10): no "5 per image" layout may be assumed
    scores = torch.tensor([[0.1] * 5 + [0.9] + [0.5] * 5,
                           [0.2] * 5 + [0.3] + [0.8] * 5])
    m = retrieval_metrics(scores, [0] * 6 + [1] * 5)
    # TR: image 0's best own is its 6th caption (0.9 > 0.5 of the wrong ones) -> rank 0; image 1: 0.8, nothing
    # of image 0's captions reaches 0.8 in its row -> rank 0.  TR R@1 = 100.
    assert m["tr_r1"] == 100.0
    # IR: texts 0-4: own 0.1 < 0.2 -> rank 1 (5 misses); text 5: 0.9 > 0.3 -> hit; texts 6-10: 0.8 > 0.5 -> hits
    assert m["ir_r1"] == pytest.approx(100 * 6 / 11) and m["ir_r5"] == 100.0


def test_retrieval_folds_see_only_their_own_block():
    # 4 images, one text each, folds of 2. Cross-fold pairs score 5, far above everything, so the full matrix has
    # R@1 = 0, but each fold ignores them: fold 0 [[1,0],[0,1]] is perfect, fold 1 [[0,1],[1,0]] is all wrong
    # (rank 1): mean R@1 = 50 for TR and IR, R@5 = 100.
    scores = torch.tensor([[1., 0, 5, 5], [0, 1, 5, 5], [5, 5, 0, 1], [5, 5, 1, 0]])
    assert retrieval_metrics(scores, torch.arange(4))["tr_r1"] == 0.0
    m = retrieval_fold_metrics(scores, torch.arange(4), fold_size=2)
    assert (m["tr_r1"], m["ir_r1"], m["tr_r5"], m["ir_r5"], m["folds"]) == (50.0, 50.0, 100.0, 100.0, 2)


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0]]), [0, 0])
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(2, 2), [0, 2])


# ---- vqa_accuracy ---------------------------------------------------------------------------------------------
# With m of the 10 answers equal to the prediction: the m matching answers each see m - 1 matches among the other
# 9, the 10 - m others see m, so acc = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10:
#   m=1: (0 + 9/3)/10 = 0.3   m=2: (2/3 + 16/3)/10 = 0.6   m=3: (3*2/3 + 7)/10 = 0.9   m>=4: 1.0


def test_vqa_accuracy_counts_matches():
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("green", ["red"] * 4 + ["blue"] * 6) == 0.0


def test_vqa_accuracy_identical_answers_are_not_normalised():
    # the official evaluator normalises only when the 10 answers differ: "two" x 10 vs "2" is no match
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Two", ["Two"] * 10) == 1.0
    assert vqa_accuracy("2", ["Two"] * 10) == 0.0
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0  # not even lower-cased
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # but always stripped


def test_vqa_accuracy_case_articles_numbers_punctuation():
    # case and articles: "A dog", "A dog", "the dog" all become "dog" -> m = 3
    assert vqa_accuracy("dog", ["A dog", "A dog", "the dog"] + ["cat"] * 7) == pytest.approx(0.9)
    # number words: "two", "two", "2" -> "2": m = 3; "Three" -> "3" matches the 7 "three"s: m = 7
    answers = ["two", "two", "2"] + ["three"] * 7
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Three", answers) == 1.0
    # "none" and "zero" are "0": m = 3
    assert vqa_accuracy("0", ["none", "zero", "0"] + ["1"] * 7) == pytest.approx(0.9)
    # a period not followed by a digit is removed: "yes." = "yes" -> m = 2
    assert vqa_accuracy("yes", ["yes.", "yes"] + ["no"] * 8) == pytest.approx(0.6)
    # a hyphen not next to a space becomes a space: "t-shirt" = "t shirt" -> m = 1
    assert vqa_accuracy("t shirt", ["t-shirt"] + ["shirt"] * 9) == pytest.approx(0.3)
    # digit,digit: punctuation is deleted: "1,000" = "1000" -> m = 2
    assert vqa_accuracy("1000", ["1,000", "1,000"] + ["500"] * 8) == pytest.approx(0.6)
    # contractions: "dont" -> "don't" -> m = 2
    assert vqa_accuracy("dont", ["don't", "dont"] + ["yes"] * 8) == pytest.approx(0.6)


def test_vqa_summary_per_answer_type():
    m = evaluate.vqa_summary([1.0, 0.3, 0.0, 0.6], ["yes/no", "yes/no", "number", "other"])
    assert m["overall"] == pytest.approx(100 * 1.9 / 4)
    assert (m["yes/no"], m["number"], m["other"]) == (pytest.approx(65.0), 0.0, pytest.approx(60.0))


# ---- NLVR2 and SNLI-VE ----------------------------------------------------------------------------------------


def test_nlvr2_consistency():
    ids = ["dev-1-0-0", "dev-1-1-0", "dev-1-2-0", "dev-1-3-0",  # sentence group dev-1-0: 4 pairs, all right
           "dev-2-0-1", "dev-2-1-1",  # group dev-2-1: one wrong
           "dev-2-0-0"]  # group dev-2-0 (same set, another sentence): right
    correct = [True, True, True, True, True, False, True]
    m = nlvr2_metrics(ids, correct)
    assert m["accuracy"] == pytest.approx(100 * 6 / 7)
    assert m["consistency"] == pytest.approx(100 * 2 / 3)
    assert m["groups"] == 3
    assert evaluate.nlvr2_sentence_group("test1-850-3-1") == "test1-850-1"


def test_snli_ve_accuracy_per_class():
    # labels 0 1 1 2 1, predictions 0 1 2 0 1: right at 0, 1, 4 -> 60%; entailment 1/1, neutral 2/3, contra 0/1
    m = evaluate.classification_metrics([0, 1, 2, 0, 1], [0, 1, 1, 2, 1], evaluate.SNLI_VE_CLASSES)
    assert m["accuracy"] == pytest.approx(60.0)
    assert (m["entailment"], m["neutral"], m["contradiction"]) == (100.0, pytest.approx(200 / 3), 0.0)


# ---- sharding ------------------------------------------------------------------------------------------------


def test_shards_cover_each_example_once():
    assert evaluate.shard(5, 0, 2) == [0, 2, 4] and evaluate.shard(5, 1, 2) == [1, 3]
    rows = lambda idx: [{"index": i} for i in idx]
    assert [r["index"] for r in evaluate.merge_examples([rows([0, 2, 4]), rows([1, 3])], 5)] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="twice"):
        evaluate.merge_examples([rows([0, 2, 4]), rows([1, 3, 0])], 5)  # DistributedSampler-style padding
    with pytest.raises(RuntimeError, match="not evaluated"):
        evaluate.merge_examples([rows([0, 2, 4]), rows([1])], 5)


def tiny_model(world, num_answers):
    tokenizer = data.Tokenizer.from_vocab(os.path.join(world, "vocab.txt"), 24)
    cfg = soho.config_from_preset("tiny", resnet_width=8, hidden_size=64, num_layers=1, num_heads=2,
                                  intermediate_size=128, vocab_size=tokenizer.vocab_size, num_answers=num_answers,
                                  vd_size=32, dropout=0.0)
    torch.manual_seed(0)
    return soho.SOHO(cfg).eval(), tokenizer


def save_checkpoint(path, model, world, task, answers=None):
    """A checkpoint in train.py's format."""
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "train_config": {"preset": "tiny"}, "task": task, "step": 0, "epoch": 0,
                "vocab_path": os.path.join(world, "vocab.txt"), "data_root": world, "answers": answers,
                "retrieval_source": "coco"}, path)
    return str(path)


@pytest.fixture(scope="module")
def vqa_checkpoint(world, tmp_path_factory):
    answers = data.build_vqa_answer_vocab(world, min_count=1)
    model, _ = tiny_model(world, len(answers))
    return save_checkpoint(tmp_path_factory.mktemp("vqa") / "ckpt.pt", model, world, "vqa", answers)


def run_two_ranks(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(REPO, "evaluate.py"), *args], check=True, env=env, cwd=REPO, timeout=300,
                   stdout=subprocess.DEVNULL)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_sharded_retrieval_matches_one_process(vqa_checkpoint, tmp_path):
    # 5 images (odd: a padding sampler would score one twice) x their 25 captions
    args = ["--task", "retrieval", "--checkpoint", vqa_checkpoint, "--max-images", "5", "--save-scores", *QUICK]
    run_two_ranks(*args, "--out", str(tmp_path / "two"))
    one = evaluate.main([*args, "--out", str(tmp_path / "one")])
    two = read_json(tmp_path / "two" / "eval-retrieval-test.json")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert (two["images"], two["texts"], two["pairs_scored"]) == (one["images"], one["texts"], 5 * one["texts"]) \
        == (5, 25, 125)
    np.testing.assert_allclose(np.load(tmp_path / "two" / "eval-retrieval-test-scores.npy"),
                               np.load(tmp_path / "one" / "eval-retrieval-test-scores.npy"), rtol=0, atol=1e-6)
    assert two["metrics"] == json.loads(json.dumps(one["metrics"]))


def test_sharded_vqa_matches_one_process(vqa_checkpoint, tmp_path):
    args = ["--task", "vqa", "--checkpoint", vqa_checkpoint, "--max-examples", "7", *QUICK]
    run_two_ranks(*args, "--out", str(tmp_path / "two"))
    one = evaluate.main([*args, "--out", str(tmp_path / "one")])
    two = read_json(tmp_path / "two" / "eval-vqa-val.json")
    assert two["examples"] == one["examples"] == 7 and two["metrics"]["questions"] == 7
    assert two["metrics"] == json.loads(json.dumps(one["metrics"]))
    submitted = read_json(tmp_path / "two" / "vqa-val-answers.json")
    assert submitted == read_json(tmp_path / "one" / "vqa-val-answers.json")
    assert len({a["question_id"] for a in submitted}) == 7 and set(submitted[0]) == {"question_id", "answer"}


def test_nlvr2_and_snli_ve_run(vqa_checkpoint, tmp_path):
    nlvr2 = evaluate.main(["--task", "nlvr2", "--checkpoint", vqa_checkpoint, "--out", str(tmp_path), *QUICK])
    assert nlvr2["metrics"]["examples"] == 4 and 0 <= nlvr2["metrics"]["consistency"] <= 100
    ve = evaluate.main(["--task", "snli-ve", "--checkpoint", vqa_checkpoint, "--out", str(tmp_path), "--workers",
                        "0"])
    assert ve["examples"] == 6 and set(evaluate.SNLI_VE_CLASSES) <= set(ve["metrics"])


def test_vqa_val_is_refused_for_a_model_trained_on_val(vqa_checkpoint, tmp_path):
    ckpt = torch.load(vqa_checkpoint, weights_only=False)
    ckpt["train_config"]["train_split"] = "train+val"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="trained on the vqa split 'train\\+val', which holds 'val'"):
        evaluate.main(["--task", "vqa", "--checkpoint", str(tmp_path / "ckpt.pt"), *QUICK])
    # the same model may still write the test server's file
    result = evaluate.main(["--task", "vqa", "--split", "test-dev", "--checkpoint", str(tmp_path / "ckpt.pt"),
                            "--max-examples", "3", *QUICK])
    assert result["examples"] == 3


def test_heldout_itm_counts_each_pair_once_and_blanks_the_images(world, tmp_path):
    model, _ = tiny_model(world, 10)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, world, "pretrain")
    result = evaluate.main(["--task", "itm", "--checkpoint", path, *QUICK])
    n_val = sum(r["split"] == "val" for r in read_json(os.path.join(world, "coco", "dataset_coco.json"))["images"])
    assert result["examples"] == result["of_split"] == n_val
    for name in ("images", "images blanked"):
        m = result["metrics"][name]
        assert m["pairs"] == 4 * n_val
        assert m["accuracy"] == pytest.approx((m["matched"] + m["mismatched"]) / 2)
    assert "itm val (held-out images)" in evaluate.report(result)


def test_missing_checkpoint_names_the_train_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="python train.py --task vqa --init runs/pretrain/ckpt.pt"):
        evaluate.main(["--task", "vqa"])


# ---- pictures of the visual dictionary ------------------------------------------------------------------------


def test_vd_picture_has_one_row_per_entry(world, tmp_path):
    model, tokenizer = tiny_model(world, 10)
    # a random dictionary sends every token to one entry; seed it with real features so that several are used
    images = data.build_dataset("retrieval", "val", world, tokenizer, model.config)
    batch = images.collate([images[i] for i in range(3)])
    with torch.no_grad():
        V, valid, _ = model.encode(batch["images"], batch["image_mask"])
    features = V[valid]
    model.visual_dictionary.embed[:8] = features[torch.linspace(0, len(features) - 1, 8).long()]
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model, world, "pretrain")
    result = evaluate.main(["--task", "vd", "--checkpoint", ckpt, "--rows", "3", "--patches-per-row", "4",
                            "--max-images", "5", *QUICK])
    assert result["entries_used"] >= 3 and result["images"] == 5
    assert [r["kind"] for r in result["rows"]] == ["top", "top", "random"]  # rows // 3 random rows
    assert sum(result["counts"]) == result["tokens"]
    with Image.open(result["rows_png"]) as png:
        # height = rows * (64-pixel cell + 4 gap) + 4; width = 150 label + 4 * (64 + 4) + 4
        assert png.size == (150 + 4 * 68 + 4, 3 * 68 + 4)
    assert os.path.isfile(result["usage_png"])
    assert os.path.dirname(result["rows_png"]) == str(tmp_path)  # beside the checkpoint


# ---- speed ---------------------------------------------------------------------------------------------------


def test_speed_at_tiny(tmp_path):
    result = evaluate.main(["--task", "speed", "--preset", "tiny", "--repeats", "1", "--warmup", "0",
                            "--out", str(tmp_path)])
    for key in ("pretrain_shared_over_repeated", "vq_lookup_over_matmul"):
        assert result[key] > 0
    assert set(result["ms_per_pair"]) == {"cnn", "vd", "transformer", "total"}
    # 256 x 384 -> a 4 x 6 grid of 64-pixel cells; + 16 text tokens
    assert (result["visual_tokens"], result["sequence_length"]) == (24, 40)
    assert read_json(tmp_path / "speed-tiny.json")["sequence_length"] == 40


def test_paper_sequence_length_is_176():
    # Sec. 4.5: ceil(600/64) * ceil(1000/64) + 16 = 10 * 16 + 16 = 176; the r101 grid, checked at r101's layout
    # with a narrow model (the sequence length depends only on the image size and the 64-pixel cell)
    model = soho.SOHO(soho.config_from_preset("tiny", resnet_width=8, hidden_size=32, num_layers=1, num_heads=2,
                                              intermediate_size=64, vd_size=16))
    result = evaluate.measure_speed(model, (600, 1000), torch.device("cpu"), "off", repeats=1, warmup=0,
                                    vq_tokens=64)
    assert result["grid"] == [10, 16] and result["sequence_length"] == 176
