"""
Is the transformer the bottleneck? Pre-training's ITM on perfect visual tokens (README, "Does the model look at
the image?").

    python experiments/oracle_tokens.py [--steps 1515] [--num_layers 2] [--lr 1e-3] [--itm_weight 1]
                                        [--mlm_prob 0.15] [--same_background] [--itm_on_clean_text]
                                        [--tokens perfect|cell-pixels|resnet] [--cell 64] [--object_scale 1]
                                        [--freeze_tokens] [--noise 0] [--offset 0] [--resnet PATH]
                                        [--standardise] [--token_scale 1] [--centre 0] [--seed 0]

The synthetic world's scenes are known exactly, so the ResNet and the VD can be replaced by perfect tokens: each
64x64 cell of a scene becomes a learned embedding of its background plus, for every shape reaching into the cell,
learned embeddings of that shape's colour and kind. The tiny preset's transformer (soho.SOHO's, with its 2-D sine
position and LayerNorm) then learns MLM and ITM as pre-training does: 16 fresh scenes a step, each with 2 of its
captions and 2 captions of other scenes of the batch, the inputs of all 4 masked alike, MLM on the matched ones.
Every --eval_every steps it is scored on 256 held-out scenes: ITM on matched captions and on mismatched captions
that name another background or the scene's own, and MLM on a masked object colour word read with the scene's own
tokens, another scene's and none (does MLM read the objects?). A mismatch that names the scene's own background
can be caught only by its objects: if perfect tokens leave those uncaught in the pre-training budget (1,515
steps), objects are lost in the transformer, not in the ResNet or the VD.

--tokens cell-pixels replaces the perfect tokens with a visual encoder far simpler than the ResNet, learned with
the transformer: a small MLP (48 -> 256 -> hidden) over each cell's sixteen 16x16 block-mean colours (the pixels
that diagnose.py's item 7 probes), on the scenes rendered as data.py prepares images. Between the two: does a
learned encoder of the same pixels give the transformer what perfect tokens give it?

What do perfect tokens have that pixels' tokens lack? --freeze_tokens keeps them at their random start (are they
read because they are learned?); --noise and --offset add to them what features have and they lack (a residual,
and a part shared by every cell); --tokens resnet feeds the transformer a frozen ResNet's features (e.g. the
stand-in of pretrain_backbone.py) on the same fresh scenes (do pixels fail because they repeat 1,616 images?),
--standardise first standardising each channel over the batch's cells; --token_scale multiplies any tokens (their
size against the 2-D sine position) and --centre takes a share of each image's mean token out (the background).
"""

import argparse
import math
import os
import random
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import soho  # noqa: E402
import synthetic  # noqa: E402
# experiments/ is this script's own folder
from diagnose import cell_contents, cell_pixels, loudness, mask_first_of  # noqa: E402
from pretrain_backbone import backbone_of  # noqa: E402
from world_variants import variant  # noqa: E402
from synthetic import SYNTH_COLORS, SYNTH_SHAPES  # noqa: E402

COLOURS, SHAPES = sorted(SYNTH_COLORS), list(SYNTH_SHAPES)
CELL = 64  # the token stride of Eq. 1


