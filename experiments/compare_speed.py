"""
Speed parity with what a user would assemble instead, and the cost of exhaustive retrieval.

    python experiments/compare_speed.py                                    # batches 1 and 16 at 600x1000
    python experiments/compare_speed.py --batches 1,16 --size 600x1000,300x500 --clock cpu   # a shared CPU
    python experiments/compare_speed.py --stages fuse,vq_lookup            # only some stages
    python experiments/compare_speed.py --retrieval                        # pairs/s of evaluate.py's scoring path

Comparison (the default mode). soho's pieces against the pieces a user would glue together instead, with the
same weights on both sides:

    trunk      soho's ResNet-101 (section 3 of soho.py)     vs  torchvision.models.resnet101 without avgpool/fc
    fuse       soho's 12-layer BERT encoder (model.fuse)    vs  transformers.BertModel: its embeddings on the text,
               over 16 text + 160 visual tokens, hidden 768      concatenated with the visual tokens, its encoder
    vq_lookup  soho.vq_lookup (Eq. 2) of N tokens            vs  one [N, 768] @ [768, 2048] GEMM, its lower bound

The reference models are built with random weights (nothing is downloaded), saved to a temporary folder in their
own formats (a torchvision state dict, a Hugging Face directory from save_pretrained) and loaded into soho with
soho's own loader, SOHO.from_pretrained. Before timing, the outputs (eval) and the gradients (a training step
with dropout off) of both sides are compared: an assertion fails if they differ beyond float32 noise, and the
largest difference is printed.

Each stage is timed in eval mode (no gradients) and as a training step (forward + backward from a fixed output
gradient; BatchNorm frozen on both sides as the r101 preset trains, dropout 0.1 on both sides as BERT), at every
batch of --batches. The two sides run interleaved, one run each in turn, the order alternating every round
(A B, B A, A B, ...), so that a slow spell of a shared machine lands on both alike; the table gives the median
of --repeats rounds after --warmup untimed ones, the ratio soho / reference of the medians, and the range of the
per-round ratios (how noisy the machine was). Times are wall-clock by default; on a machine shared with other
work use --clock cpu (this process's CPU time, which the neighbours' share of the core does not inflate; the
table also gives the other clock's ratio). --size sets the trunk's image size per batch: ResNet-101 on 16
images of 600x1000 takes minutes per training step on one CPU core, so give a smaller size for batch 16. The
fuse and vq_lookup stages always use --text-tokens + --visual-tokens tokens (the paper's 16 + 160).

torchvision and transformers are optional and never runtime dependencies of this project. Without them the
script says what it needs and exits with status 0; with one of them it runs that half (and vq_lookup).
--pretend-missing torchvision,transformers makes it behave as if they were not installed (for the tests).

Retrieval (--retrieval). evaluate.py's retrieval path, timed on random weights and random images: the CNN once
per image (evaluate.image_tokens_of), then every (image, caption) pair scored by the transformer, pair_batch
pairs per forward (evaluate.score_all_pairs). For the tiny and r18 presets at three sizes each, so that the
growth with the number of images and captions shows; then r101's cost per pair at the paper's 16 + 160 tokens
(the transformer only, the CNN runs once per image) and per image (the CNN at 600x1000), and from them the
projected cost of exhaustive COCO 5K retrieval (25,000 captions x 5,000 images = 125M pairs) on this machine.

Run everything pinned to what you want measured, e.g. one core: OMP_NUM_THREADS=1 taskset -c 1 python ...
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate  # noqa: E402
import soho  # noqa: E402
import train  # noqa: E402
from soho import SOHO, vq_lookup  # noqa: E402

ORACLES = {  # package -> the stages that need it
    "torchvision": ["trunk"],
    "transformers": ["fuse"],
}
STAGES = ("trunk", "fuse", "vq_lookup")
BARS = {"trunk": 1.05, "fuse": 1.05, "vq_lookup": 1.5}  # our bars: the ratio soho / reference at most this


# ----------------------------------------------------------------------------------------------------------------
# 1. The optional reference packages
# ----------------------------------------------------------------------------------------------------------------


def find_oracles(pretend_missing=()):
    """{package: module or None}. A package named in pretend_missing counts as not installed."""
    found = {}
    for name in ORACLES:
        if name in pretend_missing:
            found[name] = None
            continue
        try:
            found[name] = importlib.import_module(name)
        except Exception:  # not installed, or installed but broken (e.g. a torchvision built for another torch)
            found[name] = None
    return found


def what_is_needed(missing):
    """The message printed when reference packages are missing."""
    stages = ", ".join(s for name in missing for s in ORACLES[name])
    return (f"compare_speed: the comparison needs {' and '.join(missing)} (for the {stages} stage(s)), "
            "optional packages that this project never needs at run time. Install them in a separate virtual "
            "environment beside this project's runtime dependencies, e.g.\n"
            "    python -m venv /tmp/oracle && /tmp/oracle/bin/pip install torch==2.13.0 transformers "
            "numpy pillow tokenizers tqdm\n"
            "(torchvision must be the build that matches the installed torch; PyPI's torchvision pairs with "
            "PyPI's torch of the same release). `--retrieval` needs neither.")


# ----------------------------------------------------------------------------------------------------------------
# 2. Interleaved timing
# ----------------------------------------------------------------------------------------------------------------


def interleaved(fns, repeats, warmup):
    """Seconds of each run of each fn in {name: fn}: warmup + repeats rounds, each runs every fn once, in an order
    that alternates every round (A B, B A, ...), so that both sides see the same drift of a shared machine.

    Two clocks per run: "wall" (time.perf_counter, what a user waits) and "cpu" (time.process_time: the CPU time of
    this process, user + system, all threads). On a machine shared with other work the wall clock also counts the
    time the scheduler gives to other processes; the CPU clock does not, so it measures the code rather than the
    neighbours (it still sees their effect on caches and memory bandwidth). Returns {clock: {name: [seconds]}}.
    """
    names = list(fns)
    times = {"wall": {name: [] for name in names}, "cpu": {name: [] for name in names}}
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            if r >= warmup:
                times["wall"][name].append(w)
                times["cpu"][name].append(c)
    return times


def ratio_summary(times, clock, a="soho", b="reference"):
    """On `clock`: median ms of both sides, the ratio of the medians and the range of the per-round ratios; and the
    ratio of the medians on the other clock, for comparison."""
    other = "cpu" if clock == "wall" else "wall"
    t = times[clock]
    per_round = [x / y for x, y in zip(t[a], t[b])]
    med = {clock_: {n: statistics.median(v) for n, v in times[clock_].items()} for clock_ in times}
    return {"clock": clock, "soho_ms": 1000 * med[clock][a], "reference_ms": 1000 * med[clock][b],
            "ratio": med[clock][a] / med[clock][b], "round_ratio_min": min(per_round),
            "round_ratio_max": max(per_round), "rounds": len(per_round),
            f"ratio_{other}": med[other][a] / med[other][b], "other_clock": other}


# ----------------------------------------------------------------------------------------------------------------
# 3. The same weights on both sides
# ----------------------------------------------------------------------------------------------------------------


def randomise_batchnorm(module, generator):
    """Give every BatchNorm random statistics and affine weights (as trained ones would have), so that the
    comparison also checks that soho loaded the running statistics, not only the convolutions."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            with torch.no_grad():
                m.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))


