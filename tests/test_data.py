"""Tests of data.py on small fixtures written in the real formats, and on a small synthetic world (CPU, a few
seconds)."""

import collections
import dataclasses
import json
import logging
import os
import pickle
import random
import sys
import types

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import soho  # noqa: E402

SMALL = types.SimpleNamespace(image_short=64, image_long=96, max_text_len=24)  # small images keep tests fast


# ---- fixtures (and `world`, the small synthetic world: conftest.py) ----

@pytest.fixture(scope="module")
def tok(world):
    return data.Tokenizer.from_vocab(os.path.join(world, "vocab.txt"), max_len=24)


def write_jpeg(path, size=(40, 30), color=(200, 30, 30), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path, "JPEG")


def write_lines(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def karpathy_image(split, cocoid, captions, folder="train2014"):
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid, "split": split,
            "imgid": cocoid, "sentids": list(range(len(captions))),
            "sentences": [{"raw": c, "tokens": c.split(), "imgid": cocoid, "sentid": k} for k, c in enumerate(captions)]}


# ---- files ----

def test_write_json_writes_what_json_dump_writes_and_no_tmp_file(tmp_path):
    """data.write_json: json.dump's bytes (the world's files are written with it), the folder made, no .tmp left."""
    obj = {"a": [1, 2.5, None], "b": "caf\u00e9 \n"}
    path = str(tmp_path / "new" / "x.json")
    data.write_json(path, obj)
    assert open(path, encoding="utf-8").read() == json.dumps(obj) and os.listdir(tmp_path / "new") == ["x.json"]
    data.write_json(path, obj, indent=1)
    assert open(path, encoding="utf-8").read() == json.dumps(obj, indent=1)
    data.write_json_lines(path + "l", [obj, {"c": 1}])
    assert [r for _, r in data.read_json_lines(path + "l", "")] == [obj, {"c": 1}]


# ---- text ----

HAND_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "play", "##ing",
              "##ed", ".", ",", "a", "dog", "red", "circle", "cafe", "##s"]


@pytest.fixture
def hand_tok(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(HAND_VOCAB) + "\n")
    return data.Tokenizer.from_vocab(str(path), max_len=16)


def test_tokenizer_matches_hand_computed_ids(hand_tok):
    t = hand_tok
    assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id, t.vocab_size) == (0, 1, 2, 3, 4, len(HAND_VOCAB))
    assert t.encode("The cat sat on the mat.") == [2, 5, 6, 7, 8, 5, 9, 13, 3]
    assert t.encode("PLAYING dogs") == [2, 10, 11, 16, 20, 3]  # upper case lowered, ##pieces
    assert t.encode("the cat is played") == [2, 5, 6, 1, 10, 12, 3]  # unknown word -> [UNK]
    assert t.encode("playx") == [2, 1, 3]  # a word that cannot be split entirely is one [UNK], as in BERT
    assert t.encode("Café") == [2, 19, 3]  # accents stripped
    assert t.encode("red,circle") == [2, 17, 14, 18, 3]  # punctuation splits
    assert t.encode("a [MASK] cat") == [2, 15, 4, 6, 3]  # special tokens kept whole
    assert t.encode("the cat sat on the mat", max_len=5) == [2, 5, 6, 7, 3]  # truncation keeps [SEP]
    assert t.encode("") == [2, 3]
    ids, mask = t.encode_batch(["the cat", "playing"])
    assert ids.tolist() == [[2, 5, 6, 3], [2, 10, 11, 3]] and mask.all()
    ids, mask = t.encode_batch(["the cat sat", "dog"])
    assert ids.tolist() == [[2, 5, 6, 7, 3], [2, 16, 3, 0, 0]]
    assert mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert t.decode(ids[0]) == "the cat sat"
    assert t.decode([2, 10, 11, 16, 20, 3]) == "playing dogs"
    clone = pickle.loads(pickle.dumps(t))
    assert clone.encode("PLAYING dogs") == t.encode("PLAYING dogs") and clone.max_len == 16


