"""experiments/world_variants.py: each variant writes the world it describes, and leaves synthetic.py as it was."""

import os
import random
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import data  # noqa: E402
import synthetic  # noqa: E402
import world_variants  # noqa: E402


def test_pattern_mask_and_shade_in_a_loop():
    for pattern in ("striped", "checked", "plain"):
        mask = world_variants.pattern_mask(40, 56, pattern)
        for y in range(40):
            for x in range(56):
                expected = {"striped": (x + y) // 8 % 2 == 0, "checked": (x // 16 + y // 16) % 2 == 0,
                            "plain": False}[pattern]
                assert mask[y, x] == expected
    assert world_variants.pattern_shade((32, 32, 38)) == (92, 92, 98)  # dark: lighter
    assert world_variants.pattern_shade((236, 236, 230)) == (176, 176, 170)  # light: darker
    assert world_variants.pattern_shade((250, 40, 60)) == (255, 100, 120)  # mean 117: lighter, clipped at 255
    assert world_variants.pattern_shade((250, 200, 40)) == (190, 140, 0)  # mean 163: darker, clipped at 0


def drawn_in(name, seed, n):
    """n scenes of variant `name` drawn from random.Random(seed), 3 captions each and their pixels, and the
    variant's background names: (scenes, captions, images [H, W, 3] uint8, names)."""
    with world_variants.variant(name):
        rng = random.Random(seed)
        scenes = [synthetic.random_scene(rng) for _ in range(n)]
        captions = [synthetic.synth_captions(s, random.Random(1), 3) for s in scenes]
        images = [np.array(synthetic.render_scene(s)) for s in scenes]
        return scenes, captions, images, synthetic.background_names()


def test_a_patterned_scene_paints_only_its_background_and_captions_name_the_pattern():
    scenes, captions, images, _ = drawn_in("patterned", 3, 30)
    patterns = [world_variants.pattern_of(s.background) for s in scenes]
    assert set(patterns) == set(world_variants.PATTERNS)
    for scene, caps, img, pattern in zip(scenes, captions, images, patterns):
        assert all(f"{scene.background} background" in c for c in caps)
        plain = np.array(synthetic.render_scene(scene._replace(background="plain")))  # drawn outside the variant
        changed = (img != plain).any(-1)
        on_background = (plain == np.array(scene.bg_rgb, np.uint8)).all(-1)
        assert not (changed & ~on_background).any()  # the shapes are untouched
        expected = on_background & world_variants.pattern_mask(*img.shape[:2], pattern)
        assert (changed == expected).all()
        assert (img[expected] == world_variants.pattern_shade(scene.bg_rgb)).all()


@pytest.mark.parametrize("name", world_variants.VARIANTS)
def test_each_variant_writes_a_readable_world_and_restores_synthetic(tmp_path, name):
    before = (dict(synthetic.SYNTH_SIZES), dict(synthetic.SYNTH_BACKGROUNDS), synthetic.random_scene,
              synthetic.render_scene, synthetic.background_names)
    out = tmp_path / name
    manifest = world_variants.write_variant(name, str(out), n_images=48)
    assert (dict(synthetic.SYNTH_SIZES), dict(synthetic.SYNTH_BACKGROUNDS), synthetic.random_scene,
            synthetic.render_scene, synthetic.background_names) == before
    assert data.read_json(str(out / synthetic.SYNTH_MANIFEST), "manifest")["variant"] == name == manifest["variant"]
    records = data.read_json(str(out / "coco" / "dataset_coco.json"), "Karpathy split")["images"]
    captions = " ".join(s["raw"].lower() for r in records for s in r["sentences"])
    if name == "patterned":
        assert all(f"{p} " in captions for p in world_variants.PATTERNS)
    palette = {"ten-far": {**synthetic.SYNTH_BACKGROUNDS, **world_variants.FAR_BACKGROUNDS},
               "ten-backgrounds": {**world_variants.V3_BACKGROUNDS, **world_variants.MORE_BACKGROUNDS},
               "shared-colours": synthetic.SYNTH_COLORS}.get(name, world_variants.V3_BACKGROUNDS)
    named = {world_variants.scene_of(s["raw"])[0] for r in records for s in r["sentences"]} - {None}
    if name != "two-tone":  # each names one colour of the palette (two-tone: two, checked in its own test)
        assert named and named <= set(palette), (name, named - set(palette))
    if name == "ten-backgrounds":
        assert all(f"{c} background" in captions for c in world_variants.MORE_BACKGROUNDS)
    with pytest.raises(SystemExit, match="not empty"):
        world_variants.write_variant(name, str(out), n_images=48)