def freeze_batchnorm(module):
    """BatchNorm on stored statistics in training mode: what soho's r101 preset does (backbone_bn="frozen"), and
    what a user fine-tuning torchvision's ResNet on a few large images per GPU would do."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def set_dropout(soho_model, bert, p):
    """The same dropout on both transformers: soho's layers read a float, BERT's modules are nn.Dropout."""
    for layer in soho_model.transformer.layers:
        layer.dropout = p
    soho_model.transformer.text_embed.dropout.p = p
    for m in bert.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def build_models(oracles, folder):
    """The reference models with random weights, saved in their own formats under `folder`, and a SOHO at the r101
    preset loaded from those files by SOHO.from_pretrained. Returns (soho_model, tv_trunk or None, bert or None)."""
    tv_trunk = bert = None
    resnet_path = bert_dir = None
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if oracles.get("torchvision"):
        tv = oracles["torchvision"].models.resnet101(weights=None)
        randomise_batchnorm(tv, g)
        resnet_path = os.path.join(folder, "resnet101.pth")
        torch.save(tv.state_dict(), resnet_path)  # the format of torchvision's resnet101-63fe2227.pth
        tv_trunk = nn.Sequential(*list(tv.children())[:-2])  # conv1 ... layer4: no avgpool, no fc
    if oracles.get("transformers"):
        transformers = oracles["transformers"]
        config = transformers.BertConfig()  # bert-base: 12 layers, 768 wide, 12 heads, 3072, vocabulary 30522
        bert = transformers.BertModel(config)
        bert_dir = os.path.join(folder, "bert")
        with contextlib.suppress(Exception):
            transformers.utils.logging.disable_progress_bar()  # "Writing model shards" is noise in the table
        bert.save_pretrained(bert_dir)  # config.json + model.safetensors, as a Hugging Face directory
    with contextlib.redirect_stdout(sys.stderr):  # from_pretrained prints what it loaded
        model = SOHO.from_pretrained("r101", bert=bert_dir, resnet=resnet_path)
    return model, tv_trunk, bert


def hf_fuse(bert, input_ids, text_mask, visual, visual_mask):
    """The cross-modal encoder as a user would assemble it from transformers.BertModel: BERT's embeddings of the
    text, the visual tokens appended, BERT's encoder over both with the attention mask BertModel itself builds."""
    x = torch.cat([bert.embeddings(input_ids=input_ids), visual], dim=1)
    mask = torch.cat([text_mask, visual_mask], dim=1).long()
    try:
        from transformers.masking_utils import create_bidirectional_mask  # transformers >= 5
        attention_mask = create_bidirectional_mask(config=bert.config, inputs_embeds=x, attention_mask=mask)
    except ImportError:  # older transformers: BertModel.forward's own helper
        attention_mask = bert.get_extended_attention_mask(mask, x.shape[:2])
    return bert.encoder(x, attention_mask=attention_mask)[0]


