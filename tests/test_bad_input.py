"""No silent garbage: image modes that PIL would turn white or wrong, foreign or mismatched checkpoints, missing
folders and vocabularies, huge images, NLVR2 copies with a flat image folder, EXIF orientation, and
`python data.py check --full`. Each case either works correctly or stops with a message that names the file (or
option) and what was expected. CPU, a few seconds each."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data
import evaluate
import soho
import synthetic
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "real_formats")
# a small model and small images: a training step takes a fraction of a second
TINY = ["--resnet_width=8", "--hidden_size=32", "--num_layers=1", "--num_heads=2", "--intermediate_size=64",
        "--vd_size=16", "--image_short=32", "--image_long=48"]
ONE_STEP = ["--max_steps=1", "--batch_per_gpu=2", "--global_batch=2", "--num_workers=0", "--amp=off"]


class Reached(Exception):
    """Raised by a stand-in to show that training got past the checks under test."""


def tiny_checkpoint(path, vocab_path, preset="tiny", task="pretrain"):
    """A checkpoint in train.py's format, of a very small model."""
    n_tokens = sum(1 for _ in open(vocab_path, encoding="utf-8"))
    cfg = soho.config_from_preset("tiny", resnet_width=8, hidden_size=32, num_layers=1, num_heads=2,
                                  intermediate_size=64, vocab_size=n_tokens, vd_size=16, image_short=32, image_long=48)
    torch.manual_seed(0)
    model = soho.SOHO(cfg)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
                "train_config": {"preset": preset}, "task": task, "vocab_path": vocab_path, "data_root": FIXTURE,
                "answers": None}, path)
    return str(path), model


def fixture_copy(tmp_path):
    """A writable copy of the real-formats fixture (50 KB)."""
    root = str(tmp_path / "data")
    shutil.copytree(FIXTURE, root)
    return root


# ---- image modes ----

def rgb_of(path):
    return np.array(data.load_image(path))


def mode_of(path):
    with Image.open(path) as img:
        return img.mode


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_white(tmp_path):
    values = np.array([[0, 128 * 257, 65535, 1000]], dtype=np.uint16)
    path = str(tmp_path / "gray16.png")
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16" and img.convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # PIL alone: white
    assert rgb_of(path)[0].tolist() == [[0, 0, 0], [128, 128, 128], [255, 255, 255], [4, 4, 4]]  # 1000/257 = 3.9


def test_32_bit_integer_image_in_the_16_bit_range_is_scaled_else_refused(tmp_path):
    path = str(tmp_path / "gray32.tif")
    Image.fromarray(np.array([[0, 257 * 200, 65535]], dtype=np.int32)).save(path)
    assert mode_of(path) == "I"
    assert rgb_of(path)[0, :, 0].tolist() == [0, 200, 255]
    Image.fromarray(np.array([[-5, 70000, 3]], dtype=np.int32)).save(path)
    with pytest.raises(data.DataError, match=re.escape(path) + ".*mode 'I'.*-5..70000"):
        data.load_image(path)