def test_vocab_without_special_tokens_is_an_error(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("the\ncat\n")
    with pytest.raises(data.DataError, match="vocab.txt.*special tokens"):
        data.Tokenizer.from_vocab(str(path))


def test_train_wordpiece_vocab(tmp_path):
    texts = ["a red circle left of a small blue square", "how many circles are there?", "There is a green star."]
    for name in ("a.txt", "b.txt"):
        data.train_wordpiece_vocab(texts * 5, str(tmp_path / name), vocab_size=200)
    lines = (tmp_path / "a.txt").read_text().splitlines()
    assert lines[:5] == list(data.SPECIAL_TOKENS)
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()  # deterministic
    t = data.Tokenizer.from_vocab(str(tmp_path / "a.txt"))
    for text in texts:
        assert t.unk_id not in t.encode(text)
        assert t.decode(t.encode(text)) == text.lower()
    ids = t.encode("squares")  # an unseen word falls back to a known word and ##pieces, not [UNK]
    assert t.unk_id not in ids and len(ids) > 3 and t.decode(ids) == "squares"


def test_mask_tokens_statistics():
    g = torch.Generator().manual_seed(0)
    vocab = types.SimpleNamespace(mask_id=4, vocab_size=1000, special_ids=(0, 1, 2, 3, 4))
    rows, width = 400, 64
    ids = torch.randint(5, 1000, (rows, width), generator=g)
    lengths = torch.randint(20, width + 1, (rows,), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]
    ids[:, 0] = 2
    ids[torch.arange(rows), lengths - 1] = 3
    ids[~mask] = 0
    ids[::7, 5] = 1  # some [UNK]: never chosen either
    masked, labels = data.mask_tokens(ids, mask, vocab, prob=0.15, generator=g)

    candidates = mask & (ids > 4)
    chosen = labels != soho.IGNORE
    assert not (chosen & ~candidates).any()  # special tokens and padding never masked
    assert (labels[chosen] == ids[chosen]).all()
    assert (masked[~chosen] == ids[~chosen]).all()
    share = chosen.sum().item() / candidates.sum().item()
    assert abs(share - 0.15) < 0.01, share
    n = chosen.sum().item()
    to_mask = (masked[chosen] == 4).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    randomised = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.02 and abs(randomised - 0.1) < 0.02
    assert (masked >= 0).all() and not torch.isin(masked[chosen & (masked != 4)], torch.tensor([0, 1, 2, 3])).any()
    # at least one chosen token in every row that has a candidate, even a short one
    short = torch.tensor([[2, 10, 11, 3, 0], [2, 12, 3, 0, 0], [2, 3, 0, 0, 0]])
    _, short_labels = data.mask_tokens(short, short != 0, vocab, generator=g)
    assert (short_labels[:2] != soho.IGNORE).sum(1).min() >= 1 and (short_labels[2] == soho.IGNORE).all()


def test_mask_tokens_reproducible_with_generator():
    vocab = types.SimpleNamespace(mask_id=4, vocab_size=100, special_ids=(0, 1, 2, 3, 4))
    ids = torch.randint(5, 100, (8, 20))
    mask = torch.ones_like(ids, dtype=torch.bool)
    a = data.mask_tokens(ids, mask, vocab, generator=torch.Generator().manual_seed(3))
    b = data.mask_tokens(ids, mask, vocab, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- images ----

def test_resize_pad_mask():
    assert data.resize_image(Image.new("RGB", (400, 300)), 256, 384).size == (341, 256)  # short side to 256
    assert data.resize_image(Image.new("RGB", (1000, 200)), 256, 384).size == (384, 77)  # long side capped
    assert data.resize_image(Image.new("RGB", (60, 80)), 600, 1000).size == (600, 800)  # small images enlarged
    assert data.resize_image(Image.new("RGB", (1333, 800)), 600, 1000).size == (1000, 600)
    a = data.image_to_tensor(Image.new("RGB", (384, 77), (255, 0, 128)))
    b = data.image_to_tensor(Image.new("RGB", (341, 256)))
    assert a.shape == (3, 77, 384) and a.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - data.IMAGENET_MEAN.flatten()) / data.IMAGENET_STD.flatten()
    assert torch.allclose(a[:, 10, 10], expected, atol=1e-5)
    images, mask = data.pad_images([a, b])
    assert images.shape == (2, 3, 256, 384) and mask.shape == (2, 256, 384) and mask.dtype == torch.bool
    assert images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
    assert mask[0, :77, :384].all() and not mask[0, 77:].any()
    assert mask[1, :256, :341].all() and not mask[1, :, 341:].any()
    assert mask.sum().item() == 77 * 384 + 256 * 341
    assert (images[0, :, 77:] == 0).all() and (images[1, :, :, 341:] == 0).all()
    assert data.pad_images([torch.zeros(3, 33, 64)])[0].shape == (1, 3, 64, 64)


def test_load_image_any_mode(tmp_path):
    Image.new("L", (30, 20), 128).save(tmp_path / "gray.jpg")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (30, 20), (10, 200, 10)).convert("P").save(tmp_path / "palette.png")
    Image.new("RGBA", (30, 20), (0, 0, 255, 255)).save(tmp_path / "rgba.png")
    Image.new("RGBA", (30, 20), (0, 0, 0, 0)).save(tmp_path / "transparent.png")
    Image.new("RGB", (30, 20), (200, 30, 30)).save(tmp_path / "jpeg_named.png", "JPEG")  # as in NLVR2
    for name in ("gray.jpg", "cmyk.jpg", "palette.png", "rgba.png", "transparent.png", "jpeg_named.png"):
        img = data.load_image(str(tmp_path / name))
        assert img.mode == "RGB" and img.size == (30, 20), name
    assert data.load_image(str(tmp_path / "gray.jpg")).getpixel((5, 5)) == (128, 128, 128)
    r, g, b = data.load_image(str(tmp_path / "cmyk.jpg")).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert data.load_image(str(tmp_path / "transparent.png")).getpixel((5, 5)) == (255, 255, 255)
    r, g, b = data.load_image(str(tmp_path / "jpeg_named.png")).getpixel((5, 5))
    assert r > 180 and g < 60


def test_bad_image_errors_name_the_file(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image")
    with pytest.raises(data.DataError, match="corrupt.jpg"):
        data.load_image(str(tmp_path / "corrupt.jpg"))
    with pytest.raises(data.DataError, match="not found.*missing.jpg"):
        data.load_image(str(tmp_path / "missing.jpg"))
    good = tmp_path / "truncated.jpg"
    Image.new("RGB", (200, 200), (1, 2, 3)).save(good, "JPEG")
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(data.DataError, match="truncated.jpg"):
        data.load_image(str(good))


# ---- pre-training ----

def test_pretrain_batches(world, tok):
    ds = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0)
    coco = json.load(open(os.path.join(world, "coco", "dataset_coco.json")))["images"]
    n_coco = sum(r["split"] in ("train", "restval") for r in coco)
    assert ds.stats["coco_images"] == n_coco and len(ds) == n_coco + ds.stats["vg_images"]
    batch = ds.collate([ds[i] for i in range(6)])
    B = 6
    assert batch["images"].shape[0] == B  # each image once in the CNN input
    assert batch["input_ids"].shape[0] == 4 * B and batch["text_mask"].shape == batch["input_ids"].shape
    assert batch["img_index"].tolist() == [i for i in range(B) for _ in range(4)]
    assert batch["itm_label"].tolist() == [1, 1, 0, 0] * B
    assert batch["mlm_labels"].shape == batch["input_ids"].shape and batch["skipped"] == 0
    assert batch["input_ids"].shape[1] <= SMALL.max_text_len
    for row in range(4 * B):
        i = row // 4
        text, source = batch["texts"][row], batch["text_source"][row].item()
        own = ds.captions_of(i)
        if batch["itm_label"][row] == 1:
            assert text in own and source == i
            assert (batch["mlm_labels"][row] != soho.IGNORE).any()
        else:
            assert source != i and ds.keys[source] != ds.keys[i] and text not in own and text in ds.captions_of(source)
            assert (batch["mlm_labels"][row] == soho.IGNORE).all()
            assert batch["text_mask"][row].sum() == len(tok.encode(text))
        ids = batch["input_ids"][row]
        assert ids[0] == tok.cls_id and ids[batch["text_mask"][row].sum() - 1] == tok.sep_id
        assert (ids[~batch["text_mask"][row]] == tok.pad_id).all()
    # mismatched texts are masked like matched ones (without labels): a [MASK] must not give the match away
    for label in (0, 1):
        rows = batch["input_ids"][batch["itm_label"] == label]
        assert (rows == tok.mask_id).any(dim=1).float().mean() > 0.5
    # determinism per (seed, epoch, index), and new draws in a new epoch
    assert ds[3]["texts"] == ds[3]["texts"] and ds[3]["input_ids"] == ds[3]["input_ids"]
    before = [ds[i]["texts"] for i in range(8)]
    ds.set_epoch(1)
    assert [ds[i]["texts"] for i in range(8)] != before


