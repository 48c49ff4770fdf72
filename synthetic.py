"""
The synthetic world: a small world of rendered coloured shapes, written in exactly the public formats and the
--data layout of data.py (COCO Karpathy split, VQA v2, Flickr30K, SNLI-VE, NLVR2, Visual Genome, and a WordPiece
vocab.txt of its own), so that every task runs end to end in minutes on a laptop CPU, without downloads. Like
nanoGPT's prepare.py, it only writes files: data.py reads them exactly as it reads the real data sets.

    python synthetic.py [--out DIR] [--seed N] [--n_images N]

writes the world into DIR (default: data/synthetic-v<SYNTH_VERSION>/ of the repository, where train.py and
evaluate.py look when no --data is given), unless DIR already holds one. --seed (0) fixes every draw: the same
seed writes the same bytes. --n_images (2000) is the number of COCO-style images; the other data sets scale with
it (see write_synthetic_world). With no --data, train.py and evaluate.py call ensure_synthetic_world(), which
writes the default world once.

The world is learnable but not trivial: captions name several objects and their relations, questions ask about
colour, shape, count, position and size, and the negatives that the world writes (NLVR2's false statements,
SNLI-VE's contradictions) differ from true statements in one attribute, so a model has to look at the image.
SNLI-VE's neutral hypotheses, like many of SNLI's, can be told from their wording alone (measured: README, "The
paper's claims in miniature").
"""

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import sys
import time

from PIL import Image, ImageDraw

import data


# ---- The world: scenes and their pictures ----
# A scene is 1-4 shapes (colour, shape, size, position) on a plain background of one of five image sizes; all
# randomness is in the scene, and render_scene draws it.

SYNTH_COLORS = {"red": (215, 45, 45), "green": (45, 165, 70), "blue": (45, 85, 215), "yellow": (235, 205, 45),
                "purple": (140, 65, 175), "orange": (240, 135, 35)}
SYNTH_SHAPES = ("circle", "square", "triangle", "diamond", "star")
SYNTH_SIZES = {"small": (18, 26), "big": (38, 52)}  # radius in pixels
# Eight backgrounds, each at least 100 (RGB distance) from every other and 75 from every shape colour. Every caption
# names its background, and a random caption of another image names the same one 1 time in 8: a model that compares
# only the scene catches 7 in 8 random mismatches (with v3's six, 5 in 6: under the 0.85 the tiny run now reaches).
# Ten did not fit the budget: pairs of backgrounds that share visual-dictionary entries stay confused for longer
# (README, "Does the model look at the image?").
SYNTH_BACKGROUNDS = {"white": (236, 236, 230), "gray": (128, 128, 128), "black": (32, 32, 38), "olive": (110, 110, 20),
                     "lime": (160, 240, 60), "sky": (140, 200, 240), "violet": (200, 120, 230),
                     "salmon": (250, 130, 110)}
SYNTH_IMAGE_SIZES = ((256, 256), (288, 256), (320, 256), (256, 288), (256, 320))  # (width, height)
SYNTH_MANIFEST = "SYNTHETIC_WORLD.json"
SYNTH_VERSION = 4  # 2: six backgrounds, and every caption names its background; 3: VQA, SNLI-VE and NLVR2 ask
#                   about the background too; 4: eight backgrounds (v3's six were white, gray, black, brown, pink,
#                   teal: experiments/world_variants.py --variant v3 writes that world)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

Thing = collections.namedtuple("Thing", "shape color size x y r rgb")
Scene = collections.namedtuple("Scene", "width height background bg_rgb things")


def _jitter(rgb, rng, amount):
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def background_names():
    """Every name a scene's background can have, as captions, questions and statements say it. A world variant with
    other backgrounds replaces this function (world_variants.py's patterned one: "teal striped", ...), so that a
    false statement about the background names one the variant can draw."""
    return sorted(SYNTH_BACKGROUNDS)


def random_scene(rng, n_things=None, prefer=()):
    """1-4 non-overlapping shapes on a plain background. `prefer`: (colour, shape) pairs that each shape takes
    with probability 0.6 (used to make a statement about them true often enough)."""
    width, height = rng.choice(SYNTH_IMAGE_SIZES)
    background = rng.choice(sorted(SYNTH_BACKGROUNDS))
    n = n_things or rng.choices((1, 2, 3, 4), weights=(1, 3, 3, 2))[0]
    things = []
    for _ in range(200):
        if len(things) == n:
            break
        size = rng.choice(("small", "big"))
        r = rng.randint(*SYNTH_SIZES[size])
        x, y = rng.randint(r + 4, width - r - 4), rng.randint(r + 4, height - r - 4)
        if any(math.hypot(x - t.x, y - t.y) < r + t.r + 6 for t in things):
            continue
        if prefer and rng.random() < 0.6:
            color, shape = rng.choice(prefer)
        else:
            color, shape = rng.choice(sorted(SYNTH_COLORS)), rng.choice(SYNTH_SHAPES)
        things.append(Thing(shape, color, size, x, y, r, _jitter(SYNTH_COLORS[color], rng, 14)))
    return Scene(width, height, background, _jitter(SYNTH_BACKGROUNDS[background], rng, 8), tuple(things))


