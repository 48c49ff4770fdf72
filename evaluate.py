"""
Evaluate SOHO: the four downstream tasks of Sec. 4.2 with the official metrics, the inference time of Sec. 4.5,
and pictures of the visual dictionary (Sec. 4.4, Fig. 3).

    python evaluate.py --task retrieval                      # runs/retrieval/ckpt.pt on its test split
    python evaluate.py --task retrieval --max-images 100     # a quick look at a subset
    python evaluate.py --task vqa --split test-dev           # writes the test-server submission file
    python evaluate.py --task nlvr2 --split test1            # also the official scorer's predictions CSV
    python evaluate.py --task snli-ve --split test
    python evaluate.py --task itm                            # pre-training's ITM on held-out images
    torchrun --nproc_per_node 8 evaluate.py --task retrieval --checkpoint runs/retrieval/ckpt.pt --data DIR
    python evaluate.py --task speed --preset r101 --size 600x1000      # random weights are fine for timing
    python evaluate.py --task vd --checkpoint runs/pretrain/ckpt.pt    # PNGs of the visual dictionary

Without --checkpoint a task takes the latest run of its default folder (runs/<task>/ckpt.pt; runs/pretrain for
vd), or says which train.py command makes one. Results are printed as a table and written as JSON beside the
checkpoint (or into --out).

Under torchrun every rank takes every world_size-th example (indices[rank::world_size]: unlike DistributedSampler
this never pads with repeated examples), and rank 0 gathers the per-example results with their indices and checks
that each example was counted exactly once.

One thing to know when comparing runs: an image's CNN features depend (slightly) on the zero padding of its batch,
as they did in training (a padded pixel is 0 where the convolutions' own padding would be, but BatchNorm shifts
it, and the receptive fields of border tokens reach it). Numbers can therefore move in the last digits with the
batch size or the number of ranks; --batch-size 1 makes every image's features independent of its neighbours.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
import soho
import synthetic
import train
from soho import SOHO, vd_embed, vq_lookup

EVALUATIONS = (*soho.TASKS[1:], "itm", "speed", "vd")  # the four downstream tasks, held-out ITM, speed, VD pictures
DEFAULT_SPLIT = {"retrieval": "test", "vqa": "val", "nlvr2": "dev", "snli-ve": "test", "vd": "val", "itm": "val"}
RUN_OF_TASK = {"retrieval": "retrieval", "vqa": "vqa", "nlvr2": "nlvr2", "snli-ve": "snli-ve", "vd": "pretrain",
               "speed": "pretrain", "itm": "pretrain"}
SNLI_VE_CLASSES = sorted(data.SNLI_VE_LABELS, key=data.SNLI_VE_LABELS.get)  # index = class id

# ----------------------------------------------------------------------------------------------------------------
# 1. Metrics: plain functions of scores and labels, no model (the official definitions of each data set)
# ----------------------------------------------------------------------------------------------------------------


def retrieval_metrics(scores, txt2img):
    """TR and IR recall at 1, 5 and 10, in percent, of a full score matrix.

    scores:  [n_images, n_texts], higher = better match (a tensor or array)
    txt2img: [n_texts], txt2img[t] = the image of text t. An image may have any number of texts: the 5-caption
             cut of the protocol is made by data.py (RetrievalTextDataset keeps the first 5), not here.
    returns  {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"}

    TR (image -> text): an image counts at K if one of its texts is among the K best of all texts.
    IR (text -> image): a text counts at K if its image is among the K best of all images.

    Ties are broken against the ground truth: a ground truth is within the top K only when fewer than K *wrong*
    candidates score at least as high as it (for TR, as the best of the image's texts). The result does not depend
    on the order of the candidates, and a model that gives every pair the same score gets R@K = 0 (with at least
    K wrong candidates), never 100: the pessimistic choice, so a degenerate model cannot look good. The usual
    argsort-based code breaks ties by position instead; with real-valued scores ties are rare and both agree.
    Images without any text are left out of TR.
    """
    scores = torch.as_tensor(scores)
    scores = scores if scores.is_floating_point() else scores.double()
    txt2img = torch.as_tensor(txt2img, dtype=torch.long, device=scores.device)
    n_images, n_texts = scores.shape
    if txt2img.shape != (n_texts,):
        raise ValueError(f"txt2img has shape {tuple(txt2img.shape)}, expected ({n_texts},) for scores "
                         f"{tuple(scores.shape)}")
    if n_texts and (int(txt2img.min()) < 0 or int(txt2img.max()) >= n_images):
        raise ValueError(f"txt2img holds image indices outside [0, {n_images})")
    if not torch.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    chunk = 512  # rows or columns at a time: a COCO 5K matrix is 5,000 x 25,000; its boolean copies stay small

    # IR: for each text, the number of wrong images that score at least as high as its own image
    ir_rank = torch.empty(n_texts, dtype=torch.long)
    for s in range(0, n_texts, chunk):
        block = scores[:, s:s + chunk]  # [n_images, b]
        own = block[txt2img[s:s + chunk], torch.arange(block.shape[1], device=scores.device)]  # [b]
        ir_rank[s:s + chunk] = ((block >= own[None, :]).sum(0) - 1).cpu()  # minus the ground truth itself

    # TR: for each image, the number of texts of other images that score at least as high as its best own text
    tr_rank = []
    for s in range(0, n_images, chunk):
        block = scores[s:s + chunk]  # [b, n_texts]
        rows = torch.arange(s, s + block.shape[0], device=scores.device)
        own = txt2img[None, :] == rows[:, None]  # [b, n_texts]
        best_own = block.masked_fill(~own, -math.inf).amax(dim=1)  # [b]
        rank = ((block >= best_own[:, None]) & ~own).sum(1)  # [b]
        tr_rank.append(rank[own.any(dim=1)].cpu())
    tr_rank = torch.cat(tr_rank) if tr_rank else torch.empty(0, dtype=torch.long)

    out = {}
    for name, rank in (("tr", tr_rank), ("ir", ir_rank)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * (rank < k).double().mean().item() if len(rank) else float("nan")
    return out


def retrieval_fold_metrics(scores, txt2img, fold_size=1000):
    """COCO 1K: split the images into consecutive folds of fold_size (each with its own texts), compute
    retrieval_metrics in each fold, and return the mean over the folds (and "folds": their number)."""
    scores = torch.as_tensor(scores)
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    n_folds = scores.shape[0] // fold_size
    per_fold = []
    for f in range(n_folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        texts = ((txt2img >= lo) & (txt2img < hi)).nonzero().flatten()
        per_fold.append(retrieval_metrics(scores[lo:hi][:, texts], txt2img[texts] - lo))
    out = {k: sum(m[k] for m in per_fold) / n_folds for k in per_fold[0]} if per_fold else {}
    out["folds"] = n_folds
    return out


def vqa_accuracy(prediction, answers):
    """The official VQA accuracy of one predicted answer against the (10) human answers, in [0, 1].

    As the current official evaluator: tabs and newlines become spaces and everything is stripped; only when the
    human answers are not all identical are they and the prediction normalised (punctuation, lower case, number
    words to digits, articles, contractions: data.normalize_answer). Then for each human answer i,
    acc_i = min(1, #(other answers equal to the prediction) / 3), and the result is the mean over i. So
    1, 2, 3, 4+ matching answers of 10 give 0.3, 0.6, 0.9, 1.0.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs the human answers (test splits have none: write a submission file)")
    clean = lambda s: s.replace("\n", " ").replace("\t", " ").strip()
    prediction, answers = clean(prediction), [clean(a) for a in answers]
    if len(set(answers)) > 1:
        prediction, answers = data.normalize_answer(prediction), [data.normalize_answer(a) for a in answers]
    per_answer = []
    for i in range(len(answers)):
        matches = sum(a == prediction for j, a in enumerate(answers) if j != i)
        per_answer.append(min(1.0, matches / 3.0))
    return sum(per_answer) / len(per_answer)


def vqa_summary(accuracies, answer_types):
    """Overall and per-answer-type VQA accuracy in percent (means over questions), with question counts."""
    by_type = defaultdict(list)
    for acc, t in zip(accuracies, answer_types):
        by_type[t].append(acc)
    out = {"overall": 100.0 * sum(accuracies) / max(len(accuracies), 1), "questions": len(accuracies)}
    for t in data.VQA_ANSWER_TYPES:
        if by_type.get(t):
            out[t] = 100.0 * sum(by_type[t]) / len(by_type[t])
    out["questions_per_type"] = {t: len(v) for t, v in sorted(by_type.items())}
    return out


def nlvr2_sentence_group(identifier):
    """'dev-850-0-1' (split-set-pair-sentence) -> 'dev-850-1': the identifier with the pair field removed. The
    examples of one group share a sentence and differ in their image pair."""
    parts = identifier.split("-")
    if len(parts) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r}: expected split-set-pair-sentence")
    return "-".join(parts[:2] + parts[3:])


def nlvr2_metrics(identifiers, correct):
    """NLVR2 accuracy and consistency, in percent. correct[i] says whether example identifiers[i] was right;
    consistency = the fraction of sentence groups in which every example is right."""
    groups = defaultdict(list)
    for identifier, ok in zip(identifiers, correct):
        groups[nlvr2_sentence_group(identifier)].append(bool(ok))
    n = max(len(identifiers), 1)
    return {"accuracy": 100.0 * sum(bool(c) for c in correct) / n,
            "consistency": 100.0 * sum(all(g) for g in groups.values()) / max(len(groups), 1),
            "examples": len(identifiers), "groups": len(groups)}


def classification_metrics(predictions, labels, class_names):
    """Accuracy overall and per true class, in percent (SNLI-VE: entailment / neutral / contradiction)."""
    predictions, labels = list(predictions), list(labels)
    out = {"accuracy": 100.0 * sum(p == y for p, y in zip(predictions, labels)) / max(len(labels), 1),
           "examples": len(labels)}
    for c, name in enumerate(class_names):
        hits = [p == y for p, y in zip(predictions, labels) if y == c]
        out[name] = 100.0 * sum(hits) / len(hits) if hits else float("nan")
    out["examples_per_class"] = {name: sum(y == c for y in labels) for c, name in enumerate(class_names)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. Sharding and gathering: each example on exactly one rank, counted once on rank 0
# ----------------------------------------------------------------------------------------------------------------


def shard(n, rank, world_size):
    """This rank's example indices: every world_size-th from `rank`. DistributedSampler would pad the last round
    with repeated examples, which an evaluation must not count twice."""
    return list(range(rank, n, world_size))


def gather_to_rank0(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def merge_examples(parts, n_expected):
    """Per-example results of all ranks (lists of dicts with an "index") -> one list sorted by index.

    Checks that every example 0..n_expected-1 is there exactly once: a padding sampler or a lost batch would
    otherwise change the numbers without a word.
    """
    by_index = {}
    for part in parts:
        for r in part:
            if r["index"] in by_index:
                raise RuntimeError(f"example {r['index']} was evaluated twice")
            by_index[r["index"]] = r
    missing = sorted(set(range(n_expected)) - set(by_index))
    if missing:
        raise RuntimeError(f"{len(missing)} examples were not evaluated, e.g. {missing[:5]}")
    return [by_index[i] for i in range(n_expected)]


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# 3. Checkpoints, data and batches
# ----------------------------------------------------------------------------------------------------------------


def train_command(run):
    if run == "pretrain":
        return "python train.py --task pretrain"
    return f"python train.py --task {run} --init runs/pretrain/ckpt.pt"


def resolve_checkpoint(task, path):
    """The checkpoint file to evaluate: `path` (a file, or a run folder holding ckpt.pt), or, for "default",
    the task's default run folder."""
    if path and path != "default":
        return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    run = RUN_OF_TASK[task]
    default = os.path.join("runs", run, "ckpt.pt")
    if not os.path.isfile(default):
        raise SystemExit(f"no checkpoint given and none at {default}; make one with\n  {train_command(run)}\n"
                         f"or pass --checkpoint PATH")
    return default


def refuse_trained_split(ckpt, path, task, split):
    """Never score examples the model trained on: stop when the checkpoint's training split holds `split`."""
    trained = (ckpt.get("train_config") or {}).get("train_split", "train")
    if split in data.TRAINED_ON.get((task, trained), ()):
        raise SystemExit(f"{path} was trained on the {task} split {trained!r}, which holds {split!r}: its score "
                         f"there would measure memory, not generalisation. Evaluate a model trained with "
                         f"--train_split=train, or use this one for the test server (--split test-dev / test)")


def data_root_of(args, ckpt):
    """--data, else the checkpoint's data root, else the synthetic world (written once if missing)."""
    root = args.data or (ckpt or {}).get("data_root") or synthetic.default_data_root()
    if os.path.abspath(root) == os.path.abspath(synthetic.default_data_root()):
        synthetic.ensure_synthetic_world(root)
    elif not os.path.isdir(root):
        given = "--data" if args.data else "the checkpoint's data folder"
        raise SystemExit(f"{given} {root} does not exist (expected a folder in the layout of data.py's docstring"
                         + ("" if args.data else "; pass --data DIR") + ")")
    return root


def tokenizer_of(ckpt, cfg, data_root):
    vocab = ckpt.get("vocab_path") or os.path.join(data_root, "vocab.txt")
    return data.Tokenizer.from_vocab(vocab, cfg.max_text_len)


def eval_loader(dataset, indices, batch_size, workers, collate=None):
    """Batches of dataset[indices] in this order, nothing dropped, nothing repeated. The loader draws its workers'
    seeds from a generator of its own, not the global one: train.py evaluates mid-run, and a resumed run must
    continue from the same random state as a straight one."""
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate or dataset.collate, drop_last=False, generator=torch.Generator())


def synchronize(device):
    """Wait for the accelerator's queued work (timings would measure launches, not work)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# 4. Retrieval: the CNN once per image, the transformer over every (image, text) pair
# ----------------------------------------------------------------------------------------------------------------


def compact_visual_tokens(visual, valid):
    """Move each image's valid tokens to the front and cut the columns that are padding in every image.

    Why: an image's tokens then do not depend on the size of the largest image in its batch, so images of
    different batches stack into one tensor, and the transformer spends nothing on padding. The transformer is
    exactly as before: the 2-D position is already added to each token, attention ignores order, and masked
    tokens are never attended to.
    """
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # valid first, in grid order
    visual = visual.gather(1, order[..., None].expand_as(visual))
    valid = valid.gather(1, order)
    keep = max(int(valid.sum(1).max()), 1)
    return visual[:, :keep], valid[:, :keep]


def pad_and_stack(tensors, length):
    """[b_i, L_i, ...] tensors -> one [sum b_i, length, ...] tensor, zero (False) past each L_i."""
    first = tensors[0]
    out = first.new_zeros((sum(t.shape[0] for t in tensors), length, *first.shape[2:]))
    row = 0
    for t in tensors:
        out[row:row + t.shape[0], :t.shape[1]] = t
        row += t.shape[0]
    return out


@torch.no_grad()
def image_tokens_of(model, dataset, indices, args, ctx):
    """Visual tokens of dataset[indices] (the CNN runs once per image): visual [n, L, H] float32, valid [n, L]."""
    visual, valid, seen = [], [], []
    loader = eval_loader(dataset, indices, args.batch_size, args.workers)
    for batch in tqdm(loader, desc="images (CNN)", disable=ctx.rank != 0, dynamic_ncols=True):
        with train.autocast_context(ctx.device, ctx.amp):
            v, m = model.image_tokens(batch["images"].to(ctx.device), batch["image_mask"].to(ctx.device))
        v, m = compact_visual_tokens(v.float(), m)
        visual.append(v)
        valid.append(m)
        seen += batch["image_index"].tolist()
    assert seen == list(indices), "the image loader must keep the order of the indices"
    if not visual:
        H = model.config.hidden_size
        return torch.zeros(0, 1, H, device=ctx.device), torch.zeros(0, 1, dtype=torch.bool, device=ctx.device)
    L = max(v.shape[1] for v in visual)
    return pad_and_stack(visual, L), pad_and_stack(valid, L)


@torch.no_grad()
def score_all_pairs(model, visual, valid, input_ids, text_mask, pair_batch, ctx):
    """ITM score (log p(match)) of every (image row, text row) pair: [n_images, n_texts] float32 on ctx.device.

    Pairs are enumerated image-major and scored pair_batch at a time, whatever the number of texts per image,
    so the transformer always sees large batches.
    """
    n_img, n_txt = visual.shape[0], input_ids.shape[0]
    total = n_img * n_txt
    scores = torch.empty(total, device=ctx.device)
    bar = tqdm(total=total, desc="pairs (transformer)", unit="pair", unit_scale=True, disable=ctx.rank != 0,
               dynamic_ncols=True)
    for start in range(0, total, pair_batch):
        flat = torch.arange(start, min(start + pair_batch, total), device=ctx.device)
        i, t = flat // n_txt, flat % n_txt
        with train.autocast_context(ctx.device, ctx.amp):
            scores[start:start + len(flat)] = model.itm_scores(visual[i], valid[i], input_ids[t], text_mask[t])
        bar.update(len(flat))
    bar.close()
    return scores.view(n_img, n_txt)


def evaluate_retrieval(model, ckpt, args, ctx):
    """TR/IR R@1,5,10 on COCO (5K and 1K folds) or Flickr30K (1K) test images and their first 5 captions."""
    cfg = model.config
    data_root = data_root_of(args, ckpt)
    source = args.source or ckpt.get("retrieval_source") or "coco"
    dataset = data.build_dataset("retrieval", args.split, data_root, tokenizer_of(ckpt, cfg, data_root), cfg,
                                 source=source)
    n_images = len(dataset) if not args.max_images else min(args.max_images, len(dataset))
    txt2img_all = torch.as_tensor(dataset.txt2img)
    text_indices = (txt2img_all < n_images).nonzero().flatten().tolist()  # the captions of the kept images
    texts = dataset.texts.collate([dataset.texts[k] for k in text_indices])  # every rank needs every text
    input_ids, text_mask = texts["input_ids"].to(ctx.device), texts["text_mask"].to(ctx.device)
    txt2img = texts["txt2img"]
    n_texts = len(text_indices)

    mine = shard(n_images, ctx.rank, ctx.world_size)
    barrier()
    t0 = time.time()
    visual, valid = image_tokens_of(model, dataset, mine, args, ctx)
    synchronize(ctx.device)
    t1 = time.time()
    scores = score_all_pairs(model, visual, valid, input_ids, text_mask, args.pair_batch, ctx)
    parts = gather_to_rank0({"index": mine, "scores": scores.cpu().numpy()})
    t2 = time.time()
    if ctx.rank != 0:
        return None

    full = np.full((n_images, n_texts), np.nan, dtype=np.float32)
    counted = np.zeros(n_images, dtype=np.int64)
    for part in parts:
        full[part["index"]] = part["scores"]
        counted[part["index"]] += 1
    if not (counted == 1).all():
        raise RuntimeError(f"images scored {counted.min()}..{counted.max()} times; every image must be scored once")
    name = {"coco": "COCO", "flickr30k": "Flickr30K"}.get(source, source)
    size = f"{n_images // 1000}K" if n_images % 1000 == 0 else f"{n_images} images"
    metrics = {f"{name} {size}": retrieval_metrics(full, txt2img)}
    if source == "coco" and n_images >= 2000 and n_images % 1000 == 0:
        metrics[f"{name} 1K (mean of {n_images // 1000} folds)"] = retrieval_fold_metrics(full, txt2img, 1000)
    result = {
        "task": "retrieval", "source": source, "split": args.split, "images": n_images, "texts": n_texts,
        "pairs_scored": n_images * n_texts, "seconds_cnn": t1 - t0, "seconds_pairs": t2 - t1,
        "pairs_per_second": n_images * n_texts / max(t2 - t1, 1e-9), "world_size": ctx.world_size, "amp": ctx.amp,
        "tie_rule": "ties are broken against the ground truth", "metrics": metrics,
    }
    if args.save_scores:
        result["_scores"] = (full, txt2img.numpy())
    return result


# ----------------------------------------------------------------------------------------------------------------
# 5. VQA, NLVR2, SNLI-VE: one logit vector per example
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, task, dataset, indices, args, ctx):
    """Yield (dataset indices, batch, logits [b, classes] float32 on CPU) over dataset[indices]."""
    loader = eval_loader(dataset, indices, args.batch_size, args.workers)
    pos = 0
    for batch in tqdm(loader, desc=task, disable=ctx.rank != 0, dynamic_ncols=True):
        if batch.get("skipped"):
            raise RuntimeError("an image could not be read; evaluation needs every example")
        n = batch["input_ids"].shape[0]
        with train.autocast_context(ctx.device, ctx.amp):
            logits = model.task_logits(task, train.to_device(batch, ctx.device))
        yield indices[pos:pos + n], batch, logits.float().cpu()
        pos += n


def answer_vocabulary_of(ckpt, cfg, data_root):
    """The VQA answers of the model's classes: the checkpoint's list (index = class id), else rebuilt from the
    annotations as train.py builds it."""
    answers = ckpt.get("answers")
    answers = list(answers) if answers is not None else data.build_vqa_answer_vocab(data_root)
    if len(answers) != cfg.num_answers or not all(isinstance(a, str) for a in answers):
        raise SystemExit(f"the checkpoint's answer list ({len(answers)} entries) does not fit the VQA head "
                         f"({cfg.num_answers} classes)")
    return answers


def evaluate_classification(model, ckpt, args, ctx):
    """VQA (accuracy overall / per answer type, answers file), NLVR2 (accuracy, consistency), SNLI-VE (accuracy,
    per class)."""
    task, cfg = args.task, model.config
    data_root = data_root_of(args, ckpt)
    opts = {}
    if task == "vqa":
        answers = answer_vocabulary_of(ckpt, cfg, data_root)
        opts["answer_vocab"] = answers
    dataset = data.build_dataset(task, args.split, data_root, tokenizer_of(ckpt, cfg, data_root), cfg, **opts)
    n = len(dataset) if not args.max_examples else min(args.max_examples, len(dataset))
    mine = shard(n, ctx.rank, ctx.world_size)

    barrier()
    t0 = time.time()
    rows = []
    for idx, batch, logits in predict(model, task, dataset, mine, args, ctx):
        pred = logits.argmax(-1).tolist()
        for k, i in enumerate(idx):
            if task == "vqa":
                answer, human = answers[pred[k]], batch["answers"][k]
                rows.append({"index": i, "question_id": int(batch["question_id"][k]), "answer": answer,
                             "answer_type": batch["answer_type"][k],
                             "accuracy": vqa_accuracy(answer, human) if human else None})
            elif task == "nlvr2":
                rows.append({"index": i, "identifier": batch["identifier"][k], "prediction": pred[k],
                             "label": int(batch["labels"][k])})
            else:
                rows.append({"index": i, "pair_id": batch["pair_id"][k], "prediction": pred[k],
                             "label": int(batch["labels"][k])})
    parts = gather_to_rank0(rows)
    seconds = time.time() - t0
    if ctx.rank != 0:
        return None
    rows = merge_examples(parts, n)
    result = {"task": task, "split": args.split, "examples": n, "of_split": len(dataset), "seconds": seconds,
              "world_size": ctx.world_size, "amp": ctx.amp}
    if task == "vqa":
        result["answers_file"] = [{"question_id": r["question_id"], "answer": r["answer"]} for r in rows]
        if all(r["accuracy"] is not None for r in rows) and rows:
            result["metrics"] = vqa_summary([r["accuracy"] for r in rows], [r["answer_type"] for r in rows])
    elif task == "nlvr2":
        result["metrics"] = nlvr2_metrics([r["identifier"] for r in rows],
                                          [r["prediction"] == r["label"] for r in rows])
        result["predictions"] = {r["identifier"]: r["prediction"] for r in rows}
    else:
        result["metrics"] = classification_metrics([r["prediction"] for r in rows], [r["label"] for r in rows],
                                                   SNLI_VE_CLASSES)
        result["predictions"] = {r["pair_id"]: SNLI_VE_CLASSES[r["prediction"]] for r in rows}
    return result


@torch.no_grad()
def itm_accuracy(model, dataset, ctx, batch_size=16, max_images=0, workers=2):
    """Pre-training's ITM (Eq. 8) on held-out images (data.build_dataset("pretrain", "val")): each image with its
    4 texts, 2 matched and 2 mismatched captions, nothing masked. Returns (on rank 0) the accuracy over all pairs,
    over the matched and over the mismatched ones; None on the other ranks. A model that ignores the image can
    reach 0.5 overall only by answering every pair alike, so the two kinds are reported apart."""
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    mine, rows, pos = shard(n, ctx.rank, ctx.world_size), [], 0
    was_training = model.training
    model.eval()
    for batch in eval_loader(dataset, mine, batch_size, workers):
        if batch.get("skipped"):
            raise RuntimeError("an image could not be read; evaluation needs every example")
        with train.autocast_context(ctx.device, ctx.amp):
            logits = model.pretrain_itm_logits(train.to_device(batch, ctx.device))
        correct = (logits.argmax(-1).cpu() == batch["itm_label"]).view(-1, 4)  # [images, 4 texts]
        rows += [{"index": i, "correct": correct[k].tolist()} for k, i in enumerate(mine[pos:pos + len(correct)])]
        pos += len(correct)
    model.train(was_training)
    parts = gather_to_rank0(rows)
    if ctx.rank != 0:
        return None
    correct = torch.tensor([r["correct"] for r in merge_examples(parts, n)], dtype=torch.float64)  # [n, 4]
    m = {"images": n, "pairs": 4 * n, "accuracy": correct.mean().item(),
         "matched": correct[:, :2].mean().item(), "mismatched": correct[:, 2:].mean().item()}
    if dataset.negatives != "random":  # text 3 is the chosen mismatch, text 4 the random one
        m[f"mismatched_{dataset.negatives}"] = correct[:, 2].mean().item()
        m["mismatched_random"] = correct[:, 3].mean().item()
    return m


def evaluate_itm(model, ckpt, args, ctx):
    """Held-out pre-training ITM: with the real images, and with every image blanked (one constant image). A model
    that looks at the image drops to chance when blanked; a model that reads only the text does not move."""
    cfg = model.config
    data_root = data_root_of(args, ckpt)
    tokenizer = tokenizer_of(ckpt, cfg, data_root)
    text_only = ckpt.get("train_config", {}).get("text_only", False)
    result = {"task": "itm", "split": args.split, "world_size": ctx.world_size, "amp": ctx.amp, "metrics": {}}
    for name, blank in (("images", text_only), ("images blanked", True)):
        dataset = data.build_dataset("pretrain", args.split, data_root, tokenizer, cfg, seed=0, text_only=blank,
                                     negatives=args.negatives)
        m = itm_accuracy(model, dataset, ctx, args.batch_size, args.max_images, args.workers)
        if ctx.rank == 0:
            result["metrics"][name] = m
            result["examples"], result["of_split"] = m["images"], len(dataset)
        if text_only:
            break  # the control never saw an image: blanking changes nothing
    return result if ctx.rank == 0 else None


# ----------------------------------------------------------------------------------------------------------------
# 6. Speed (Sec. 4.5): time per image-text pair of each inference stage, and two ratios
# ----------------------------------------------------------------------------------------------------------------


def parse_size(text):
    """'600x1000' -> (600, 1000): image height x width in pixels (the paper's 600 x 1000)."""
    try:
        h, w = (int(x) for x in text.lower().split("x"))
        return h, w
    except ValueError:
        raise SystemExit(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 600x1000") from None


def timed(fn, device, inner=1):
    """Seconds per call of fn, over `inner` back-to-back calls, with the accelerator synchronised around."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / inner


def median_times(fns, device, repeats, warmup, inner=None):
    """Median seconds per call of each fn in {name: fn}, measured side by side: every repeat runs each fn once,
    in alternating order (ABBA), so that drifting clocks, caches or thermal state affect them alike."""
    inner = inner or {}
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = timed(fns[name], device, inner.get(name, 1))
            if r >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_speed(model, size, device, amp, repeats, warmup, text_len=16, batch=1, pretrain_images=1,
                  vq_tokens=None):
    """Sec. 4.5 on this machine: a dict of times (ms per image-text pair) and the two ratios.

    Inference (eval mode, no gradients, under `amp`), batch image-text pairs per call:
      cnn         = model.encode (Eq. 1)
      vd          = vq_lookup + vd_embed (Eq. 2, 3) of every visual token
      transformer = embed_visual + fuse over [16 text tokens ; visual tokens]
      total       = the three in one pipeline, plus the pooled ITM head (a retrieval score)
    Ratios (measured side by side, alternating):
      pretrain_shared_over_repeated: a pre-training step (forward + backward of pretrain_losses) with the CNN run
          once per image (img_index sharing) over the same step with each image repeated for its 4 texts
      vq_lookup_over_matmul: vq_lookup of N tokens over one [N, c] @ [c, k] matrix multiply, the lower bound of
          Eq. 2's cost
    """
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    images, image_mask = (t.to(device) for t in data.random_images(batch, size, g))
    ids = torch.randint(5, cfg.vocab_size, (batch, text_len), generator=g).to(device)  # text_len real tokens each
    model.eval()
    with torch.no_grad(), train.autocast_context(device, amp):
        V, valid, grid = model.encode(images, image_mask)
    inference = time_inference_stages(model, images, image_mask, (V, valid, grid), ids, device, amp, repeats, warmup)
    ms_per_pair = {k: 1000.0 * inference[k] / batch for k in ("cnn", "vd", "transformer", "total") if k in inference}
    steps = time_pretrain_steps(model, pretrain_images, size, text_len, device, amp, repeats, warmup)
    n_tokens = vq_tokens or 16 * V.shape[1]  # default: the tokens of 16 images, the official batch per GPU
    lookups = time_vq_lookup(model, n_tokens, device, repeats, warmup, g)
    gh, gw = grid
    return {
        "size": list(size), "padded_size": list(images.shape[-2:]), "batch": batch, "text_tokens": text_len,
        "visual_tokens": gh * gw, "grid": [gh, gw], "sequence_length": text_len + gh * gw,
        "ms_per_pair": ms_per_pair, "ms_sum_of_stages": sum(v for k, v in ms_per_pair.items() if k != "total"),
        "pretrain_images": pretrain_images, "pretrain_step_s": steps,
        "pretrain_shared_over_repeated": steps["shared"] / steps["repeated"],
        "vq_tokens": n_tokens, "vq_lookup_ms": 1000 * lookups["vq_lookup"], "matmul_ms": 1000 * lookups["matmul"],
        "matmul_shape": [[n_tokens, cfg.hidden_size], [cfg.hidden_size, cfg.vd_size]],
        "vq_lookup_over_matmul": lookups["vq_lookup"] / lookups["matmul"],
    }


def time_inference_stages(model, images, image_mask, encoded, ids, device, amp, repeats, warmup):
    """Median seconds per call of each inference stage (measure_speed's docstring), side by side. encoded: the
    images' (V, valid, grid) from model.encode, the input of the later stages."""
    V, valid, grid = encoded
    text_mask = torch.ones_like(ids, dtype=torch.bool)
    dictionary = model.visual_dictionary.embed if model.config.use_vd else None

    def run(fn):
        def wrapped():
            with torch.no_grad(), train.autocast_context(device, amp):
                return fn()
        return wrapped

    def pipeline():
        V, valid, grid = model.encode(images, image_mask)
        tokens = vd_embed(vq_lookup(V.reshape(-1, V.shape[-1]), dictionary), dictionary).view_as(V) \
            if dictionary is not None else V
        hidden = model.fuse(ids, text_mask, model.embed_visual(tokens, grid), valid)
        return model.itm_head(model.transformer.pool(hidden, text_mask))

    stages = {"cnn": run(lambda: model.encode(images, image_mask)),
              "transformer": run(lambda: model.fuse(ids, text_mask, model.embed_visual(V, grid), valid)),
              "total": run(pipeline)}
    if dictionary is not None:
        stages["vd"] = run(lambda: vd_embed(vq_lookup(V.reshape(-1, V.shape[-1]), dictionary), dictionary))
    return median_times(stages, device, repeats, warmup)


def time_pretrain_steps(model, n_images, size, text_len, device, amp, repeats, warmup):
    """Median seconds of a pre-training step (forward + backward) with the CNN once per image ("shared") and with
    each image repeated for its 4 texts ("repeated"), side by side. Leaves the model in eval mode, no gradients,
    and no pending Eq. 4 statistics."""
    shared = train.to_device(data.random_batch("pretrain", model.config, n_images, image_size=size,
                                               text_len=text_len), device)
    repeated = dict(shared, images=shared["images"].repeat_interleave(4, 0),
                    image_mask=shared["image_mask"].repeat_interleave(4, 0),
                    img_index=torch.arange(4 * n_images, device=device))

    def step(b):
        def fn():
            model.zero_grad(set_to_none=True)
            with train.autocast_context(device, amp):
                out = model.pretrain_losses(b)
            soho.pretraining_objective(out["mlm"].mean, out["mvm"].mean, out["itm"].mean).backward()
        return fn

    model.train()
    steps = median_times({"shared": step(shared), "repeated": step(repeated)}, device, repeats, warmup)
    model.zero_grad(set_to_none=True)
    model.eval()
    if model.visual_dictionary is not None:  # the timed steps gathered Eq. 4 statistics; they must not update
        model.visual_dictionary.discard_pending()
    return steps


def time_vq_lookup(model, n_tokens, device, repeats, warmup, generator):
    """Median seconds of Eq. 2 against its lower bound, one matrix multiply of the same shape (both in fp32, as
    vq_lookup), side by side: {"vq_lookup", "matmul"}."""
    cfg = model.config
    v = torch.randn(n_tokens, cfg.hidden_size, generator=generator).to(device)
    d = (model.visual_dictionary.embed.float() if cfg.use_vd
         else torch.randn(cfg.vd_size, cfg.hidden_size, generator=generator).to(device))
    d_t = d.t().contiguous()  # [c, k]
    matmul = lambda: v @ d_t
    inner = max(1, min(1000, math.ceil(0.01 / max(timed(matmul, device), 1e-7))))  # >= ~10 ms per measurement
    return median_times({"vq_lookup": lambda: vq_lookup(v, d), "matmul": matmul}, device, repeats, warmup,
                        inner={"vq_lookup": inner, "matmul": inner})


def evaluate_speed(args, device, amp):
    """Build the model (random weights from --preset, or a checkpoint) and run measure_speed."""
    ckpt_path = None
    if args.checkpoint:
        ckpt_path = resolve_checkpoint("speed", args.checkpoint)
        model, ckpt = train.load_model(ckpt_path, device)
        preset = ckpt.get("train_config", {}).get("preset", "checkpoint")
    else:
        preset = args.preset or "tiny"
        torch.manual_seed(0)
        model = SOHO(soho.config_from_preset(preset)).to(device)
    cfg = model.config
    size = parse_size(args.size) if args.size else (cfg.image_short, cfg.image_long)
    on_cpu = device.type == "cpu"
    repeats = args.repeats if args.repeats is not None else (5 if on_cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 5)
    pretrain_images = args.pretrain_images or (1 if on_cpu else 8)
    result = measure_speed(model, size, device, amp, repeats, warmup, text_len=args.text_len, batch=args.pairs,
                           pretrain_images=pretrain_images, vq_tokens=args.vq_tokens)
    result = {"task": "speed", "preset": preset, "checkpoint": ckpt_path, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "amp": amp, "repeats": repeats, "warmup": warmup, **result}
    return result, ckpt_path, preset


# ----------------------------------------------------------------------------------------------------------------
# 7. Pictures of the visual dictionary (Sec. 4.4, Fig. 3): the image cells that share a VD entry
# ----------------------------------------------------------------------------------------------------------------

CELL = 64  # pixels under one visual token: stride 32 of the ResNet, then 2x2 max pooling (Sec. 3.1)
GAP = 4  # pixels between patches and between rows (and around the picture)
LABEL_WIDTH = 150  # the column with each row's entry number and usage


@torch.no_grad()
def vd_assignments(model, dataset, indices, args, ctx):
    """VD index of every valid visual token of dataset[indices]: an int64 array of rows
    (image index, grid row, grid column, VD entry)."""
    dictionary = model.visual_dictionary.embed
    rows = []
    for batch in tqdm(eval_loader(dataset, indices, args.batch_size, args.workers), desc="images (CNN + VD)",
                      disable=ctx.rank != 0, dynamic_ncols=True):
        with train.autocast_context(ctx.device, ctx.amp):
            V, valid, (gh, gw) = model.encode(batch["images"].to(ctx.device), batch["image_mask"].to(ctx.device))
        h = vq_lookup(V.reshape(-1, V.shape[-1]), dictionary).view(valid.shape)  # Eq. 2, fp32 inside
        b, t = valid.nonzero(as_tuple=True)
        image_index = batch["image_index"].to(ctx.device)[b]
        rows.append(torch.stack([image_index, t // gw, t % gw, h[b, t]], dim=1).cpu())
    return torch.cat(rows).numpy() if rows else np.zeros((0, 4), dtype=np.int64)


def unnormalise(image):
    """A normalised [3, h, w] tensor (data.image_to_tensor) -> the resized RGB picture as a PIL image."""
    pixels = (image * data.IMAGENET_STD + data.IMAGENET_MEAN).clamp(0, 1) * 255
    return Image.fromarray(pixels.round().to(torch.uint8).permute(1, 2, 0).numpy())


def choose_vd_rows(counts, rows, rng):
    """(entry, kind) of the rows to draw: the most used entries first, then rows // 3 random other used
    entries (Fig. 3 samples entries at random; the most used ones show what the dictionary spends itself on)."""
    used = [int(j) for j in np.argsort(-counts, kind="stable") if counts[j] > 0]
    n_random = min(rows // 3, max(len(used) - (rows - rows // 3), 0))
    top = used[:rows - n_random]
    random_rows = rng.sample(sorted(set(used) - set(top)), n_random)
    return [(j, "top") for j in top] + [(j, "random") for j in random_rows]


def draw_vd_rows(chosen, patches_of, counts, get_image, patches_per_row):
    """The picture: one row per chosen entry, a label then up to patches_per_row image cells.
    Size: width LABEL_WIDTH + patches_per_row * (CELL + GAP) + GAP, height len(chosen) * (CELL + GAP) + GAP."""
    width = LABEL_WIDTH + patches_per_row * (CELL + GAP) + GAP
    height = len(chosen) * (CELL + GAP) + GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    total = max(int(counts.sum()), 1)
    for r, (entry, kind) in enumerate(chosen):
        y = GAP + r * (CELL + GAP)
        label = f"{kind} #{entry}\n{int(counts[entry])} tokens\n{100 * counts[entry] / total:.2f}%"
        draw.multiline_text((GAP, y + 8), label, fill=(0, 0, 0), font=font)
        for p, (image_index, row, col) in enumerate(patches_of[entry]):
            # crop() outside the picture fills with black: the padding of a border cell
            cell = get_image(image_index).crop((col * CELL, row * CELL, (col + 1) * CELL, (row + 1) * CELL))
            canvas.paste(cell, (LABEL_WIDTH + p * (CELL + GAP), y))
    return canvas


def draw_vd_histogram(counts, n_images):
    """Usage of all k entries, most used first (bar heights linear in the count), with a summary line."""
    k = len(counts)
    bar = max(1, 800 // k)
    margin, plot_h = 40, 240
    width, height = max(k * bar + 2 * margin, 640), plot_h + 2 * margin + 20
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    ordered = np.sort(counts)[::-1]
    top = max(int(ordered[0]), 1) if k else 1
    base = margin + plot_h
    for j, c in enumerate(ordered):
        x = margin + j * bar
        draw.rectangle((x, base - round(plot_h * c / top), x + bar - 1, base), fill=(60, 90, 170))
    draw.line((margin, base, margin + k * bar, base), fill=(0, 0, 0))
    p = counts / max(counts.sum(), 1)
    perplexity = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())) if counts.sum() else 0.0
    draw.text((margin, 8), f"VD usage: {int(counts.sum())} visual tokens of {n_images} images; "
              f"{int((counts > 0).sum())} of {k} entries used; perplexity {perplexity:.1f}", fill=(0, 0, 0),
              font=font)
    draw.text((margin, base + 6), f"entries, most used first (max {top} tokens)", fill=(0, 0, 0), font=font)
    return canvas, perplexity


def evaluate_vd(model, ckpt, args, ctx, out_dir):
    """Count the VD entries of every valid token of the images, and draw the rows and the usage histogram."""
    cfg = model.config
    if not cfg.use_vd:
        raise SystemExit("this checkpoint has no visual dictionary (use_vd=False)")
    data_root = data_root_of(args, ckpt)
    dataset = data.build_dataset("retrieval", args.split, data_root, tokenizer_of(ckpt, cfg, data_root), cfg,
                                 source=args.source or "coco")
    n = len(dataset) if not args.max_images else min(args.max_images, len(dataset))
    parts = gather_to_rank0(vd_assignments(model, dataset, shard(n, ctx.rank, ctx.world_size), args, ctx))
    if ctx.rank != 0:
        return None
    tokens = np.concatenate(parts)
    counts = np.bincount(tokens[:, 3], minlength=cfg.vd_size)
    rng = random.Random(args.seed)
    chosen = choose_vd_rows(counts, args.rows, rng)
    patches_of = {}
    for entry, _ in chosen:
        at = tokens[tokens[:, 3] == entry][:, :3].tolist()
        patches_of[entry] = rng.sample(at, min(args.patches_per_row, len(at)))
    images = {}

    def get_image(i):
        if i not in images:
            images[i] = unnormalise(dataset[i]["image"])
        return images[i]

    rows_png = draw_vd_rows(chosen, patches_of, counts, get_image, args.patches_per_row)
    histogram_png, perplexity = draw_vd_histogram(counts, n)
    stem = os.path.join(out_dir, f"vd-{args.split}")
    os.makedirs(out_dir, exist_ok=True)
    rows_png.save(stem + ".png")
    histogram_png.save(stem + "-usage.png")
    return {"task": "vd", "split": args.split, "images": n, "tokens": int(len(tokens)),
            "entries": cfg.vd_size, "entries_used": int((counts > 0).sum()), "perplexity": perplexity,
            "rows_png": stem + ".png", "usage_png": stem + "-usage.png",
            "rows": [{"entry": e, "kind": kind, "count": int(counts[e]), "patches": patches_of[e]}
                     for e, kind in chosen],
            "counts": counts.tolist(), "cell": CELL, "gap": GAP}


# ----------------------------------------------------------------------------------------------------------------
# 8. Reports: a printed table and JSON
# ----------------------------------------------------------------------------------------------------------------


def format_table(header, rows):
    """Left-aligned first column, right-aligned numbers (2 decimals)."""
    cells = [[c if isinstance(c, str) else f"{c:.2f}" for c in row] for row in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def report_retrieval(result):
    keys = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"]
    table = format_table(["", "TR R@1", "TR R@5", "TR R@10", "IR R@1", "IR R@5", "IR R@10"],
                         [[name] + [m[k] for k in keys] for name, m in result["metrics"].items()])
    return (f"retrieval, {result['source']} {result['split']}: {result['images']} images x {result['texts']} "
            f"texts = {result['pairs_scored']:,} pairs scored in {result['seconds_pairs']:.1f} s "
            f"({result['pairs_per_second']:,.0f} pairs/s; CNN {result['seconds_cnn']:.1f} s), "
            f"{result['world_size']} rank(s)\n{table}")


def report_vqa(result):
    head = f"vqa {result['split']}: {result['examples']} of {result['of_split']} questions"
    if "metrics" not in result:
        return head + " (no annotations: answers file only)"
    m = result["metrics"]
    types = [t for t in data.VQA_ANSWER_TYPES if t in m]
    return head + "\n" + format_table(["", "overall"] + types, [["accuracy", m["overall"]] + [m[t] for t in types]])


def report_nlvr2(result):
    m = result["metrics"]
    return (f"nlvr2 {result['split']}: {m['examples']} examples in {m['groups']} sentence groups\n"
            + format_table(["", "accuracy", "consistency"], [["NLVR2", m["accuracy"], m["consistency"]]]))


def report_snli_ve(result):
    m = result["metrics"]
    return (f"snli-ve {result['split']}: {m['examples']} examples\n"
            + format_table(["", "accuracy"] + SNLI_VE_CLASSES,
                           [["SNLI-VE", m["accuracy"]] + [m[c] for c in SNLI_VE_CLASSES]]))


def report_speed(result):
    ms = result["ms_per_pair"]
    names = {"cnn": "CNN (encode, Eq. 1)", "vd": "VD (vq_lookup + vd_embed, Eq. 2-3)",
             "transformer": f"transformer (fuse, {result['sequence_length']} tokens)",
             "total": f"total (one pipeline; sum of stages {result['ms_sum_of_stages']:.2f})"}
    table = format_table(["stage", "ms / pair"], [[names[k], ms[k]] for k in ("cnn", "vd", "transformer", "total")
                                                 if k in ms])
    gh, gw = result["grid"]
    s = result["pretrain_step_s"]
    return (f"speed: preset {result['preset']}, {result['size'][0]}x{result['size'][1]} image (padded "
            f"{result['padded_size'][0]}x{result['padded_size'][1]}), {result['text_tokens']} text tokens + "
            f"{gh}x{gw} = {result['visual_tokens']} visual tokens = sequence length {result['sequence_length']}; "
            f"{result['device_name']}, amp {result['amp']}, {result['threads']} threads, {result['batch']} "
            f"pair(s) per call, median of {result['repeats']} after {result['warmup']} warm-up\n{table}\n"
            f"pre-training step (forward + backward), {result['pretrain_images']} image(s) x 4 texts: CNN once "
            f"per image {s['shared']:.3f} s, image repeated per text {s['repeated']:.3f} s, "
            f"ratio {result['pretrain_shared_over_repeated']:.2f}\n"
            f"vq_lookup of {result['vq_tokens']} tokens {result['vq_lookup_ms']:.3f} ms vs one "
            f"[{result['vq_tokens']},{result['matmul_shape'][0][1]}] @ [{result['matmul_shape'][1][0]},"
            f"{result['matmul_shape'][1][1]}] matmul {result['matmul_ms']:.3f} ms, ratio "
            f"{result['vq_lookup_over_matmul']:.2f}")


def report_itm(result):
    hard = [k for k in next(iter(result["metrics"].values())) if k.startswith("mismatched_")]  # by kind
    rows = [[name] + [m[k] for k in ["accuracy", "matched", "mismatched", *hard]]
            for name, m in result["metrics"].items()]
    return (f"itm {result['split']} (held-out images): {result['examples']} images x 4 texts (2 matched, "
            f"2 mismatched captions)\n" + format_table(["", "accuracy", "matched", "mismatched",
                                                        *[k.replace("_", " ") for k in hard]], rows))


def report_vd(result):
    return (f"vd {result['split']}: {result['tokens']} visual tokens of {result['images']} images; "
            f"{result['entries_used']} of {result['entries']} entries used, perplexity "
            f"{result['perplexity']:.1f}\n  {len(result['rows'])} rows: {result['rows_png']}\n"
            f"  usage histogram: {result['usage_png']}")


def report(result):
    """The human-readable summary of a result dict (JSON for a task without its own)."""
    reports = {"retrieval": report_retrieval, "vqa": report_vqa, "nlvr2": report_nlvr2, "snli-ve": report_snli_ve,
               "speed": report_speed, "itm": report_itm, "vd": report_vd}
    if result["task"] in reports:
        return reports[result["task"]](result)
    return json.dumps(result, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# 9. Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=EVALUATIONS)
    p.add_argument("--checkpoint", nargs="?", const="default", default=None,
                   help="a ckpt.pt or run folder; without a value (or, except for speed, when left out): the "
                   "task's default run runs/<task>/ckpt.pt (runs/pretrain for vd and speed)")
    p.add_argument("--split", default=None, help="retrieval test|val; vqa val|test-dev|test; nlvr2 dev|test1; "
                   "snli-ve dev|test; vd (retrieval images) val|test. Default: " +
                   ", ".join(f"{k} {v}" for k, v in DEFAULT_SPLIT.items()))
    p.add_argument("--data", default="", help="data root (data.py layout); default: the checkpoint's")
    p.add_argument("--out", default="", help="folder for the JSON (and PNG, answers) files; default: beside the "
                   "checkpoint (speed without one: runs/speed)")
    p.add_argument("--source", default="", help="retrieval: coco | flickr30k (default: the checkpoint's)")
    p.add_argument("--max-images", type=int, default=0, help="retrieval / vd / itm: only the first N images")
    p.add_argument("--max-examples", type=int, default=0, help="vqa / nlvr2 / snli-ve: only the first N examples")
    p.add_argument("--negatives", default="random", choices=list(data.NEGATIVES),
                   help="itm: the third text (subject: a caption of another image with the same subject; "
                        "hard: one sharing most words with the image's own); the fourth is always random")
    p.add_argument("--batch-size", type=int, default=16, help="images (examples) per CNN forward")
    p.add_argument("--pair-batch", type=int, default=0,
                   help="retrieval: image-text pairs per transformer forward (default 1024 on GPU, 256 on CPU)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast (auto: bf16 on a GPU, off on CPU)")
    p.add_argument("--device", default="", help="cpu to force the CPU (single process only)")
    p.add_argument("--save-scores", action="store_true", help="retrieval: also write the score matrix (.npy)")
    # speed
    p.add_argument("--preset", default=None, choices=list(soho.PRESETS), help="speed: model size (default tiny)")
    p.add_argument("--size", default="", help="speed: image HEIGHTxWIDTH (default: the preset's, 600x1000 for r101)")
    p.add_argument("--repeats", type=int, default=None, help="speed: timed runs per measurement (CPU 5, GPU 20)")
    p.add_argument("--warmup", type=int, default=None, help="speed: untimed runs first (CPU 1, GPU 5)")
    p.add_argument("--text-len", type=int, default=16, help="speed: text tokens (the paper pads to 16)")
    p.add_argument("--pairs", type=int, default=1, help="speed: image-text pairs per inference call")
    p.add_argument("--pretrain-images", type=int, default=0, help="speed: images of the timed pre-training step "
                   "(each with 4 texts; default 1 on CPU, 8 on GPU)")
    p.add_argument("--vq-tokens", type=int, default=0, help="speed: N of the vq_lookup timing (default 16 images' "
                   "tokens)")
    # vd
    p.add_argument("--rows", type=int, default=12, help="vd: rows drawn (2/3 most used entries, 1/3 random used)")
    p.add_argument("--patches-per-row", type=int, default=10, help="vd: image cells per row")
    p.add_argument("--seed", type=int, default=0, help="vd: the random rows and patches")
    args = p.parse_args(argv)
    args.split = args.split or DEFAULT_SPLIT.get(args.task)
    return args


def main(argv=None):
    """Run one evaluation; returns the result dict on rank 0 (None on the other ranks)."""
    args = parse_args(argv)
    ctx = make_context(args)
    args.pair_batch = args.pair_batch or (256 if ctx.device.type == "cpu" else 1024)
    try:
        if args.task == "speed":
            return run_speed(args, ctx)
        ckpt_path = resolve_checkpoint(args.task, args.checkpoint)
        model, ckpt = train.load_model(ckpt_path, ctx.device)
        warn_if_other_task(ckpt, ckpt_path, args.task, ctx)
        refuse_trained_split(ckpt, ckpt_path, args.task, args.split)
        out_dir = args.out or os.path.dirname(os.path.abspath(ckpt_path))
        if args.task == "retrieval":
            result = evaluate_retrieval(model, ckpt, args, ctx)
        elif args.task == "vd":
            result = evaluate_vd(model, ckpt, args, ctx, out_dir)
        elif args.task == "itm":
            result = evaluate_itm(model, ckpt, args, ctx)
        else:
            result = evaluate_classification(model, ckpt, args, ctx)
        if ctx.master_process:
            result["checkpoint"] = ckpt_path
            write_results(result, args, out_dir)
        barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_context(args):
    """train.Context of this process; --device overrides the device of a single process."""
    ctx = train.make_context(args.amp)
    if args.device:
        if ctx.world_size > 1:
            raise SystemExit("--device is for a single process; torchrun picks one device per rank")
        device = torch.device(args.device)
        ctx = dataclasses.replace(ctx, device=device, amp=train.resolve_amp(args.amp, device))
    return ctx


def run_speed(args, ctx):
    """The speed benchmark: one process measures (timing is per device), the others wait."""
    result = None
    if ctx.master_process:
        result, ckpt_path, preset = evaluate_speed(args, ctx.device, ctx.amp)
        out_dir = args.out or (os.path.dirname(ckpt_path) if ckpt_path else os.path.join("runs", "speed"))
        result["json"] = os.path.join(out_dir, f"speed-{preset}.json")
        data.write_json(result["json"], result, indent=1)
        print(report(result))
        print(f"wrote {result['json']}")
    barrier()
    return result


def warn_if_other_task(ckpt, ckpt_path, task, ctx):
    """A checkpoint fine-tuned for another task has an untrained head for this one: say so. Zero-shot retrieval
    and ITM with a pre-trained ITM head are fine, and every checkpoint carries the VD."""
    trained_for = ckpt.get("task")
    if ctx.master_process and task != "vd" and trained_for not in (task, None) and \
            not (task in ("retrieval", "itm") and trained_for == "pretrain"):
        print(f"warning: {ckpt_path} was trained for {trained_for!r}, not {task!r}: its {task} "
              "head may be untrained", file=sys.stderr)


def write_results(result, args, out_dir):
    """<out_dir>/eval-<task>-<split>.json, and the files the official tools read: retrieval's score matrix,
    VQA's answers file, NLVR2's predictions CSV. Prints the report."""
    os.makedirs(out_dir, exist_ok=True)
    suffix = f"-{args.source}" if args.task == "retrieval" and args.source else ""
    stem = os.path.join(out_dir, f"eval-{args.task}-{args.split}{suffix}")
    if "_scores" in result:
        scores, txt2img = result.pop("_scores")
        np.save(stem + "-scores.npy", scores)
        np.save(stem + "-txt2img.npy", txt2img)
        result["scores_file"] = stem + "-scores.npy"
    if "answers_file" in result:
        # [{"question_id", "answer"}]: the test server's format (test-dev / test), or the official evaluator's
        # results file (val)
        answers_path = os.path.join(out_dir, f"vqa-{args.split}-answers.json")
        data.write_json(answers_path, result.pop("answers_file"))
        result["answers_path"] = answers_path
        if result["examples"] < result["of_split"]:
            print(f"note: {answers_path} covers {result['examples']} of {result['of_split']} questions; "
                  "the test server wants all of them", file=sys.stderr)
    if args.task == "nlvr2":
        # the official NLVR2 scorer's predictions file: one "identifier,True" or "identifier,False" line per
        # example, in example order (class 1 is the label "True", as in data.NLVR2Dataset)
        result["predictions_path"] = stem + "-predictions.csv"
        with open(result["predictions_path"], "w", encoding="utf-8") as f:
            f.writelines(f"{identifier},{'True' if prediction == 1 else 'False'}\n"
                         for identifier, prediction in result["predictions"].items())
    result["json"] = stem + ".json"
    data.write_json(result["json"], result, indent=1)
    print(report(result))
    if "predictions_path" in result:
        print(f"wrote {result['predictions_path']} (the official NLVR2 scorer's predictions file)")
    print(f"wrote {result['json']}")


if __name__ == "__main__":
    main()
