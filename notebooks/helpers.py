"""Setup shared by the read-along notebooks: a small synthetic world, a briefly trained tiny SOHO, images as
batches, and plotting. Nothing here implements an equation; the notebooks call soho.py for those.

Everything the notebooks write goes to one cache folder: $SOHO_NB_CACHE if set (the tests and
build_notebooks.py set a fresh one, so every run starts clean), else a temporary folder named after a hash of
soho.py, data.py, synthetic.py, train.py and this file, so a change to the code never reuses stale checkpoints.
"""

import contextlib
import glob
import hashlib
import io
import math
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import soho  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402

# One thread per kernel. The notebooks run on small shared machines (CI, 2 cores); when another job holds a core,
# two OpenMP threads wait on each other and a training step gets about 10x slower, while one thread loses ~1.5x.
torch.set_num_threads(1)

N_IMAGES = 240  # COCO-style images of the synthetic world (the other tasks scale with it); 3 s to write
PRETRAIN_STEPS = 60  # about 40 s on 2 CPU cores
plt.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72, "font.size": 9})


def cache_dir():
    root = os.environ.get("SOHO_NB_CACHE")
    if not root:
        digest = hashlib.sha1()
        for name in ("soho.py", "data.py", "synthetic.py", "train.py", os.path.join("notebooks", "helpers.py")):
            with open(os.path.join(REPO, name), "rb") as f:
                digest.update(f.read())
        root = os.path.join(tempfile.gettempdir(), f"soho-notebooks-{digest.hexdigest()[:12]}")
    os.makedirs(root, exist_ok=True)
    return root


def shorten(text):
    """Paths in the cache folder written as <cache>/..., so that printed outputs do not change between runs."""
    return text.replace(cache_dir(), "<cache>")


def world():
    """The synthetic world (written once per cache folder): synthetic.write_synthetic_world with N_IMAGES images."""
    root = os.path.join(cache_dir(), "world")
    if not os.path.isfile(os.path.join(root, synthetic.SYNTH_MANIFEST)):
        with contextlib.redirect_stderr(io.StringIO()):
            synthetic.ensure_synthetic_world(root, seed=0, n_images=N_IMAGES)
    return root


def train_once(name, argv):
    """train.main(argv + ["--out", <cache>/name]) unless that run exists already; returns its checkpoint path.

    The run is written to a temporary folder and renamed when it is complete.
    """
    out = os.path.join(cache_dir(), name)
    ckpt = os.path.join(out, "ckpt.pt")
    if os.path.isfile(ckpt):
        print(f"reusing the {name} run in {shorten(out)}")
        return ckpt
    print(shorten("python train.py " + " ".join(argv)))
    tmp = f"{out}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        metrics = train.main([*argv, "--out", tmp, "--fresh"])  # progress bar and summary not shown
    print(f"trained {metrics['step']} steps; last logged: {train.format_metrics(metrics)}")
    try:
        os.rename(tmp, out)
    except OSError:  # another notebook finished the same run first
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


def pretrain_argv():
    """train.py's tiny pre-training, with the schedule spelled out so that the notebooks do not move when the
    tiny recipe does: 5 epochs of 12 steps of 16 images (x 4 texts), the ResNet frozen for the first epoch, Eq. 9
    with equal weights (the paper's)."""
    return ["--task", "pretrain", "--data", world(), "--batch_per_gpu=16", "--global_batch=16", "--epochs=5",
            f"--max_steps={PRETRAIN_STEPS}", "--lr=5e-4", "--lr_milestones=4", "--warmup_steps=10",
            "--freeze_backbone_epochs=1", "--itm_weight=1", "--num_workers=0", "--log_every=5"]


def pretrained():
    """Checkpoint of a tiny SOHO pre-trained for PRETRAIN_STEPS steps (train.py's tiny recipe, 16 images/step)."""
    return train_once("pretrain", pretrain_argv())


def demo_model():
    """The model of the default `python train.py` run (1,515 steps; held-out ITM in its "metrics"), kept in
    notebooks/demo/ by make_demo.py, so that a notebook can show what pre-training learns without 7 minutes of
    training first. Returns (model in eval mode, fp32, the demo dict, a tokenizer of its vocabulary)."""
    demo = torch.load(os.path.join(HERE, "demo", "tiny-pretrained.pt"), map_location="cpu")
    model = soho.SOHO(soho.SOHOConfig(**demo["model_config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in demo["model"].items()})
    tok = data.Tokenizer.from_vocab(os.path.join(HERE, "demo", "vocab.txt"), model.config.max_text_len)
    return model.eval(), demo, tok


def fresh_scenes(n, seed=0):
    """n scenes drawn fresh from the synthetic world's generator (no model was trained on them), each with one of
    its captions: (scenes, captions, images [n, 3, H, W], image_mask [n, H, W])."""
    import random
    rng = random.Random(f"notebooks/{seed}")
    scenes = [synthetic.random_scene(rng) for _ in range(n)]
    captions = [synthetic.synth_captions(s, rng, 1)[0] for s in scenes]
    config = soho.PRESETS["tiny"]
    images, image_mask = synthetic.scene_batch(scenes, config.image_short, config.image_long)
    return scenes, captions, images, image_mask


def read_log(ckpt_path):
    """The rows of train.py's log.jsonl next to a checkpoint, as a dict of lists."""
    import json
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(ckpt_path), "log.jsonl"))]
    return {k: [r.get(k, float("nan")) for r in rows] for k in rows[-1]}