def render_scene(scene):
    """Draw a scene (deterministic: all randomness is in the scene)."""
    img = Image.new("RGB", (scene.width, scene.height), scene.bg_rgb)
    draw = ImageDraw.Draw(img)
    for t in scene.things:
        x, y, r = t.x, t.y, t.r
        if t.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=t.rgb)
        elif t.shape == "square":
            s = 0.85 * r
            draw.rectangle([x - s, y - s, x + s, y + s], fill=t.rgb)
        elif t.shape == "triangle":
            draw.polygon([(x, y - r), (x - 0.95 * r, y + 0.8 * r), (x + 0.95 * r, y + 0.8 * r)], fill=t.rgb)
        elif t.shape == "diamond":
            draw.polygon([(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)], fill=t.rgb)
        else:  # star: 10 corners alternating between the outer and the inner radius
            corners = [(x + (r if k % 2 == 0 else 0.45 * r) * math.cos(math.pi * (k / 5 - 0.5)),
                        y + (r if k % 2 == 0 else 0.45 * r) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)]
            draw.polygon(corners, fill=t.rgb)
    return img


def shapes_in_cell(scene, r, c, cell=64, reach=1.0):
    """The shapes of a scene that reach into grid cell (r, c) of `cell` pixels: those whose centre lies within
    reach x their radius of the cell's square (reach=1: the shape's disc touches the cell)."""
    x0, y0 = cell * c, cell * r
    return [t for t in scene.things
            if math.hypot(max(x0 - t.x, 0, t.x - (x0 + cell - 1)), max(y0 - t.y, 0, t.y - (y0 + cell - 1))) < reach * t.r]


def scene_batch(scenes, image_short, image_long):
    """Scenes drawn straight into a batch, resized and padded as data.py's datasets prepare images, without
    files: (images [n, 3, H, W], image_mask [n, H, W]). For probes on scenes no model has seen."""
    return data.pad_images([data.image_to_tensor(data.resize_image(render_scene(s), image_short, image_long))
                            for s in scenes])


# ---- Its language: captions, questions, answers ----
# COCO-like captions (and VG region phrases), VQA questions with the answers of 10 annotators.

def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(word, n):
    return word if n == 1 else word + "s"


def _noun(t, with_size=False):
    return f"{t.size} {t.color} {t.shape}" if with_size else f"{t.color} {t.shape}"


def _relation(a, b, weak=False):
    """Where a is with respect to b, along the axis of the larger offset; None when too close to say. weak=True
    instead returns every direction a is at all (for checking that a claimed relation is false)."""
    dx, dy = b.x - a.x, b.y - a.y
    if weak:
        return {rel for rel, d in (("left of", dx), ("right of", -dx), ("above", dy), ("below", -dy)) if d > 8}
    if max(abs(dx), abs(dy)) < 24:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _where(t, scene):
    """"left", "right", "top", "bottom" or "middle": the side of the image the shape is on."""
    dx, dy = t.x - scene.width / 2, t.y - scene.height / 2
    if max(abs(dx), abs(dy)) < 0.15 * min(scene.width, scene.height):
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _region_phrase(t, scene):
    col = "left" if t.x < scene.width / 3 else "right" if t.x > 2 * scene.width / 3 else ""
    row = "top" if t.y < scene.height / 3 else "bottom" if t.y > 2 * scene.height / 3 else ""
    if col and row:
        return f"in the {row} {col} corner"
    if col:
        return f"on the {col}"
    if row:
        return f"at the {row}"
    return "in the middle"


def _count(scene, color=None, shape=None):
    return sum((color is None or t.color == color) and (shape is None or t.shape == shape) for t in scene.things)


def _unique(scene, key):
    """Shapes that are the only ones with their key (e.g. the only circle), so "the circle" is well defined."""
    keys = collections.Counter(key(t) for t in scene.things)
    return [t for t in scene.things if keys[key(t)] == 1]


def _related_pair(things, rng):
    """(a, b, where a is with respect to b) for two random different shapes, or None: fewer than two shapes, or
    too close to say."""
    if len(things) < 2:
        return None
    a, b = rng.sample(things, 2)
    rel = _relation(a, b)
    return None if rel is None else (a, b, rel)


def synth_captions(scene, rng, n):
    """n different true captions (fewer only if the scene allows no more), COCO-like in style."""
    things, bg = scene.things, scene.background

    def relation():
        pair = _related_pair(things, rng)
        if pair is None:
            return None
        a, b, rel = pair
        verb = rng.choice(("", "is ", "placed "))
        return f"{_a(_noun(a, rng.random() < 0.5))} {verb}{rel} {_a(_noun(b, rng.random() < 0.5))}"

    def listing():
        names = [_a(_noun(t, rng.random() < 0.4)) for t in rng.sample(things, len(things))]
        text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return rng.choice(("", "a picture of ", "an image with ")) + text

    def counting():
        n_things = len(things)
        t = rng.choice(things)
        return rng.choice((f"{NUMBER_WORDS[n_things]} {_plural('shape', n_things)}",
                           f"{NUMBER_WORDS[n_things]} {_plural('shape', n_things)} including {_a(_noun(t))}"))

    def position():
        t = rng.choice(things)
        return f"{_a(_noun(t, rng.random() < 0.5))} {_region_phrase(t, scene)}"

    def colours():
        parts = [f"{NUMBER_WORDS[k]} {c} {_plural('shape', k)}"
                 for c, k in collections.Counter(t.color for t in things).most_common()]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def relation_and_place():
        pair = _related_pair(things, rng)
        if pair is None:
            return None
        a, b, rel = pair
        return f"the {_noun(a)} {_region_phrase(a, scene)} is {rel} the {_noun(b)}"

    def in_scene(text):
        # Every caption names the scene, as most COCO captions do ("... in a kitchen"); here the scene is the
        # background. Put first or last, so that the 24-token cut of a long caption keeps it more often than not.
        return text and rng.choice((f"{text} on {_a(bg)} background", f"{text} against {_a(bg)} background",
                                    f"on {_a(bg)} background {text}"))

    makers = (relation, relation, listing, counting, position, colours, relation_and_place)
    captions = []
    for _ in range(200):
        text = in_scene(rng.choice(makers)())
        if text and text not in captions:
            captions.append(text)
        if len(captions) == n:
            break
    return captions