def test_pretrain_hard_negative_shares_words(world, tok):
    ds = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0, negatives="hard")
    hard = random_ = 0
    for i in range(len(ds)):
        e = ds[i]
        words = data.content_words(e["texts"][0])
        hard += len(words & data.content_words(e["texts"][2]))
        random_ += len(words & data.content_words(e["texts"][3]))
    assert hard > 1.5 * random_


def test_pretrain_negatives_are_random_captions_by_default(world, tok):
    """The paper's negatives: both mismatched texts are captions of random other images, so their words overlap a
    matched caption no more than each other's do (the hard ones overlap far more, see the test above)."""
    ds = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0)
    assert ds.negatives == "random"
    overlap = [0, 0]
    for i in range(len(ds)):
        e = ds[i]
        words = data.content_words(e["texts"][0])
        for k in (2, 3):
            overlap[k - 2] += len(words & data.content_words(e["texts"][k]))
    assert 0.7 < overlap[0] / overlap[1] < 1.4


def test_subject_negatives_share_the_subject_and_leave_no_text_trace(tmp_path_factory):
    """negatives="subject": the third text names the image's own background (the synthetic world's subject), yet
    over many epochs it is distributed like a matched caption: its mean length (the trace that "hard" leaves, a
    text-only model's cue) stays that of the matched captions, while "hard" makes it ~2.7 words longer."""
    import synthetic

    root = str(tmp_path_factory.mktemp("world120"))
    synthetic.write_synthetic_world(root, seed=0, n_images=120)
    tok = data.Tokenizer.from_vocab(os.path.join(root, "vocab.txt"), 24)
    length_gap, same_background = {}, {}
    for negatives in ("random", "subject", "hard"):
        ds = data.build_dataset("pretrain", "train", root, tok, SMALL, seed=0, negatives=negatives)
        matched, third, same, named = [], [], 0, 0
        for epoch in range(100):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                texts, _ = ds.choose_texts(i, ds.example_rng(i))
                matched += [len(t.split()) for t in texts[:2]]
                third.append(len(texts[2].split()))
                background = [w for w in synthetic.SYNTH_BACKGROUNDS if f"{w} background" in texts[0].lower()]
                if background:  # COCO captions name it; Visual Genome's region descriptions do not
                    named += 1
                    same += f"{background[0]} background" in texts[2].lower()
        length_gap[negatives] = sum(third) / len(third) - sum(matched) / len(matched)
        same_background[negatives] = same / named
    assert same_background["subject"] > 0.95 and same_background["random"] < 0.3
    assert abs(length_gap["random"]) < 0.3 and abs(length_gap["subject"]) < 0.4
    assert length_gap["hard"] > 1.5


def test_subject_from_epoch_switches_the_third_text_to_the_subject(world, tok):
    """subject_from_epoch=N: the third text is a random caption before epoch N and a same-subject one (on the
    synthetic world, a caption naming the image's own background) from epoch N on; the fourth stays random."""
    import synthetic

    ds = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0, subject_from_epoch=2)

    def same_background(epoch, slot):
        ds.set_epoch(epoch)
        same = named = 0
        for e in range(5):
            for i in range(len(ds)):
                texts, _ = ds.choose_texts(i, random.Random(f"{e}/{i}"))
                own = [w for w in synthetic.SYNTH_BACKGROUNDS if f"{w} background" in texts[0].lower()]
                if own:
                    named += 1
                    same += f"{own[0]} background" in texts[slot].lower()
        return same / named

    assert same_background(0, 2) < 0.35 and same_background(1, 2) < 0.35 and ds.negatives_now() == "random"
    assert same_background(2, 2) > 0.95 and same_background(5, 2) > 0.95 and ds.negatives_now() == "subject"
    assert same_background(5, 3) < 0.35


def test_mlm_prob_sets_the_share_of_masked_words(world, tok):
    """--mlm_prob reaches the pre-training data: about that share of each matched text's words carry MLM labels."""
    shares = {}
    for prob in (0.15, 0.4):
        ds = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0, mlm_prob=prob)
        labelled = total = 0
        for i in range(len(ds)):
            for row in ds[i]["mlm_labels"][:2]:
                labelled += sum(label != soho.IGNORE for label in row[1:-1])
                total += len(row) - 2  # [CLS] and [SEP] are never masked
        shares[prob] = labelled / total
    assert 0.12 < shares[0.15] < 0.22 and 0.35 < shares[0.4] < 0.46


