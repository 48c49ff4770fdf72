"""The public releases read as they ship: tests/fixtures/real_formats/ holds a few records of each release, typed
in that release's own documented layout (Karpathy's dataset_coco.json with restval and dataset_flickr30k.json
without filepath / cocoid, Visual Genome 1.2 with coco_id and both image folders, VQA v2 with answer variants and a
question-only test-dev file, NLVR2 JSON Lines with `directory` and .png files holding JPEG data, SNLI-VE with its
2018 and 2020 image keys), and tiny images (tests/fixtures/make_real_formats.py). None of it is written by data.py,
and every expected value below is typed from those records, never computed with data.py. CPU, a few seconds."""

import dataclasses
import json
import os
import types

import pytest
import torch

import data
import evaluate
import soho

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "real_formats")
SMALL = types.SimpleNamespace(image_short=32, image_long=48, max_text_len=24)


@pytest.fixture(scope="module")
def tok():
    return data.Tokenizer.from_vocab(os.path.join(FIXTURE, "vocab.txt"), 24)


def build(task, split, tok, **opts):
    return data.build_dataset(task, split, FIXTURE, tok, SMALL, seed=0, **opts)


def rel(paths):
    return [os.path.relpath(p, FIXTURE).replace(os.sep, "/") for p in paths]


def read_every_example(dataset):
    """Decode every example (every image of the split is opened)."""
    examples = [dataset[i] for i in range(len(dataset))]
    assert all(e is not None for e in examples)
    return examples


# ---- COCO (Karpathy split) and Visual Genome: pre-training ----

COCO_60623 = ["A young girl inhales with the intent of blowing out a candle.",
              "A young girl is preparing to blow out her candle.",
              "A kid is to blow out the single candle in a bowl of birthday goodness.",
              "Girl blowing out the candle on an ice-cream",
              "A little girl is getting ready to blow out a candle on a small dessert."]


def test_pretrain_reads_coco_train_and_restval_and_vg_without_coco_test_copies(tok):
    ds = build("pretrain", "train", tok)
    # Karpathy train (318556, 57870) and restval (60623) in file order, then VG 1, 10 and 2343 (= COCO 318556);
    # VG 107899 is COCO 391895, a Karpathy test image: dropped
    assert [ds.keys[i] for i in range(len(ds))] == ["coco:60623", "coco:318556", "coco:57870", "vg:1.jpg", "vg:10.jpg",
                                                    "coco:318556"]
    assert rel(ds.paths[i] for i in range(len(ds))) == [
        "coco/val2014/COCO_val2014_000000060623.jpg", "coco/train2014/COCO_train2014_000000318556.jpg",
        "coco/train2014/COCO_train2014_000000057870.jpg", "vg/VG_100K_2/1.jpg", "vg/VG_100K/10.jpg",
        "vg/VG_100K_2/2343.jpg"]
    assert ds.captions_of(0) == COCO_60623  # trailing spaces of `raw` stripped
    # VG phrases: trailing space stripped, "Man is wearing sneakers" a duplicate of "man is wearing sneakers"
    assert ds.captions_of(3) == ["the clock is green in colour", "shade is along the street", "man is wearing sneakers"]
    assert ds.captions_of(4) == ["white car parked on the street", "a tall street lamp"]  # top-level key image_id
    assert (ds.stats["coco_images"], ds.stats["vg_images"], ds.stats["dropped_coco_val_test"]) == (3, 3, 1)
    for example in read_every_example(ds):
        assert example["image"].shape[0] == 3 and min(example["image"].shape[1:]) == 32
        assert len(example["texts"]) == 4


def test_visual_genome_finds_both_image_folders_and_keeps_coco_ids():
    images, _ = data.read_visual_genome(os.path.join(FIXTURE, "vg"))
    assert rel(p for p, _, _ in images) == ["vg/VG_100K_2/1.jpg", "vg/VG_100K/10.jpg", "vg/VG_100K/107899.jpg",
                                            "vg/VG_100K_2/2343.jpg"]
    assert [c for _, _, c in images] == [None, None, 391895, 318556]
    assert data.coco_held_out_ids(os.path.join(FIXTURE, "coco", "dataset_coco.json")) == {391895, 522418, 184613}