def test_bigger_shapes_are_bigger_inside_the_variant_only():
    with world_variants.variant("bigger-shapes"):
        radii = [t.r for _ in range(50) for t in synthetic.random_scene(random.Random(_)).things]
    assert min(radii) >= 28 and max(radii) <= 58
    radii = [t.r for _ in range(50) for t in synthetic.random_scene(random.Random(_)).things]
    assert min(radii) >= 18 and max(radii) <= 52 and min(radii) < 28


def test_close_ups_are_one_large_shape_inside_the_image_about_three_times_in_ten():
    with world_variants.variant("close-ups"):
        scenes = [synthetic.random_scene(random.Random(i)) for i in range(400)]
        pairs = [synthetic.random_scene(random.Random(i), n_things=2) for i in range(50)]  # asked for two: two
    lo, hi = world_variants.CLOSE_UP_RADII
    close = [s for s in scenes if any(t.r >= lo for t in s.things)]
    assert all(len(s.things) == 1 and lo <= s.things[0].r <= hi for s in close)
    for s in close:
        t = s.things[0]
        assert t.r + 4 <= t.x <= s.width - t.r - 4 and t.r + 4 <= t.y <= s.height - t.r - 4
    assert 0.25 < len(close) / len(scenes) < 0.35  # CLOSE_UP_SHARE = 0.3
    assert all(len(s.things) == 2 for s in pairs)
    assert not any(t.r >= lo for i in range(100) for t in synthetic.random_scene(random.Random(i)).things)


def test_coco_scenes_are_the_scenes_of_the_written_images(tmp_path):
    world_variants.write_variant("close-ups", str(tmp_path), n_images=48)
    scenes = world_variants.coco_scenes("close-ups", seed=0, n_images=48)
    records = data.read_json(str(tmp_path / "coco" / "dataset_coco.json"), "Karpathy split")["images"]
    assert {r["cocoid"] for r in records} <= set(scenes)  # (and the test2015 images)
    assert any(world_variants.is_close_up(s) for s in scenes.values())
    for r in records:
        written = np.array(Image.open(tmp_path / "coco" / r["filepath"] / r["filename"]).convert("RGB"), np.float32)
        drawn = np.array(synthetic.render_scene(scenes[r["cocoid"]]), np.float32)
        assert written.shape == drawn.shape and np.abs(written - drawn).mean() < 3  # JPEG at quality 90


def test_an_unknown_variant_is_named_in_the_error():
    with pytest.raises(ValueError, match="'striped'.*bigger-shapes"):
        with world_variants.variant("striped"):
            pass


def test_a_mismatch_is_told_by_what_it_shares_with_the_scene():
    own = world_variants.scene_of("A red star on a plain teal background.")
    assert own == ("teal", "plain")
    assert world_variants.scene_of("two shapes against a teal striped background") == ("teal", "striped")
    assert world_variants.scene_of("a red star on a teal background") == ("teal", None)
    assert world_variants.scene_of("a red star on a sky background") == ("sky", None)  # ten-backgrounds' colours
    kind = world_variants.kind_of_mismatch
    assert kind("A red star on a plain teal background.", "two shapes on a plain pink background") == "other colour"
    assert kind("a red star on a plain teal background", "a star on a teal checked background") == \
        "same colour, other pattern"
    assert kind("a red star on a plain teal background", "a circle on a plain teal background") == \
        "same colour, same pattern"
    assert kind("a red star on a teal background", "a blue star on a teal background") == "same colour"
    assert kind("a red star on a teal background", "a blue star") is None


def test_grid_shapes_sit_wholly_in_one_token_each_a_cell_of_their_own():
    with world_variants.variant("grid"):
        scenes = [synthetic.random_scene(random.Random(i)) for i in range(200)]
    for s in scenes:
        cells = set()
        for t in s.things:
            r, c = (t.y - 32) // 64, (t.x - 32) // 64
            assert (t.x, t.y) == (64 * c + 32, 64 * r + 32)  # a cell's centre
            assert 64 * (c + 1) <= s.width and 64 * (r + 1) <= s.height  # a whole cell of the image
            lo, hi = world_variants.GRID_RADII[t.size]
            assert lo <= t.r <= hi
            touched = [(i, j) for i in range(5) for j in range(5) if t in synthetic.shapes_in_cell(s, i, j)]
            assert touched == [(r, c)]  # the disc reaches no other cell
            cells.add((r, c))
        assert len(cells) == len(s.things)
    assert {len(s.things) for s in scenes} == {1, 2, 3, 4}