def test_training_and_evaluation_sets_are_disjoint(world, tok):
    """No evaluation scores an example the model trained on: per task, the default training split and each
    evaluation split share no image (no question, no sentence pair)."""
    def images(ds):
        return {os.path.realpath(ds.paths[i]) for i in range(len(ds.paths))}

    pretrain = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0)
    for split in ("val", "test"):
        held_out = data.build_dataset("pretrain", split, world, tok, SMALL, seed=0)
        assert len(held_out) and not images(pretrain) & images(held_out)
        e = held_out[0]  # held-out pairs are scored as they are: nothing masked, nothing to predict
        assert e["texts"][0] in held_out.captions_of(0) and e["texts"][2] not in held_out.captions_of(0)
        assert all(t != tok.mask_id for ids in e["input_ids"] for t in ids)
        assert all(label == soho.IGNORE for row in e["mlm_labels"] for label in row)
    for source in ("coco", "flickr30k"):
        train = data.build_dataset("retrieval", "train", world, tok, SMALL, source=source)
        for split in ("val", "test"):
            assert not images(train) & images(data.build_dataset("retrieval", split, world, tok, SMALL, source=source))
    vqa_train = data.build_dataset("vqa", "train", world, tok, SMALL, min_answer_count=1)
    vqa_val = data.build_dataset("vqa", "val", world, tok, SMALL, answer_vocab=vqa_train.answer_vocab)
    assert not set(vqa_train.question_ids.tolist()) & set(vqa_val.question_ids.tolist())
    assert not images(vqa_train) & images(vqa_val)
    # the paper's train+val holds val: evaluate.py refuses to score val with such a model (data.TRAINED_ON)
    both = data.build_dataset("vqa", "train+val", world, tok, SMALL, min_answer_count=1)
    assert set(vqa_val.question_ids.tolist()) <= set(both.question_ids.tolist())
    assert data.TRAINED_ON[("vqa", "train+val")] == {"val"}
    nlvr2 = data.build_dataset("nlvr2", "train", world, tok, SMALL)
    nlvr2_images = {os.path.realpath(p) for ds in [nlvr2] for i in range(len(ds)) for p in (ds.left[i], ds.right[i])}
    for split in ("dev", "test1"):
        other = data.build_dataset("nlvr2", split, world, tok, SMALL)
        assert not nlvr2_images & {os.path.realpath(p) for i in range(len(other)) for p in (other.left[i], other.right[i])}
        assert not {nlvr2.identifiers[i] for i in range(len(nlvr2))} & {other.identifiers[i] for i in range(len(other))}
    snli = data.build_dataset("snli-ve", "train", world, tok, SMALL)
    for split in ("dev", "test"):
        assert not images(snli) & images(data.build_dataset("snli-ve", split, world, tok, SMALL))


def test_text_only_control_sees_one_constant_image(world, tok):
    ds = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0, text_only=True)
    batch = ds.collate([ds[i] for i in range(4)])
    assert (batch["images"] == 0).all() and batch["image_mask"].all()
    assert batch["images"].shape[-2:] == (SMALL.image_short, SMALL.image_short)
    real = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0)
    assert real[0]["texts"] == ds[0]["texts"] and real[0]["input_ids"] == ds[0]["input_ids"]  # only images differ
    vqa = data.build_dataset("vqa", "val", world, tok, SMALL, text_only=True, min_answer_count=1)
    assert (vqa[0]["image"] == 0).all()


