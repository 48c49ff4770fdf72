"""Tests of synthetic.py: the synthetic world's layout, determinism and contents, and its command line (CPU, a few
seconds)."""

import json
import math
import os
import random
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import synthetic  # noqa: E402


def test_synthetic_world_layout_and_determinism(world, tmp_path):
    for rel in ("vocab.txt", "coco/dataset_coco.json", "vg/region_descriptions.json", "vg/image_data.json",
                "vqa/v2_OpenEnded_mscoco_train2014_questions.json", "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
                "vqa/v2_OpenEnded_mscoco_test2015_questions.json", "vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json",
                "vqa/v2_mscoco_train2014_annotations.json", "vqa/v2_mscoco_val2014_annotations.json",
                "nlvr2/train.json", "nlvr2/dev.json", "nlvr2/test1.json", "flickr30k/dataset_flickr30k.json",
                "snli-ve/snli_ve_train.jsonl", "snli-ve/snli_ve_dev.jsonl", "snli-ve/snli_ve_test.jsonl",
                synthetic.SYNTH_MANIFEST):
        assert os.path.isfile(os.path.join(world, rel)), rel
    coco = json.load(open(os.path.join(world, "coco", "dataset_coco.json")))
    assert {r["split"] for r in coco["images"]} == {"train", "restval", "val", "test"}
    for r in coco["images"]:
        assert r["filepath"] == ("train2014" if r["split"] == "train" else "val2014")
        assert len(r["sentences"]) >= 5 and r["sentids"] == [s["sentid"] for s in r["sentences"]]
        assert os.path.isfile(os.path.join(world, "coco", r["filepath"], r["filename"]))
        w, h = Image.open(os.path.join(world, "coco", r["filepath"], r["filename"])).size
        assert min(w, h) == 256 and max(w, h) <= 320
    annotations = json.load(open(os.path.join(world, "vqa", "v2_mscoco_train2014_annotations.json")))["annotations"]
    assert all(len(a["answers"]) == 10 for a in annotations)
    assert {a["answer_type"] for a in annotations} <= {"yes/no", "number", "other"}
    snli = [json.loads(l) for l in open(os.path.join(world, "snli-ve", "snli_ve_train.jsonl"))]
    assert {r["gold_label"] for r in snli} == {"entailment", "neutral", "contradiction"}
    nlvr2 = [json.loads(l) for l in open(os.path.join(world, "nlvr2", "train.json"))]
    assert {r["label"] for r in nlvr2} == {"True", "False"} and all("directory" in r for r in nlvr2)

    again = str(tmp_path / "again")
    synthetic.write_synthetic_world(again, seed=0, n_images=48)
    for rel in ("coco/dataset_coco.json", "vocab.txt", "nlvr2/train.json", "snli-ve/snli_ve_dev.jsonl",
                "vqa/v2_mscoco_val2014_annotations.json", "vg/region_descriptions.json",
                "coco/train2014/" + sorted(os.listdir(os.path.join(world, "coco", "train2014")))[0]):
        with open(os.path.join(world, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_synthetic_vqa_vocabulary_clears_the_official_threshold(tmp_path):
    root = str(tmp_path / "w")
    synthetic.write_synthetic_world(root, seed=1, n_images=600)  # 1,800 train+val questions; the default has 6,000
    vocab = data.build_vqa_answer_vocab(root)  # min_count=9, as for the real data
    every_answer = (set(synthetic.SYNTH_COLORS) | set(synthetic.SYNTH_SHAPES) | {"0", "1", "2", "3", "4", "yes", "no"}
                    | {"left", "right", "top", "bottom", "middle", "small", "big"} | set(synthetic.SYNTH_BACKGROUNDS))
    assert set(vocab) == every_answer


def test_statements_about_the_scene_are_told_apart_by_the_image_alone():
    """SNLI-VE's and NLVR2's statements about the background: the label is the truth, and a true statement is
    worded like a false one (the same templates, every background named under both labels)."""
    rng = random.Random(0)
    templates, named = {"entailment": set(), "contradiction": set()}, {"entailment": set(), "contradiction": set()}
    for _ in range(400):
        scene = synthetic.random_scene(rng)
        for hypothesis, label in synthetic.synth_hypotheses(scene, rng):
            bg = next((b for b in synthetic.SYNTH_BACKGROUNDS if f" {b}" in hypothesis), None)
            if "background" not in hypothesis or label == "neutral":
                continue
            assert (bg == scene.background) == (label == "entailment"), (hypothesis, label, scene.background)
            templates[label].add(hypothesis.replace(synthetic._a(bg), "a X").replace(bg, "X"))  # a/an X
            named[label].add(bg)
    assert templates["entailment"] == templates["contradiction"] and len(templates["entailment"]) == 3
    assert named["entailment"] == named["contradiction"] == set(synthetic.SYNTH_BACKGROUNDS)

    left, right = synthetic.random_scene(random.Random(1)), synthetic.random_scene(random.Random(2))
    left, right = left._replace(background="olive"), right._replace(background="sky")
    truth = {"Both images have an olive background.": False, "The left image has an olive background.": True,
             "Exactly one image has an olive background.": True, "Both images have a sky background.": False,
             "The left image has a sky background.": False, "Exactly one image has a white background.": False}
    seen = {}
    for _ in range(3000):
        sentence, predicate, _ = synthetic.synth_nlvr2_statement(rng)
        if sentence in truth:
            seen[sentence] = predicate(left, right)
    assert seen == truth


def test_ensure_synthetic_world_is_a_noop_when_present(tmp_path):
    root = str(tmp_path / "synthetic")
    assert synthetic.ensure_synthetic_world(root, seed=0, n_images=16) == root
    manifest = os.path.join(root, synthetic.SYNTH_MANIFEST)
    stamp = os.path.getmtime(manifest)
    assert synthetic.ensure_synthetic_world(root, seed=0, n_images=16) == root
    assert os.path.getmtime(manifest) == stamp
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(data.DataError, match="other"):
        synthetic.ensure_synthetic_world(str(tmp_path / "other"))
    assert synthetic.default_data_root().endswith(os.path.join("data", f"synthetic-v{synthetic.SYNTH_VERSION}"))
    # a world written by another version of the writer is named, not silently reused
    with open(manifest) as f:
        old = json.load(f)
    with open(manifest, "w") as f:
        json.dump({**old, "format_version": synthetic.SYNTH_VERSION - 1}, f)
    with pytest.raises(data.DataError, match=f"version {synthetic.SYNTH_VERSION - 1}.*remove the folder"):
        synthetic.ensure_synthetic_world(root)


def test_every_synthetic_caption_names_its_background(world):
    coco = json.load(open(os.path.join(world, "coco", "dataset_coco.json")))["images"]
    for image in coco:
        for s in image["sentences"]:
            assert any(f"{bg} background" in s["raw"].lower() for bg in synthetic.SYNTH_BACKGROUNDS), s["raw"]


def test_backgrounds_lie_far_apart_and_far_from_the_shapes_colours():
    # A random caption of another image names the image's own background 1 time in len(SYNTH_BACKGROUNDS), and a
    # model that compares only the scene catches the rest: eight backgrounds allow 7 in 8 (the tiny run's bar: 0.85).
    # Backgrounds that lie close are told apart late (README), and a shape on a background of nearly its colour
    # would not show.
    backgrounds, colours = list(synthetic.SYNTH_BACKGROUNDS.values()), list(synthetic.SYNTH_COLORS.values())
    assert len(backgrounds) == 8 and not set(synthetic.SYNTH_BACKGROUNDS) & set(synthetic.SYNTH_COLORS)
    assert min(math.dist(a, b) for i, a in enumerate(backgrounds) for b in backgrounds[i + 1:]) >= 100
    assert min(math.dist(a, c) for a in backgrounds for c in colours) >= 75


def test_cli_writes_a_world_once(tmp_path, capsys):
    out = str(tmp_path / "w")
    synthetic.main(["--out", out, "--seed", "0", "--n_images", "16"])
    printed = capsys.readouterr().out
    manifest = json.load(open(os.path.join(out, synthetic.SYNTH_MANIFEST)))
    assert manifest["n_images"] == 16 and json.dumps(manifest["counts"]) in printed
    synthetic.main(["--out", out, "--n_images", "32"])  # a world is there: left as it is
    assert "already holds a synthetic world (seed 0, 16 images)" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, synthetic.SYNTH_MANIFEST))) == manifest



def test_shapes_in_cell_finds_the_shapes_whose_disc_reaches_the_cell():
    star = synthetic.Thing("star", "red", "small", x=70, y=20, r=10, rgb=(215, 45, 45))  # 6 px right of cell (0, 0)
    scene = synthetic.Scene(width=256, height=256, background="teal", bg_rgb=(40, 130, 130), things=(star,))
    assert synthetic.shapes_in_cell(scene, 0, 1) == [star]  # its own cell
    assert synthetic.shapes_in_cell(scene, 0, 0) == [star]  # 7 px away, within its radius of 10
    assert synthetic.shapes_in_cell(scene, 0, 0, reach=0.6) == []  # but not within 6 px
    assert synthetic.shapes_in_cell(scene, 1, 1) == []
