"""
Does the visual pathway reach ITM? Measurements on a pre-training checkpoint (README, "Does the model look at the
image?").

    python experiments/diagnose.py --checkpoint runs/pretrain/ckpt.pt [--init]

Each line answers one suspected cause with a number, on held-out data:
1. colour probe: can a linear probe read "colour c is in the image" from the visual tokens, at each stage of the
   pathway (ResNet layer1 .. layer4, the projection, the tokens that enter the transformer)? Scenes are drawn fresh
   from the synthetic world's generator, so their contents are known exactly; the probe trains on 600 and is scored
   on 300 others, against the majority rate.
2. token spread: the share of the visual tokens' energy that differs between images (the rest is one vector shared
   by every image), beside the same share for the text tokens.
3. attention: the share of [CLS]'s attention that goes to visual tokens, per layer, on held-out pairs.
4. gradients: the norm of each loss term's gradient (MLM, MVM, ITM) at the ResNet, the projection and the
   transformer: a term whose gradient is far smaller than the others' gets a small share of AdamW's steps.
5. the VD: entries in use on held-out images, against the 30 colour-shape kinds of the world.
6. what ITM reads: held-out mismatched captions split by whether they name the image's own background (every
   synthetic caption names one): a model that sees only the scene catches none of the same-background ones.
7. per-cell colour probe: can a probe (linear, and a small MLP) read which colours lie in a token's own 64x64
   cell, from the features and from the tokens that enter the transformer, against the same probe on the cell's
   own pixels (balanced accuracy, chance 0.5)? Pixels the probe reads better than features: the ResNet lost it.
8. scale: the norm of the visual features against that of the 2-D sine position added to them before the
   LayerNorm: a token whose position is far larger than its content tells the transformer little of the image.
9. grounded MLM: held-out matched captions with their background word (alone) masked; MLM's accuracy on it with
   the image's own visual tokens, with those of an image of another background, and with no image: a model that
   has tied the word to the pixels is right with its own image and wrong with another's.
10. the same for the first object colour a matched caption names ("red" in "a red circle ..."): a model that sees
   objects is right more often with its own image than with none.
11. loudness: each cell's features and tokens fitted, by least squares, as a sum of one vector for its background
   and one per colour and kind of shape in it (perfect tokens are exactly that): how far apart the colours' vectors
   lie against how far apart the backgrounds' do, and against the residual. Perfect tokens whose colours lie
   0.45 as far apart as their backgrounds are not read in 1,000 steps (oracle_tokens.py --object_scale 0.45).
12. shared entries: the VD entries the tokens of each background's held-out images take most, and the pairs of
   backgrounds whose most used entries overlap: such a pair gives the transformer the same tokens, and ITM cannot
   tell its captions apart until the features move apart (README, "Why eight backgrounds, and not ten").
With --init the same model is measured at its initialisation (same seed and config), to tell what training did.
"""

import argparse
import collections
import itertools
import os
import random
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import soho  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from soho import sine_position_embedding_2d  # noqa: E402
from synthetic import SYNTH_COLORS, SYNTH_SHAPES  # noqa: E402


def scenes(n, seed):
    rng = random.Random(f"diagnose/{seed}")
    return [synthetic.random_scene(rng) for _ in range(n)]