def test_pretrain_reads_coco_and_vg_without_leakage(tmp_path, hand_tok):
    root = tmp_path
    images = [karpathy_image("train", 1, ["the cat sat", "a dog"]),
              karpathy_image("restval", 2, ["a red circle", "the mat"], "val2014"),
              karpathy_image("test", 3, ["a cat on the mat"], "val2014"),
              karpathy_image("val", 4, ["a dog on the mat"], "val2014")]
    (root / "coco").mkdir()
    (root / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for r in images:
        write_jpeg(str(root / "coco" / r["filepath"] / r["filename"]))
    (root / "vg").mkdir()
    regions = [{"id": 10, "regions": [{"region_id": 1, "image_id": 10, "phrase": "a cat", "x": 0, "y": 0,
                                       "width": 5, "height": 5}]},
               {"image_id": 11, "regions": [{"region_id": 2, "image_id": 11, "phrase": "the dog ", "x": 0, "y": 0,
                                             "width": 5, "height": 5},
                                            {"region_id": 3, "image_id": 11, "phrase": " ", "x": 0, "y": 0,
                                             "width": 5, "height": 5}]},
               {"regions": [{"region_id": 4, "image_id": 12, "phrase": "red mat", "x": 0, "y": 0, "width": 5,
                             "height": 5}]},
               {"id": 13, "regions": [{"region_id": 5, "image_id": 13, "phrase": "a mat", "x": 0, "y": 0,
                                       "width": 5, "height": 5}]}]
    meta = [{"image_id": 10, "coco_id": 1, "url": "https://x/VG_100K/10.jpg"},
            {"image_id": 11, "coco_id": None, "url": "https://x/VG_100K_2/11.jpg"},
            {"image_id": 12, "coco_id": 3, "url": "https://x/VG_100K/12.jpg"},  # a COCO test image: dropped
            {"image_id": 13, "coco_id": 4, "url": "https://x/VG_100K_2/13.jpg"}]  # a COCO val image: dropped
    (root / "vg" / "region_descriptions.json").write_text(json.dumps(regions))
    (root / "vg" / "image_data.json").write_text(json.dumps(meta))
    write_jpeg(str(root / "vg" / "VG_100K" / "10.jpg"))
    write_jpeg(str(root / "vg" / "VG_100K_2" / "11.jpg"))
    ds = data.build_dataset("pretrain", "train", str(root), hand_tok, SMALL, seed=0)
    assert len(ds) == 4 and ds.stats["dropped_coco_val_test"] == 2 and ds.stats["empty_captions"] == 1
    paths = [ds.paths[i] for i in range(len(ds))]
    assert paths[3].endswith(os.path.join("VG_100K_2", "11.jpg"))
    assert ds.keys[2] == ds.keys[0] == "coco:1"  # VG image 10 is COCO image 1: the same photograph
    for epoch in range(5):
        ds.set_epoch(epoch)
        for source in ds[0]["text_source"][2:] + ds[2]["text_source"][2:]:
            assert source in (1, 3)  # never a caption of the same photograph
        batch = ds.collate([ds[i] for i in range(4)])
        assert batch["images"].shape[0] == 4


# ---- random batches ----

def collated_batch(task, world, tok):
    """A real batch of a task from the small world: 3 examples (2 for NLVR2)."""
    opts = {"seed": 0, "min_answer_count": 1} if task == "vqa" else {"seed": 0}
    ds = data.build_dataset(task, "train", world, tok, SMALL, **opts)
    return ds.collate([ds[i] for i in range(2 if task == "nlvr2" else 3)])


def layout(batch):
    """key -> what a batch must agree on: a tensor's dtype and shape, a list's length and item type."""
    return {k: (v.dtype, tuple(v.shape)) if torch.is_tensor(v) else
            (type(v), len(v), type(v[0])) if isinstance(v, list) else type(v) for k, v in batch.items()}


@pytest.mark.parametrize("task", data.TASKS)
def test_random_batch_is_laid_out_as_a_collated_batch_and_the_model_runs_on_it(world, tok, task):
    real = collated_batch(task, world, tok)
    n = real["input_ids"].shape[0] // (4 if task == "pretrain" else 1)
    config = soho.PRESETS["tiny"]
    if task == "vqa":
        config = dataclasses.replace(config, num_answers=real["targets"].shape[1])
    batch = data.random_batch(task, config, n, image_size=real["images"].shape[-2:],
                              text_len=real["input_ids"].shape[1], seed=1)
    assert layout(batch) == layout(real)
    model = soho.SOHO(config)
    if task == "pretrain":
        out = model.pretrain_losses(batch)
        assert out["mlm"].count == (batch["mlm_labels"] != soho.IGNORE).sum() and out["itm"].count == 4 * n
        assert all(torch.isfinite(out[k].mean) for k in ("mlm", "mvm", "itm"))
    else:
        shape = {"retrieval": (n, n, 2), "vqa": (n, config.num_answers), "nlvr2": (n, 2), "snli-ve": (n, 3)}[task]
        assert model.task_logits(task, batch).shape == shape


def test_random_pretrain_batch_is_masked_as_pretrain_dataset_masks():
    config = soho.PRESETS["tiny"]
    batch = data.random_batch("pretrain", config, 6, seed=3)
    assert all(torch.equal(batch[k], v) for k, v in data.random_batch("pretrain", config, 6, seed=3).items()
               if torch.is_tensor(v))  # the same for the same seed
    assert not torch.equal(batch["input_ids"], data.random_batch("pretrain", config, 6, seed=4)["input_ids"])
    assert batch["images"].shape == (6, 3, config.image_short, config.image_short) and batch["image_mask"].all()
    assert batch["input_ids"].shape == (24, config.max_text_len) and batch["itm_label"].tolist() == [1, 1, 0, 0] * 6
    targets = batch["mlm_labels"] != soho.IGNORE
    matched = batch["itm_label"] == 1
    assert targets[matched].any(dim=1).all() and not targets[~matched].any()  # >= 1 per matched text, no other
    lengths = batch["text_mask"].sum(1)
    assert lengths.max() == config.max_text_len and lengths.min() >= 3
    assert not targets[:, 0].any() and not targets[torch.arange(24), lengths - 1].any()  # [CLS], [SEP]
    assert (batch["mlm_labels"][targets] >= 5).all()  # words only
    assert (batch["input_ids"][~matched] == 4).any()  # the mismatched texts are masked too, without labels
    assert (batch["text_source"].view(6, 4)[:, :2] == torch.arange(6)[:, None]).all()


# ---- retrieval ----

def test_retrieval_train_and_eval(world, tok):
    coco = json.load(open(os.path.join(world, "coco", "dataset_coco.json")))["images"]
    captions = {r["cocoid"]: [s["raw"].strip() for s in r["sentences"]] for r in coco}
    ds = data.build_dataset("retrieval", "train", world, tok, SMALL, seed=0, source="coco")
    assert len(ds) == sum(r["split"] in ("train", "restval") for r in coco)
    batch = ds.collate([ds[i] for i in range(8)])
    assert batch["images"].shape[0] == batch["input_ids"].shape[0] == 8
    assert len(set(batch["image_ids"])) == 8  # t distinct images
    for image_id, text in zip(batch["image_ids"], batch["texts"]):
        assert text in captions[image_id]  # caption j belongs to image j

    test = data.build_dataset("retrieval", "test", world, tok, SMALL, source="coco")
    test_images = [r for r in coco if r["split"] == "test"]
    assert len(test) == len(test_images) and len(test.texts) == 5 * len(test_images)
    assert test.txt2img.tolist() == [i for i in range(len(test_images)) for _ in range(5)]
    assert test.img2txt[1] == [5, 6, 7, 8, 9]
    image_batch = test.collate([test[i] for i in range(3)])
    assert image_batch["image_index"].tolist() == [0, 1, 2] and image_batch["images"].shape[0] == 3
    text_batch = test.texts.collate([test.texts[k] for k in range(7)])
    assert text_batch["txt2img"].tolist() == [0] * 5 + [1] * 2 and text_batch["text_index"].tolist() == list(range(7))

    flickr = data.build_dataset("retrieval", "test", world, tok, SMALL, source="flickr30k")
    assert len(flickr.texts) == 5 * len(flickr) and flickr.collate([flickr[0]])["images"].shape[0] == 1


def test_coco_image_with_seven_captions(tmp_path, hand_tok):
    captions = [f"the cat {k}" for k in range(7)]
    images = [karpathy_image("test", 5, captions, "val2014"), karpathy_image("train", 6, ["a dog", "", "the mat\n"])]
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    test = data.build_dataset("retrieval", "test", str(tmp_path), hand_tok, SMALL, source="coco")
    assert [test.texts.captions[k] for k in range(len(test.texts))] == captions[:5]  # the first 5
    train = data.build_dataset("retrieval", "train", str(tmp_path), hand_tok, SMALL, source="coco")
    assert train.stats["empty_captions"] == 1 and len(train.captions) == 2  # empty skipped, raw stripped
    assert train.captions[1] == "the mat"


# ---- VQA ----

def test_answer_normalization():
    assert data.normalize_answer("Two dogs.") == "2 dogs"
    assert data.normalize_answer(" the Dog\n") == "dog"
    assert data.normalize_answer("dont know") == "don't know"
    assert data.normalize_answer("yes!") == "yes"
    assert data.normalize_answer("left-hand") == "left hand"
    assert data.normalize_answer("1,000") == "1000"  # digit,digit: punctuation deleted
    assert data.normalize_answer("3.5") == "3.5"  # a period before a digit stays
    assert data.normalize_answer("none") == "0"
    assert data.normalize_answer("an apple") == "apple"
    assert data.normalize_vocab_answer("red,white") == "red white"
    assert data.normalize_vocab_answer("red, white") == "red white"
    assert [data.vqa_soft_score(c) for c in range(6)] == pytest.approx([0, 0.3, 0.6, 0.9, 1, 1])


def test_answer_vocabulary_counts_distinct_questions():
    annotations = ([{"question_id": q, "multiple_choice_answer": "Two"} for q in range(5)]
                   + [{"question_id": q, "multiple_choice_answer": "2"} for q in range(5, 9)]
                   + [{"question_id": 1, "multiple_choice_answer": "cat"}] * 20  # one question, many times
                   + [{"question_id": q, "multiple_choice_answer": "yes"} for q in range(20)])
    assert data.answer_vocabulary(annotations) == ["yes", "2"]  # "two" and "2" merge: 9 questions
    assert data.answer_vocabulary(annotations, min_count=1) == ["yes", "2", "cat"]


def test_vqa_dataset(world, tok):
    train = data.build_dataset("vqa", "train+val", world, tok, SMALL, min_answer_count=1)
    n_train = len(json.load(open(os.path.join(world, "vqa", "v2_OpenEnded_mscoco_train2014_questions.json")))["questions"])
    n_val = len(json.load(open(os.path.join(world, "vqa", "v2_OpenEnded_mscoco_val2014_questions.json")))["questions"])
    assert len(train) == n_train + n_val
    assert train.answer_vocab == data.build_vqa_answer_vocab(world, min_count=1)  # one parse or two: the same
    assert len(data.build_dataset("vqa", "val", world, tok, SMALL, answer_vocab=train.answer_vocab)) == n_val
    batch = train.collate([train[i] for i in range(5)])
    assert batch["targets"].shape == (5, train.num_answers)
    for value in batch["targets"].unique().tolist():
        assert min(abs(value - s) for s in (0, 0.3, 0.6, 0.9, 1)) < 1e-6
    assert (batch["targets"].max(1).values > 0).all()
    assert all(len(a) == 10 for a in batch["answers"]) and set(batch["answer_type"]) <= set(data.VQA_ANSWER_TYPES)
    assert batch["question_id"].dtype == torch.long and batch["images"].shape[0] == 5
    e = train[0]
    counts = collections.Counter(data.normalize_vocab_answer(a) for a in e["answers"])
    for answer, count in counts.items():
        assert e["targets"][train.answer_index[answer]].item() == pytest.approx(min(1, 0.3 * count))
    dev = data.build_dataset("vqa", "test-dev", world, tok, SMALL, answer_vocab=train.answer_vocab)
    batch = dev.collate([dev[i] for i in range(len(dev))])
    assert batch["answer_type"] == [None] * len(dev) and batch["answers"] == [[]] * len(dev)
    assert batch["targets"].sum() == 0
    assert len(data.build_dataset("vqa", "test", world, tok, SMALL, answer_vocab=train.answer_vocab)) > len(dev)


# ---- NLVR2 ----

def test_nlvr2_dataset(world, tok):
    ds = data.build_dataset("nlvr2", "train", world, tok, SMALL)
    records = [json.loads(l) for l in open(os.path.join(world, "nlvr2", "train.json"))]
    assert len(ds) == len(records)
    assert ds.left[0] == os.path.join(world, "nlvr2", "images", "train", str(records[0]["directory"]),
                                      records[0]["identifier"].rsplit("-", 1)[0] + "-img0.png")
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch["images"].shape[0] == 6 and batch["image_mask"].shape[0] == 6
    assert batch["input_ids"].shape[0] == 3
    assert batch["labels"].tolist() == [int(r["label"] == "True") for r in records[:3]]
    assert batch["identifier"] == [r["identifier"] for r in records[:3]]
    dev = data.build_dataset("nlvr2", "dev", world, tok, SMALL)
    assert dev.collate([dev[0]])["images"].shape[0] == 2


def nlvr2_fixture(root, lines):
    write_lines(str(root / "nlvr2" / "dev.json"), lines)
    (root / "nlvr2" / "dev").mkdir(exist_ok=True)
    return root


GOOD_NLVR2 = {"identifier": "dev-1-0-0", "sentence": "a cat", "label": "True", "left_url": "", "right_url": "",
              "synset": "n0", "query": "cat"}


def test_nlvr2_bad_input(tmp_path, hand_tok):
    nlvr2_fixture(tmp_path, [GOOD_NLVR2, dict(GOOD_NLVR2, label="Maybe")])
    with pytest.raises(data.DataError, match=r"dev.json: line 2: unknown label 'Maybe'.*True"):
        data.build_dataset("nlvr2", "dev", str(tmp_path), hand_tok, SMALL)
    nlvr2_fixture(tmp_path, [GOOD_NLVR2, "", '{"identifier": "dev-1-1-0", "sentence": '])
    with pytest.raises(data.DataError, match=r"dev.json: line 3: malformed JSON"):
        data.build_dataset("nlvr2", "dev", str(tmp_path), hand_tok, SMALL)
    nlvr2_fixture(tmp_path, [{k: v for k, v in GOOD_NLVR2.items() if k != "sentence"}])
    with pytest.raises(data.DataError, match=r"dev.json: line 1: missing key 'sentence'"):
        data.build_dataset("nlvr2", "dev", str(tmp_path), hand_tok, SMALL)


def test_nlvr2_png_that_is_a_jpeg(tmp_path, hand_tok):
    nlvr2_fixture(tmp_path, [GOOD_NLVR2])
    Image.new("RGB", (50, 40), (0, 0, 200)).save(tmp_path / "nlvr2" / "dev" / "dev-1-0-img0.png", "JPEG")
    Image.new("RGB", (40, 50), (0, 200, 0)).save(tmp_path / "nlvr2" / "dev" / "dev-1-0-img1.png", "PNG")
    ds = data.build_dataset("nlvr2", "dev", str(tmp_path), hand_tok, SMALL)
    batch = ds.collate([ds[0]])
    assert batch["images"].shape == (2, 3, 96, 96) and batch["labels"].tolist() == [1]


# ---- SNLI-VE ----

def snli_fixture(root, lines):
    write_lines(str(root / "snli-ve" / "snli_ve_dev.jsonl"), lines)
    (root / "flickr30k" / "flickr30k-images").mkdir(parents=True, exist_ok=True)


SNLI_LINE = {"sentence1": "the mat sat on a dog", "sentence2": "A cat sat.", "gold_label": "entailment",
             "pairID": "123.jpg#0r1e", "captionID": "123.jpg#0"}


def test_snli_ve_both_image_keys_and_no_premise(tmp_path, hand_tok):
    snli_fixture(tmp_path, [dict(SNLI_LINE, Flickr30K_ID="123"),
                            dict(SNLI_LINE, Flikr30kID="456.jpg", gold_label="contradiction", pairID="456.jpg#0r1c")])
    write_jpeg(str(tmp_path / "flickr30k" / "flickr30k-images" / "123.jpg"), mode="L", color=90)
    Image.new("CMYK", (30, 20), (0, 0, 0, 100)).save(tmp_path / "flickr30k" / "flickr30k-images" / "456.jpg")
    ds = data.build_dataset("snli-ve", "dev", str(tmp_path), hand_tok, SMALL)
    assert [ds.paths[ds.image_of[i]] for i in range(2)] == [
        os.path.join(str(tmp_path), "flickr30k", "flickr30k-images", n) for n in ("123.jpg", "456.jpg")]
    batch = ds.collate([ds[0], ds[1]])
    assert batch["labels"].tolist() == [0, 2] and batch["pair_id"] == ["123.jpg#0r1e", "456.jpg#0r1c"]
    assert hand_tok.decode(batch["input_ids"][0]) == "a cat sat."  # the hypothesis only
    assert not any("mat" in ds.hypotheses[i] for i in range(len(ds)))  # sentence1 is not even stored


def test_snli_ve_bad_input(tmp_path, hand_tok):
    snli_fixture(tmp_path, [dict(SNLI_LINE, Flickr30K_ID="1"), dict(SNLI_LINE, Flickr30K_ID="2", gold_label="-")])
    with pytest.raises(data.DataError, match=r"snli_ve_dev.jsonl: line 2: unknown gold_label '-'"):
        data.build_dataset("snli-ve", "dev", str(tmp_path), hand_tok, SMALL)
    snli_fixture(tmp_path, [SNLI_LINE])
    with pytest.raises(data.DataError, match=r"line 1: missing key 'Flickr30K_ID'"):
        data.build_dataset("snli-ve", "dev", str(tmp_path), hand_tok, SMALL)


def test_snli_ve_world(world, tok):
    ds = data.build_dataset("snli-ve", "train", world, tok, SMALL)
    assert set(ds.labels.tolist()) == {0, 1, 2}
    batch = ds.collate([ds[i] for i in range(4)])
    assert batch["images"].shape[0] == 4 and batch["input_ids"].shape[0] == 4


# ---- bad input, missing files ----

def test_missing_files_are_named(tmp_path, hand_tok):
    root = str(tmp_path)
    with pytest.raises(data.DataError, match=r"nlvr2 dev: missing .*nlvr2.dev\.json"):
        data.build_dataset("nlvr2", "dev", root, hand_tok, SMALL)
    with pytest.raises(data.DataError, match=r"vqa train\+val: missing .*v2_OpenEnded_mscoco_train2014_questions\.json.*"
                                             r"v2_mscoco_val2014_annotations\.json.*coco.train2014"):
        data.build_dataset("vqa", "train+val", root, hand_tok, SMALL)
    with pytest.raises(data.DataError, match=r"dataset_coco\.json.*region_descriptions\.json"):
        data.build_dataset("pretrain", "train", root, hand_tok, SMALL)
    with pytest.raises(data.DataError, match=r"dataset_flickr30k\.json"):
        data.build_dataset("retrieval", "test", root, hand_tok, SMALL, source="flickr30k")
    with pytest.raises(data.DataError, match=r"snli_ve_test\.jsonl"):
        data.build_dataset("snli-ve", "test", root, hand_tok, SMALL)
    with pytest.raises(data.DataError, match="unknown task"):
        data.build_dataset("captioning", "train", root, hand_tok, SMALL)
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "dataset_coco.json").write_text('{"images": [{"split": "train"}]}')
    with pytest.raises(data.DataError, match=r"dataset_coco\.json: images\[0\]: missing key 'sentences'"):
        data.build_dataset("retrieval", "train", root, hand_tok, SMALL)