def max_abs_diff(a, b):
    return (a.detach().float() - b.detach().float()).abs().max().item()


def assert_close(name, a, b, rtol=1e-4):
    """a and b equal up to float32 noise, relative to b's scale; returns (max abs diff, max abs value of b)."""
    scale = b.detach().abs().max().item()
    diff = max_abs_diff(a, b)
    assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * max(scale, 1.0)), \
        f"{name}: soho and the reference differ by {diff:.3g} (scale {scale:.3g})"
    return diff, scale


# ----------------------------------------------------------------------------------------------------------------
# 4. The stages: inputs, equality checks and the functions that are timed
# ----------------------------------------------------------------------------------------------------------------


def trunk_inputs(batch, size, generator):
    h, w = size
    return torch.randn(batch, 3, math.ceil(h / 32) * 32, math.ceil(w / 32) * 32, generator=generator)


def fuse_inputs(batch, text_tokens, visual_tokens, config, generator):
    """Random text ids and visual tokens (N(0, 1), the scale of soho's LayerNorm-ed visual tokens), all real."""
    ids = torch.randint(5, config.vocab_size, (batch, text_tokens), generator=generator)
    visual = torch.randn(batch, visual_tokens, config.hidden_size, generator=generator)
    return ids, torch.ones_like(ids, dtype=torch.bool), visual, torch.ones(batch, visual_tokens, dtype=torch.bool)


def grads_of(params):
    return [p.grad.detach().clone() for p in params]


def check_trunk(soho_trunk, tv_trunk, images):
    """Outputs in eval mode, then the gradients of a training step (frozen BatchNorm), on both sides."""
    soho_trunk.eval(), tv_trunk.eval()
    with torch.no_grad():
        out = assert_close("trunk output", soho_trunk(images), tv_trunk(images))
    soho_trunk.train(), tv_trunk.train(), freeze_batchnorm(tv_trunk)
    results = []
    for trunk in (soho_trunk, tv_trunk):
        trunk.zero_grad(set_to_none=True)
        y = trunk(images)
        y.backward(torch.ones_like(y) / y.numel())
        results.append(grads_of([trunk[0].weight if isinstance(trunk, nn.Sequential) else trunk.conv1.weight]))
    grad = assert_close("trunk conv1 gradient", results[0][0], results[1][0], rtol=1e-3)
    soho_trunk.zero_grad(set_to_none=True), tv_trunk.zero_grad(set_to_none=True)
    return {"output_max_abs_diff": out[0], "output_scale": out[1], "grad_max_abs_diff": grad[0],
            "grad_scale": grad[1]}