def test_pretrain_held_out_pairs_are_karpathy_val_and_test(tok):
    assert [build("pretrain", "val", tok).keys[0]] == ["coco:184613"]
    test = build("pretrain", "test", tok)
    assert [test.keys[i] for i in range(len(test))] == ["coco:391895", "coco:522418"]


# ---- retrieval: COCO and Flickr30K Karpathy splits ----

def test_coco_retrieval_splits_and_the_first_five_captions(tok):
    train = build("retrieval", "train", tok, source="coco")
    assert train.image_ids == [60623, 318556, 57870]  # train + restval
    val = build("retrieval", "val", tok, source="coco")
    assert val.image_ids == [184613] and len(val.texts) == 5
    test = build("retrieval", "test", tok, source="coco")
    assert test.image_ids == [391895, 522418]
    assert rel(test.paths[i] for i in range(2)) == ["coco/val2014/COCO_val2014_000000391895.jpg",
                                                    "coco/val2014/COCO_val2014_000000522418.jpg"]
    captions = [test.texts.captions[k] for k in range(len(test.texts))]
    # 522418 has 6 captions: the protocol takes the first 5 ("A lady in a hairnet..." is left out)
    assert len(captions) == 10 and test.txt2img.tolist() == [0] * 5 + [1] * 5 and test.img2txt[1] == [5, 6, 7, 8, 9]
    assert captions[0] == "A man with a red helmet on a small moped on a dirt road."
    assert captions[5:] == ["A woman wearing a net on her head cutting a cake.",
                            "A woman cutting a large white sheet cake.",
                            "A woman wearing a hair net cutting a large sheet cake.",
                            "there is a woman that is cutting a white cake",
                            "A woman marking a cake with the back of a chef's knife."]
    for ds in (train, val, test):
        read_every_example(ds)


def test_flickr30k_karpathy_records_without_filepath_or_cocoid(tok):
    train = build("retrieval", "train", tok, source="flickr30k")
    assert train.image_ids == ["1000092795.jpg", "10002456.jpg"]  # no cocoid: the file name is the id
    assert rel(train.paths[i] for i in range(2)) == ["flickr30k/flickr30k-images/1000092795.jpg",
                                                     "flickr30k/flickr30k-images/10002456.jpg"]
    assert train.captions[0] == "Two young guys with shaggy hair look at their hands while hanging out in the yard."
    assert build("retrieval", "val", tok, source="flickr30k").image_ids == ["1000268201.jpg"]
    test = build("retrieval", "test", tok, source="flickr30k")
    assert test.image_ids == ["1007129816.jpg"]
    assert [test.texts.captions[k] for k in range(5)] == [
        "The man with pierced ears is wearing glasses and an orange hat.",
        "A man with glasses is wearing a beer can crocheted hat.",
        "A man with gauges and glasses is wearing a Blitz hat.",
        "A man in an orange hat starring at something.",
        "A man wears an orange hat and glasses."]
    read_every_example(train)
    read_every_example(test)


# ---- VQA v2 ----