def test_skip_bad_images(tmp_path, hand_tok, caplog):
    snli_fixture(tmp_path, [dict(SNLI_LINE, Flickr30K_ID=str(k), pairID=f"{k}#0r1e") for k in range(4)])
    images = tmp_path / "flickr30k" / "flickr30k-images"
    write_jpeg(str(images / "0.jpg"))
    (images / "1.jpg").write_bytes(b"\xff\xd8 broken")
    write_jpeg(str(images / "3.jpg"))  # 2.jpg is missing
    strict = data.build_dataset("snli-ve", "dev", str(tmp_path), hand_tok, SMALL)
    with pytest.raises(data.DataError, match=r"1\.jpg"):
        strict[1]
    lenient = data.build_dataset("snli-ve", "dev", str(tmp_path), hand_tok, SMALL, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="soho.data"):
        batch = lenient.collate([lenient[k] for k in range(4)])
    assert batch["skipped"] == 2 and batch["pair_id"] == ["0#0r1e", "3#0r1e"] and batch["images"].shape[0] == 2
    assert "1.jpg" in caplog.text and "2.jpg" in caplog.text
    assert lenient.collate([lenient[1]]) is None  # nothing left of the batch
    assert lenient.num_skipped == 3 and len(lenient.skipped) == 3
    # the count of skips in DataLoader workers reaches the main process
    fresh = data.build_dataset("snli-ve", "dev", str(tmp_path), hand_tok, SMALL, skip_bad_images=True)
    loader = torch.utils.data.DataLoader(fresh, batch_size=2, num_workers=2, collate_fn=fresh.collate)
    assert sum(batch["skipped"] for batch in loader) == 2 and fresh.num_skipped == 2