@pytest.mark.parametrize("name", ["patterned", "ten-backgrounds"])
def test_statements_about_the_scene_name_the_variants_backgrounds(name):
    """With other backgrounds, a false statement about the scene names one of the variant's backgrounds (never a
    plain colour that a patterned background also is), so true and false ones are still worded alike; the label
    is the truth, and a VQA annotator's wrong answer is one of the variant's backgrounds too."""
    with world_variants.variant(name):
        names = synthetic.background_names()
        rng = random.Random(0)
        named = {"entailment": set(), "contradiction": set()}
        for _ in range(1500):
            scene = synthetic.random_scene(rng)
            assert scene.background in names
            for hypothesis, label in synthetic.synth_hypotheses(scene, rng):
                if "background" in hypothesis:
                    said = next(n for n in sorted(names, key=len, reverse=True) if n in hypothesis)
                    assert (said == scene.background) == (label == "entailment"), (hypothesis, label, scene)
                    named[label].add(said)
        wrong = {a for _ in range(200) for a in synthetic.synth_human_answers(names[0], "background", rng)}
    assert named["entailment"] == named["contradiction"] == set(names)
    assert wrong <= set(names) | {n.capitalize() for n in names} | {n + "." for n in names} and len(wrong) > 3
    assert len(names) == (18 if name == "patterned" else 10)


def test_shared_colours_paint_backgrounds_in_the_shapes_colours_and_never_a_shape_in_its_own():
    with world_variants.variant("shared-colours"):
        scenes = [synthetic.random_scene(random.Random(i)) for i in range(300)]
        captions = [synthetic.synth_captions(s, random.Random(1), 3) for s in scenes]
    assert {s.background for s in scenes} == set(synthetic.SYNTH_COLORS)
    for s, caps in zip(scenes, captions):
        assert s.things and all(t.color != s.background for t in s.things)
        for t in s.things:  # jittered about its colour's own RGB, at most 14 a channel
            assert max(abs(a - b) for a, b in zip(t.rgb, synthetic.SYNTH_COLORS[t.color])) <= 14
        assert max(abs(a - b) for a, b in zip(s.bg_rgb, synthetic.SYNTH_COLORS[s.background])) <= 8
        assert all(f"{s.background} background" in c for c in caps)
        # the background is read from its phrase, though object colours are the same words
        assert {world_variants.scene_of(c)[0] for c in caps} == {s.background}
    assert world_variants.scene_of("a red star on a blue background") == ("blue", None)
    assert world_variants.kind_of_mismatch("a red star on a blue background",
                                           "a blue circle on a red background") == "other colour"


def test_two_tone_paints_the_bottom_half_of_the_background_only_and_captions_name_both_colours():
    scenes, captions, images, names = drawn_in("two-tone", 5, 40)
    assert len(names) == 30 and {s.background for s in scenes} <= set(names)
    for scene, caps, img in zip(scenes, captions, images):
        top, bottom = scene.background.split(" and ")
        assert top != bottom
        assert all(f"{top} and {bottom} background" in c for c in caps)
        assert {world_variants.scene_of(c)[0] for c in caps} == {scene.background}
        plain = np.array(synthetic.render_scene(scene))  # outside the variant: one colour, the top's
        on_background = (plain == np.array(scene.bg_rgb, np.uint8)).all(-1)
        changed = (img != plain).any(-1)
        half = scene.height // 2
        assert not changed[:half].any() and not (changed & ~on_background).any()
        assert (changed[half:] == on_background[half:]).all()
        bottom_rgb = [min(255, max(0, b + j - t)) for b, j, t in
                      zip(world_variants.V3_BACKGROUNDS[bottom], scene.bg_rgb, world_variants.V3_BACKGROUNDS[top])]
        assert (img[changed] == bottom_rgb).all()
    kind = world_variants.kind_of_mismatch
    own = "a red star on a pink and teal background"
    assert kind(own, "two shapes against a white and black background") == "other colours"
    assert kind(own, "a circle on a teal and white background") == "one colour shared"
    assert kind(own, "on a teal and pink background a circle") == "same colours, swapped"
    assert kind(own, "a circle on a pink and teal background") == "same colours"