def test_vqa_v2_questions_answers_and_answer_vocabulary(tok):
    # min_count=1 over train2014 + val2014: the normalised multiple_choice_answers, by question count, then A-Z
    assert data.build_vqa_answer_vocab(FIXTURE, min_count=1) == ["yes", "1", "8", "butterflies", "motorcycle",
                                                                 "umbrella", "white"]
    vocab = ["8", "10", "6", "lot", "yes", "butterflies", "butterfly", "flowers"]
    train = build("vqa", "train", tok, answer_vocab=vocab)
    assert train.question_ids.tolist() == [318556000, 318556001, 57870000]
    assert [train.questions[i] for i in range(3)] == ["What are the tiles decorated with?", "Is the bathroom clean?",
                                                      "How many chairs are at the table?"]
    examples = read_every_example(train)
    assert [e["answer_type"] for e in examples] == ["other", "yes/no", "number"]
    assert examples[2]["answers"] == ["8", "8", "eight", "10", "8", "Eight", "6", "8", "10", "lot"]
    # soft scores min(1, 0.3 x count) after normalisation: "eight"/"Eight" count as "8" (6 in all), "10" twice
    assert examples[2]["targets"].tolist() == pytest.approx([1.0, 0.6, 0.3, 0.3, 0, 0, 0, 0])
    # "butterflies " and "Butterflies" are "butterflies" (7 in all), "butterfly" twice, "flowers" once
    assert examples[0]["targets"].tolist() == pytest.approx([0, 0, 0, 0, 0, 1.0, 0.6, 0.3])
    assert examples[1]["targets"].tolist() == pytest.approx([0, 0, 0, 0, 1.0, 0, 0, 0])  # "Yes", "yes." are "yes"
    assert rel([train.paths[train.image_of[0]]]) == ["coco/train2014/COCO_train2014_000000318556.jpg"]

    val = build("vqa", "val", tok, answer_vocab=vocab)
    assert val.question_ids.tolist() == [391895000, 391895001, 522418000, 184613000, 60623000]
    assert len(build("vqa", "train+val", tok, answer_vocab=vocab)) == 8


def test_vqa_test_dev_and_test_are_questions_only_on_test2015_images(tok):
    test_dev = build("vqa", "test-dev", tok, answer_vocab=["yes"])
    assert test_dev.question_ids.tolist() == [1000, 1001]
    examples = read_every_example(test_dev)
    assert [(e["answers"], e["answer_type"]) for e in examples] == [([], None), ([], None)]
    assert rel([test_dev.paths[0]]) == ["coco/test2015/COCO_test2015_000000000001.jpg"]  # test-dev lives in test2015
    test = build("vqa", "test", tok, answer_vocab=["yes"])
    assert test.question_ids.tolist() == [1000, 1001, 14000]


# ---- NLVR2 ----

def test_nlvr2_json_lines_with_directory_and_png_files_holding_jpeg(tok):
    train = build("nlvr2", "train", tok)
    assert [train.identifiers[i] for i in range(3)] == ["train-10171-0-0", "train-10171-1-0", "train-5024-2-1"]
    assert train.labels.tolist() == [0, 1, 1]  # "False", "True", "True"; label 1 is "True"
    assert rel(train.left[i] for i in range(3)) == ["nlvr2/images/train/72/train-10171-0-img0.png",
                                                    "nlvr2/images/train/72/train-10171-1-img0.png",
                                                    "nlvr2/images/train/14/train-5024-2-img0.png"]
    assert rel([train.right[0]]) == ["nlvr2/images/train/72/train-10171-0-img1.png"]
    dev = build("nlvr2", "dev", tok)
    assert [dev.identifiers[i] for i in range(3)] == ["dev-850-0-0", "dev-850-1-0", "dev-850-0-1"]
    assert dev.labels.tolist() == [1, 0, 0]
    assert dev.sentences[2] == "There are more acorns in the left image than in the right image."
    assert rel([dev.left[2], dev.right[2]]) == ["nlvr2/dev/dev-850-0-img0.png", "nlvr2/dev/dev-850-0-img1.png"]
    test1 = build("nlvr2", "test1", tok)
    assert [test1.identifiers[i] for i in range(2)] == ["test1-0-0-0", "test1-0-1-0"]
    assert test1.labels.tolist() == [0, 1]
    # these ".png" files hold JPEG data (NLVR2 has such files): decoded by content
    for path in (train.right[0], dev.left[1], test1.right[1]):
        with open(path, "rb") as f:
            assert f.read(3) == b"\xff\xd8\xff"
    for ds in (train, dev, test1):
        examples = read_every_example(ds)
        batch = ds.collate(examples)
        assert batch["images"].shape[:2] == (2 * len(ds), 3)
        assert batch["labels"].tolist() == ds.labels.tolist()


# ---- SNLI-VE ----