class OracleTokens(nn.Module):
    """A scene's cells as features [B, l, c]: background + the colour and kind of each shape reaching the cell.
    object_scale multiplies the colour and kind embeddings at initialisation (N(0, object_scale^2) instead of
    N(0, 1), the background's): how loud a shape is in its cell's token, against its background. noise adds
    N(0, noise^2) to every number of every cell at every forward: what the sum does not explain, as in pixels'
    features (diagnose.py's item 11). variants gives each colour and kind that many vectors, one drawn at random for
    every shape in every cell; graded scales a shape's vectors by the share of the cell it covers; single_cell puts
    them only in the cell that holds the shape's centre. offset adds one random vector of N(0, offset^2) numbers to
    every cell: a part shared by all cells, as ReLU features have (their mean)."""

    def __init__(self, dim, object_scale=1.0, noise=0.0, offset=0.0, variants=1, graded=False, single_cell=False,
                 cell=CELL):
        super().__init__()
        self.cell = cell
        self.noise, self.variants, self.graded, self.single_cell = noise, variants, graded, single_cell
        self.draw = random.Random("oracle/variants")  # which variant each shape shows: a stream of its own
        self.backgrounds = synthetic.background_names()  # the world's, as built (a variant may change them)
        self.background = nn.Embedding(len(self.backgrounds), dim)
        self.colour = nn.Embedding(len(COLOURS) * variants, dim)  # variant v of colour i: row i * variants + v
        self.shape = nn.Embedding(len(SHAPES) * variants, dim)
        with torch.no_grad():
            self.colour.weight.mul_(object_scale)
            self.shape.weight.mul_(object_scale)
        # one vector shared by every cell of every scene (drawn only when asked, so that the other runs' draws stay)
        self.register_buffer("offset", offset * torch.randn(dim) if offset else torch.zeros(dim))

    def forward(self, scenes):
        k = self.cell
        gh = max(math.ceil(s.height / k) for s in scenes)
        gw = max(math.ceil(s.width / k) for s in scenes)
        dim = self.background.embedding_dim
        features = torch.zeros(len(scenes), gh * gw, dim)
        valid = torch.zeros(len(scenes), gh * gw, dtype=torch.bool)
        for b, s in enumerate(scenes):
            for r in range(math.ceil(s.height / k)):
                for c in range(math.ceil(s.width / k)):
                    i = r * gw + c
                    valid[b, i] = True
                    x = self.background.weight[self.backgrounds.index(s.background)]
                    for t in synthetic.shapes_in_cell(s, r, c, k):  # each shape whose disc reaches the cell
                        if self.single_cell and (int(t.y) // k, int(t.x) // k) != (r, c):
                            continue  # single_cell: only the cell that holds the shape's centre
                        v = self.draw.randrange(self.variants) if self.variants > 1 else 0
                        w = disc_coverage(t, r, c, cell=k) * k ** 2 / (math.pi * 22 ** 2) if self.graded else 1.0
                        x = x + w * (self.colour.weight[COLOURS.index(t.color) * self.variants + v]
                                     + self.shape.weight[SHAPES.index(t.shape) * self.variants + v])
                    features[b, i] = x
        features = (features + self.offset) * valid[..., None]
        if self.noise:
            features = features + self.noise * torch.randn_like(features) * valid[..., None]
        return features, valid, (gh, gw)


def disc_coverage(thing, r, c, samples=16, cell=CELL):
    """The share of grid cell (r, c) that the shape's disc covers, from samples x samples points of the cell."""
    step = cell / samples
    centres = [(c * cell + (i + 0.5) * step, r * cell + (j + 0.5) * step)
               for i in range(samples) for j in range(samples)]
    return sum(math.hypot(x - thing.x, y - thing.y) < thing.r for x, y in centres) / samples ** 2


class CellPixelTokens(nn.Module):
    """A scene's cells as features [B, l, c]: an MLP over each cell's sixteen block-mean colours (64x64 cells of
    16x16 blocks by default), of the scene rendered and resized as data.py prepares images (the tiny preset's
    256-384 px)."""

    def __init__(self, dim, hidden=256, image_short=256, image_long=384, cell=CELL):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(48, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.image_short, self.image_long, self.cell = image_short, image_long, cell

    def forward(self, scenes):
        images, image_mask = synthetic.scene_batch(scenes, self.image_short, self.image_long)
        H, W = images.shape[-2:]
        k = self.cell
        gh, gw = math.ceil(H / k), math.ceil(W / k)
        real = F.pad(image_mask.float()[:, None], (0, k * gw - W, 0, k * gh - H))  # [B, 1, gh * k, gw * k]
        valid = F.max_pool2d(real, k).flatten(1) > 0  # [B, gh * gw]: cells with any real pixel
        return self.mlp(cell_pixels(images, (gh, gw), k)), valid, (gh, gw)


class ResNetTokens(nn.Module):
    """A scene's cells as features [B, l, c]: Eq. 1 with a frozen ResNet (in eval mode; e.g. the stand-in that
    pretrain_backbone.py trains) and a learned 1x1 projection, on the scenes rendered as data.py prepares images.
    Fresh scenes through the visual pathway of `train.py --resnet PATH --freeze_backbone_epochs=15
    --use_vd=false`: what pixels give the transformer when the data never repeat."""

    def __init__(self, dim, resnet, cfg, standardise=False):
        super().__init__()
        self.standardise = standardise
        self.backbone = backbone_of(cfg)
        soho.load_resnet_weights(self.backbone, resnet)
        self.backbone.requires_grad_(False).eval()
        self.projection = nn.Conv2d(self.backbone.out_channels, dim, kernel_size=1)
        self.image_short, self.image_long = cfg.image_short, cfg.image_long

    def train(self, mode=True):  # the ResNet stays in eval mode (its BatchNorm frozen) whatever the caller asks
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, scenes):
        images, image_mask = synthetic.scene_batch(scenes, self.image_short, self.image_long)
        if not self.standardise:
            return soho.encode(images, image_mask, self.backbone, self.projection)
        cells, valid, grid = soho.encode(images, image_mask, self.backbone, nn.Identity())  # [B, l, C]
        real = cells[valid]  # [n, C]: per channel, the batch's valid cells' mean and deviation
        cells = (cells - real.mean(0)) / (real.std(0) + 1e-5)
        return self.projection(cells.transpose(1, 2)[..., None])[..., 0].transpose(1, 2) * valid[..., None], valid, grid


class Scaled(nn.Module):
    """Any of the token encoders above, its tokens multiplied by `scale`: how large a token's content is against
    the 2-D sine position (norm 8 at the tiny preset's 128 dimensions) that embed_visual adds before its LayerNorm."""

    def __init__(self, tokens, scale):
        super().__init__()
        self.tokens, self.scale = tokens, scale

    def forward(self, scenes):
        features, valid, grid = self.tokens(scenes)
        return self.scale * features, valid, grid


class Centred(nn.Module):
    """Any of the token encoders above, with `share` x each image's mean token (over its valid cells) subtracted
    from its tokens: most of the background, shared by every cell, is taken out (all of it at share 1), and what
    differs between cells is left."""

    def __init__(self, tokens, share=1.0):
        super().__init__()
        self.tokens, self.share = tokens, share

    def forward(self, scenes):
        features, valid, grid = self.tokens(scenes)
        mean = (features * valid[..., None]).sum(1, keepdim=True) / valid.sum(1)[:, None, None]  # [B, 1, c]
        return (features - self.share * mean) * valid[..., None], valid, grid


def batch_of(scenes, captions, tok, rng, mlm_prob, same_background=False):
    """Rows 4i..4i+3: scene i's 2 captions, then captions of 2 random other scenes of the batch (as data.py);
    with same_background, the third comes from another scene with scene i's background where the batch has one
    (as --itm_negatives=subject)."""
    texts, labels, kinds = [], [], []
    for i, s in enumerate(scenes):
        others = [j for j in range(len(scenes)) if j != i]
        alike = [j for j in others if scenes[j].background == s.background] if same_background else []
        third = rng.choice(alike or others)
        picks = rng.sample(captions[i], 2) + [rng.choice(captions[third]), rng.choice(captions[rng.choice(others)])]
        for k, text in enumerate(picks):
            texts.append(text)
            labels.append(int(k < 2))
            named = text.lower()
            kinds.append("matched" if k < 2 else
                         "same background" if f"{s.background} background" in named else "other background")
    ids, mask = data.pad_token_rows([tok.encode(t) for t in texts], tok.pad_id)
    generator = torch.Generator().manual_seed(rng.getrandbits(62))
    masked, mlm_labels = data.mask_tokens(ids, mask, tok, mlm_prob, generator) if mlm_prob else (ids, None)
    if mlm_labels is not None:
        mlm_labels[torch.tensor(labels) == 0] = soho.IGNORE  # MLM on the matched pairs only
    return masked, mask, mlm_labels, torch.tensor(labels), kinds, ids


def forward(model, oracle, scenes, ids, mask, img_index):
    features, valid, grid = oracle(scenes)
    visual = model.embed_visual(features, grid)[img_index]  # [4B, l, c]
    hidden = model.fuse(ids, mask, visual, valid[img_index])
    return hidden, model.itm_head(model.transformer.pool(hidden, mask))


@torch.no_grad()
def geometry(oracle, scenes, cell=CELL):
    """diagnose.py's item 11 on the tokens as they enter embed_visual (before the 2-D sine position, whose norm is
    sqrt(hidden / 2)): how far apart backgrounds, colours and kinds lie, the residual, and the tokens' mean norm.
    The encoder is measured in eval mode and left in the mode it was in."""
    was_training = oracle.training
    features, valid, (gh, gw) = oracle.eval()(scenes)
    oracle.train(was_training)
    where = [(s, i // gw, i % gw) for b, s in enumerate(scenes) for i in range(gh * gw) if valid[b, i]]
    bg, colours, kinds = zip(*(cell_contents(s, r, c, cell=cell) for s, r, c in where))
    parts = loudness(features[valid], torch.tensor(bg), torch.tensor(colours), torch.tensor(kinds))
    return {**parts, "token norm": features[valid].norm(dim=1).mean().item()}


def fresh(rng, n):
    scenes = [synthetic.random_scene(rng) for _ in range(n)]
    return scenes, [synthetic.synth_captions(s, rng, 5) for s in scenes]


@torch.no_grad()
def evaluate(model, oracle, tok, scenes, captions):
    """Held-out ITM accuracy per kind of text, and MLM's accuracy on the first object colour that each scene's first
    caption names, masked, read with the scene's own tokens, with the next scene's, and with none."""
    model.eval()
    rng, hits = random.Random("oracle/eval"), {}
    colour_ids = torch.tensor([tok.encode(c)[1] for c in COLOURS])
    for start in range(0, len(scenes), 16):
        sc, caps = scenes[start:start + 16], captions[start:start + 16]
        ids, mask, _, labels, kinds, _ = batch_of(sc, caps, tok, rng, 0.0)
        _, logits = forward(model, oracle, sc, ids, mask, torch.arange(len(sc)).repeat_interleave(4))
        for kind, ok in zip(kinds, (logits.argmax(-1) == labels).tolist()):
            hits.setdefault(kind, []).append(ok)
        first, at, targets = mask_first_of(ids[0::4], colour_ids, tok.mask_id)  # [16, T]: each scene's first caption
        features, valid, grid = oracle(sc)
        visual = model.embed_visual(features, grid)
        scene = torch.arange(len(sc))
        readings = (("colour MLM own", scene), ("colour MLM other", scene.roll(1)), ("colour MLM none", None))
        for name, tokens_of in readings:
            if tokens_of is None:
                hidden = model.fuse(first, mask[0::4])
            else:
                hidden = model.fuse(first, mask[0::4], visual[tokens_of], valid[tokens_of])
            right = model.mlm_logits(hidden[:, :first.shape[1]][at]).argmax(-1) == targets
            hits.setdefault(name, []).extend(right.tolist())
    model.train()
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1515)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--itm_weight", type=float, default=1.0, help="the ITM term's weight in Eq. 9 (the paper: 1)")
    p.add_argument("--mlm_prob", type=float, default=0.15)
    p.add_argument("--same_background", action="store_true", help="train with the third text from a scene with "
                   "the same background (as --itm_negatives=subject); held-out scoring stays random")
    p.add_argument("--itm_on_clean_text", action="store_true", help="score ITM in a second pass on unmasked texts "
                   "(MLM keeps the masked pass) instead of on the masked texts of the one pass")
    p.add_argument("--tokens", choices=("perfect", "cell-pixels", "resnet"), default="perfect",
                   help="perfect: learned embeddings of what each cell holds; cell-pixels: an MLP over its pixels; "
                   "resnet: a frozen ResNet (--resnet) and a learned projection (Eq. 1)")
    p.add_argument("--resnet", default="runs/backbone/resnet.pt", help="--tokens resnet: its weights (a state dict "
                   "as train.py --resnet reads, e.g. from pretrain_backbone.py)")
    p.add_argument("--noise", type=float, default=0.0, help="perfect tokens: add N(0, noise^2) to every number of "
                   "every cell at every forward (the residual's norm is then ~noise x a colour vector's)")
    p.add_argument("--cell", type=int, default=CELL, help="perfect and cell-pixels tokens: the side of a token's "
                   "cell in pixels (64: Eq. 1's stride; 32: a grid four times as fine)")
    p.add_argument("--object_scale", type=float, default=1.0, help="perfect tokens: the shapes' embeddings start "
                   "at this scale against the background's (1: the same)")
    p.add_argument("--freeze_tokens", action="store_true", help="keep the token encoder at its initialisation "
                   "(perfect tokens: fixed random vectors per background, colour and kind) instead of learning it")
    p.add_argument("--variants", type=int, default=1, help="perfect tokens: each colour and kind has this many "
                   "random vectors, one drawn for every shape in every cell (1: one exact vector each)")
    p.add_argument("--single_cell", action="store_true", help="perfect tokens: a shape's vectors only in the cell "
                   "that holds its centre (one token per shape) instead of in every cell its disc reaches")
    p.add_argument("--graded", action="store_true", help="perfect tokens: a shape's vectors scaled by the share of "
                   "the cell its disc covers (x 64^2 / (pi 22^2): 1 for a small shape wholly inside), as pixels are")
    p.add_argument("--offset", type=float, default=0.0, help="perfect tokens: add one random vector of N(0, "
                   "offset^2) numbers to every cell (a part shared by all, as the mean of ReLU features)")
    p.add_argument("--standardise", action="store_true", help="resnet tokens: standardise each channel of the "
                   "features over the batch's cells before the projection")
    p.add_argument("--token_scale", type=float, default=1.0, help="multiply every token by this (1: as they are)")
    p.add_argument("--centre", type=float, default=0.0, help="subtract this share of each image's mean token from "
                   "its tokens (0: none; 1: all)")
    p.add_argument("--world", default="", help="a world variant of world_variants.py to draw the scenes from "
                   "(empty: synthetic.py's own)")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", default=os.path.join(synthetic.default_data_root(), "vocab.txt"))
    args = p.parse_args(argv)
    with variant(args.world):
        return run(args)


def run(args):
    if not os.path.isfile(args.vocab):
        synthetic.ensure_synthetic_world()
    torch.manual_seed(args.seed)
    cfg = soho.config_from_preset("tiny", num_layers=args.num_layers, use_vd=False)
    tok = data.Tokenizer.from_vocab(args.vocab, cfg.max_text_len)
    model = soho.SOHO(cfg)
    if args.tokens == "perfect":
        oracle = OracleTokens(cfg.hidden_size, args.object_scale, args.noise, args.offset, args.variants, args.graded,
                              args.single_cell, args.cell)
    elif args.tokens == "resnet":
        oracle = ResNetTokens(cfg.hidden_size, args.resnet, soho.PRESETS["tiny"], args.standardise)
    else:
        oracle = CellPixelTokens(cfg.hidden_size, cell=args.cell)
    if args.centre:
        oracle = Centred(oracle, args.centre)
    if args.token_scale != 1.0:
        oracle = Scaled(oracle, args.token_scale)
    params = [*model.transformer.parameters(), *model.visual_norm.parameters(), *model.mlm_transform.parameters(),
              model.mlm_bias, *model.itm_head.parameters()]
    if args.freeze_tokens:
        oracle.requires_grad_(False)
    else:
        params += list(oracle.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = random.Random(f"oracle/train/{args.seed}")
    held_out = fresh(random.Random("oracle/held-out"), 256)
    print(f"{args.tokens} tokens | {args.num_layers} layers | lr {args.lr} | itm weight {args.itm_weight} | "
          f"mlm_prob {args.mlm_prob} | same-background negatives {args.same_background} | "
          f"ITM on clean texts {args.itm_on_clean_text} | tokens frozen {args.freeze_tokens} | "
          f"object scale {args.object_scale} | noise {args.noise} | offset {args.offset} | "
          f"variants {args.variants} | graded {args.graded} | single cell {args.single_cell} | "
          f"centred {args.centre} | token scale {args.token_scale} | standardised {args.standardise} | "
          f"world {args.world or 'synthetic.py'} | cell {args.cell} px | seed {args.seed}")
    cell = CELL if args.tokens == "resnet" else args.cell  # the side of a token's cell, for item 11's labels
    shape = geometry(oracle, held_out[0][:64], cell)
    print(f"tokens at the start (position norm {math.sqrt(cfg.hidden_size / 2):.2f}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in shape.items()), flush=True)
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:  # the tiny recipe's warm-up: 50 steps from 1/3 of the rate
            group["lr"] = args.lr * min(1.0, 1 / 3 + (2 / 3) * step / 50)
        scenes, captions = fresh(rng, 16)
        ids, mask, mlm_labels, labels, _, clean = batch_of(scenes, captions, tok, rng, args.mlm_prob,
                                                            args.same_background)
        img_index = torch.arange(len(scenes)).repeat_interleave(4)  # texts 4i..4i+3 are scene i's
        hidden, logits = forward(model, oracle, scenes, ids, mask, img_index)
        if args.itm_on_clean_text and mlm_labels is not None:  # a second pass: ITM on the texts as they are
            _, logits = forward(model, oracle, scenes, clean, mask, img_index)
        itm = F.cross_entropy(logits, labels)
        loss = args.itm_weight * itm
        if mlm_labels is not None:
            at = mlm_labels != soho.IGNORE
            loss = loss + F.cross_entropy(model.mlm_logits(hidden[:, :ids.shape[1]][at]), mlm_labels[at])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            scores = evaluate(model, oracle, tok, *held_out)
            print(f"step {step:5d}  itm loss {itm.item():.3f}  held-out: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
            if step == args.steps:
                shape = geometry(oracle, held_out[0][:64], cell)
                print("tokens at the end: " + ", ".join(f"{k} {v:.2f}" for k, v in shape.items()), flush=True)
    return scores


if __name__ == "__main__":
    main()