@torch.no_grad()
def stage_features(model, images, image_mask):
    """{stage name: [B, C] mean over the image's valid cells} along the visual pathway."""
    bb, out = model.backbone, {}
    x = F.max_pool2d(F.relu(bb.bn1(bb.conv1(images))), kernel_size=3, stride=2, padding=1)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(bb, name)(x)
        out[name] = x.mean((2, 3))
    V, valid, _ = model.encode(images, image_mask)
    out["projection"] = (V * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    tokens, _ = model.pretrain_visual_tokens(images, image_mask)
    out["tokens entering the transformer"] = (tokens * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    return out


def _standardise(x_train, x_test):
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return (x_train - mean) / std, (x_test - mean) / std


def balanced_accuracy(pred, y):
    """Mean over labels of (true-positive rate + true-negative rate) / 2: chance 0.5 however rare a label is."""
    tpr = (pred & (y == 1)).sum(0) / y.sum(0).clamp(min=1)
    tnr = (~pred & (y == 0)).sum(0) / (1 - y).sum(0).clamp(min=1)
    return ((tpr + tnr) / 2).mean().item()


def linear_probe(x_train, y_train, x_test, y_test, steps=300, balanced=False):
    """A logistic-regression probe per binary label: x [N, C], y [N, K]. Returns its accuracy averaged over labels,
    or with balanced=True (classes weighted equally in training) its balanced accuracy."""
    x_train, x_test = _standardise(x_train, x_test)
    w = torch.zeros(x_train.shape[1], y_train.shape[1], requires_grad=True)
    b = torch.zeros(y_train.shape[1], requires_grad=True)
    pos_weight = (1 - y_train.mean(0)) / y_train.mean(0).clamp(min=1e-3) if balanced else None
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x_train @ w + b, y_train, pos_weight=pos_weight)
        (loss + 1e-3 * (w * w).sum()).backward()
        opt.step()
    with torch.no_grad():
        pred = (x_test @ w + b) > 0
        return balanced_accuracy(pred, y_test) if balanced else (pred.float() == y_test).float().mean().item()


def mlp_probe(x_train, y_train, x_test, y_test, steps=600, hidden=256):
    """A one-hidden-layer probe (ReLU, `hidden` units), classes weighted equally: balanced accuracy. A linear probe
    cannot read "red is in this cell" from a cell's colours (the background mixes in), a small MLP can."""
    torch.manual_seed(0)
    x_train, x_test = _standardise(x_train, x_test)
    net = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, y_train.shape[1]))
    pos_weight = (1 - y_train.mean(0)) / y_train.mean(0).clamp(min=1e-3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(net(x_train), y_train, pos_weight=pos_weight).backward()
        opt.step()
    with torch.no_grad():
        return balanced_accuracy(net(x_test) > 0, y_test)


def colour_probe(model, cfg, n_train=600, n_test=300):
    colours = sorted(SYNTH_COLORS)
    feats, labels = {}, []
    for part, n in (("train", n_train), ("test", n_test)):
        sc = scenes(n, part)
        labels.append(torch.tensor([[float(any(t.color == c for t in s.things)) for c in colours] for s in sc]))
        for start in range(0, n, 50):
            images, mask = synthetic.scene_batch(sc[start:start + 50], cfg.image_short, cfg.image_long)
            for k, v in stage_features(model, images, mask).items():
                feats.setdefault(k, {}).setdefault(part, []).append(v)
    y_train, y_test = labels
    majority = torch.maximum(y_test.mean(0), 1 - y_test.mean(0)).mean().item()
    return {k: linear_probe(torch.cat(v["train"]), y_train, torch.cat(v["test"]), y_test) for k, v in feats.items()}, \
        majority


def cell_pixels(images, grid, cell=64):
    """[B, gh * gw, 48]: each cell x cell square of the token grid (64: Eq. 1's) as the mean colour of its sixteen
    (cell/4)x(cell/4) blocks (3 x 4 x 4 numbers, channel first, then block row, then block column), images padded
    with zeros to whole cells."""
    gh, gw = grid
    B, _, H, W = images.shape
    padded = F.pad(images, (0, cell * gw - W, 0, cell * gh - H))  # a 288-pixel side is 5 cells, the last half empty
    blocks = F.avg_pool2d(padded, cell // 4)  # [B, 3, 4 gh, 4 gw]
    return blocks.view(B, 3, gh, 4, gw, 4).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, 48)


@torch.no_grad()
def cell_rows(model, cfg, sc, batch_size=50):
    """Every valid 64x64 cell of the scenes `sc`, one row each: ({"pixels", "features", "tokens": [N, *]}, [(scene,
    grid row, grid column)]), with pixels as cell_pixels, features the output of Eq. 1 and tokens what enters the
    transformer in pre-training."""
    rows, where = {"pixels": [], "features": [], "tokens": []}, []
    for start in range(0, len(sc), batch_size):
        batch = sc[start:start + batch_size]
        images, mask = synthetic.scene_batch(batch, cfg.image_short, cfg.image_long)
        V, valid, (gh, gw) = model.encode(images, mask)
        tokens, _ = model.pretrain_visual_tokens(images, mask)
        rows["pixels"].append(cell_pixels(images, (gh, gw))[valid])
        rows["features"].append(V[valid])
        rows["tokens"].append(tokens[valid])
        where += [(s, i // gw, i % gw) for b, s in enumerate(batch) for i in range(gh * gw) if valid[b, i]]
    return {k: torch.cat(v) for k, v in rows.items()}, where


@torch.no_grad()
def cell_colour_probe(model, cfg, n_train=400, n_test=200):
    """Per token: can a probe read which colours lie in its own 64x64 cell, from the cell's pixels (its mean colour
    in each 16x16 block: 48 numbers, the reference), from the features (Eq. 1), and from the tokens that enter the
    transformer? {(probe, input): balanced accuracy, chance 0.5}, for a linear probe and a small MLP."""
    parts = {}
    for part, n in (("train", n_train), ("test", n_test)):
        rows, where = cell_rows(model, cfg, scenes(n, f"cells/{part}"))
        parts[part] = (rows, torch.tensor([cell_contents(s, r, c)[1] for s, r, c in where]))
    (x_train, y_train), (x_test, y_test) = parts["train"], parts["test"]
    with torch.enable_grad():
        return {(name, k): probe(x_train[k], y_train, x_test[k], y_test)
                for name, probe in (("linear", lambda *a: linear_probe(*a, balanced=True)), ("MLP", mlp_probe))
                for k in x_train}


def loudness(x, background, colours, kinds):
    """How loud each part of a cell is in its vector: least squares of x [N, C] on what the cell holds,

        x_n ~ B_bg[background_n] + sum_c colours[n, c] B_colour[c] + sum_k kinds[n, k] B_kind[k]

    background: [N] indices, colours: [N, 6] and kinds: [N, 5] 0/1. What tells one background, colour or kind from
    another is each group's rows less their mean: returns the mean norm of those ("background", "colour", "kind"),
    the norm of the vector that any one shape adds to its cell whatever it is ("shape present": the colour rows'
    mean plus the kind rows'), and the mean norm of the residual rows (what the sum does not explain). Perfect
    tokens (oracle_tokens.py) are exactly such a sum: at initialisation the three spreads ~ sqrt(C x 5/6) or so,
    residual 0."""
    design = torch.cat([F.one_hot(background, -1).double(), colours.double(), kinds.double()], 1)  # [N, nb + 11]
    fit = torch.linalg.lstsq(design, x.double()).solution  # [nb + 11, C]
    nb, nc = design.shape[1] - colours.shape[1] - kinds.shape[1], colours.shape[1]
    groups = {"background": fit[:nb], "colour": fit[nb:nb + nc], "kind": fit[nb + nc:]}
    out = {k: (rows - rows.mean(0)).norm(dim=1).mean().item() for k, rows in groups.items()}
    out["shape present"] = (groups["colour"].mean(0) + groups["kind"].mean(0)).norm().item()
    out["residual"] = (x.double() - design @ fit).norm(dim=1).mean().item()
    return out


def cell_contents(scene, r, c, reach=0.6, cell=64):
    """(background index, [6] colours and [5] kinds 0/1) of grid cell (r, c) of `cell` pixels: the shapes whose
    centre lies within `reach` x their radius of the cell."""
    things = synthetic.shapes_in_cell(scene, r, c, cell, reach=reach)
    return (synthetic.background_names().index(scene.background),
            [float(any(t.color == k for t in things)) for k in sorted(SYNTH_COLORS)],
            [float(any(t.shape == k for t in things)) for k in SYNTH_SHAPES])


@torch.no_grad()
def cell_loudness(model, cfg, n=300):
    """{input: loudness} of the features (Eq. 1) and the tokens that enter the transformer, on n fresh scenes."""
    rows, where = cell_rows(model, cfg, scenes(n, "loudness"))
    bg, colours, kinds = zip(*(cell_contents(s, r, c) for s, r, c in where))
    return {k: loudness(rows[k], torch.tensor(bg), torch.tensor(colours), torch.tensor(kinds))
            for k in ("features", "tokens")}


@torch.no_grad()
def visual_scale(model, batch):
    """Norms per visual token before the LayerNorm of embed_visual: the features (Eq. 1), their image-specific
    part (less the mean over all tokens of the batch), and the 2-D sine position added to them."""
    V, valid, grid = model.encode(batch["images"], batch["image_mask"])
    v = V[valid]
    pos = sine_position_embedding_2d(*grid, v.shape[1])
    return {"features": v.norm(dim=1).mean().item(), "image-specific": (v - v.mean(0)).norm(dim=1).mean().item(),
            "position": pos.norm(dim=1).mean().item()}


def split_batch(ckpt, cfg, n_images=32, split="val"):
    """The first n_images of a pre-training split with their 4 texts: val (held out) for the measurements; train
    for the gradients of item 4, which need MLM's masked words (the val split masks none)."""
    root = ckpt["data_root"]
    tok = data.Tokenizer.from_vocab(ckpt["vocab_path"], cfg.max_text_len)
    ds = data.build_dataset("pretrain", split, root, tok, cfg, seed=0)
    return ds.collate([ds[i] for i in range(n_images)])


def attention_to_visual(model, batch):
    """Per layer: the mean share of [CLS]'s attention (averaged over heads) that lands on visual tokens."""
    tr, shares = model.transformer, []
    visual, valid = model.pretrain_visual_tokens(batch["images"], batch["image_mask"])
    idx = batch["img_index"]
    x = torch.cat([tr.text_embed(batch["input_ids"]), visual[idx]], 1)
    attend = torch.cat([batch["text_mask"].bool(), valid[idx]], 1)
    T = batch["input_ids"].shape[1]
    for layer in tr.layers:
        B, S, H = x.shape
        nh = layer.num_heads
        q = layer.query(x[:, :1]).view(B, 1, nh, H // nh).transpose(1, 2)
        k = layer.key(x).view(B, S, nh, H // nh).transpose(1, 2)
        att = (q @ k.transpose(-1, -2) / (H // nh) ** 0.5).masked_fill(~attend[:, None, None], float("-inf"))
        shares.append(att.softmax(-1)[..., T:].sum(-1).mean().item())
        x = layer(x, attend)
    return shares


def token_spread(model, batch):
    """Share of the visual (text) tokens' energy that is not the mean token over the batch."""
    visual, valid = model.pretrain_visual_tokens(batch["images"], batch["image_mask"])
    vis = visual[valid]  # [N, H]
    txt = model.transformer.text_embed(batch["input_ids"])[batch["text_mask"].bool()]
    share = lambda t: ((t - t.mean(0)) ** 2).sum().item() / (t ** 2).sum().item()
    return share(vis), share(txt)


def term_gradients(model, batch):
    """{term: {part: norm}}: the norm of each pre-training term's gradient (MLM, MVM, ITM, each its mean over its
    targets, as Eq. 9 sums them) at the ResNet, the projection and the transformer, on one batch."""
    out = model.pretrain_losses(batch, torch.Generator().manual_seed(0))
    parts = {"resnet": model.backbone, "projection": model.projection, "transformer": model.transformer}
    params, result = [p for mod in parts.values() for p in mod.parameters()], {}
    for term in ("mlm", "mvm", "itm") if model.config.use_vd else ("mlm", "itm"):  # no VD: no MVM
        grads = dict(zip(params, torch.autograd.grad(out[term].mean, params, retain_graph=True, allow_unused=True)))
        result[term] = {name: torch.sqrt(sum((grads[p] ** 2).sum() for p in mod.parameters()
                                             if grads[p] is not None)).item() for name, mod in parts.items()}
    if model.visual_dictionary is not None:
        model.visual_dictionary.discard_pending()
    return result


BACKGROUND_PHRASE = re.compile(r"(?:on|against) an? ([a-z ]+?) background")  # synth_captions' three wordings


def background_of(text):
    """The background a synthetic caption names ("teal" in "... on a teal background"; on world_variants.py's
    patterned or two-tone worlds the whole name, "plain teal", "pink and teal"), in any world version; None if it
    names none."""
    phrase = BACKGROUND_PHRASE.search(text.lower())
    return phrase.group(1) if phrase else None


def heldout_pretrain_batches(ckpt, cfg, n_images=250, batch_size=16):
    """The tokenizer and the pre-training batches of the first n_images held-out (val) images, 4 texts each."""
    tok = data.Tokenizer.from_vocab(ckpt["vocab_path"], cfg.max_text_len)
    ds = data.build_dataset("pretrain", "val", ckpt["data_root"], tok, cfg, seed=0)
    n = min(n_images, len(ds))
    return tok, (ds.collate([ds[i] for i in range(start, min(start + batch_size, n))])
                 for start in range(0, n, batch_size))


@torch.no_grad()
def mismatches_by(model, ckpt, cfg, kind_of, n_images=250, image_kind=None):
    """Held-out ITM accuracy on mismatched captions, grouped by kind_of(the image's first matched caption, the
    mismatched caption), a name or None (not counted): {kind: (accuracy, number of captions)}, kinds sorted.
    image_kind(image id), if given, names the kind of image, and each group is split by it ("close-up, same
    colour")."""
    hits = {}
    for batch in heldout_pretrain_batches(ckpt, cfg, n_images)[1]:
        correct = model.pretrain_itm_logits(batch).argmax(-1) == batch["itm_label"]
        for row, text in enumerate(batch["texts"]):
            kind = kind_of(batch["texts"][row - row % 4], text) if batch["itm_label"][row] == 0 else None
            if kind is not None and image_kind is not None:
                kind = f"{image_kind(batch['image_ids'][row // 4])}, {kind}"
            if kind is not None:
                right, n = hits.get(kind, (0, 0))
                hits[kind] = (right + int(correct[row]), n + 1)
    return {k: (right / n, n) for k, (right, n) in sorted(hits.items())}


@torch.no_grad()
def entries_by_background(model, ckpt, cfg, n_images=250, top=4):
    """Item 12: ({background: [(entry, share of the background's tokens), ...] for its `top` most used entries},
    {(background a, background b): [entries among the `top` of both]} for the pairs that share any). The tokens are
    all of a held-out image's valid tokens, counted under the background its first caption names."""
    counts = {}
    for batch in heldout_pretrain_batches(ckpt, cfg, n_images)[1]:
        V, valid, _ = model.encode(batch["images"], batch["image_mask"])
        h = model.visual_dictionary.lookup(V)[0]  # [B, l] entry indices
        for i in range(len(V)):
            background = background_of(batch["texts"][4 * i])
            if background:
                counts.setdefault(background, collections.Counter()).update(h[i][valid[i]].tolist())
    most = {bg: [(entry, n / sum(c.values())) for entry, n in c.most_common(top)] for bg, c in sorted(counts.items())}
    shared = {(a, b): sorted({e for e, _ in most[a]} & {e for e, _ in most[b]})
              for a, b in itertools.combinations(most, 2)}
    return most, {pair: entries for pair, entries in shared.items() if entries}


def background_kind(own_text, text):
    """"same background" or "other background" than the image's own caption names; None if either names none."""
    own, named = background_of(own_text), background_of(text)
    return None if not (own and named) else "same background" if own == named else "other background"


def mask_first_of(ids, word_ids, mask_id):
    """Each row's first token that is one of `word_ids` replaced by [MASK]: (masked ids [K, T], where [K, T] bool,
    the replaced ids [number masked], in row order). A row with none of the words is left as it is."""
    at = torch.isin(ids, word_ids)
    at &= at.cumsum(1) == 1  # the first occurrence only
    masked = ids.clone()
    masked[at] = mask_id
    return masked, at, ids[at]


@torch.no_grad()
def grounded_mlm(model, ckpt, cfg, n_images=250, word="background"):
    """MLM accuracy on one masked word of held-out matched captions, given the image's own visual tokens, those of
    an image with another background, or none: {"own image", "other image", "no image"}, and the number scored.
    word="background": the background's colour word (item 9; a caption names it once); word="object colour": the
    first colour of a shape that the caption names (item 10)."""
    words = {"background": synthetic.SYNTH_BACKGROUNDS, "object colour": SYNTH_COLORS}[word]
    tok, batches = heldout_pretrain_batches(ckpt, cfg, n_images)
    word_ids = torch.tensor([tok.encode(w)[1] for w in words])  # each is one WordPiece of the world's vocabulary
    right = {"own image": 0, "other image": 0, "no image": 0}
    n = 0
    for batch in batches:
        visual, valid = model.pretrain_visual_tokens(batch["images"], batch["image_mask"])  # [B, l, c], [B, l]
        first = torch.arange(0, len(batch["texts"]), 4)  # each image's first text: a matched caption
        own = [background_of(batch["texts"][i]) for i in first.tolist()]
        # (image, another image of the batch with another background), for each image that names one and has one
        pairs = [(b, next((o for o, bg in enumerate(own) if bg not in (None, own[b])), None))
                 for b in range(len(own)) if own[b] is not None]
        pairs = [(b, o) for b, o in pairs if o is not None]
        ids, at, targets = mask_first_of(batch["input_ids"][first[[b for b, _ in pairs]]], word_ids, tok.mask_id)
        rows = at.any(1).tolist()  # the captions that name such a word
        keep = [b for (b, _), r in zip(pairs, rows) if r]
        other = [o for (_, o), r in zip(pairs, rows) if r]
        if not keep:
            continue
        ids, at = ids[torch.tensor(rows)], at[torch.tensor(rows)]  # [K, T]
        tmask = batch["text_mask"][first[keep]]
        T = ids.shape[1]
        for name, vis in (("own image", keep), ("other image", other), ("no image", None)):
            if vis is None:
                hidden = model.fuse(ids, tmask)
            else:
                hidden = model.fuse(ids, tmask, visual[vis], valid[vis])
            pred = model.mlm_logits(hidden[:, :T][at]).argmax(-1)  # [masked positions], in row order as targets
            right[name] += (pred == targets).sum().item()
        n += len(targets)
    return {k: v / max(n, 1) for k, v in right.items()}, n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/pretrain/ckpt.pt")
    p.add_argument("--init", action="store_true", help="measure the model at its initialisation instead")
    args = p.parse_args()
    model, ckpt = train.load_model(args.checkpoint)
    cfg = model.config
    if args.init:
        torch.manual_seed(ckpt["train_config"]["seed"])
        model = soho.SOHO(cfg).eval()
    torch.manual_seed(0)
    batch = split_batch(ckpt, cfg)  # held out
    print(f"{args.checkpoint}{' (at initialisation)' if args.init else ''}")
    probes, majority = colour_probe(model, cfg)
    print(f"1. colour probe (has colour c, 6 colours; majority rate {majority:.3f}):")
    for k, v in probes.items():
        print(f"     {k:32s} {v:.3f}")
    vis, txt = token_spread(model, batch)
    print(f"2. image-specific share of the visual tokens' energy {vis:.3f} (text tokens: {txt:.3f})")
    with torch.no_grad():
        shares = attention_to_visual(model, batch)
    n_vis = batch["image_mask"].shape[1] * batch["image_mask"].shape[2] // 64 ** 2
    print("3. [CLS] attention on visual tokens, per layer: " + ", ".join(f"{s:.3f}" for s in shares)
          + f" (uniform attention would give about {n_vis / (n_vis + batch['text_mask'].sum(1).float().mean()):.2f})")
    model.train()
    grads = term_gradients(model, split_batch(ckpt, cfg, 16, split="train"))
    print("4. gradient norms of each term of Eq. 9 (AdamW scales a shared weight's step by all of them together):")
    for term, norms in grads.items():
        print(f"     {term.upper():4s} " + ", ".join(f"{k} {v:.2e}" for k, v in norms.items()))
    model.eval()
    if cfg.use_vd:
        with torch.no_grad():
            V, valid, _ = model.encode(batch["images"], batch["image_mask"])
            h = model.visual_dictionary.lookup(V)[0][valid]
        print(f"5. VD entries used by {int(valid.sum())} held-out tokens: {len(h.unique())} of {cfg.vd_size} "
              f"(the world has {len(SYNTH_COLORS) * len(SYNTH_SHAPES)} colour-shape kinds and "
              f"{len(synthetic.SYNTH_BACKGROUNDS)} backgrounds)")

    split = mismatches_by(model, ckpt, cfg, background_kind)
    print("6. held-out mismatched captions caught: " + ", ".join(f"naming {k.split()[0]} background {a:.3f} "
                                                               f"({n} captions)" for k, (a, n) in split.items()))
    cells = cell_colour_probe(model, cfg)
    print("7. per-cell colour probe (which colours lie in a token's own cell; balanced accuracy, chance 0.5):")
    for name in ("linear", "MLP"):
        print(f"     {name:6s} " + ", ".join(f"{k} {v:.3f}" for (p, k), v in cells.items() if p == name)
              + " (pixels: the cell's 16x16-block mean colours, the reference)")
    scale = visual_scale(model, batch)
    print("8. visual token norms before the LayerNorm: " + ", ".join(f"{k} {v:.2f}" for k, v in scale.items()))
    grounded, n = grounded_mlm(model, ckpt, cfg)
    print(f"9. masked background word ({n} held-out captions) predicted: "
          + ", ".join(f"with {k} {v:.3f}" for k, v in grounded.items())
          + f" (chance among the {len(synthetic.SYNTH_BACKGROUNDS)} backgrounds "
          f"{1 / len(synthetic.SYNTH_BACKGROUNDS):.3f})")
    grounded, n = grounded_mlm(model, ckpt, cfg, word="object colour")
    print(f"10. masked object colour word ({n} held-out captions) predicted: "
          + ", ".join(f"with {k} {v:.3f}" for k, v in grounded.items())
          + f" (chance among the {len(SYNTH_COLORS)} colours {1 / len(SYNTH_COLORS):.3f})")
    print("11. loudness per cell (mean norms of a least-squares fit of each cell's vector on its background, colours "
          "and kinds: how far apart backgrounds, colours and kinds lie, the vector any shape adds, the residual):")
    for k, parts in cell_loudness(model, cfg).items():
        print(f"     {k:8s} " + ", ".join(f"{part} {v:.2f}" for part, v in parts.items())
              + f" (colour / background {parts['colour'] / parts['background']:.3f})")
    if cfg.use_vd:
        most, shared = entries_by_background(model, ckpt, cfg)
        print("12. most used VD entries of each background's held-out tokens (entry: share):")
        for background, entries in most.items():
            print(f"     {background:10s} " + ", ".join(f"{e}: {share:.2f}" for e, share in entries))
        print("    backgrounds that share any of them: " + (", ".join(f"{a}/{b} ({', '.join(map(str, e))})"
                                                              for (a, b), e in shared.items()) or "none"))


if __name__ == "__main__":
    main()