def test_snli_ve_reads_the_2018_and_the_2020_image_keys(tok):
    train = build("snli-ve", "train", tok)
    assert [train.pair_ids[i] for i in range(3)] == ["1000092795.jpg#0r1n", "1000092795.jpg#0r1e",
                                                     "10002456.jpg#0r1c"]
    assert [train.hypotheses[i] for i in range(3)] == ["Two young guys are brothers.", "Two guys are outside.",
                                                       "Nobody is working."]  # sentence2; the premise is not read
    assert train.labels.tolist() == [1, 0, 2]  # neutral, entailment, contradiction
    # lines 1-2 carry Flikr30kID "1000092795.jpg" (2018), line 3 Flickr30K_ID "10002456" (2020)
    assert rel(train.paths[train.image_of[i]] for i in range(3)) == ["flickr30k/flickr30k-images/1000092795.jpg"] * 2 \
        + ["flickr30k/flickr30k-images/10002456.jpg"]
    dev = build("snli-ve", "dev", tok)
    assert [dev.pair_ids[i] for i in range(2)] == ["1000268201.jpg#0r1e", "1000268201.jpg#0r1n"]
    assert dev.labels.tolist() == [0, 1]
    test = build("snli-ve", "test", tok)
    assert test.labels.tolist() == [2, 0] and test.hypotheses[0] == "The man is bald and wears no hat."
    for ds in (train, dev, test):
        read_every_example(ds)


# ---- the whole folder, as `python data.py check --full` sees it ----

def test_check_full_opens_every_file_of_the_fixture(capsys):
    assert data.main(["check", "--data", FIXTURE, "--full", "--image-short", "32", "--image-long", "48"]) is None
    out = capsys.readouterr().out
    images = [os.path.join(d, f) for d, _, files in os.walk(FIXTURE) for f in files if f.endswith((".jpg", ".png"))]
    annotations = sorted(os.path.relpath(os.path.join(d, f), FIXTURE) for d, _, files in os.walk(FIXTURE)
                         for f in files if f.endswith((".json", ".jsonl")))
    assert len(images) == 30 and len(annotations) == 16
    assert "full mode" in out and f"opened {len(images)} image files" in out and "bad image files: 0" in out
    for name in annotations:
        assert f"  {name}\n" in out


# ---- evaluate.py --task nlvr2: the official scorer's predictions file ----

def test_evaluate_nlvr2_writes_the_official_predictions_csv(tok, tmp_path, capsys):
    cfg = soho.config_from_preset("tiny", resnet_width=8, hidden_size=32, num_layers=1, num_heads=2,
                                  intermediate_size=64, vocab_size=tok.vocab_size, vd_size=16, dropout=0.0,
                                  image_short=64, image_long=96)
    torch.manual_seed(0)
    model = soho.SOHO(cfg)
    ckpt = str(tmp_path / "ckpt.pt")
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
                "train_config": {"preset": "tiny"}, "task": "nlvr2", "vocab_path": os.path.join(FIXTURE, "vocab.txt"),
                "data_root": FIXTURE, "answers": None}, ckpt)
    result = evaluate.main(["--task", "nlvr2", "--split", "dev", "--checkpoint", ckpt, "--out", str(tmp_path),
                            "--workers", "0", "--batch-size", "1"])
    path = str(tmp_path / "eval-nlvr2-dev-predictions.csv")
    assert result["predictions_path"] == path and f"wrote {path}" in capsys.readouterr().out
    with open(path) as f:
        lines = f.read().splitlines()
    # one "identifier,True|False" line per example, in the order of dev.json
    with open(os.path.join(FIXTURE, "nlvr2", "dev.json")) as f:
        gold = [json.loads(line) for line in f if line.strip()]
    assert [line.split(",")[0] for line in lines] == ["dev-850-0-0", "dev-850-1-0", "dev-850-0-1"]
    assert all(line.split(",")[1] in ("True", "False") for line in lines)
    assert [line.split(",")[1] == "True" for line in lines] == [result["predictions"][g["identifier"]] == 1
                                                                for g in gold]
    # scored as the official scorer does: the prediction string against the label string, per identifier
    predicted = dict(line.split(",") for line in lines)
    accuracy = 100.0 * sum(predicted[g["identifier"]].lower() == g["label"].lower() for g in gold) / len(gold)
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy)