# ---- distribution and workers ----

def test_distributed_sampler_shards(world, tok):
    ds = data.build_dataset("retrieval", "train", world, tok, SMALL, seed=0)
    n = len(ds)
    for replicas in (2, 3, 4):
        shards = [list(torch.utils.data.DistributedSampler(ds, num_replicas=replicas, rank=r, shuffle=True, seed=1))
                  for r in range(replicas)]
        assert all(len(s) == -(-n // replicas) for s in shards)
        flat = [i for s in shards for i in s]
        assert set(flat) == set(range(n))  # every example is seen
        if n % replicas == 0:
            assert len(flat) == n  # ... exactly once (otherwise the sampler repeats a few to even the shards)


def test_dataloader_workers_match_single_process(world, tok):
    ds = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0)
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets
    assert clone[5]["input_ids"] == ds[5]["input_ids"] and torch.equal(clone[5]["image"], ds[5]["image"])
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers,
                                             collate_fn=ds.collate)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == -(-len(sampler) // 4)
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["images"], b["images"])
        assert torch.equal(a["mlm_labels"], b["mlm_labels"])
    seen = [image_id for b in batches[2] for image_id in b["image_ids"]]
    assert sorted(seen) == sorted(ds.keys[i] for i in sampler)


def test_measure_data_wait(world, tok):
    ds = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate)
    result = data.measure_data_wait(loader, lambda batch: None, num_batches=3, warmup=1)
    assert result["batches"] == 3 and 0.0 <= result["wait_share"] <= 1.0 and result["wait_s"] > 0