def _raw_caption(text, rng):
    """COCO's raw captions: often capitalised with a period, sometimes with trailing spaces or a newline."""
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + "."
    return text + rng.choice(("",) * 8 + (" ", " \n"))


def synth_questions(scene, rng, n=3):
    """n VQA questions: (question, answer, answer_type, question_type, kind)."""
    things = scene.things
    colours, shapes = sorted(SYNTH_COLORS), SYNTH_SHAPES

    def colour():
        t = rng.choice(_unique(scene, lambda t: t.shape) or [None])
        return t and (f"what color is the {t.shape}?", t.color, "other", "what color is the", "color")

    def shape():
        t = rng.choice(_unique(scene, lambda t: t.color) or [None])
        return t and (f"what shape is the {t.color} object?", t.shape, "other", "what shape is the", "shape")

    def count_shape():
        s = rng.choice([t.shape for t in things] + list(shapes))
        return (f"how many {s}s are there?", str(_count(scene, shape=s)), "number", "how many", "number")

    def count_colour():
        c = rng.choice([t.color for t in things] + colours)
        return (f"how many {c} shapes are there?", str(_count(scene, color=c)), "number", "how many", "number")

    def count_all():
        question = rng.choice(("how many shapes are there?", "how many objects are in the picture?"))
        return (question, str(len(things)), "number", "how many", "number")

    def exists():
        t = rng.choice(things)
        c, s = t.color, t.shape
        if rng.random() < 0.5:  # change one attribute into a combination that is not in the image
            for _ in range(20):
                c2, s2 = (rng.choice(colours), s) if rng.random() < 0.5 else (c, rng.choice(shapes))
                if not _count(scene, c2, s2):
                    c, s = c2, s2
                    break
        answer = "yes" if _count(scene, c, s) else "no"
        return (f"is there {_a(c + ' ' + s)}?", answer, "yes/no", "is there a", "yesno")

    def relation():
        pair = _related_pair(_unique(scene, lambda t: (t.color, t.shape)), rng)
        if pair is None:
            return None
        a, b, rel = pair
        asked, answer = (rel, "yes") if rng.random() < 0.5 else (OPPOSITE[rel], "no")
        return (f"is the {_noun(a)} {asked} the {_noun(b)}?", answer, "yes/no", "is the", "yesno")

    def where():
        t = rng.choice(_unique(scene, lambda t: (t.color, t.shape)) or [None])
        return t and (f"where is the {_noun(t)}?", _where(t, scene), "other", "where is the", "position")

    def size():
        t = rng.choice(_unique(scene, lambda t: (t.color, t.shape)) or [None])
        return t and (f"what size is the {_noun(t)}?", t.size, "other", "what size is the", "size")

    def background():  # the scene, as VQA's "what room is this?"
        return ("what color is the background?", scene.background, "other", "what color is the", "background")

    makers = (colour, shape, count_shape, count_colour, count_all, exists, exists, relation, where, size, background)
    questions = []
    for _ in range(100):
        q = rng.choice(makers)()
        if q and q[0] not in [x[0] for x in questions]:
            questions.append(q)
        if len(questions) == n:
            break
    return questions


_ANSWER_CHOICES = {"color": sorted(SYNTH_COLORS), "shape": list(SYNTH_SHAPES), "yesno": ["yes", "no"],
                   "position": ["left", "right", "top", "bottom", "middle"], "size": ["small", "big"]}
ANSWER_KINDS = (*_ANSWER_CHOICES, "background")


def answer_choices(kind):
    """The answers a question of this kind (one of ANSWER_KINDS) can have; the background's are the world's."""
    return background_names() if kind == "background" else _ANSWER_CHOICES[kind]


def synth_human_answers(answer, kind, rng):
    """10 annotators: most give the answer, a question-dependent few a plausible wrong one, and some write it
    differently ("Red", "two", "left.") in ways the official normalisation undoes."""
    difficulty = rng.choice((0.0, 0.05, 0.1, 0.2, 0.3))
    answers = []
    for _ in range(10):
        a = answer
        if rng.random() < difficulty:
            if kind == "number":
                a = str(max(0, int(answer) + rng.choice((-1, 1))))
            else:
                a = rng.choice([c for c in answer_choices(kind) if c != answer])
        r = rng.random()
        if r < 0.04:
            a = a.capitalize()
        elif r < 0.08 and kind == "number":
            a = NUMBER_WORDS[int(a)]
        elif r < 0.10:
            a = a + "."
        elif r < 0.12 and kind == "position":
            a = "the " + a
        answers.append(a)
    return answers


