"""
Variants of the synthetic world that we measured as fixes for the random-mismatch bar and did not keep (README,
"Where the objects are lost, measured on the current default"), and the world of the measurements made before
world v4. Each writes a whole world, in the same formats as synthetic.py, into a folder of its own; pre-train on it
with --data:

    python experiments/world_variants.py --variant patterned --out data/variant-patterned
    python train.py --data data/variant-patterned --out runs/variant-patterned
    python experiments/world_variants.py --score runs/variant-patterned/ckpt.pt

    v3                world v3, synthetic.py's before world v4: six backgrounds (white, gray, black, brown,
                      pink, teal) instead of v4's eight, the same bytes. Every variant below but ten-far was
                      measured on v3 and is built on it
    bigger-shapes     radii 28-36 px (small) and 46-58 px (big) instead of 18-26 and 38-52: a shape fills more of
                      its 64x64 cells, so more of the image shows the objects
    patterned         every background is also plain, striped or checked, and the caption says which ("on a plain
                      teal background", "on a teal striped background"): a second property of the whole scene, so
                      a random caption names the image's own scene one time in 18 instead of one in 6
    ten-backgrounds   four more background colours (sky, lime, maroon, sand): one time in 10
    ten-far           world v4's eight backgrounds and two more, indigo and turquoise, as far apart as the eight
                      (at least 97 in RGB): one time in 10
    grid              every shape centred in a 64x64 cell of the token grid, one shape per cell, radius 20-22 px
                      (small) or 27-29 (big): each shape shows wholly in exactly one token, as near as pixels come
                      to perfect tokens' one vector per colour at full size. Measured (README): perfect
                      tokens on this world are not read in 1,000 steps, nor are pixels in 1,500
    close-ups         three scenes in ten are one shape of radius 80-110 px that fills much of the image (a
                      close-up): its colour and kind are a property of the whole image, as the background is
    two-tone          the background's top half is one of the six background colours and its bottom half another
                      ("on a pink and teal background": top, then bottom): two properties of the whole scene, each
                      as loud as today's one, so a random caption names the image's own pair one time in 30
    shared-colours    the backgrounds take the shapes' six colours (a red circle on a blue background; a shape is
                      never the colour of its background): a colour word, learned where it fills the image as a
                      background, is the same word, and the same pixels, when a shape shows it. Measured when
                      captions said "a orange background"; since v4 they say "an orange"

--score CKPT splits a pre-trained model's held-out mismatched captions (those of diagnose.py's item 6) by what they
share with the image's own scene: its background colour, and on the patterned world its pattern; only a model that
compares objects catches those that share both. On the close-ups world each group is also split by
whether the image is a close-up (the world's scenes are drawn again from its seed: coco_scenes).

The variant is applied only inside `variant(name)`, which restores synthetic.py's settings when it ends; the
manifest of the written world records it. diagnose.py reads a checkpoint's own world for its held-out captions and
images (items 6, 9, 10), but its item 7 and oracle_tokens.py draw fresh scenes from synthetic.random_scene, which
outside this script are the default world's.
"""

import argparse
import contextlib
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from diagnose import BACKGROUND_PHRASE, mismatches_by  # noqa: E402  (experiments/ is this script's own folder)

PATTERNS = ("plain", "striped", "checked")
V3_BACKGROUNDS = {"white": (236, 236, 230), "gray": (150, 150, 150), "black": (32, 32, 38), "brown": (120, 85, 55),
                  "pink": (240, 170, 200), "teal": (40, 130, 130)}
MORE_BACKGROUNDS = {"sky": (140, 200, 240), "lime": (175, 225, 110), "maroon": (115, 30, 55), "sand": (215, 195, 145)}
FAR_BACKGROUNDS = {"indigo": (60, 20, 130), "turquoise": (60, 200, 170)}
VARIANTS = ("v3", "bigger-shapes", "patterned", "ten-backgrounds", "ten-far", "close-ups", "grid", "shared-colours",
            "two-tone")
GRID_RADII = {"small": (20, 22), "big": (27, 29)}  # both wholly inside a 64x64 cell, centred in it
CLOSE_UP_SHARE, CLOSE_UP_RADII = 0.3, (80, 110)


def pattern_of(background):
    """The pattern a patterned scene's background phrase names ("plain teal", "teal striped")."""
    return next(p for p in PATTERNS if p in background.split())