def check_fuse(model, bert, inputs):
    """Outputs in eval mode, then the gradients (visual tokens, first query weight) of a training step with
    dropout off (dropout draws differ between the two implementations)."""
    ids, tmask, visual, vmask = inputs
    model.eval(), bert.eval()
    with torch.no_grad():
        out = assert_close("fuse output", model.fuse(ids, tmask, visual, vmask), hf_fuse(bert, ids, tmask, visual,
                                                                                           vmask))
    model.train(), bert.train()
    set_dropout(model, bert, 0.0)
    grads = []
    for fn, query in ((lambda v: model.fuse(ids, tmask, v, vmask), model.transformer.layers[0].query.weight),
                      (lambda v: hf_fuse(bert, ids, tmask, v, vmask),
                       bert.encoder.layer[0].attention.self.query.weight)):
        v = visual.clone().requires_grad_(True)
        query.grad = None
        y = fn(v)
        y.backward(torch.ones_like(y) / y.numel())
        grads.append((v.grad, query.grad.clone()))
        query.grad = None
    g_visual = assert_close("fuse gradient (visual tokens)", grads[0][0], grads[1][0], rtol=1e-3)
    g_query = assert_close("fuse gradient (layer 0 query)", grads[0][1], grads[1][1], rtol=1e-3)
    set_dropout(model, bert, 0.1)
    model.zero_grad(set_to_none=True), bert.zero_grad(set_to_none=True)
    return {"output_max_abs_diff": out[0], "output_scale": out[1],
            "grad_max_abs_diff": max(g_visual[0], g_query[0])}


def timed_pair(soho_fn, ref_fn, mode, params, output_grad_of):
    """Two zero-argument callables, soho's and the reference's, for `mode` "eval" (no gradients) or "train"
    (forward + backward from a fixed output gradient; gradients are dropped before each run, set_to_none, as an
    optimizer's zero_grad does)."""
    def make(fn, ps):
        if mode == "eval":
            def run():
                with torch.no_grad():
                    fn()
            return run

        def run():
            for p in ps:
                p.grad = None
            y = fn()
            y.backward(output_grad_of(y))
        return run
    return {"soho": make(soho_fn, params[0]), "reference": make(ref_fn, params[1])}


def fixed_grad_cache():
    """The same output gradient for both sides of a stage (one random tensor per output shape)."""
    cache = {}

    def of(y):
        key = tuple(y.shape)
        if key not in cache:
            cache[key] = torch.randn(key, generator=torch.Generator().manual_seed(1)) / y.numel() ** 0.5
        return cache[key]
    return of


def set_mode(mode, soho_side, ref_side, trunk=False):
    for m in (soho_side, ref_side):
        m.train(mode == "train")
    if trunk and mode == "train":
        freeze_batchnorm(ref_side)  # soho's ResNet freezes its own (backbone_bn="frozen")