# ---- Statements: true, false (one attribute changed) or undecidable ----
# SNLI-VE's hypotheses about one image, and NLVR2's sentences about a pair of images. Most are about the shapes;
# about a quarter are about the scene, the background, as many of the real ones are ("The people are outdoors").
# A statement about the scene is written alike whether it is true or false: only the image tells them apart.

def _holds(scene, fact, weak=False):
    """Whether a fact is true of a scene; weak=True reads relations loosely (to be sure a contradiction is false)."""
    kind, things = fact[0], scene.things
    if kind == "exists":
        _, c, s, z = fact
        return any(t.color == c and t.shape == s and (z is None or t.size == z) for t in things)
    if kind == "count":
        return len(things) == fact[1]
    if kind == "all_color":
        return all(t.color == fact[1] for t in things)
    if kind == "background":
        return scene.background == fact[1]
    _, c1, s1, rel, c2, s2 = fact  # relation
    pairs = [(a, b) for a in things for b in things
             if a is not b and (a.color, a.shape) == (c1, s1) and (b.color, b.shape) == (c2, s2)]
    return any(rel in _relation(a, b, weak=True) if weak else rel == _relation(a, b) for a, b in pairs)


def _true_fact(scene, rng):
    t = rng.choice(scene.things)
    kind = rng.choice(("exists", "exists", "count", "relation", "relation", "all_color", "background", "background"))
    if kind == "background":
        return ("background", scene.background)
    pair = _related_pair(scene.things, rng) if kind == "relation" else None
    if pair is not None:
        a, b, rel = pair
        return ("relation", a.color, a.shape, rel, b.color, b.shape)
    if kind == "count":
        return ("count", len(scene.things))
    if kind == "all_color" and _holds(scene, ("all_color", t.color)):
        return ("all_color", t.color)
    return ("exists", t.color, t.shape, t.size if rng.random() < 0.3 else None)


def _change_one_attribute(fact, rng):
    kind = fact[0]
    if kind == "exists":
        _, c, s, z = fact
        which = rng.choice(("color", "shape", "size") if z else ("color", "shape"))
        if which == "color":
            return ("exists", rng.choice([x for x in SYNTH_COLORS if x != c]), s, z)
        if which == "shape":
            return ("exists", c, rng.choice([x for x in SYNTH_SHAPES if x != s]), z)
        return ("exists", c, s, "small" if z == "big" else "big")
    if kind == "count":
        return ("count", max(1, fact[1] + rng.choice((-1, 1))))
    if kind == "all_color":
        return ("all_color", rng.choice([x for x in SYNTH_COLORS if x != fact[1]]))
    if kind == "background":
        return ("background", rng.choice([x for x in background_names() if x != fact[1]]))
    _, c1, s1, rel, c2, s2 = fact
    if rng.random() < 0.5:
        return ("relation", c1, s1, OPPOSITE[rel], c2, s2)
    return ("relation", rng.choice([x for x in SYNTH_COLORS if x != c1]), s1, rel, c2, s2)


def _say(fact, rng):
    kind = fact[0]
    if kind == "exists":
        _, c, s, z = fact
        noun = _a(f"{z} {c} {s}" if z else f"{c} {s}")
        return rng.choice((f"There is {noun}.", f"The picture contains {noun}.", f"{noun.capitalize()} can be seen."))
    if kind == "count":
        n = fact[1]
        return "There is exactly one shape." if n == 1 else f"The picture shows {NUMBER_WORDS[n]} shapes."
    if kind == "all_color":
        return f"All the shapes are {fact[1]}."
    if kind == "background":
        bg = fact[1]
        return rng.choice((f"The shapes are on {_a(bg)} background.", f"The background is {bg}.",
                           f"The picture has {_a(bg)} background."))
    _, c1, s1, rel, c2, s2 = fact
    return f"{_a(c1 + ' ' + s1).capitalize()} is {rel} {_a(c2 + ' ' + s2)}."


def _neutral_statement(scene, rng):
    """About shapes in the image, but nothing the image can settle."""
    t = rng.choice(scene.things)
    other = rng.choice(scene.things)
    return rng.choice((
        f"The {_noun(t)} is made of {rng.choice(('wood', 'paper', 'metal', 'glass', 'plastic'))}.",
        f"The {_noun(t)} was drawn by a child.",
        f"Someone is about to move the {_noun(t)}.",
        f"The {_noun(t)} is the artist's favourite shape.",
        f"The {_noun(t)} is heavier than the {_noun(other)}." if other is not t else f"The {_noun(t)} is warm.",
    ))


def synth_hypotheses(scene, rng):
    """One (hypothesis, gold_label) per label, the contradiction a true fact with one attribute changed."""
    true = _true_fact(scene, rng)
    false = None
    for _ in range(30):
        candidate = _change_one_attribute(_true_fact(scene, rng), rng)
        if not _holds(scene, candidate, weak=True):
            false = candidate
            break
    if false is None:  # e.g. a single shape and bad luck: a shape of a colour that is not there
        used = {t.color for t in scene.things}
        false = ("exists", next(c for c in sorted(SYNTH_COLORS) if c not in used), "circle", None)
    return [(_say(true, rng), "entailment"), (_neutral_statement(scene, rng), "neutral"),
            (_say(false, rng), "contradiction")]