def pattern_mask(height, width, pattern):
    """[height, width] bool: the pixels a pattern paints in its second shade. Stripes: diagonal, 8 px wide;
    checks: 16 px squares; plain: none."""
    y, x = np.mgrid[:height, :width]
    if pattern == "striped":
        return ((x + y) // 8) % 2 == 0
    if pattern == "checked":
        return ((x // 16) + (y // 16)) % 2 == 0
    return np.zeros((height, width), bool)


def pattern_shade(rgb):
    """The pattern's second shade: 60 lighter on a dark background, 60 darker on a light one."""
    step = 60 if sum(rgb) / 3 < 128 else -60
    return tuple(min(255, max(0, c + step)) for c in rgb)


def patterned_name(colour, pattern):
    """What captions call a background of this colour and pattern: "plain teal", "teal striped"."""
    return f"plain {colour}" if pattern == "plain" else f"{colour} {pattern}"


def patterned_scene(plain_scene):
    """A random_scene that also draws a pattern; its background becomes the phrase captions use."""
    def random_scene(rng, n_things=None, prefer=()):
        scene = plain_scene(rng, n_things, prefer)
        p = rng.choice(PATTERNS)
        return scene._replace(background=patterned_name(scene.background, p))
    return random_scene


def patterned_names(plain_names):
    """A background_names that gives every colour with every pattern, as patterned_scene names them."""
    return lambda: sorted(patterned_name(b, p) for b in plain_names() for p in PATTERNS)


def repainting_background(plain_render, repaint):
    """A render_scene that draws the scene as plain_render does, then lets repaint(pixels [H, W, 3] uint8, scene,
    on_background [H, W] bool) change the background's pixels in place: those left in the background colour after
    the shapes are drawn (the shapes are drawn in other colours, without anti-aliasing)."""
    def render_scene(scene):
        pixels = np.array(plain_render(scene))
        repaint(pixels, scene, (pixels == np.array(scene.bg_rgb, np.uint8)).all(-1))
        return Image.fromarray(pixels)
    return render_scene


def paint_pattern(pixels, scene, on_background):
    """The patterned variant's repaint: the pattern's second shade on the background's pixels that it covers."""
    pixels[on_background & pattern_mask(*pixels.shape[:2], pattern_of(scene.background))] = pattern_shade(scene.bg_rgb)


def two_tone_name(top, bottom):
    """What captions call a background whose top half is `top` and bottom half `bottom`: "pink and teal"."""
    return f"{top} and {bottom}"


def two_tone_scene(plain_scene):
    """A random_scene whose background is two different background colours, top half and bottom half; the bottom's
    colour is drawn after the rest of the scene, from the same rng."""
    def random_scene(rng, n_things=None, prefer=()):
        scene = plain_scene(rng, n_things, prefer)
        bottom = rng.choice([b for b in sorted(synthetic.SYNTH_BACKGROUNDS) if b != scene.background])
        return scene._replace(background=two_tone_name(scene.background, bottom))
    return random_scene


def two_tone_names(plain_names):
    """A background_names that gives every ordered pair of different colours, as two_tone_scene names them."""
    return lambda: sorted(two_tone_name(a, b) for a in plain_names() for b in plain_names() if a != b)


def paint_bottom_half(pixels, scene, on_background):
    """The two-tone variant's repaint: the bottom half's background pixels in the bottom's colour, with the top's
    jitter, so that drawing stays free of randomness."""
    top, bottom = scene.background.split(" and ")
    jitter = np.array(scene.bg_rgb) - np.array(synthetic.SYNTH_BACKGROUNDS[top])
    bottom_half = np.arange(scene.height)[:, None] >= scene.height // 2  # [H, 1]
    pixels[on_background & bottom_half] = np.clip(np.array(synthetic.SYNTH_BACKGROUNDS[bottom]) + jitter, 0, 255)


def close_up_scene(plain_scene):
    """A random_scene that draws, CLOSE_UP_SHARE of the time (when any number of shapes may be drawn), a single
    shape with a radius in CLOSE_UP_RADII, placed wholly inside the image."""
    def random_scene(rng, n_things=None, prefer=()):
        if n_things not in (None, 1) or rng.random() >= CLOSE_UP_SHARE:
            return plain_scene(rng, n_things, prefer)
        scene = plain_scene(rng, 1, prefer)
        r = rng.randint(*CLOSE_UP_RADII)
        x, y = rng.randint(r + 4, scene.width - r - 4), rng.randint(r + 4, scene.height - r - 4)
        return scene._replace(things=(scene.things[0]._replace(size="big", r=r, x=x, y=y),))
    return random_scene


def grid_scene(plain_scene):
    """A random_scene whose shapes each sit at the centre of a 64x64 cell of the token grid (Eq. 1), a different
    cell each, with a radius in GRID_RADII: every shape shows wholly, at one of two sizes, in exactly one token."""
    def random_scene(rng, n_things=None, prefer=()):
        scene = plain_scene(rng, n_things, prefer)
        cells = [(r, c) for r in range(scene.height // 64) for c in range(scene.width // 64)]
        places = rng.sample(cells, len(scene.things))
        things = tuple(t._replace(r=rng.randint(*GRID_RADII[t.size]), x=64 * c + 32, y=64 * r + 32)
                       for t, (r, c) in zip(scene.things, places))
        return scene._replace(things=things)
    return random_scene


def shared_colour_scene(plain_scene):
    """A random_scene whose background is one of the shapes' colours (synthetic.SYNTH_BACKGROUNDS is set to
    SYNTH_COLORS by variant()); a shape drawn in the background's colour takes another colour, drawn from the same
    rng, so that every shape shows."""
    def recoloured(thing, colour, rng):
        return thing._replace(color=colour, rgb=synthetic._jitter(synthetic.SYNTH_COLORS[colour], rng, 14))

    def random_scene(rng, n_things=None, prefer=()):
        scene = plain_scene(rng, n_things, prefer)
        others = [c for c in sorted(synthetic.SYNTH_COLORS) if c != scene.background]
        things = tuple(recoloured(t, rng.choice(others), rng) if t.color == scene.background else t
                       for t in scene.things)
        return scene._replace(things=things)
    return random_scene


@contextlib.contextmanager
def variant(name):
    """synthetic.py's world changed as `name` says while the block runs; restored afterwards. An empty name leaves
    synthetic.py's own world as it is (so that a script's --world flag can always go through here)."""
    if not name:
        yield
        return
    if name not in VARIANTS:
        raise ValueError(f"unknown world variant {name!r}: expected one of {', '.join(VARIANTS)}")
    patched = ("SYNTH_SIZES", "SYNTH_BACKGROUNDS", "random_scene", "render_scene", "background_names")
    saved = {k: getattr(synthetic, k) for k in patched}
    try:
        # every variant but ten-far was measured on world v3 and is built on its six backgrounds
        synthetic.SYNTH_BACKGROUNDS = ({**saved["SYNTH_BACKGROUNDS"], **FAR_BACKGROUNDS} if name == "ten-far"
                                       else dict(V3_BACKGROUNDS))
        if name == "bigger-shapes":
            synthetic.SYNTH_SIZES = {"small": (28, 36), "big": (46, 58)}
        elif name == "ten-backgrounds":
            synthetic.SYNTH_BACKGROUNDS = {**V3_BACKGROUNDS, **MORE_BACKGROUNDS}
        elif name == "close-ups":
            synthetic.random_scene = close_up_scene(saved["random_scene"])
        elif name == "grid":
            synthetic.random_scene = grid_scene(saved["random_scene"])
        elif name == "two-tone":
            synthetic.random_scene = two_tone_scene(saved["random_scene"])
            synthetic.render_scene = repainting_background(saved["render_scene"], paint_bottom_half)
            synthetic.background_names = two_tone_names(saved["background_names"])
        elif name == "shared-colours":
            synthetic.SYNTH_BACKGROUNDS = dict(synthetic.SYNTH_COLORS)
            synthetic.random_scene = shared_colour_scene(saved["random_scene"])
        elif name == "patterned":
            synthetic.random_scene = patterned_scene(saved["random_scene"])
            synthetic.render_scene = repainting_background(saved["render_scene"], paint_pattern)
            synthetic.background_names = patterned_names(saved["background_names"])
        yield
    finally:
        for k, v in saved.items():
            setattr(synthetic, k, v)


def write_variant(name, out, seed=0, n_images=2000):
    """Write the world of variant `name` into `out` (which must not hold one already); returns the manifest."""
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"{out} is not empty: remove it, or pass another --out")
    with variant(name):
        manifest = synthetic.write_synthetic_world(out, seed=seed, n_images=n_images)
    manifest = {**manifest, "variant": name}
    data.write_json(os.path.join(out, synthetic.SYNTH_MANIFEST), manifest, indent=1)
    return manifest


def coco_scenes(name, seed=0, n_images=2000):
    """{COCO id: scene} of the COCO images in the world that write_variant(name, ..., seed, n_images) writes. The
    world is a function of its seed, so it is written again into a temporary folder, noting each scene drawn."""
    drawn, scenes = [], {}
    render, save = synthetic.render_scene, synthetic._save

    def noting_render(scene):
        drawn.append(scene)
        return render(scene)

    def noting_save(image, path, *fmt):
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.startswith("COCO_"):  # COCO_train2014_000000000408
            scenes[int(stem.rsplit("_", 1)[1])] = drawn[-1]
        return save(image, path, *fmt)

    with tempfile.TemporaryDirectory() as tmp, variant(name):
        synthetic.render_scene, synthetic._save = noting_render, noting_save
        try:
            synthetic.write_synthetic_world(tmp, seed=seed, n_images=n_images)
        finally:
            synthetic.render_scene, synthetic._save = render, save
    return scenes


def is_close_up(scene):
    """Whether a scene is a close-up of the close-ups variant (one shape, of a close-up's radius)."""
    return len(scene.things) == 1 and scene.things[0].r >= CLOSE_UP_RADII[0]


def scene_of(text):
    """(background colour, pattern) that a caption's background phrase ("on a teal striped background") names, in
    any variant's world; None for what it names not exactly once. Only the phrase is read: on the shared-colours
    world the shapes' colours are background colours too."""
    phrase = BACKGROUND_PHRASE.search(text.lower())
    if phrase and " and " in phrase.group(1):  # two-tone: "pink and teal", top then bottom
        return phrase.group(1), None
    words = set(phrase.group(1).split()) if phrase else set()
    known = {**synthetic.SYNTH_BACKGROUNDS, **V3_BACKGROUNDS, **MORE_BACKGROUNDS, **FAR_BACKGROUNDS,
             **synthetic.SYNTH_COLORS}
    colours = [c for c in known if c in words]
    patterns = [p for p in PATTERNS if p in words]
    return colours[0] if len(colours) == 1 else None, patterns[0] if len(patterns) == 1 else None


def kind_of_mismatch(own_text, text):
    """How a mismatched caption's scene compares with the image's own caption's: "other colour", "same colour,
    other pattern", "same colour, same pattern", or "same colour" on a world without patterns; on the two-tone
    world "other colours", "one colour shared", "same colours, swapped" or "same colours"; None if either names no
    background colour (diagnose.mismatches_by's kind_of)."""
    own, other = scene_of(own_text), scene_of(text)
    if own[0] is None or other[0] is None:
        return None
    if " and " in own[0] and " and " in other[0]:  # two-tone: how many of the two colours the texts share
        own_pair, other_pair = own[0].split(" and "), other[0].split(" and ")
        shared = len(set(own_pair) & set(other_pair))
        if shared == 2:
            return "same colours" if own_pair == other_pair else "same colours, swapped"
        return "one colour shared" if shared else "other colours"
    if own[0] != other[0]:
        return "other colour"
    if own[1] is None or other[1] is None:
        return "same colour"
    return "same colour, " + ("same pattern" if own[1] == other[1] else "other pattern")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--out")
    p.add_argument("--score", metavar="CKPT", help="split CKPT's held-out mismatches by scene instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_images", type=int, default=2000)
    args = p.parse_args(argv)
    if args.score:
        model, ckpt = train.load_model(args.score)
        world = data.read_json(os.path.join(ckpt["data_root"], synthetic.SYNTH_MANIFEST), "world manifest")
        image_kind = None
        if world.get("variant") == "close-ups":  # split by the kind of image too
            scenes = coco_scenes("close-ups", world["seed"], world["n_images"])

            def image_kind(image_id):  # pre-training's held-out images are "coco:<id>"
                return "close-up" if is_close_up(scenes[int(image_id.split(":")[1])]) else "other image"
        for kind, (accuracy, n) in mismatches_by(model.eval(), ckpt, model.config, kind_of_mismatch,
                                                 image_kind=image_kind).items():
            print(f"held-out mismatched captions ({kind}): caught {accuracy:.3f} ({n} captions)")
        return
    if not (args.variant and args.out):
        p.error("pass --variant and --out to write a world, or --score CKPT")
    manifest = write_variant(args.variant, os.path.abspath(args.out), args.seed, args.n_images)
    print(f"wrote the {args.variant} world to {args.out}: {manifest['counts']['coco']} COCO images")


if __name__ == "__main__":
    main()