def test_cli_check(world, capsys):
    data.main(["check", "--data", world, "--image-short", "64", "--image-long", "96"])
    out = capsys.readouterr().out
    for name in ("pretrain train", "retrieval coco test", "retrieval flickr30k train", "vqa test-dev", "nlvr2 test1",
                 "snli-ve dev"):
        assert name in out
    assert "unavailable" not in out.replace("vqa answer vocabulary", "")


def test_tokenizer_matches_hugging_face_bert_tokenizer(hand_tok, tmp_path):
    """The optional oracle: transformers' reference BertTokenizer on the same vocab.txt (skipped without it)."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(HAND_VOCAB) + "\n")
    reference = transformers.BertTokenizer(str(path), do_lower_case=True)
    sentences = ["A red circle left of a small BLUE square.", "the circles, the squares!", "unknownword zz",
                 "Café naïve résumé", "two  spaces\tand tab", ""]
    for s in sentences:
        expected = reference(s, truncation=True, max_length=16)["input_ids"]
        assert hand_tok.encode(s) == expected, s


def test_landscape_flags_read_each_image_header_once(world, tok, tmp_path, monkeypatch):
    """landscape_flags: True exactly where an example's image is wider than tall (checked against the decoded
    image), one header read per distinct image; all False for the text-only control; None for NLVR2."""
    real_image_size = data.image_size
    for task, split in (("pretrain", "train"), ("retrieval", "train"), ("vqa", "val"), ("snli-ve", "dev")):
        ds = data.build_dataset(task, split, world, tok, SMALL, seed=0)
        reads = []
        monkeypatch.setattr(data, "image_size", lambda p: reads.append(p) or real_image_size(p))
        flags = ds.landscape_flags()
        paths = [ds.example_image_path(i) for i in range(len(ds))]
        assert sorted(reads) == sorted(set(paths)), task  # each distinct image once
        width_over_height = [data.load_image(p).size for p in paths]
        assert flags.tolist() == [w > h for w, h in width_over_height], task
        if task == "pretrain":  # the world has both kinds, so the check above can fail
            assert 0 < flags.sum() < len(ds)
    control = data.build_dataset("pretrain", "train", world, tok, SMALL, seed=0, text_only=True)
    assert not control.landscape_flags().any()
    assert data.build_dataset("nlvr2", "dev", world, tok, SMALL, seed=0).landscape_flags() is None


def test_image_size_errors_name_the_file(tmp_path):
    write_jpeg(str(tmp_path / "wide.jpg"), size=(40, 30))
    assert data.image_size(str(tmp_path / "wide.jpg")) == (40, 30)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(data.DataError, match=r"junk\.jpg"):
        data.image_size(str(tmp_path / "junk.jpg"))
    with pytest.raises(data.DataError, match=r"image file not found: .*gone\.jpg"):
        data.image_size(str(tmp_path / "gone.jpg"))