def synth_nlvr2_statement(rng):
    """(sentence, predicate(left scene, right scene) -> bool, (colour, shape) pairs to favour when sampling)."""
    c, s = rng.choice(sorted(SYNTH_COLORS)), rng.choice(SYNTH_SHAPES)
    c2, s2 = rng.choice(sorted(SYNTH_COLORS)), rng.choice(SYNTH_SHAPES)
    n = rng.randint(1, 3)
    z = rng.choice(("small", "big"))
    rel = rng.choice(sorted(OPPOSITE))
    bg = rng.choice(background_names())
    has = lambda scene: _count(scene, c, s) > 0
    kind = rng.randrange(11)
    # Kinds 8-10 are about the scene. Their pairs are drawn until the truth is the one wanted, as for the others
    # (_nlvr2_example); the (colour, shape) they favour only names the record's "query".
    if kind == 8:
        return (f"Both images have {_a(bg)} background.",
                lambda L, R: L.background == bg and R.background == bg, [(c, s)])
    if kind == 9:
        return f"The left image has {_a(bg)} background.", lambda L, R: L.background == bg, [(c, s)]
    if kind == 10:
        return (f"Exactly one image has {_a(bg)} background.",
                lambda L, R: (L.background == bg) != (R.background == bg), [(c, s)])
    if kind == 0:
        return (f"The left image contains exactly {NUMBER_WORDS[n]} {c} {_plural('shape', n)}.",
                lambda L, R: _count(L, color=c) == n, [(c, s)])
    if kind == 1:
        return f"Both images contain {_a(c + ' ' + s)}.", lambda L, R: has(L) and has(R), [(c, s)]
    if kind == 2:
        return f"Exactly one image contains {_a(c + ' ' + s)}.", lambda L, R: has(L) != has(R), [(c, s)]
    if kind == 3:
        return (f"There are more {s}s in the left image than in the right image.",
                lambda L, R: _count(L, shape=s) > _count(R, shape=s), [(c, s)])
    if kind == 4:
        return (f"The right image contains {_a(z + ' ' + c + ' ' + s)}.",
                lambda L, R: _holds(R, ("exists", c, s, z)), [(c, s)])
    if kind == 5:
        return (f"There are {NUMBER_WORDS[n + 1]} {s}s in total.",
                lambda L, R: _count(L, shape=s) + _count(R, shape=s) == n + 1, [(c, s)])
    if kind == 6:
        return (f"In the left image, {_a(c + ' ' + s)} is {rel} {_a(c2 + ' ' + s2)}.",
                lambda L, R: _holds(L, ("relation", c, s, rel, c2, s2)), [(c, s), (c2, s2)])
    return (f"One image contains only {c} shapes.",
            lambda L, R: _holds(L, ("all_color", c)) or _holds(R, ("all_color", c)), [(c, s)])


# ---- Writing the files: one writer per data set ----
# Each writer draws from its own random stream (random.Random(f"{seed}/{part}")), so that a change to one data set
# leaves the files of the others as they were. Each appends the texts it writes to `texts` (the vocabulary is
# trained on them) and its sizes to `counts` (the manifest's, whose keys come in the order of the calls).

WORLD_FOLDERS = ("coco/train2014", "coco/val2014", "coco/test2015", "vg/VG_100K", "vg/VG_100K_2", "vqa",
           "nlvr2/images/train", "nlvr2/dev", "nlvr2/test1", "flickr30k/flickr30k-images", "snli-ve")
VQA_INFO = {"description": "SOHO synthetic world (VQA v2 format)", "version": "2.0", "year": 2017}


def _save(img, path, fmt="JPEG"):
    if fmt == "JPEG":
        img.save(path, "JPEG", quality=90)
    else:
        img.save(path, "PNG", compress_level=1)


def _split_counts(n, fractions):
    """Split n items by fractions, at least one per part (when n allows), the first part taking the rest."""
    counts = [max(1, int(n * f)) for f in fractions[1:]]
    return [n - sum(counts)] + counts


def write_coco(root, rng, n_images, texts, counts):
    """COCO, Karpathy split: n_images images (train / restval / val / test = 60 / 15 / 12.5 / 12.5 %), in train2014
    (Karpathy train) and val2014 (the others), 5 captions each (a few 6 or 7), and coco/dataset_coco.json.
    Returns (image records, their scenes, the COCO ids left for test2015): VQA asks about these scenes, VG
    copies some of them."""
    n_test2015 = max(2, n_images // 16)
    coco_ids = rng.sample(range(1, 600000), n_images + n_test2015)  # drawn together: no id is used twice
    split_of = [s for s, k in zip(("train", "restval", "val", "test"),
                                  _split_counts(n_images, (0.6, 0.15, 0.125, 0.125))) for _ in range(k)]
    rng.shuffle(split_of)
    records, scenes, sentid = [], [], 0
    for imgid in range(n_images):
        split, cocoid = split_of[imgid], coco_ids[imgid]
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        scene = random_scene(rng)
        _save(render_scene(scene), os.path.join(root, "coco", folder, filename))
        captions = synth_captions(scene, rng, rng.choice((5,) * 18 + (6, 7)))
        sentences = []
        for caption in captions:
            raw = _raw_caption(caption, rng)
            sentences.append({"tokens": re.findall(r"[a-z]+", raw.lower()), "raw": raw, "imgid": imgid,
                              "sentid": sentid})
            sentid += 1
        texts += captions
        records.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                        "imgid": imgid, "split": split, "sentences": sentences, "cocoid": cocoid})
        scenes.append(scene)
    data.write_json(os.path.join(root, "coco", "dataset_coco.json"), {"images": records, "dataset": "coco"})
    counts["coco"] = dict(collections.Counter(split_of))
    return records, scenes, coco_ids[n_images:]