def compare(args, oracles):
    """Checks, then times every stage at every batch and mode. Returns the list of result rows."""
    rows, checks = [], {}
    batches, sizes = args.batches, args.sizes
    grad_of = fixed_grad_cache()
    with tempfile.TemporaryDirectory() as folder:
        model, tv_trunk, bert = build_models(oracles, folder)
    g = torch.Generator().manual_seed(0)

    if "trunk" in args.stages and tv_trunk is not None:
        soho_trunk = model.backbone
        checks["trunk"] = check_trunk(soho_trunk, tv_trunk, trunk_inputs(1, sizes[0], g))
        print(f"trunk: outputs equal, max abs diff {checks['trunk']['output_max_abs_diff']:.2e} on outputs up to "
              f"{checks['trunk']['output_scale']:.2e}; conv1 gradients max abs diff "
              f"{checks['trunk']['grad_max_abs_diff']:.2e}", flush=True)
        params = ([p for p in soho_trunk.parameters() if p.requires_grad],
                  [p for p in tv_trunk.parameters() if p.requires_grad])
        for batch, size in zip(batches, sizes):
            images = trunk_inputs(batch, size, g)
            for mode in args.modes:
                set_mode(mode, soho_trunk, tv_trunk, trunk=True)
                fns = timed_pair(lambda: soho_trunk(images), lambda: tv_trunk(images), mode, params, grad_of)
                row = {"stage": "trunk", "batch": batch, "mode": mode, "shape": f"{size[0]}x{size[1]} image",
                       **ratio_summary(interleaved(fns, args.repeats, args.warmup), args.clock)}
                rows.append(row)
                print(format_row(row), flush=True)
        del tv_trunk

    if "fuse" in args.stages and bert is not None:
        T, L = args.text_tokens, args.visual_tokens
        checks["fuse"] = check_fuse(model, bert, fuse_inputs(1, T, L, model.config, g))
        print(f"fuse: outputs equal, max abs diff {checks['fuse']['output_max_abs_diff']:.2e} on outputs up to "
              f"{checks['fuse']['output_scale']:.2e}; gradients max abs diff {checks['fuse']['grad_max_abs_diff']:.2e}"
              f"; transformers attention implementation: {bert.config._attn_implementation}", flush=True)
        params = (list(model.transformer.parameters()), list(bert.parameters()))
        for batch in batches:
            ids, tmask, visual, vmask = fuse_inputs(batch, T, L, model.config, g)
            for mode in args.modes:
                set_mode(mode, model, bert)
                v = visual.clone().requires_grad_(mode == "train")  # the CNN's gradient flows through them
                fns = timed_pair(lambda: model.fuse(ids, tmask, v, vmask), lambda: hf_fuse(bert, ids, tmask, v, vmask),
                                 mode, params, grad_of)
                row = {"stage": "fuse", "batch": batch, "mode": mode, "shape": f"{T} + {L} tokens",
                       **ratio_summary(interleaved(fns, args.repeats, args.warmup), args.clock)}
                rows.append(row)
                print(format_row(row), flush=True)

    if "vq_lookup" in args.stages:
        # Eq. 2 has no reference package: its lower bound is the one GEMM it cannot avoid, [N, c] @ [c, k]. It runs
        # under no_grad in training too, so eval is the only mode. A single call is short: `inner` back-to-back
        # calls per timed run (at least ~20 ms), the same for both sides.
        k, c = model.config.vd_size, model.config.hidden_size
        for batch in batches:
            n = batch * args.visual_tokens
            v, d = torch.randn(n, c, generator=g), torch.randn(k, c, generator=g)
            d_t = d.t().contiguous()
            h = vq_lookup(v, d)
            exact = torch.cdist(v.double(), d.double()).argmin(1)
            agree = (h == exact).float().mean().item()
            assert agree > 0.999, f"vq_lookup disagrees with the float64 nearest entry on {1 - agree:.2%} of tokens"
            t0 = time.perf_counter()
            v @ d_t
            inner = max(1, min(1000, math.ceil(0.02 / max(time.perf_counter() - t0, 1e-7))))

            def repeat(fn):
                return lambda: [fn() for _ in range(inner)]
            times = interleaved({"soho": repeat(lambda: vq_lookup(v, d)), "reference": repeat(lambda: v @ d_t)},
                                args.repeats, args.warmup)
            times = {clock: {name: [t / inner for t in ts] for name, ts in by_name.items()}
                     for clock, by_name in times.items()}
            row = {"stage": "vq_lookup", "batch": batch, "mode": "eval", "shape": f"[{n},{c}] @ [{c},{k}]",
                   **ratio_summary(times, args.clock)}
            rows.append(row)
            print(format_row(row), flush=True)
            checks.setdefault("vq_lookup", {})[f"batch {batch}"] = {"agreement_with_float64_argmin": agree}
    return rows, checks


# ----------------------------------------------------------------------------------------------------------------
# 5. Retrieval at scale: evaluate.py's scoring path, timed
# ----------------------------------------------------------------------------------------------------------------


class RandomImages(torch.utils.data.Dataset):
    """n random images of one size, in the item and batch format that evaluate.image_tokens_of reads."""

    def __init__(self, n, size, seed=0):
        self.images, self.mask = data.random_images(n, size, torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.mask[i], "index": i}

    @staticmethod
    def collate(items):
        return {"images": torch.stack([x["image"] for x in items]),
                "image_mask": torch.stack([x["mask"] for x in items]),
                "image_index": torch.tensor([x["index"] for x in items])}


def cpu_context():
    """The train.Context that evaluate.py's functions take: this process, the CPU, fp32. rank=1 only turns off
    their progress bars (rank 0 draws them); nothing else in image_tokens_of or score_all_pairs reads the rank."""
    return train.Context(rank=1, world_size=1, local_rank=0, device=torch.device("cpu"), amp="off")