def test_floating_point_image_is_refused_by_name(tmp_path):
    path = str(tmp_path / "float.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(path)
    assert mode_of(path) == "F"
    with pytest.raises(data.DataError, match=re.escape(path) + ".*image mode 'F'.*not supported"):
        data.load_image(path)


@pytest.mark.parametrize("mode, fmt, colour, expected", [
    ("1", "PNG", 1, (255, 255, 255)),
    ("L", "JPEG", 100, (100, 100, 100)),
    ("LA", "PNG", (100, 255), (100, 100, 100)),
    ("LA", "PNG", (100, 0), (255, 255, 255)),  # transparent: laid on white
    ("P", "PNG", None, (30, 160, 90)),
    ("RGBA", "PNG", (30, 160, 90, 255), (30, 160, 90)),
    ("CMYK", "JPEG", (0, 255, 0, 0), (255, 0, 255)),  # magenta
    ("LAB", "TIFF", (128, 128, 128), (119, 119, 119)),  # lightness 50%: a mid gray, not (128, 128, 128)
])
def test_every_other_mode_converts_to_the_right_colour(tmp_path, mode, fmt, colour, expected):
    path = str(tmp_path / f"image.{fmt.lower()}")
    if mode == "P":  # an adaptive palette holds the exact colour
        img = Image.new("RGB", (8, 8), (30, 160, 90)).convert("P", palette=Image.ADAPTIVE, colors=4)
    else:
        img = Image.new(mode, (8, 8), colour)
    img.save(path, fmt)
    assert mode_of(path) == mode
    assert np.abs(rgb_of(path)[4, 4].astype(int) - expected).max() <= 3


# ---- EXIF orientation ----

def test_exif_orientation_is_not_applied(tmp_path):
    """data.py's choice (see the comment above load_image): the stored pixel grid, as the annotators saw it."""
    img = Image.new("RGB", (20, 10), (220, 20, 20))
    img.paste((20, 20, 220), (10, 0, 20, 10))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: "rotate 90 degrees clockwise to display"
    path = str(tmp_path / "tagged.jpg")
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as tagged:
        assert tagged.getexif()[0x0112] == 6 and ImageOps.exif_transpose(tagged).size == (10, 20)
    pixels = rgb_of(path)
    assert pixels.shape == (10, 20, 3)  # not turned to 20 x 10
    assert pixels[5, 2].argmax() == 0 and pixels[5, 17].argmax() == 2  # red still left, blue still right


# ---- huge images ----

def test_decompression_bomb_warning_names_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "huge.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256 pixels: above the limit, below twice it
    with pytest.warns(Image.DecompressionBombWarning, match=re.escape(path)):
        assert data.load_image(path).size == (16, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # above twice the limit: PIL refuses, and so do we
    with pytest.raises(data.DataError, match=re.escape(path) + ".*DecompressionBombError"):
        data.load_image(path)


# ---- NLVR2 train images without the <directory>/ level ----

def test_nlvr2_train_images_in_a_flat_folder_are_found(tmp_path, caplog):
    root = fixture_copy(tmp_path)
    train_dir = os.path.join(root, "nlvr2", "images", "train")
    for directory in ("72", "14"):
        for name in os.listdir(os.path.join(train_dir, directory)):
            shutil.move(os.path.join(train_dir, directory, name), train_dir)
        os.rmdir(os.path.join(train_dir, directory))
    tok = data.Tokenizer.from_vocab(os.path.join(root, "vocab.txt"))
    config = dataclasses.replace(soho.PRESETS["tiny"], image_short=32, image_long=48)
    with caplog.at_level("INFO", logger="soho.data"):
        ds = data.build_dataset("nlvr2", "train", root, tok, config)
    assert [ds.left[i] for i in range(3)] == [os.path.join(train_dir, f"{pair}-img0.png")
                                              for pair in ("train-10171-0", "train-10171-1", "train-5024-2")]
    assert all(ds[i] is not None for i in range(3))
    assert "3 of 3 examples are directly in" in caplog.text

    os.remove(os.path.join(train_dir, "train-5024-2-img0.png"))  # now in neither place: both are named
    caplog.clear()
    ds = data.build_dataset("nlvr2", "train", root, tok, config)
    nested = os.path.join(train_dir, "14", "train-5024-2-img0.png")
    assert f"looked for at {nested} and at {os.path.join(train_dir, 'train-5024-2-img0.png')}" in caplog.text
    assert "train.json: line 3" in caplog.text
    with pytest.raises(data.DataError, match=re.escape(nested)):
        ds[2]


# ---- data.py check ----

def test_check_full_reports_every_file_of_the_synthetic_world(world, capsys):
    data.main(["check", "--data", world, "--image-short", "32", "--image-long", "48"])
    assert "quick mode" in capsys.readouterr().out
    assert data.main(["check", "--data", world, "--full", "--image-short", "32", "--image-long", "48"]) is None
    out = capsys.readouterr().out
    images = [f for _, _, files in os.walk(world) for f in files if f.endswith((".jpg", ".png"))]
    annotations = sorted(os.path.relpath(os.path.join(d, f), world) for d, _, files in os.walk(world) for f in files
                         if f.endswith((".json", ".jsonl")) and f != synthetic.SYNTH_MANIFEST)
    assert "full mode: every annotation record parsed, every image file opened" in out
    assert f"read {len(annotations)} annotation files" in out and f"opened {len(images)} image files" in out
    for name in annotations:
        assert f"  {name}\n" in out
    folders = {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S+)/: (\d+) image files$", out, re.M)}
    assert sum(folders.values()) == len(images) and "vg/VG_100K_2" in folders
    assert "bad image files: 0" in out


def test_check_full_names_each_bad_image_and_the_annotation_naming_it(tmp_path, capsys):
    root = fixture_copy(tmp_path)
    truncated = os.path.join(root, "coco", "val2014", "COCO_val2014_000000522418.jpg")
    with open(truncated, "r+b") as f:
        f.truncate(100)
    missing = os.path.join(root, "nlvr2", "dev", "dev-850-1-img1.png")
    os.remove(missing)
    with pytest.raises(SystemExit) as stop:
        data.main(["check", "--data", root, "--full", "--image-short", "32", "--image-long", "48"])
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "bad image files: 2" in out
    assert re.search(re.escape(truncated) + r".*\(named by retrieval coco test, image 522418\)", out)
    assert re.search(re.escape(missing) + r".*\(named by nlvr2 dev, identifier dev-850-1-0\)", out)


def test_check_of_a_missing_folder_fails(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    run = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "check", "--data", missing],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode != 0
    assert f"--data {missing}: the folder does not exist" in run.stderr


# ---- missing --data folder in train.py and evaluate.py ----

def test_train_and_evaluate_say_that_the_data_folder_does_not_exist(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(SystemExit, match=f"--data {re.escape(missing)} does not exist"):
        train.main(["--data", missing, "--out", str(tmp_path / "run")])
    ckpt, _ = tiny_checkpoint(tmp_path / "ckpt.pt", os.path.join(FIXTURE, "vocab.txt"), task="nlvr2")
    with pytest.raises(SystemExit, match=f"--data {re.escape(missing)} does not exist"):
        evaluate.main(["--task", "nlvr2", "--checkpoint", ckpt, "--data", missing, "--workers", "0"])
    moved = torch.load(ckpt, weights_only=False)
    moved["data_root"] = missing  # a checkpoint made on another machine
    torch.save(moved, ckpt)
    with pytest.raises(SystemExit, match=f"the checkpoint's data folder {re.escape(missing)} does not exist.*--data"):
        evaluate.main(["--task", "nlvr2", "--checkpoint", ckpt, "--workers", "0"])


# ---- checkpoints ----

def test_a_plain_state_dict_is_not_taken_for_a_checkpoint(tmp_path):
    _, model = tiny_checkpoint(tmp_path / "ckpt.pt", os.path.join(FIXTURE, "vocab.txt"))
    path = str(tmp_path / "weights.pt")
    torch.save(model.state_dict(), path)
    expected = re.escape(path) + r": not a SOHO checkpoint: it holds a plain state dict of \d+ tensors.*'model_config'"
    with pytest.raises(SystemExit, match=expected):
        train.load_checkpoint(path)
    with pytest.raises(SystemExit, match=expected):
        evaluate.main(["--task", "nlvr2", "--checkpoint", path, "--workers", "0"])
    with pytest.raises(SystemExit, match=expected):
        train.main(["--task", "nlvr2", "--init", path, "--data", FIXTURE, "--out", str(tmp_path / "run")])
    torch.save([1, 2], path)
    with pytest.raises(SystemExit, match=re.escape(path) + ": not a SOHO checkpoint: it holds a list"):
        train.load_checkpoint(path)


def test_init_from_another_preset_is_refused_unless_allowed(tmp_path, monkeypatch):
    ckpt, _ = tiny_checkpoint(tmp_path / "ckpt.pt", os.path.join(FIXTURE, "vocab.txt"), preset="tiny")
    args = ["--task", "nlvr2", "--preset", "r18", "--init", ckpt, "--data", FIXTURE, "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=f"--init {re.escape(ckpt)} was trained at preset 'tiny', this run is at "
                                         "preset 'r18'.*--preset tiny.*--init_any_preset=true"):
        train.main(args)

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(train, "build_train_dataset", reached)
    with pytest.raises(Reached):
        train.main(args + ["--init_any_preset=true"])
    with pytest.raises(Reached):  # the same preset needs no permission
        train.main(["--task", "nlvr2", "--preset", "tiny", "--init", ckpt, "--data", FIXTURE,
                    "--out", str(tmp_path / "run")])


# ---- the vocabulary: --vocab FILE, or --bert DIR with vocab.txt alone ----

def test_missing_vocabulary_names_both_ways_to_give_one(tmp_path):
    root = fixture_copy(tmp_path)
    os.remove(os.path.join(root, "vocab.txt"))
    with pytest.raises(SystemExit, match=f"no vocabulary at {re.escape(os.path.join(root, 'vocab.txt'))}"
                                         r".*--vocab FILE.*--bert DIR"):
        train.main(["--task", "snli-ve", "--data", root, "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=r"no vocabulary at .*nothing\.txt \(--vocab\).*--vocab FILE.*--bert DIR"):
        train.main(["--task", "snli-ve", "--data", root, "--vocab", str(tmp_path / "nothing.txt"),
                    "--out", str(tmp_path / "run")])


def test_vocab_option_gives_the_tokenizer(tmp_path):
    root = fixture_copy(tmp_path)
    vocab = str(tmp_path / "my-vocab.txt")
    shutil.move(os.path.join(root, "vocab.txt"), vocab)  # the data folder has none
    out = str(tmp_path / "run")
    train.main(["--task", "snli-ve", "--data", root, "--vocab", vocab, "--out", out, *ONE_STEP, *TINY])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    n_tokens = sum(1 for _ in open(vocab, encoding="utf-8"))
    assert ckpt["vocab_path"] == vocab and ckpt["train_config"]["vocab"] == vocab
    assert ckpt["model_config"]["vocab_size"] == n_tokens and ckpt["step"] == 1


def test_bert_folder_with_only_vocab_txt_means_bert_vocabulary_and_random_weights(tmp_path, capsys):
    bert = tmp_path / "bert-base-uncased"
    bert.mkdir()
    shutil.copy(os.path.join(FIXTURE, "vocab.txt"), bert / "vocab.txt")  # no config.json, no weights
    out = str(tmp_path / "run")
    train.main(["--task", "snli-ve", "--data", FIXTURE, "--bert", str(bert), "--out", out, *ONE_STEP, *TINY])
    assert f"--bert {bert} holds no config.json, only vocab.txt: BERT's vocabulary" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["vocab_path"] == str(bert / "vocab.txt")
    assert ckpt["model_config"]["vocab_size"] == sum(1 for _ in open(bert / "vocab.txt", encoding="utf-8"))


def test_bert_folder_that_cannot_be_what_it_claims_is_refused(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    shutil.copy(os.path.join(FIXTURE, "vocab.txt"), bert / "vocab.txt")
    (bert / "pytorch_model.bin").write_bytes(b"")  # weights, but no config.json to say what shape they have
    args = ["--task", "snli-ve", "--data", FIXTURE, "--bert", str(bert), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=f"--bert {re.escape(str(bert))} holds pytorch_model.bin but no config.json"):
        train.main(args)
    (bert / "config.json").write_text("{}")
    other = tmp_path / "other-vocab.txt"
    other.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ncat\n")
    with pytest.raises(SystemExit, match=f"--vocab {re.escape(str(other))} differs from .*BERT weights"):
        train.main(args + ["--vocab", str(other)])