def write_vqa(root, rng, coco_records, coco_scenes, test2015_ids, texts, counts):
    """VQA v2: 3 questions about each COCO image of train2014 and val2014 with the answers of 10 annotators, and
    the questions (no answers) about new images in coco/test2015, test-dev2015 being those of the first half."""
    test_scenes = []
    for image_id in test2015_ids:
        scene = random_scene(rng)
        _save(render_scene(scene), os.path.join(root, "coco", "test2015", f"COCO_test2015_{image_id:012d}.jpg"))
        test_scenes.append((image_id, scene))
    subsets = {"train2014": [], "val2014": [], "test2015": test_scenes}
    for record, scene in zip(coco_records, coco_scenes):
        subsets[record["filepath"]].append((record["cocoid"], scene))
    for subset, images in subsets.items():
        questions, annotations = _vqa_questions(images, rng, texts)
        _write_vqa_files(root, subset, images, questions, annotations)
        counts[f"vqa_{subset}"] = len(questions)


def _vqa_questions(images, rng, texts):
    """The question records and the annotation records of a list of (image id, scene)."""
    questions, annotations = [], []
    for image_id, scene in images:
        for k, (question, answer, answer_type, question_type, kind) in enumerate(synth_questions(scene, rng)):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            texts.append(question)
            answers = synth_human_answers(answer, kind, rng)
            normalized = collections.Counter(data.normalize_vocab_answer(a) for a in answers)
            annotations.append({
                "question_type": question_type, "multiple_choice_answer": normalized.most_common(1)[0][0],
                "answers": [{"answer": a,
                             "answer_confidence": "yes" if a == answer else rng.choice(("yes", "maybe", "no")),
                             "answer_id": j + 1} for j, a in enumerate(answers)],
                "image_id": image_id, "answer_type": answer_type, "question_id": qid})
    return questions, annotations