def time_retrieval(model, n_images, n_texts, size, text_tokens, pair_batch, seed=0):
    """One exhaustive retrieval over random images and captions, through evaluate.py's own functions.
    Returns seconds for the CNN (once per image) and for scoring all pairs, and the pair count."""
    cfg = model.config
    images = RandomImages(n_images, size, seed)
    ids = torch.randint(5, cfg.vocab_size, (n_texts, text_tokens), generator=torch.Generator().manual_seed(seed))
    text_mask = torch.ones_like(ids, dtype=torch.bool)
    # evaluate.py's defaults on CPU: 16 images per CNN forward; workers=0 keeps everything on this one process.
    args, ctx = SimpleNamespace(batch_size=16, workers=0), cpu_context()
    t0, c0 = time.perf_counter(), time.process_time()
    visual, valid = evaluate.image_tokens_of(model, images, list(range(n_images)), args, ctx)
    t1, c1 = time.perf_counter(), time.process_time()
    scores = evaluate.score_all_pairs(model, visual, valid, ids, text_mask, pair_batch, ctx)
    t2, c2 = time.perf_counter(), time.process_time()
    assert scores.shape == (n_images, n_texts) and torch.isfinite(scores).all()
    pairs = n_images * n_texts
    return {"images": n_images, "texts": n_texts, "pairs": pairs, "visual_tokens": visual.shape[1],
            "cnn_s": t1 - t0, "pairs_s": t2 - t1, "pairs_per_s": pairs / (t2 - t1),
            "ms_per_pair": 1000 * (t2 - t1) / pairs, "cnn_ms_per_image": 1000 * (t1 - t0) / n_images,
            "cnn_cpu_s": c1 - c0, "pairs_cpu_s": c2 - c1, "pairs_per_cpu_s": pairs / (c2 - c1)}


