"""
An ImageNet stand-in for the tiny preset: pre-train its ResNet to name what each 64x64 cell of a synthetic scene
holds, then start SOHO's pre-training from it, as the paper starts from ImageNet weights (Sec. 4.1).

    python experiments/pretrain_backbone.py [--steps 600] [--fixed_head] [--world VARIANT]
                                            [--out runs/backbone/resnet.pt]
    python train.py --resnet runs/backbone/resnet.pt

Why: the tiny model trains its ResNet from scratch, and "Where the objects are lost" (README) finds that nothing
in pre-training makes its tokens carry the shapes loudly enough for the transformer to read them, while perfect
tokens (one learned vector per colour and kind) are read. The paper's ResNet never faced this: ImageNet taught it
objects before SOHO saw a caption. Here the stand-in task is supervised on scenes drawn fresh from the synthetic
world's generator (never its COCO val images, on which pre-training is scored): for every cell of the stride-64
grid of Eq. 1 (the ResNet's last stage, 2x2 max-pooled), which of the 6 object colours and 5 kinds have a shape
there (a shape's centre within 0.6 of its radius of the cell, as diagnose.py's item 7), by a linear head and
binary cross-entropy, and the image's background, by cross-entropy on the mean of its cells. Only the ResNet is
saved (the head is dropped), in the key names --resnet reads.
"""

import argparse
import os
import random
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import soho  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from synthetic import SYNTH_COLORS, SYNTH_SHAPES  # noqa: E402
from world_variants import variant  # noqa: E402  (experiments/ is this script's own folder)

COLOURS, SHAPES = sorted(SYNTH_COLORS), list(SYNTH_SHAPES)


def cell_labels(scenes, grid, reach=0.6):
    """[B, gh * gw, 11] 0/1: the colours (6, sorted) and kinds (5) with a shape in each cell; cells beyond a
    scene's own size are all 0."""
    gh, gw = grid
    labels = torch.zeros(len(scenes), gh * gw, len(COLOURS) + len(SHAPES))
    for b, s in enumerate(scenes):
        for r in range(gh):
            for c in range(gw):
                for t in synthetic.shapes_in_cell(s, r, c, reach=reach):
                    labels[b, r * gw + c, COLOURS.index(t.color)] = 1.0
                    labels[b, r * gw + c, len(COLOURS) + SHAPES.index(t.shape)] = 1.0
    return labels


def backbone_of(cfg):
    return soho.ResNet(cfg.resnet_depth, cfg.resnet_width, cfg.backbone_bn, zero_init_residual=cfg.zero_init_residual,
                       average_downsample=cfg.average_downsample)


def head_of(backbone, fixed=False):
    """The linear head that names a cell's background (8 on v4), colours (6) and kinds (5) from its features.
    fixed: rows of norm 1 in random directions, zero bias, never trained, so that a label is said only as loudly as
    the features carry it along its row (a learned head can make a quiet direction loud by its own weights)."""
    # the world's backgrounds, read when the head is built: a world variant may change them (v3 has six, v4 eight)
    head = nn.Linear(backbone.out_channels, len(synthetic.background_names()) + len(COLOURS) + len(SHAPES))
    if fixed:
        with torch.no_grad():
            head.weight.copy_(F.normalize(torch.randn_like(head.weight), dim=1))
            head.bias.zero_()
        head.requires_grad_(False)
    return head


def cell_losses(backbone, head, scenes, cfg):
    """(BCE of the cells' colours and kinds, CE of the background, balanced accuracy of the cells' labels at
    0.5: the mean of the shares of present and of absent labels said right)."""
    images, image_mask = synthetic.scene_batch(scenes, cfg.image_short, cfg.image_long)
    # Eq. 1's grid without its 1x1 projection: the ResNet's last stage, 2x2 max-pooled, one row per 64x64 cell
    cells, valid, grid = soho.encode(images, image_mask, backbone, nn.Identity())  # [B, l, C], [B, l]
    names = synthetic.background_names()
    n = len(names)
    logits = head(cells)  # [B, l, n + 11]: the backgrounds, then the colours and kinds
    labels = cell_labels(scenes, grid)
    objects = F.binary_cross_entropy_with_logits(logits[..., n:][valid], labels[valid])
    mean = (logits[..., :n] * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)  # [B, n]
    background = F.cross_entropy(mean, torch.tensor([names.index(s.background) for s in scenes]))
    said, truth = logits[..., n:][valid] > 0, labels[valid] > 0
    balanced = ((said & truth).sum() / truth.sum() + (~said & ~truth).sum() / (~truth).sum()) / 2
    return objects, background, balanced


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fixed_head", action="store_true", help="a head of fixed random rows of norm 1 (head_of)")
    p.add_argument("--world", default="", help="a world variant of world_variants.py to draw the scenes from "
                   "(empty: synthetic.py's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/backbone/resnet.pt")
    args = p.parse_args(argv)
    with variant(args.world):
        return run(args)


def run(args):
    torch.manual_seed(args.seed)
    cfg = soho.PRESETS["tiny"]
    backbone = backbone_of(cfg).train()
    head = head_of(backbone, args.fixed_head)
    params = [p for p in (*backbone.parameters(), *head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    rng = random.Random(f"pretrain_backbone/{args.seed}")  # a stream of its own: never the world's COCO images
    held_out = [synthetic.random_scene(random.Random(f"pretrain_backbone/held-out/{i}")) for i in range(64)]
    for step in range(1, args.steps + 1):
        scenes = [synthetic.random_scene(rng) for _ in range(args.batch)]
        objects, background, accuracy = cell_losses(backbone, head, scenes, cfg)
        opt.zero_grad(set_to_none=True)
        (objects + background).backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            backbone.eval()
            with torch.no_grad():
                _, _, held = cell_losses(backbone, head, held_out, cfg)
            backbone.train()
            print(f"step {step}: cells' colours and kinds BCE {objects.item():.3f} (balanced accuracy {accuracy:.3f}, "
                  f"held-out {held:.3f}), background CE {background.item():.3f}", flush=True)
    train.save_checkpoint(args.out, backbone.state_dict())  # a temporary file, then a rename
    print(f"wrote the ResNet to {args.out}: python train.py --resnet {args.out}")


if __name__ == "__main__":
    main()