def _write_vqa_files(root, subset, images, questions, annotations):
    """A subset's question file and its annotation file; test2015 has no annotations (the test server keeps
    them) but a second question file, test-dev2015."""
    header = {"info": VQA_INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    vqa_dir = os.path.join(root, "vqa")
    data.write_json(os.path.join(vqa_dir, data.VQA_QUESTION_FILES[subset]),
                    dict(header, data_subtype=subset, questions=questions))
    if subset in data.VQA_ANNOTATION_FILES:
        data.write_json(os.path.join(vqa_dir, data.VQA_ANNOTATION_FILES[subset]),
                        {"info": VQA_INFO, "license": {}, "data_subtype": subset, "data_type": "mscoco",
                         "annotations": annotations})
    else:  # test-dev2015 is a subset of test2015: the questions of its first half of the images
        dev_images = {image_id for image_id, _ in images[:max(1, len(images) // 2)]}
        data.write_json(os.path.join(vqa_dir, data.VQA_QUESTION_FILES["test-dev2015"]),
                        dict(header, data_subtype="test-dev2015",
                             questions=[q for q in questions if q["image_id"] in dev_images]))


def write_flickr30k(root, rng, n_images, texts, counts):
    """Flickr30K, Karpathy split: n_images / 4 images (train / val / test = 80 / 10 / 10 %) with 5 captions each,
    and flickr30k/dataset_flickr30k.json; then SNLI-VE on these images, whose pairs are drawn with each image
    (from the same random stream, so they are written here)."""
    n_flickr = max(3, n_images // 4)
    split_of = [s for s, k in zip(("train", "val", "test"), _split_counts(n_flickr, (0.8, 0.1, 0.1)))
                for _ in range(k)]
    flickr_ids = rng.sample(range(10 ** 8, 10 ** 9), n_flickr)
    records, snli = [], {"train": [], "val": [], "test": []}
    for imgid in range(n_flickr):
        scene = random_scene(rng)
        filename = f"{flickr_ids[imgid]}.jpg"
        _save(render_scene(scene), os.path.join(root, "flickr30k", "flickr30k-images", filename))
        captions = synth_captions(scene, rng, 5)
        texts += captions
        sentences = [{"tokens": re.findall(r"[a-z]+", c.lower()), "raw": _raw_caption(c, rng), "imgid": imgid,
                      "sentid": imgid * 5 + k} for k, c in enumerate(captions)]
        records.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                        "split": split_of[imgid], "filename": filename})
        snli[split_of[imgid]] += snli_ve_pairs(scene, filename, sentences, rng, texts)
    data.write_json(os.path.join(root, "flickr30k", "dataset_flickr30k.json"),
                    {"images": records, "dataset": "flickr30k"})
    write_snli_ve(root, snli, counts)
    counts["flickr30k"] = dict(collections.Counter(split_of))


def snli_ve_pairs(scene, filename, sentences, rng, texts):
    """SNLI-VE's records of one Flickr30K image: two of its captions are premises, each with one hypothesis per
    label (6 per image)."""
    pairs = []
    for k in rng.sample(range(len(sentences)), min(2, len(sentences))):
        premise = sentences[k]["raw"].strip()
        for hypothesis, label in synth_hypotheses(scene, rng):
            texts.append(hypothesis)
            pairs.append({"annotator_labels": [label], "captionID": f"{filename}#{k}", "gold_label": label,
                          "pairID": f"{filename}#{k}r1{label[0]}", "sentence1": premise, "sentence2": hypothesis,
                          "Flickr30K_ID": filename[:-4]})
    return pairs


def write_snli_ve(root, snli, counts):
    """snli-ve/snli_ve_{train,dev,test}.jsonl from the pairs of Flickr30K's train, val and test images."""
    for split, flickr_split in (("train", "train"), ("dev", "val"), ("test", "test")):
        data.write_json_lines(os.path.join(root, "snli-ve", f"snli_ve_{split}.jsonl"), snli[flickr_split])
        counts[f"snli-ve_{split}"] = len(snli[flickr_split])


def write_nlvr2(root, rng, n_images, texts, counts):
    """NLVR2: n_images / 10 sentences (train / dev / test1 = 75 / 12.5 / 12.5 %), each with 4 image pairs, labels
    balanced where the sampling allows; nlvr2/{train,dev,test1}.json and the images as the zips unpack."""
    n_sets = max(3, n_images // 10)
    set_id = 0
    for split, n_split_sets in zip(("train", "dev", "test1"), _split_counts(n_sets, (0.75, 0.125, 0.125))):
        lines = []
        for _ in range(n_split_sets):
            statement = synth_nlvr2_statement(rng)
            texts.append(statement[0])
            wanted = [True, True, False, False]
            rng.shuffle(wanted)
            for pair, want in enumerate(wanted):
                lines.append(_nlvr2_example(root, rng, split, set_id, pair, statement, want))
            set_id += 1
        data.write_json_lines(os.path.join(root, "nlvr2", f"{split}.json"), lines)
        counts[f"nlvr2_{split}"] = len(lines)


def _nlvr2_example(root, rng, split, set_id, pair, statement, want):
    """One image pair of a sentence, drawn until the sentence's truth is `want` (at most 300 tries: the label is
    always the truth, the balance is best effort); its images are written, its record returned."""
    sentence, predicate, prefer = statement
    for _ in range(300):
        left, right = random_scene(rng, prefer=prefer), random_scene(rng, prefer=prefer)
        if predicate(left, right) == want:
            break
    stem = f"{split}-{set_id}-{pair}"
    record = {"identifier": f"{stem}-0", "sentence": sentence, "label": str(predicate(left, right)),
              "left_url": f"https://synthetic.invalid/{stem}-img0.png",
              "right_url": f"https://synthetic.invalid/{stem}-img1.png",
              "synset": "n00027807", "query": f"{prefer[0][0]} {prefer[0][1]}"}
    folder = os.path.join(root, "nlvr2", "dev" if split == "dev" else "test1")
    if split == "train":  # train images are spread over images/train/<directory>/, as released
        record["directory"] = set_id % 100
        folder = os.path.join(root, "nlvr2", "images", "train", str(set_id % 100))
        os.makedirs(folder, exist_ok=True)
    for side, scene in (("img0", left), ("img1", right)):  # a quarter are JPEGs named .png, as in NLVR2
        fmt = "JPEG" if rng.random() < 0.25 else "PNG"
        _save(render_scene(scene), os.path.join(folder, f"{stem}-{side}.png"), fmt)
    return record


def write_visual_genome(root, rng, n_images, coco_records, coco_scenes, texts, counts):
    """Visual Genome: n_images / 16 images with a region description per shape; a third of them are COCO images
    (the same scene, with its coco_id), so that pre-training meets VG copies of COCO images as on the real data
    (it drops those of COCO val / test images and never pairs a copy with its original as a mismatch)."""
    n_vg = max(2, n_images // 16)
    region_descriptions, image_data, region_id = [], [], 1
    for image_id in range(1, n_vg + 1):
        if image_id % 3 == 1:
            k = rng.randrange(n_images)
            scene, coco_id = coco_scenes[k], coco_records[k]["cocoid"]
        else:
            scene, coco_id = random_scene(rng), None
        folder = "VG_100K" if image_id <= n_vg // 2 else "VG_100K_2"
        _save(render_scene(scene), os.path.join(root, "vg", folder, f"{image_id}.jpg"))
        regions = _vg_regions(scene, image_id, region_id, rng, texts)
        region_id += len(regions)
        region_descriptions.append({"regions": regions, "id": image_id})
        url = f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg"
        image_data.append({"width": scene.width, "url": url, "height": scene.height, "image_id": image_id,
                           "coco_id": coco_id, "flickr_id": None})
    data.write_json(os.path.join(root, "vg", "region_descriptions.json"), region_descriptions)
    data.write_json(os.path.join(root, "vg", "image_data.json"), image_data)
    counts["vg"] = n_vg


def _vg_regions(scene, image_id, first_region_id, rng, texts):
    """A region per shape, its box and a phrase: its name, its place in the image, or a relation to another."""
    regions = []
    for region_id, t in enumerate(scene.things, start=first_region_id):
        phrase = rng.choice((_noun(t), _noun(t, True), f"{_noun(t)} {_region_phrase(t, scene)}"))
        others = [u for u in scene.things if u is not t and _relation(t, u)]
        if others and rng.random() < 0.5:
            u = rng.choice(others)
            phrase = f"{_noun(t)} {_relation(t, u)} {_noun(u)}"
        texts.append(phrase)
        regions.append({"region_id": region_id, "width": 2 * t.r, "height": 2 * t.r, "image_id": image_id,
                        "phrase": phrase, "y": t.y - t.r, "x": t.x - t.r})
    return regions


def write_vocab(root, texts, vocab_size):
    """vocab.txt: a WordPiece vocabulary of every text of the world and every answer, so no BERT file is needed."""
    answers = [a for kind in ANSWER_KINDS for a in answer_choices(kind)]
    data.train_wordpiece_vocab(texts + answers, os.path.join(root, "vocab.txt"), vocab_size)


def write_manifest(root, seed, n_images, counts):
    """SYNTHETIC_WORLD.json, written last: it marks the world complete (ensure_synthetic_world looks for it)."""
    manifest = {"seed": seed, "n_images": n_images, "counts": counts, "format_version": SYNTH_VERSION}
    data.write_json(os.path.join(root, SYNTH_MANIFEST), manifest)
    return manifest


# ---- The whole world ----

def default_data_root():
    """<repo>/data/synthetic-v<version>: where the training script keeps the synthetic world."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"synthetic-v{SYNTH_VERSION}")


def write_synthetic_world(root, seed=0, n_images=2000, vocab_size=1000):
    """Render the synthetic world into `root` in the real formats and the --data layout. Deterministic for a seed.

    n_images COCO-style images (Karpathy train / restval / val / test = 60 / 15 / 12.5 / 12.5 %, 5 captions each,
    a few with 6 or 7), plus n_images/16 COCO test2015 images for VQA test-dev/test; 3 VQA questions per COCO
    image; n_images/4 Flickr30K-style images with captions, and SNLI-VE: 2 premise captions per image with one
    hypothesis per label each (6 per image); n_images/10 NLVR2 sentence sets of 4 image pairs each; n_images/16
    VG images (a third of them copies of COCO images, with their coco_id); and vocab.txt trained on all the
    texts. Returns the manifest (seed, n_images, the counts of each data set, format_version).
    """
    rng_for = lambda part: random.Random(f"{seed}/{part}")
    texts, counts = [], {}
    for folder in WORLD_FOLDERS:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    coco_records, coco_scenes, test2015_ids = write_coco(root, rng_for("coco"), n_images, texts, counts)
    write_vqa(root, rng_for("vqa"), coco_records, coco_scenes, test2015_ids, texts, counts)
    write_flickr30k(root, rng_for("flickr30k"), n_images, texts, counts)
    write_nlvr2(root, rng_for("nlvr2"), n_images, texts, counts)
    write_visual_genome(root, rng_for("vg"), n_images, coco_records, coco_scenes, texts, counts)
    write_vocab(root, texts, vocab_size)
    return write_manifest(root, seed, n_images, counts)


def ensure_synthetic_world(root=None, seed=0, **kwargs):
    """Write the synthetic world into `root` (default: default_data_root()) unless it is already there; returns
    root. It is written into a temporary folder and renamed, so an interrupted run leaves nothing half-written
    and concurrent callers (several ranks) end up with one complete world."""
    root = os.path.abspath(root or default_data_root())
    manifest = os.path.join(root, SYNTH_MANIFEST)
    if os.path.isfile(manifest):
        version = data.read_json(manifest, "a synthetic world's manifest").get("format_version", 1)
        if version != SYNTH_VERSION:
            raise data.DataError(f"{root} holds a synthetic world of version {version}, this code writes "
                                 f"version {SYNTH_VERSION}: remove the folder, or write a new one elsewhere")
        return root
    if os.path.isdir(root) and os.listdir(root):
        raise data.DataError(f"{root} is not empty but has no {SYNTH_MANIFEST}: not a synthetic world; remove it")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = f"{root}.{os.getpid()}.tmp"
    print(f"writing the synthetic world to {root} (once, about half a minute)", file=sys.stderr, flush=True)
    try:
        write_synthetic_world(tmp, seed, **kwargs)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isfile(manifest):  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---- Command line ----

def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic world (see the docstring of synthetic.py)")
    parser.add_argument("--out", default=None, help="the folder (default: data/synthetic-v<version>/ of the "
                        "repository, where train.py and evaluate.py look without --data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_images", type=int, default=2000,
                        help="COCO-style images; the other data sets scale with it")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out or default_data_root())
    manifest_path = os.path.join(out, SYNTH_MANIFEST)
    existed = os.path.isfile(manifest_path)
    t0 = time.time()
    try:
        ensure_synthetic_world(out, args.seed, n_images=args.n_images)
    except data.DataError as e:
        raise SystemExit(str(e))
    manifest = data.read_json(manifest_path, "a synthetic world's manifest")
    if existed:
        print(f"{out} already holds a synthetic world (seed {manifest['seed']}, {manifest['n_images']} images): "
              f"left as it is")
        return
    print(json.dumps(manifest["counts"]))
    print(f"wrote {out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