def tokenizer(ckpt=None, max_len=None):
    vocab = ckpt["vocab_path"] if ckpt else os.path.join(world(), "vocab.txt")
    return data.Tokenizer.from_vocab(vocab, max_len or soho.PRESETS["tiny"].max_text_len)


def image_paths(n, split="val2014"):
    """The first n COCO-style images of a folder of the world (val2014: Karpathy restval / val / test)."""
    return sorted(glob.glob(os.path.join(world(), "coco", split, "*.jpg")))[:n]


def load_batch(paths, config=soho.PRESETS["tiny"]):
    """Images as the data pipeline makes them: (images [B,3,H,W], image_mask [B,H,W], resized PIL images)."""
    pil = [data.resize_image(data.load_image(p), config.image_short, config.image_long) for p in paths]
    images, mask = data.pad_images([data.image_to_tensor(im) for im in pil])
    return images, mask, pil


def show_tokens(ax, img, grid, labels=None, colors=None, hatch=None, title=None, cell=64):
    """An image with its grid of 64x64 token cells; optional per-cell text labels, RGB(A) colours laid over
    the cells, and a hatch over the cells where `hatch` is True. grid = (gh, gw); per-cell arrays are [gh*gw]."""
    gh, gw = grid
    ax.imshow(img, extent=(0, img.width, img.height, 0))
    ax.set_xlim(0, gw * cell)
    ax.set_ylim(gh * cell, 0)
    for k in range(gh * gw):
        r, c = divmod(k, gw)
        x, y = c * cell, r * cell
        if colors is not None:
            ax.add_patch(plt.Rectangle((x, y), cell, cell, color=colors[k], lw=0))
        if hatch is not None and hatch[k]:
            ax.add_patch(plt.Rectangle((x, y), cell, cell, fill=False, hatch="xx", ec="k", lw=0))
        ax.add_patch(plt.Rectangle((x, y), cell, cell, fill=False, ec="w", lw=0.8))
        if labels is not None and labels[k] is not None:
            ax.text(x + cell / 2, y + cell / 2, str(labels[k]), ha="center", va="center", fontsize=8,
                    color="k", bbox=dict(boxstyle="round,pad=0.15", fc="w", ec="none", alpha=0.8))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)


def pca_basis(x, q=3):
    """(mean, components [c, q]) of the rows of x: to draw features in 2-D or as RGB."""
    x = x.detach().double()
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, v[:q].t()


def to_rgb(x, basis, ref=None):
    """Rows of x [N, c] as colours [N, 3]: their first 3 principal components, scaled to [0, 1] between the
    2nd and 98th percentiles of the rows of `ref` (default: x itself)."""
    mean, comps = basis
    project = lambda t: (t.detach().double() - mean) @ comps
    y, r = project(x), project(x if ref is None else ref)
    lo, hi = r.quantile(0.02, dim=0), r.quantile(0.98, dim=0)
    return ((y - lo) / (hi - lo).clamp(min=1e-9)).clamp(0, 1).numpy()


def entry_colors(h, used):
    """A distinct colour for each entry in `used` (sorted), looked up for the indices h; transparent for an index
    not in `used` (e.g. the entry that only padding tokens choose, when `used` comes from the real tokens)."""
    cmap = plt.get_cmap("tab20")
    order = {int(j): i for i, j in enumerate(sorted(int(u) for u in used))}
    return [(*cmap(order[int(j)] % 20)[:3], 0.45) if int(j) in order else (0, 0, 0, 0) for j in h]


def cells(img, grid, cell=64):
    """The 64x64 pixel cells of a (resized) PIL image, row by row, as uint8 arrays (padding is black)."""
    gh, gw = grid
    canvas = np.zeros((gh * cell, gw * cell, 3), dtype=np.uint8)
    pixels = np.asarray(img)
    canvas[:pixels.shape[0], :pixels.shape[1]] = pixels
    return [canvas[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] for r in range(gh) for c in range(gw)]


def ceil_div(a, b):
    return math.ceil(a / b)


def unnormalize(image):
    """A normalised [3, H, W] image tensor back to an [H, W, 3] array in [0, 1] for imshow (padding is black)."""
    return (image * data.IMAGENET_STD + data.IMAGENET_MEAN).clamp(0, 1).permute(1, 2, 0).numpy()