def text_embedding_share(model, text_tokens, visual_tokens, pairs, repeats=3):
    """evaluate.score_all_pairs recomputes each caption's input embedding (word + position + LayerNorm) for every
    pair it is scored with, inside model.fuse; the rest of the transformer mixes text and image and cannot be
    shared. This measures what that recomputation costs: text_embed of `pairs` captions over fuse of `pairs` pairs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (pairs, text_tokens), generator=g)
    tmask = torch.ones_like(ids, dtype=torch.bool)
    visual = torch.randn(pairs, visual_tokens, model.config.hidden_size, generator=g)
    vmask = torch.ones(pairs, visual_tokens, dtype=torch.bool)
    with torch.no_grad():
        times = interleaved({"embed": lambda: model.transformer.text_embed(ids),
                             "fuse": lambda: model.fuse(ids, tmask, visual, vmask)}, repeats, 1)
    return statistics.median(times["cpu"]["embed"]) / statistics.median(times["cpu"]["fuse"])


def retrieval(args):
    """Pairs per second at a few sizes for the tiny and r18 presets, r101's per-pair and per-image cost, and the
    projected cost of exhaustive COCO 5K retrieval at r101."""
    rows = []
    for preset, sizes in (("tiny", args.tiny_sizes), ("r18", args.r18_sizes)):
        torch.manual_seed(0)
        model = SOHO(soho.config_from_preset(preset)).eval()
        size = (model.config.image_short, model.config.image_long)
        for n_images, n_texts in sizes:
            row = {"preset": preset, "size": f"{size[0]}x{size[1]}",
                   **time_retrieval(model, n_images, n_texts, size, args.text_tokens, args.pair_batch)}
            rows.append(row)
            print(format_retrieval_row(row), flush=True)
        del model

    # r101 at the paper's sizes. Per pair: the transformer over 16 + 160 tokens, through score_all_pairs on
    # precomputed visual tokens (the CNN is not part of the per-pair cost). Per image: the CNN at 600x1000.
    torch.manual_seed(0)
    model = SOHO(soho.config_from_preset("r101")).eval()
    cfg = model.config
    n_img, n_txt = args.r101_pairs
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(n_img, args.visual_tokens, cfg.hidden_size, generator=g)
    valid = torch.ones(n_img, args.visual_tokens, dtype=torch.bool)
    ids = torch.randint(5, cfg.vocab_size, (n_txt, args.text_tokens), generator=g)
    tmask = torch.ones_like(ids, dtype=torch.bool)
    per_pair, per_pair_cpu = [], []
    for _ in range(args.r101_repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate.score_all_pairs(model, visual, valid, ids, tmask, args.pair_batch, cpu_context())
        per_pair.append((time.perf_counter() - t0) / (n_img * n_txt))
        per_pair_cpu.append((time.process_time() - c0) / (n_img * n_txt))
    s_pair = statistics.median(per_pair)
    images, mask = data.random_images(1, (cfg.image_short, cfg.image_long), g)
    with torch.no_grad():
        model.image_tokens(images, mask)  # warm-up
        per_image, per_image_cpu = [], []
        for _ in range(args.r101_repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            model.image_tokens(images, mask)
            per_image.append(time.perf_counter() - t0)
            per_image_cpu.append(time.process_time() - c0)
    s_image = statistics.median(per_image)
    share = text_embedding_share(model, args.text_tokens, args.visual_tokens, min(16, args.pair_batch))
    coco_pairs, coco_images = 25_000 * 5_000, 5_000
    projection = {"preset": "r101", "pairs_measured": n_img * n_txt, "pair_batch": args.pair_batch,
                  "repeats": args.r101_repeats, "s_per_pair": s_pair, "s_per_image_cnn": s_image,
                  "cpu_s_per_pair": statistics.median(per_pair_cpu),
                  "cpu_s_per_image_cnn": statistics.median(per_image_cpu),
                  "text_embedding_share_of_pair": share, "coco5k_pairs": coco_pairs,
                  "coco5k_transformer_s": coco_pairs * s_pair, "coco5k_cnn_s": coco_images * s_image}
    projection["coco5k_total_s"] = projection["coco5k_transformer_s"] + projection["coco5k_cnn_s"]
    return rows, projection


# ----------------------------------------------------------------------------------------------------------------
# 6. Tables
# ----------------------------------------------------------------------------------------------------------------

HEADER = (f"{'stage':<10} {'batch':>5} {'mode':<5} {'shape':<24} {'soho ms':>10} {'reference ms':>12} "
          f"{'ratio':>6} {'round ratios':>13} {'other clock':>11}  bar")


def format_row(r):
    bar = BARS[r["stage"]]
    verdict = "ok" if r["ratio"] <= bar else f"ABOVE {bar}"
    other = r["other_clock"]
    return (f"{r['stage']:<10} {r['batch']:>5} {r['mode']:<5} {r['shape']:<24} {r['soho_ms']:>10.2f} "
            f"{r['reference_ms']:>12.2f} {r['ratio']:>6.3f} {r['round_ratio_min']:>6.2f}-{r['round_ratio_max']:<6.2f}"
            f" {other:>4} {r['ratio_' + other]:>6.3f}  <= {bar}: {verdict}")


RETRIEVAL_HEADER = (f"{'preset':<6} {'image':<9} {'images':>6} {'captions':>8} {'pairs':>8} {'tokens':>6} "
                    f"{'CNN s':>8} {'pairs s':>9} {'pairs/s':>9} {'ms/pair':>9} {'pairs/cpu-s':>11}")


def format_retrieval_row(r):
    return (f"{r['preset']:<6} {r['size']:<9} {r['images']:>6} {r['texts']:>8} {r['pairs']:>8} "
            f"{r['visual_tokens']:>6} {r['cnn_s']:>8.2f} {r['pairs_s']:>9.2f} {r['pairs_per_s']:>9.1f} "
            f"{r['ms_per_pair']:>9.3f} {r['pairs_per_cpu_s']:>11.1f}")


def human_seconds(s):
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    if s < 2 * 365 * 86400:
        return f"{s / 86400:.1f} days"
    return f"{s / (365 * 86400):.1f} years"


def format_projection(p):
    return (f"r101 at the paper's sizes on this machine: {1000 * p['s_per_pair']:.1f} ms per pair (transformer over "
            f"16 + 160 tokens, median of {p['repeats']} runs of {p['pairs_measured']} pairs, pair_batch "
            f"{p['pair_batch']}), {1000 * p['s_per_image_cnn']:.0f} ms per image (CNN at 600x1000, once per "
            f"image; CPU clock: {1000 * p['cpu_s_per_pair']:.1f} ms and {1000 * p['cpu_s_per_image_cnn']:.0f} ms); "
            f"re-embedding each caption for every pair costs {100 * p['text_embedding_share_of_pair']:.2f}% "
            f"of a pair\nexhaustive COCO 5K (25,000 captions x 5,000 images = {p['coco5k_pairs'] / 1e6:.0f}M pairs) "
            f"projected: transformer {human_seconds(p['coco5k_transformer_s'])}, CNN "
            f"{human_seconds(p['coco5k_cnn_s'])}, in all {human_seconds(p['coco5k_total_s'])} "
            f"({p['coco5k_total_s']:.3g} s)")


# ----------------------------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_sizes(text, n):
    sizes = [evaluate.parse_size(s) for s in text.split(",")]
    if len(sizes) == 1:
        sizes = sizes * n
    if len(sizes) != n:
        raise SystemExit(f"--size: give one size, or one per batch of --batches ({n})")
    return sizes


def parse_grid(text):
    """'25x125,50x250' -> [(25, 125), (50, 250)]: images x captions."""
    return [evaluate.parse_size(s) for s in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16", help="batches to time (comma-separated)")
    p.add_argument("--size", default="600x1000", help="trunk image HEIGHTxWIDTH: one, or one per batch")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="the clock of the table's times and ratios: wall (perf_counter) or cpu (process_time, "
                   "for a machine shared with other work); the other clock's ratio is shown beside")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ", ".join(STAGES))
    p.add_argument("--modes", default="eval,train", help="eval, train (forward + backward) or both")
    p.add_argument("--text-tokens", type=int, default=16, help="text tokens of fuse (the paper pads to 16)")
    p.add_argument("--visual-tokens", type=int, default=160, help="visual tokens of fuse and vq_lookup (the "
                   "paper's 10 x 16 at 600x1000)")
    p.add_argument("--pretend-missing", default="", help="act as if these packages were not installed "
                   "(comma-separated: torchvision, transformers)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--retrieval", action="store_true", help="time evaluate.py's retrieval path instead")
    p.add_argument("--tiny-sizes", default="25x125,50x250,100x500", help="retrieval: images x captions, tiny")
    p.add_argument("--r18-sizes", default="2x10,4x20,8x40", help="retrieval: images x captions, r18")
    p.add_argument("--r101-pairs", default="2x8", help="retrieval: images x captions timed at r101")
    p.add_argument("--r101-repeats", type=int, default=3, help="retrieval: runs of the r101 measurements")
    p.add_argument("--pair-batch", type=int, default=256, help="retrieval: pairs per transformer forward "
                   "(evaluate.py's default on CPU)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sizes = parse_sizes(args.size, len(args.batches))
    args.stages = [s for s in args.stages.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.stages) - set(STAGES)) + sorted(set(args.modes) - {"eval", "train"})
    if unknown:
        raise SystemExit(f"unknown stage(s) or mode(s): {unknown}")
    args.pretend_missing = [s for s in args.pretend_missing.split(",") if s]
    args.tiny_sizes, args.r18_sizes = parse_grid(args.tiny_sizes), parse_grid(args.r18_sizes)
    args.r101_pairs = evaluate.parse_size(args.r101_pairs)
    return args


def environment(oracles):
    versions = {name: getattr(m, "__version__", "?") if m else "missing" for name, m in oracles.items()}
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU {platform.processor() or '?'} "
            f"({torch.backends.cpu.get_cpu_capability()}), " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    if args.retrieval:
        print(f"retrieval through evaluate.py (image_tokens_of, score_all_pairs), random weights and inputs, eval, "
              f"fp32, pair_batch {args.pair_batch}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
        print(RETRIEVAL_HEADER, flush=True)
        rows, projection = retrieval(args)
        print(format_projection(projection))
        result = {"mode": "retrieval", "rows": rows, "r101": projection}
    else:
        oracles = find_oracles(args.pretend_missing)
        blocked = [s for s in args.stages for name in ORACLES if s in ORACLES[name] and oracles[name] is None]
        compared = [s for s in args.stages if s != "vq_lookup"]
        if compared and set(compared) <= set(blocked):
            print(what_is_needed([name for name, m in oracles.items() if m is None]))
            return 0
        if blocked:
            print(f"skipped: the {', '.join(blocked)} stage(s): "
                  f"{', '.join(n for n in ORACLES if set(ORACLES[n]) & set(blocked))} not installed")
            args.stages = [s for s in args.stages if s not in blocked]
        print(f"compare: soho / reference, {args.clock} clock, median of {args.repeats} interleaved rounds after "
              f"{args.warmup} warm-up; "
              f"{environment(oracles)}")
        print(HEADER, flush=True)
        rows, checks = compare(args, oracles)
        result = {"mode": "compare", "rows": rows, "checks": checks, "environment": environment(oracles)}
        above = [r for r in rows if r["ratio"] > BARS[r["stage"]]]
        print(f"{len(rows)} ratio(s), {len(above)} above the bar" +
              "".join(f"\n  above: {r['stage']} batch {r['batch']} {r['mode']}: {r['ratio']:.3f}" for r in above))
    print(f"done in {time.time() - started:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
