"""
Data for SOHO: the public data sets read as they are on disk, and the batches of the paper.

Point `--data DIR` at a folder with this layout. Every part is optional: a task needs only its own files, and a
task whose files are missing raises a DataError that lists what it looked for and where.

    DIR/
      vocab.txt                                 WordPiece vocabulary (BERT's bert-base-uncased vocab.txt, or the
                                                synthetic world's; train.py decides which one to use)
      coco/
        dataset_coco.json                       Karpathy split: train / restval / val / test
        train2014/COCO_train2014_<id>.jpg       COCO images (pre-training, retrieval, and VQA v2, which reuses them)
        val2014/COCO_val2014_<id>.jpg
        test2015/COCO_test2015_<id>.jpg         only for VQA test-dev / test-std
      vg/
        region_descriptions.json
        image_data.json
        VG_100K/<id>.jpg, VG_100K_2/<id>.jpg
      vqa/
        v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
        v2_mscoco_{train2014,val2014}_annotations.json
                                                (no images here: VQA reads coco/train2014, coco/val2014, coco/test2015)
      nlvr2/
        train.json, dev.json, test1.json        JSON Lines, as released
        images/train/<directory>/<pair>-img0.png, -img1.png   (a flat images/train/<pair>-img0.png is found too)
        dev/<pair>-img{0,1}.png                 as the image zips unpack (images/dev/ and images/test1/ work too)
        test1/<pair>-img{0,1}.png
      flickr30k/
        dataset_flickr30k.json                  Karpathy split: train / val / test
        flickr30k-images/<id>.jpg               (SNLI-VE reads its images here too)
      snli-ve/
        snli_ve_{train,dev,test}.jsonl

Tasks and splits for build_dataset(task, split, ...):

    pretrain   train                  COCO train + restval captions and VG region descriptions (VG images whose
                                      coco_id is in the COCO val/test splits are dropped)
    retrieval  train, val, test       source="coco" or "flickr30k"; train = COCO train + restval / Flickr train;
                                      val/test return the images (each once) with the first 5 captions in `.texts`
    vqa        train, val             train2014 and val2014 questions: train on one, evaluate on the other
               train+val              train2014 + val2014, the paper's training set for the test server
               test-dev, test         test-dev2015 and test2015 (= test-std) questions, for the submission file
    nlvr2      train, dev, test1
    snli-ve    train, dev, test

Batches: each dataset's `collate` pads a list of examples into one dict (None when every example was skipped);
these are all the keys. B: examples in the batch (pre-training: images); T: the longest text of the batch, at
most max_text_len ids; H, W: the largest image height and width of the batch, rounded up to a multiple of 32.
Tasks: "pretrain" is the train split and the held-out val/test; "retrieval" is its train split, whose val/test
sets give batches of images (ret-images, RetrievalImageDataset) and of captions (ret-texts, its .texts). Model:
what soho.SOHO.pretrain_losses (P) and task_logits (T) read; the other keys feed the losses (train.py), the
metrics (evaluate.py) and the logs. random_batch(task, config, n) builds a batch of a task with random content.

    key          shape, type       dtype    tasks                             model  holds
    images       [B, 3, H, W]      float32  all but ret-texts; nlvr2: 2B      P, T   normalised pixels, 0 in padding
    image_mask   [B, H, W]         bool     all but ret-texts; nlvr2: 2B      P, T   True over the real pixels
    input_ids    [B, T]            int64    all but ret-images; pretrain: 4B  P, T   [CLS] text [SEP] [PAD]..
    text_mask    [B, T]            bool     all but ret-images; pretrain: 4B  P, T   True over [CLS] text [SEP]
    img_index    [4B]              int64    pretrain                          P      image i for texts 4i..4i+3
    itm_label    [4B]              int64    pretrain                          P      1, 1, 0, 0: matched or not
    mlm_labels   [4B, T]           int64    pretrain                          P      target ids, -100: none (b)
    text_source  [4B]              int64    pretrain                          -      image whose caption it is
    image_ids    list of B         str/int  pretrain, retrieval               -      picture key / image id (c)
    texts        list of 4B / B    str      pretrain, retrieval               -      the texts, untokenized
    targets      [B, num_answers]  float32  vqa                               -      soft scores of the answers
    question_id  [B]               int64    vqa                               -
    answer_type  list of B         str      vqa                               -      yes/no, number, other (d)
    answers      list of B lists   str      vqa                               -      the 10 raw answers (d)
    labels       [B]               int64    nlvr2, snli-ve                    -      the class (e)
    identifier   list of B         str      nlvr2                             -
    pair_id      list of B         str      snli-ve                           -
    image_index  [B]               int64    ret-images                        -      index in the dataset
    text_index   [B]               int64    ret-texts                         -      index in the dataset
    txt2img      [B]               int64    ret-texts                         -      its image's image_index
    skipped      int                        all but ret-texts                 -      examples dropped (a)

(a) examples whose image could not be read (skip_bad_images). (b) pre-training's train split masks all four
texts of an image as BERT does (input_ids hold the [MASK]s), and mlm_labels hold the original id where a token is
to be predicted (mlm_prob = 15% of a text's real tokens, at least one, never [CLS] or [SEP]), -100 elsewhere:
everywhere on the mismatched texts, and everywhere in the held-out splits, which mask nothing. Texts 4i..4i+3 are
image i's: matched, matched, mismatched, mismatched (PretrainDataset). NLVR2's images 2i and 2i+1 are example i's
left and right images. (c) pretrain: "coco:<id>" or "vg:<file>"; retrieval: the COCO id (int) or the Flickr30K
file name. (d) None and [] in VQA's test-dev and test. (e) nlvr2: 1 = True; snli-ve: 0 entailment, 1 neutral,
2 contradiction.

With no --data, train.py and evaluate.py write the synthetic world of synthetic.py once (a small world of
coloured shapes in exactly these formats and this layout, so that every task runs end to end in minutes on a
laptop CPU); `python synthetic.py --out DIR` writes one by hand. `python data.py check --data DIR` counts what a
folder holds and reads each set's first example (`--full`: opens every image file and lists the bad ones),
`python data.py bench` times the loading.
"""

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import random
import re
import sys
import time
import types
import warnings

import numpy as np
import torch
import tokenizers
from PIL import Image
from tqdm import tqdm

from soho import IGNORE, TASKS  # the label of tokens not predicted (-100), and the tasks

log = logging.getLogger("soho.data")


class DataError(ValueError):
    """A data file is missing, unreadable or not in the expected format. The message names the file."""


# ---- Files ----
# Small helpers so that every format error names the file, the line or key, and what was expected; and the one
# writer of JSON files (with its JSON Lines twin), which never leaves half a file behind.

# While `python data.py check --full` runs this is a set, and the two readers below add every file they parse
# (so that the check can list the annotation files it read); otherwise None.
_files_read = None


def _note_read(path):
    if _files_read is not None:
        _files_read.add(os.path.abspath(path))


def read_json(path, expected):
    """Parse a JSON file; `expected` says in words what the file should hold (for the error message)."""
    if not os.path.isfile(path):
        raise DataError(f"missing file {path} (expected {expected})")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg}); expected {expected}")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); expected {expected}")
    _note_read(path)
    return content


def read_json_lines(path, expected):
    """Parse a JSON Lines file into a list of (line number, record dict); blank lines are ignored."""
    if not os.path.isfile(path):
        raise DataError(f"missing file {path} (expected {expected})")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no}: malformed JSON ({e.msg}); expected {expected}")
                if not isinstance(record, dict):
                    raise DataError(f"{path}: line {line_no}: expected a JSON object ({expected})")
                records.append((line_no, record))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); expected {expected}")
    _note_read(path)
    return records


def write_json(path, obj, indent=None):
    """Write obj as JSON (utf-8; indent as json.dump's), creating the folder. Written to path + ".tmp" and then
    renamed, so that a reader (or an interrupted run) never finds half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


def write_json_lines(path, records):
    """Write records as JSON Lines (one object per line, as read_json_lines reads them), like write_json."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)


def field(record, key, where):
    """record[key], or a DataError that says where the key is missing."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing key '{key}'")
    return record[key]


def require_files(task, paths):
    """Raise one DataError listing every missing file of a task (so the user sees all of them at once)."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(f"{task}: missing " + ", ".join(missing) + " (see the data layout in data.py's docstring)")


class StringTable:
    """Many strings packed into two numpy arrays.

    Why: DataLoader workers are forked; reading a Python list of millions of str objects touches their reference
    counts, which makes every worker copy those pages (the data set's memory multiplied by the number of workers).
    numpy buffers have no per-item reference counts and stay shared.
    """

    def __init__(self, strings=()):
        blobs = [s.encode("utf-8") for s in strings]
        lengths = np.array([len(b) for b in blobs], dtype=np.int64)
        self.offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        self.data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


# ---- Text ----
# BERT's WordPiece tokenization (bert-base-uncased rules) built with `tokenizers`, and BERT's MLM masking.

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
    """BERT uncased WordPiece: `[CLS] pieces [SEP]`, truncated to max_len ids (both special tokens included).

    The normaliser (clean control characters, split CJK characters, lower-case, strip accents), the pre-tokeniser
    (whitespace and punctuation) and greedy longest-match WordPiece with [UNK] for a word that cannot be split are
    those of BERT's reference tokenizer, so the ids equal bert-base-uncased's for the same vocab.txt. The special
    tokens written literally in a text ("[MASK]") are kept whole, as BERT does.
    """

    def __init__(self, tokens, max_len=16):
        self.tokens = list(tokens)
        self.max_len = max_len
        ids = {t: i for i, t in enumerate(self.tokens)}
        missing = [t for t in SPECIAL_TOKENS if t not in ids]
        if missing:
            raise DataError(f"vocabulary lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)
        self.special_ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)
        self.vocab_size = len(self.tokens)
        self._tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(
            ids, unk_token="[UNK]", max_input_chars_per_word=100, continuing_subword_prefix="##"))
        self._tok.normalizer = tokenizers.normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)  # None: strip if lower
        self._tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
        self._tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
        self._tok.add_special_tokens(list(SPECIAL_TOKENS))

    @classmethod
    def from_vocab(cls, path, max_len=16):
        """Read a BERT vocab.txt: one token per line, the line number is the id."""
        if not os.path.isfile(path):
            raise DataError(f"missing vocabulary file {path} (expected a BERT vocab.txt, one token per line)")
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\r\n") for line in f]
        try:
            return cls(tokens, max_len)
        except DataError as e:
            raise DataError(f"{path}: {e}")

    def encode(self, text, max_len=None):
        """Ids of `[CLS] text [SEP]`, truncated (at the end of the text) to max_len ids in all."""
        max_len = max_len or self.max_len
        pieces = self._tok.encode(text, add_special_tokens=False).ids[:max_len - 2]
        return [self.cls_id] + pieces + [self.sep_id]

    def encode_batch(self, texts, max_len=None):
        """(input_ids long [B, T], text_mask bool [B, T]) padded with [PAD] to the longest text of the batch."""
        return pad_token_rows([self.encode(t, max_len) for t in texts], self.pad_id)

    def decode(self, ids):
        """Text of the ids, special tokens left out and ##pieces joined."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=True)

    # a tokenizers.Tokenizer pickles too, but the token list is the smallest faithful state for DataLoader workers
    def __getstate__(self):
        return {"tokens": self.tokens, "max_len": self.max_len}

    def __setstate__(self, state):
        self.__init__(state["tokens"], state["max_len"])


def pad_token_rows(rows, pad_value):
    """Lists of ids of different lengths -> (long [N, T] padded with pad_value, bool [N, T] True on real ids)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
    return ids, mask


def train_wordpiece_vocab(texts, out_path, vocab_size=1000, min_frequency=1):
    """Build a lower-cased WordPiece vocabulary from `texts` and write it as a BERT vocab.txt; returns out_path.

    The five special tokens come first ([PAD]=0 ... [MASK]=4; Tokenizer looks them up by name), then every
    character seen and its "##" continuation (so no word of these texts is ever [UNK]), then whole words by
    frequency (ties alphabetical) while vocab_size allows. Words are split by tokenizers' BERT normaliser and
    pre-tokeniser, exactly as Tokenizer splits them. Why not tokenizers' WordPieceTrainer: it breaks ties in
    hash-map order, so its vocabulary (the tokens themselves, not only their ids) changes from run to run
    (tokenizers 0.23), and the synthetic world must be the same for a seed.
    """
    normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    words = collections.Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    known = set(vocab)
    for word, count in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])):
        if len(vocab) >= vocab_size or count < min_frequency:
            break
        if word not in known:
            vocab.append(word)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(token + "\n" for token in vocab)
    return out_path


def mask_tokens(input_ids, text_mask, tokenizer, prob=0.15, generator=None, at_least_one=True):
    """BERT's masked-language-model corruption. Returns (masked_ids, labels), both long like input_ids.

    `prob` of the real, non-special tokens are chosen (and at least one per row that has any, so that a short
    caption still teaches something); labels hold their original id there and IGNORE (-100) elsewhere. Of the chosen ones
    80% become [MASK], 10% a random non-special token and 10% stay as they are. `tokenizer` is anything with
    mask_id, vocab_size and special_ids (a Tokenizer, or a SimpleNamespace). Special tokens are never chosen.
    """
    special = torch.tensor(sorted(set(tokenizer.special_ids)), dtype=torch.long)
    candidates = text_mask.bool() & ~torch.isin(input_ids, special)
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & candidates
    if at_least_one:
        empty_rows = ~chosen.any(dim=1) & candidates.any(dim=1)
        scores = torch.rand(input_ids.shape, generator=generator).masked_fill(~candidates, -1.0)
        pick = scores.argmax(dim=1)  # a uniformly random candidate of each row
        rows = empty_rows.nonzero().flatten()
        chosen[rows, pick[rows]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))

    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    # a uniform draw over the non-special ids: draw in [0, V - #special), then step over each special id in order
    random_ids = torch.randint(tokenizer.vocab_size - len(special), input_ids.shape, generator=generator)
    for s in special.tolist():
        random_ids += (random_ids >= s).long()
    masked = input_ids.clone()
    masked[to_mask] = tokenizer.mask_id
    masked[to_random] = random_ids[to_random]
    return masked, labels


# ---- Images ----
# Sec. 4.1: short side to 600, long side at most 1000, bilinear; ImageNet statistics; zero padding to a multiple
# of 32 and to the largest image of the batch, with a mask of the real pixels.

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# EXIF orientation is NOT applied (no PIL.ImageOps.exif_transpose): an image is used as its pixels are stored.
# Why: the texts of COCO (2014), Flickr30K (2014), Visual Genome (2016) and NLVR2 (2018) were written by annotators
# who saw the images in desktop web browsers, and those ignored the orientation tag of an <img> until 2020 (CSS
# image-orientation: from-image became the default then). So a caption ("a man lying on the left") describes the
# stored pixel grid, and so do VG's region boxes and the width/height of image_data.json. Turning an image by its
# tag would turn it away from its text. Few images of these sets carry a tag; custom data whose annotators saw
# turned images should be turned once on disk (e.g. `exiftran -ai`), not here.

# The modes that PIL converts to RGB faithfully; the 16- and 32-bit integer grayscale modes are scaled first (see
# _gray_to_8bit); any other mode ("F", a future one) is refused by name rather than guessed.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_RGB_CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB") + _ALPHA_MODES


def _gray_to_8bit(img, path):
    """A 16-bit grayscale image (mode I;16, I;16B, I;16L, I;16N, or I holding 0..65535, as Pillow reads 16-bit
    PNG and TIFF files) as 8-bit L: value / 257, so 0 -> 0 and 65535 -> 255. PIL's own convert("L") clips every
    value above 255, which makes almost any 16-bit photograph pure white."""
    values = np.asarray(img)
    lo, hi = int(values.min()), int(values.max())
    if img.mode == "I" and (lo < 0 or hi > 65535):
        raise DataError(f"cannot read image {path}: mode 'I' (32-bit integers) with values {lo}..{hi}, outside "
                        "the 16-bit range 0..65535 that can be scaled to 8 bits; save it as an 8-bit or 16-bit image")
    return Image.fromarray(np.rint(values.astype(np.float64) / 257.0).astype(np.uint8))  # uint8 2-D: mode L


def _decode_rgb(path):
    with Image.open(path) as img:
        img.load()  # decode now, so that a truncated file fails here and not later in a worker
        if img.mode == "I" or img.mode.startswith("I;16"):
            img = _gray_to_8bit(img, path)
        elif img.mode not in _RGB_CONVERTIBLE_MODES:
            detail = ""
            if img.mode == "F":
                values = np.asarray(img)
                detail = (f" (32-bit floating point, values {float(values.min()):g}..{float(values.max()):g}: no "
                          "fixed range to map to 8 bits)")
            raise DataError(f"cannot read image {path}: image mode {img.mode!r}{detail} is not supported; expected "
                            f"one of {', '.join(_RGB_CONVERTIBLE_MODES)} or 16-bit grayscale. Save it as an 8-bit "
                            "RGB or grayscale image")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in _ALPHA_MODES:
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        return img.convert("RGB") if img.mode != "RGB" else img.copy()


@contextlib.contextmanager
def _reading_image(path):
    """Around any reading of an image file: a missing file, or whatever PIL raises (OSError, SyntaxError, ValueError,
    DecompressionBombError, struct.error...), becomes a DataError that names the file."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}")


def load_image(path):
    """Decode an image file to RGB. The format is read from the content, not the extension (some NLVR2 .png files
    are JPEGs). Grayscale, palette, CMYK, LAB and alpha images are converted (transparency is laid on white), 16-bit
    grayscale is scaled to 8 bits, any other mode is refused with a DataError naming the file; EXIF orientation is
    not applied (see above). PIL's warnings (a DecompressionBombWarning for a huge image, corrupt EXIF data...) do
    not say which file they are about: they are re-emitted, same category, with the path in front."""
    with warnings.catch_warnings(record=True) as caught, _reading_image(path):
        warnings.simplefilter("always")
        img = _decode_rgb(path)
    for w in caught:
        warnings.warn(f"{path}: {w.message}", w.category, stacklevel=2)
    return img


def resize_image(img, short=600, long=1000):
    """Scale so that the short side is `short` and the long side at most `long` (the smaller of the two ratios;
    small images are enlarged), bilinear."""
    w, h = img.size
    scale = min(short / min(w, h), long / max(w, h))
    size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    return img if size == (w, h) else img.resize(size, Image.BILINEAR)


def image_size(path):
    """(width, height) of an image file, read from its header without decoding the pixels (Pillow reads a few
    kilobytes). A missing or unreadable file is a DataError naming it. EXIF orientation is not applied, as in
    load_image, so the size is the one the model will see (up to resize_image's scaling, which keeps the shape)."""
    with _reading_image(path), Image.open(path) as img:
        return img.size


def image_to_tensor(img):
    """RGB PIL image -> float32 [3, h, w] normalised with the ImageNet mean and std."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return (pixels.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def pad_images(images, size_divisor=32):
    """List of [3, h, w] -> (images [B, 3, H, W], image_mask bool [B, H, W]); zeros bottom/right, H and W the
    largest h and w rounded up to a multiple of size_divisor; the mask is True exactly over the real pixels."""
    H = math.ceil(max(x.shape[1] for x in images) / size_divisor) * size_divisor
    W = math.ceil(max(x.shape[2] for x in images) / size_divisor) * size_divisor
    out = torch.zeros(len(images), 3, H, W)
    mask = torch.zeros(len(images), H, W, dtype=torch.bool)
    for i, x in enumerate(images):
        out[i, :, :x.shape[1], :x.shape[2]] = x
        mask[i, :x.shape[1], :x.shape[2]] = True
    return out, mask


# ---- VQA answers ----
# The official VQA evaluator's answer processing (the accuracy in evaluate.py imports these), the 3,129-answer
# vocabulary and the soft scores. The quirks of the official code are kept on purpose, so that scores match.

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
# The official pattern means "(?<!\d)" but is written "(?!<=\d)", a lookahead that is nearly always true: keep it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text):
    """The official step 1: a punctuation mark next to a space (or anywhere, if the answer has a digit,digit) is
    deleted, otherwise replaced by a space; periods not followed by a digit are removed."""
    out = text
    delete = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATION:
        if delete or (p + " ") in text or (" " + p) in text:  # tested on the input text, as the official code does
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # the official code passes re.UNICODE (32) as the count


def process_digit_article(text):
    """The official step 2: lower-case, number words zero..ten (and "none") to digits, drop a/an/the, restore
    apostrophes of contractions ("dont" -> "don't")."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer):
    """What the official evaluator compares: tabs/newlines to spaces, strip, punctuation, digits and articles.
    (The evaluator applies the last two only when the 10 human answers disagree; evaluate.py decides that.)"""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def normalize_vocab_answer(answer):
    """The key of the answer vocabulary and of the soft-score targets: normalize_answer, then drop commas."""
    return normalize_answer(answer).replace(",", "")


def answer_vocabulary(annotations, min_count=9):
    """The answers (normalised multiple_choice_answer) given for at least min_count distinct questions; over VQA v2
    train2014 + val2014 with min_count=9 this is the standard 3,129. Sorted by frequency, then alphabetically."""
    questions = collections.defaultdict(set)
    for a in annotations:
        questions[normalize_vocab_answer(a["multiple_choice_answer"])].add(a["question_id"])
    kept = [(answer, len(q)) for answer, q in questions.items() if len(q) >= min_count and answer]
    return [answer for answer, _ in sorted(kept, key=lambda x: (-x[1], x[0]))]


def vqa_soft_score(count):
    """Target score of an answer given by `count` of the 10 annotators: min(1, 0.3 count) -> 0, .3, .6, .9, 1."""
    return min(1.0, 0.3 * count)


# ---- Annotation readers ----
# Each reader turns one public file into plain lists; the datasets below pack them for the DataLoader.

def read_karpathy(json_path, image_path_of, splits, first_captions=None):
    """Images of the given Karpathy splits: a list of (image path, [captions], image id), and the number of
    empty captions skipped. image_path_of(record) builds the path (COCO: <filepath>/<filename>)."""
    content = read_json(json_path, "a Karpathy split file: {\"images\": [...]}")
    images, empty = [], 0
    for k, record in enumerate(field(content, "images", json_path)):
        at = f"{json_path}: images[{k}]"
        if field(record, "split", at) not in splits:
            continue
        sentences = field(record, "sentences", at)[:first_captions]
        captions = []
        for s in sentences:
            raw = field(s, "raw", at + ".sentences").strip()
            if raw:
                captions.append(raw)
            else:
                empty += 1
        if captions:
            image_id = record.get("cocoid", field(record, "filename", at))
            images.append((image_path_of(record, at), captions, image_id))
    return images, empty


def coco_image_path(coco_dir):
    return lambda record, at: os.path.join(coco_dir, field(record, "filepath", at), field(record, "filename", at))


def flickr_image_path(flickr_dir):
    return lambda record, at: os.path.join(flickr_dir, "flickr30k-images", field(record, "filename", at))


def coco_held_out_ids(coco_json):
    """COCO ids of the Karpathy val and test images: the VG images showing them must not be pre-trained on."""
    data = read_json(coco_json, "a Karpathy split file")
    return {r["cocoid"] for r in data["images"] if r.get("split") in ("val", "test") and "cocoid" in r}


def read_visual_genome(vg_dir, exclude_coco_ids=()):
    """VG images with their region descriptions: list of (path, [phrases], coco id or None), and counts."""
    regions_path = os.path.join(vg_dir, "region_descriptions.json")
    meta_path = os.path.join(vg_dir, "image_data.json")
    regions = read_json(regions_path, "a list of {\"id\" or \"image_id\", \"regions\": [...]}")
    meta = read_json(meta_path, "a list of {\"image_id\", \"coco_id\", \"url\", ...}")
    meta_by_id = {m.get("image_id", m.get("id")): m for m in meta}
    folders = sorted(d for d in os.listdir(vg_dir) if d.startswith("VG_100K") and os.path.isdir(os.path.join(vg_dir, d)))
    images, stats = [], collections.Counter()
    for k, entry in enumerate(regions):
        at = f"{regions_path}: [{k}]"
        phrases_of_image = field(entry, "regions", at)
        image_id = entry.get("image_id", entry.get("id"))
        if image_id is None and phrases_of_image:
            image_id = field(phrases_of_image[0], "image_id", at + ".regions[0]")
        if image_id is None:
            raise DataError(f"{at}: missing key 'id' (or 'image_id')")
        m = meta_by_id.get(image_id, {})
        coco_id = m.get("coco_id")
        if coco_id is not None and coco_id in exclude_coco_ids:
            stats["dropped_coco_val_test"] += 1
            continue
        # the url names the folder (VG_100K or VG_100K_2); fall back to the folder that exists
        url_folder = (m.get("url") or "").rstrip("/").split("/")[-2:-1]
        folder = url_folder[0] if url_folder and url_folder[0] in folders else (folders[0] if folders else "VG_100K")
        phrases, seen = [], set()
        for r in phrases_of_image:
            phrase = str(field(r, "phrase", at + ".regions")).strip()
            if not phrase:
                stats["empty_captions"] += 1
            elif phrase.lower() not in seen:
                seen.add(phrase.lower())
                phrases.append(phrase)
        if phrases:
            images.append((os.path.join(vg_dir, folder, f"{image_id}.jpg"), phrases, coco_id))
    return images, stats


NLVR2_LABELS = {"True": 1, "False": 0, True: 1, False: 0}
SNLI_VE_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


def nlvr2_image_dir(nlvr2_dir, split):
    """Where a split's images are: the official zips unpack to images/train/<directory>/, dev/ and test1/."""
    candidates = [os.path.join(nlvr2_dir, "images", split), os.path.join(nlvr2_dir, split)]
    for c in candidates:
        if os.path.isdir(c):
            return c
    raise DataError(f"nlvr2 {split}: missing image folder; looked for " + " and ".join(candidates))


def read_nlvr2(json_path, image_dir, split):
    """NLVR2 examples: (identifier, sentence, label, left path, right path).

    Train images are released under images/train/<directory>/, but copies seen in the wild hold them all directly
    in images/train/. A train example's images are looked for in its <directory>/ first, then directly in the
    image folder (logged once, with the count); one found in neither place keeps its <directory>/ path (loading
    it then fails naming that path), and a warning names both places looked in."""
    examples, flat, nowhere = [], 0, []
    for line_no, r in read_json_lines(json_path, "NLVR2 records with identifier, sentence, label"):
        at = f"{json_path}: line {line_no}"
        identifier = str(field(r, "identifier", at))
        label = field(r, "label", at)
        if label not in NLVR2_LABELS:
            raise DataError(f"{at}: unknown label {label!r} (expected \"True\" or \"False\")")
        parts = identifier.split("-")
        if len(parts) < 4:
            raise DataError(f"{at}: identifier {identifier!r} is not split-set-pair-sentence")
        pair = "-".join(parts[:-1])  # drop the sentence field: the images are the pair's
        folder = image_dir
        if split == "train":
            folder = os.path.join(image_dir, str(field(r, "directory", at)))
            if not os.path.isfile(os.path.join(folder, pair + "-img0.png")):
                if os.path.isfile(os.path.join(image_dir, pair + "-img0.png")):
                    folder, flat = image_dir, flat + 1
                else:
                    nowhere.append((at, os.path.join(folder, pair + "-img0.png"),
                                    os.path.join(image_dir, pair + "-img0.png")))
        stem = os.path.join(folder, pair)
        examples.append((identifier, str(field(r, "sentence", at)), NLVR2_LABELS[label],
                         stem + "-img0.png", stem + "-img1.png"))
    if flat:
        log.info("%s: the images of %d of %d examples are directly in %s, not in its <directory>/ subfolders "
                 "as released (a flat copy): using them", json_path, flat, len(examples), image_dir)
    if nowhere:
        at, nested, flat_path = nowhere[0]
        log.warning("%s: the images of %d example(s) are neither in %s/<directory>/ nor directly in it; the "
                    "first, %s, was looked for at %s and at %s", json_path, len(nowhere), image_dir, at, nested,
                    flat_path)
    return examples


def read_snli_ve(jsonl_path, flickr_image_dir):
    """SNLI-VE examples: (pair id, hypothesis, label, image path). The premise (sentence1) is not read at all."""
    examples = []
    for line_no, r in read_json_lines(jsonl_path, "SNLI-VE records with sentence2, gold_label, Flickr30K_ID"):
        at = f"{jsonl_path}: line {line_no}"
        label = field(r, "gold_label", at)
        if label not in SNLI_VE_LABELS:
            raise DataError(f"{at}: unknown gold_label {label!r} (expected entailment, neutral or contradiction)")
        if "Flickr30K_ID" in r:
            image = str(r["Flickr30K_ID"])
        elif "Flikr30kID" in r:  # the key of the older release, whose values end in ".jpg"
            image = str(r["Flikr30kID"])
        else:
            raise DataError(f"{at}: missing key 'Flickr30K_ID' (or the older 'Flikr30kID')")
        if image.endswith(".jpg"):
            image = image[:-4]
        examples.append((str(field(r, "pairID", at)), str(field(r, "sentence2", at)), SNLI_VE_LABELS[label],
                         os.path.join(flickr_image_dir, image + ".jpg")))
    return examples


# ---- Datasets ----
# Map-style datasets (so DistributedSampler shards them and DataLoader workers share them). __getitem__ decodes,
# resizes and tokenizes one example; the `collate` method pads a list of them into a batch (its keys: the table at
# the top of this file).
# Randomness (captions drawn, negatives, MLM masks) comes from a per-example generator: seeded from
# (seed, epoch, index) when a seed is given, so a run is the same whatever the number of workers or ranks (call
# set_epoch every epoch, like DistributedSampler's); with seed=None from torch's global generator, which the
# DataLoader seeds differently in each worker and epoch.

class ImageTextDataset(torch.utils.data.Dataset):
    """What all datasets share: image loading (with optional skipping of bad files), tokenization, randomness."""

    def __init__(self, tokenizer, image_short=600, image_long=1000, max_text_len=16, skip_bad_images=False,
                 seed=None, text_only=False):
        self.tokenizer = tokenizer
        self.text_only = text_only  # the control: one constant image instead of every image
        self.image_short, self.image_long, self.max_text_len = image_short, image_long, max_text_len
        self.skip_bad_images = skip_bad_images
        self.seed, self.epoch = seed, 0
        self.stats = collections.Counter()  # e.g. empty captions skipped while reading the annotations
        # images skipped so far; in shared memory, so that the skips of DataLoader workers reach this process
        self._num_skipped = torch.zeros(1, dtype=torch.long).share_memory_()

    @property
    def num_skipped(self):
        """Unreadable images skipped so far (skip_bad_images=True), by this process and its DataLoader workers;
        each one was logged with its path when skipped."""
        return int(self._num_skipped.item())

    @property
    def skipped(self):
        """A sequence as long as num_skipped (for `len(dataset.skipped)`; the paths themselves are in the log)."""
        return (None,) * self.num_skipped

    def set_epoch(self, epoch):
        self.epoch = epoch

    def example_rng(self, index):
        if self.seed is None:
            return random.Random(int(torch.randint(2 ** 62, ()).item()))
        return random.Random(f"{self.seed}/{self.epoch}/{index}")  # str seeds are hashed with SHA-512: stable

    def image(self, path):
        """[3, h, w] float tensor, or None (after logging) for an unreadable file when skip_bad_images is set.

        With text_only every image is the same mid-gray square (zero after normalisation), of one size, so that
        neither its pixels nor its shape can tell one example from another: a model trained so sees only text."""
        if self.text_only:
            return torch.zeros(3, self.image_short, self.image_short)
        try:
            return image_to_tensor(resize_image(load_image(path), self.image_short, self.image_long))
        except DataError as e:
            if not self.skip_bad_images:
                raise
            self._num_skipped += 1
            log.warning("skipping example (%d so far in this data set): %s", self.num_skipped, e)
            return None

    def example_image_path(self, i):
        """The path of example i's image, for grouping batches by orientation (landscape_flags); None for a data
        set whose examples have two images (NLVR2), which is not grouped."""
        return None

    def landscape_flags(self, progress=False):
        """[len(self)] bool numpy array, True where example i's image is wider than it is tall, read from the image
        headers once per distinct image (image_size); None for a data set whose examples cannot be grouped. For
        train.py's AspectGroupedSampler. With text_only every image is the same square: all False, nothing read.
        An unreadable image is a DataError, or counts as not landscape with skip_bad_images (it is skipped when
        its example is loaded)."""
        if len(self) == 0 or self.example_image_path(0) is None:
            return None
        flags, seen = np.zeros(len(self), dtype=bool), {}
        if self.text_only:
            return flags
        for i in tqdm(range(len(self)), desc="image sizes (to group batches by orientation)", unit="example",
                      disable=not progress, mininterval=2.0):
            path = self.example_image_path(i)
            if path not in seen:
                try:
                    width, height = image_size(path)
                    seen[path] = width > height
                except DataError:
                    if not self.skip_bad_images:
                        raise
                    seen[path] = False
            flags[i] = seen[path]
        return flags

    def encode(self, text):
        return self.tokenizer.encode(text, max_len=self.max_text_len)

    def text_batch(self, rows):
        return pad_token_rows(rows, self.tokenizer.pad_id)

    def image_text_batch(self, images, examples, skipped, **fields):
        """The common part of a batch: padded images with their mask, and one text per example."""
        images, image_mask = pad_images(images)
        input_ids, text_mask = self.text_batch([e["input_ids"] for e in examples])
        return {"images": images, "image_mask": image_mask, "input_ids": input_ids, "text_mask": text_mask,
                **fields, "skipped": skipped}


def _kept(examples):
    """Drop the examples whose image could not be read; the batch reports how many in batch["skipped"]."""
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


_STOPWORDS = set("a an the of on in at to with and is are there its it this that some one two three four five "
                 "image picture photo shape shapes object objects".split())


def content_words(text):
    return set(re.findall(r"[a-z]+", text.lower())) - _STOPWORDS


NEGATIVES = ("random", "subject", "hard")  # PretrainDataset's kinds of mismatched caption


def images_by_subject(caption_lists):
    """For each image, the indices of all images that share its subject (itself included, as an int64 array).

    An image's subject is the content word w maximising count(w in its captions) x log(n_images / df(w)), df(w)
    being the number of images whose captions use w: a word all its captions repeat and few other images use.
    Ties go to the alphabetically first word; an image without content words is its own subject."""
    words = [[content_words(c) for c in caps] for caps in caption_lists]
    df = collections.Counter(w for per_caption in words for w in set().union(*per_caption))
    n = len(caption_lists)
    groups, subject_of = collections.defaultdict(list), []
    for i, per_caption in enumerate(words):
        count = collections.Counter(w for ws in per_caption for w in ws)
        best = min(count, key=lambda w: (-count[w] * math.log(n / df[w]), w), default=f"#{i}")
        subject_of.append(best)
        groups[best].append(i)
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}
    return [arrays[k] for k in subject_of]


class PretrainDataset(ImageTextDataset):
    """One item per image; it carries 4 texts (Sec. 4.1, A.2): 2 matched captions of the image and 2 captions of
    other images. A caption of another picture of the same photograph (a VG image that is a COCO image) is never
    used as a mismatch. All four texts get BERT masking; only the matched ones carry MLM labels (a [MASK] must not
    give the match away to ITM).

    negatives="random" (the paper's): both mismatched captions are captions of random other images, so a
    mismatched text is distributed exactly like a matched one and only the image can tell them apart.
    negatives="subject" (beyond the paper): the third text is instead a caption of a random other image with the
    same subject, the content word most typical of an image's captions (count in its captions x inverse image
    frequency: "dog" for most photographs of a dog; on the synthetic world, the background's colour). Every image
    of a subject is picked by each other one with the same probability, so a subject's images serve as mismatches
    equally often and a mismatched text is still distributed exactly like a matched one: the text alone cannot
    tell it apart (measured: README, "Does the model look at the image?"). Such a mismatch differs from the image
    in its details, not in its subject. negatives="hard" (beyond the paper, kept to show the trap): the third text
    is the caption sharing most content words with a matched caption among `hard_pool` random others. Wordy
    captions win that contest, so a model that never sees the image catches 75% of them: they teach ITM to read
    the text.

    subject_from_epoch=N (beyond the paper, -1: never) is a curriculum: the third text is a "subject" one from epoch
    N on (0-based), whatever `negatives` says before.

    images: list of (path, [captions], picture key); equal keys mean the same photograph.
    """

    def __init__(self, images, tokenizer, negatives="random", hard_pool=16, mlm_prob=0.15, subject_from_epoch=-1,
                 **kwargs):
        super().__init__(tokenizer, **kwargs)
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        self.subject_from_epoch = subject_from_epoch
        self.paths = StringTable(p for p, _, _ in images)
        self.captions = StringTable(c for _, caps, _ in images for c in caps)
        self.caption_start = np.cumsum([0] + [len(caps) for _, caps, _ in images], dtype=np.int64)
        self.keys = StringTable(str(k) for _, _, k in images)
        self.negatives, self.hard_pool, self.mlm_prob = negatives, hard_pool, mlm_prob
        if negatives == "subject" or subject_from_epoch >= 0:
            self.same_subject = images_by_subject([caps for _, caps, _ in images])

    def __len__(self):
        return len(self.paths)

    def example_image_path(self, i):
        return self.paths[i]

    def captions_of(self, i):
        return [self.captions[c] for c in range(self.caption_start[i], self.caption_start[i + 1])]

    def _caption_of_another(self, i, own, rng, pool=None, tries=100):
        """(index of another photograph, one of its captions that is not also a caption of image i), the
        photograph drawn from `pool` (image indices; default: every image); None if `tries` draws find none."""
        for _ in range(tries):
            j = rng.randrange(len(self)) if pool is None else int(pool[rng.randrange(len(pool))])
            if j != i and self.keys[j] != self.keys[i]:
                c = self.caption_start[j] + rng.randrange(self.caption_start[j + 1] - self.caption_start[j])
                if self.captions[c] not in own:
                    return j, self.captions[c]
        return None

    def _random_caption(self, i, own, rng):
        found = self._caption_of_another(i, own, rng)
        if found is None:
            raise DataError("pre-training needs captions of at least two different images")
        return found

    def negatives_now(self):
        """The kind of the third text in this epoch: `negatives`, or "subject" from epoch subject_from_epoch on."""
        return "subject" if 0 <= self.subject_from_epoch <= self.epoch else self.negatives

    def choose_texts(self, i, rng):
        """Image i's 4 texts (matched, matched, the chosen mismatch, a random mismatch) and the index of the image
        each comes from, drawn with `rng`."""
        own = self.captions_of(i)
        matched = rng.sample(own, 2) if len(own) >= 2 else [own[0], own[0]]
        random_source, random_text = self._random_caption(i, own, rng)
        chosen, negatives = None, self.negatives_now()
        if negatives == "subject":  # an image that is alone with its subject falls back to a random caption
            group = self.same_subject[i]
            chosen = self._caption_of_another(i, own, rng, pool=group, tries=20 if len(group) > 1 else 0)
        hard_source, hard_text = chosen or self._random_caption(i, own, rng)
        if negatives == "hard":
            words = content_words(matched[0])
            best = len(words & content_words(hard_text))
            for _ in range(self.hard_pool - 1):
                j, text = self._random_caption(i, own, rng)
                overlap = len(words & content_words(text))
                if overlap > best:
                    best, hard_source, hard_text = overlap, j, text
        return matched + [hard_text, random_text], [i, i, hard_source, random_source]

    def __getitem__(self, i):
        rng = self.example_rng(i)
        texts, sources = self.choose_texts(i, rng)
        image = self.image(self.paths[i])
        if image is None:
            return None
        ids = [self.encode(t) for t in texts]
        # All four texts are masked, but only the matched ones are predicted (Sec. 4.1). Were the mismatched texts
        # left unmasked, a [MASK] in the input would tell the ITM head "matched" without looking at the image.
        all_ids, all_mask = self.text_batch(ids)
        generator = torch.Generator().manual_seed(rng.getrandbits(62))
        if self.mlm_prob:
            masked, labels = mask_tokens(all_ids, all_mask, self.tokenizer, self.mlm_prob, generator)
        else:  # held-out ITM: the texts as they are
            masked, labels = all_ids, torch.full_like(all_ids, IGNORE)
        return {
            "image": image, "image_id": self.keys[i], "texts": texts, "text_source": sources,
            "input_ids": [masked[k, :len(ids[k])].tolist() for k in range(4)],
            "mlm_labels": [labels[k, :len(ids[k])].tolist() for k in range(2)] + [[IGNORE] * len(r) for r in ids[2:]],
        }

    def collate(self, examples):
        """The pre-training batch; rows 4i..4i+3 are the texts of image i: matched, matched,
        mismatched (same subject with negatives="subject", the hard one with "hard"), mismatched (random)."""
        examples, skipped = _kept(examples)
        if not examples:
            return None
        images, image_mask = pad_images([e["image"] for e in examples])
        input_ids, text_mask = self.text_batch([r for e in examples for r in e["input_ids"]])
        mlm_labels, _ = pad_token_rows([r for e in examples for r in e["mlm_labels"]], IGNORE)
        B = len(examples)
        return {
            "images": images, "image_mask": image_mask, "input_ids": input_ids, "text_mask": text_mask,
            "img_index": torch.arange(B).repeat_interleave(4), "itm_label": torch.tensor([1, 1, 0, 0]).repeat(B),
            "mlm_labels": mlm_labels, "image_ids": [e["image_id"] for e in examples],
            "texts": [t for e in examples for t in e["texts"]],
            "text_source": torch.tensor([s for e in examples for s in e["text_source"]]), "skipped": skipped,
        }


class RetrievalTrainDataset(ImageTextDataset):
    """Retrieval fine-tuning (Sec. 4.2.1): one item per image with one of its captions, drawn anew each epoch.
    Items are images, so any batch of t distinct indices holds t aligned pairs of t distinct images, with any
    sampler; the model pairs each image with the other t - 1 captions as the unaligned ones. (An epoch visits
    each image once with one caption: an epoch over all 5 captions of each image is 5 of these.)"""

    def __init__(self, images, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.paths = StringTable(p for p, _, _ in images)
        self.captions = StringTable(c for _, caps, _ in images for c in caps)
        self.caption_start = np.cumsum([0] + [len(caps) for _, caps, _ in images], dtype=np.int64)
        self.image_ids = [k for _, _, k in images]

    def __len__(self):
        return len(self.paths)

    def example_image_path(self, i):
        return self.paths[i]

    def __getitem__(self, i):
        rng = self.example_rng(i)
        caption = self.captions[rng.randrange(self.caption_start[i], self.caption_start[i + 1])]
        image = self.image(self.paths[i])
        if image is None:
            return None
        return {"image": image, "input_ids": self.encode(caption), "image_id": self.image_ids[i], "text": caption}

    def collate(self, examples):
        examples, skipped = _kept(examples)
        if not examples:
            return None
        return self.image_text_batch([e["image"] for e in examples], examples, skipped,
                                     image_ids=[e["image_id"] for e in examples], texts=[e["text"] for e in examples])


class RetrievalTextDataset(ImageTextDataset):
    """Retrieval evaluation, texts: the first 5 captions of each image, in file order; txt2img[k] is the index
    (into the RetrievalImageDataset) of caption k's image."""

    def __init__(self, images, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.captions = StringTable(c for _, caps, _ in images for c in caps)
        self.txt2img = np.array([i for i, (_, caps, _) in enumerate(images) for _ in caps], dtype=np.int64)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, k):
        return {"input_ids": self.encode(self.captions[k]), "text_index": k, "txt2img": int(self.txt2img[k])}

    def collate(self, examples):
        input_ids, text_mask = self.text_batch([e["input_ids"] for e in examples])
        return {"input_ids": input_ids, "text_mask": text_mask,
                "text_index": torch.tensor([e["text_index"] for e in examples]),
                "txt2img": torch.tensor([e["txt2img"] for e in examples])}


class RetrievalImageDataset(ImageTextDataset):
    """Retrieval evaluation, images: each image once (the CNN runs once per image). `.texts` is the matching
    RetrievalTextDataset; `.img2txt[i]` lists the caption indices of image i. COCO 1K = 5 consecutive folds of
    1,000 images of this order."""

    def __init__(self, images, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.paths = StringTable(p for p, _, _ in images)
        self.image_ids = [k for _, _, k in images]
        self.texts = RetrievalTextDataset(images, tokenizer, **kwargs)
        self.txt2img = self.texts.txt2img
        self.img2txt = [[] for _ in images]
        for k, i in enumerate(self.txt2img):
            self.img2txt[i].append(k)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = self.image(self.paths[i])
        return None if image is None else {"image": image, "image_index": i}

    def collate(self, examples):
        examples, skipped = _kept(examples)
        if not examples:
            return None
        images, image_mask = pad_images([e["image"] for e in examples])
        return {"images": images, "image_mask": image_mask,
                "image_index": torch.tensor([e["image_index"] for e in examples]), "skipped": skipped}


VQA_QUESTION_FILES = {s: f"v2_OpenEnded_mscoco_{s}_questions.json"
                      for s in ("train2014", "val2014", "test2015", "test-dev2015")}
VQA_ANNOTATION_FILES = {s: f"v2_mscoco_{s}_annotations.json" for s in ("train2014", "val2014")}
VQA_IMAGE_FOLDERS = {"train2014": "train2014", "val2014": "val2014", "test2015": "test2015",
                     "test-dev2015": "test2015"}  # test-dev images live in test2015
# "train" is train2014 alone, so that a local evaluation on "val" scores questions the model never trained on;
# "train+val" is the paper's recipe for the test server (test-dev / test), which trains on both.
VQA_SPLITS = {"train": ("train2014",), "train+val": ("train2014", "val2014"), "val": ("val2014",),
              "test-dev": ("test-dev2015",), "test": ("test2015",)}
# the evaluation splits that each training split has seen (evaluate.py refuses to score them)
TRAINED_ON = {("vqa", "train+val"): {"val"}}
VQA_ANSWER_TYPES = ("yes/no", "number", "other")


class VQADataset(ImageTextDataset):
    """VQA v2: one image, one question; targets are the soft scores of the 10 answers over `answer_vocab`.

    records: list of (question_id, question, image path, answer_type or None, [10 raw answers] or []).
    """

    def __init__(self, records, answer_vocab, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.answer_vocab = list(answer_vocab)
        self.answer_index = {a: i for i, a in enumerate(self.answer_vocab)}
        self.num_answers = len(self.answer_vocab)
        self.question_ids = np.array([r[0] for r in records], dtype=np.int64)
        self.questions = StringTable(r[1] for r in records)
        unique_paths = sorted({r[2] for r in records})
        path_index = {p: i for i, p in enumerate(unique_paths)}
        self.paths = StringTable(unique_paths)
        self.image_of = np.array([path_index[r[2]] for r in records], dtype=np.int64)
        self.answer_types = np.array([-1 if r[3] is None else VQA_ANSWER_TYPES.index(r[3]) for r in records],
                                     dtype=np.int8)
        self.answers = StringTable("\x1f".join(r[4]) for r in records)  # \x1f: a separator no answer contains

    def __len__(self):
        return len(self.question_ids)

    def targets(self, answers):
        """Soft-score vector [num_answers] of a list of raw answers (normalised as the vocabulary was)."""
        target = torch.zeros(self.num_answers)
        for answer, count in collections.Counter(normalize_vocab_answer(a) for a in answers).items():
            if answer in self.answer_index:
                target[self.answer_index[answer]] = vqa_soft_score(count)
        return target

    def example_image_path(self, i):
        return self.paths[self.image_of[i]]

    def __getitem__(self, i):
        image = self.image(self.paths[self.image_of[i]])
        if image is None:
            return None
        joined = self.answers[i]
        answers = joined.split("\x1f") if joined else []
        answer_type = int(self.answer_types[i])
        return {"image": image, "input_ids": self.encode(self.questions[i]), "targets": self.targets(answers),
                "question_id": int(self.question_ids[i]), "answers": answers,
                "answer_type": VQA_ANSWER_TYPES[answer_type] if answer_type >= 0 else None}

    def collate(self, examples):
        examples, skipped = _kept(examples)
        if not examples:
            return None
        return self.image_text_batch([e["image"] for e in examples], examples, skipped,
                                     targets=torch.stack([e["targets"] for e in examples]),
                                     question_id=torch.tensor([e["question_id"] for e in examples]),
                                     answer_type=[e["answer_type"] for e in examples],
                                     answers=[e["answers"] for e in examples])


class NLVR2Dataset(ImageTextDataset):
    """NLVR2: two images and one sentence; label 1 = "True". Batch rows 2i and 2i+1 are example i's left and
    right images."""

    def __init__(self, examples, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.identifiers = StringTable(e[0] for e in examples)
        self.sentences = StringTable(e[1] for e in examples)
        self.labels = np.array([e[2] for e in examples], dtype=np.int64)
        self.left = StringTable(e[3] for e in examples)
        self.right = StringTable(e[4] for e in examples)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        left, right = self.image(self.left[i]), self.image(self.right[i])
        if left is None or right is None:
            return None
        return {"images": [left, right], "input_ids": self.encode(self.sentences[i]), "label": int(self.labels[i]),
                "identifier": self.identifiers[i]}

    def collate(self, examples):
        examples, skipped = _kept(examples)
        if not examples:
            return None
        return self.image_text_batch([x for e in examples for x in e["images"]], examples, skipped,
                                     labels=torch.tensor([e["label"] for e in examples]),
                                     identifier=[e["identifier"] for e in examples])


class SNLIVEDataset(ImageTextDataset):
    """SNLI-VE: one image (the premise) and the hypothesis sentence2; labels 0 entailment, 1 neutral,
    2 contradiction. The text premise sentence1 is never read."""

    def __init__(self, examples, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.pair_ids = StringTable(e[0] for e in examples)
        self.hypotheses = StringTable(e[1] for e in examples)
        self.labels = np.array([e[2] for e in examples], dtype=np.int64)
        unique_paths = sorted({e[3] for e in examples})
        path_index = {p: i for i, p in enumerate(unique_paths)}
        self.paths = StringTable(unique_paths)
        self.image_of = np.array([path_index[e[3]] for e in examples], dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def example_image_path(self, i):
        return self.paths[self.image_of[i]]

    def __getitem__(self, i):
        image = self.image(self.paths[self.image_of[i]])
        if image is None:
            return None
        return {"image": image, "input_ids": self.encode(self.hypotheses[i]), "label": int(self.labels[i]),
                "pair_id": self.pair_ids[i]}

    def collate(self, examples):
        examples, skipped = _kept(examples)
        if not examples:
            return None
        return self.image_text_batch([e["image"] for e in examples], examples, skipped,
                                     labels=torch.tensor([e["label"] for e in examples]),
                                     pair_id=[e["pair_id"] for e in examples])


def build_vqa_answer_vocab(data_root, min_count=9):
    """The answer vocabulary from vqa/'s train2014 + val2014 annotation files (as every VQA v2 split uses)."""
    vqa_dir = os.path.join(data_root, "vqa")
    paths = [os.path.join(vqa_dir, VQA_ANNOTATION_FILES[s]) for s in ("train2014", "val2014")]
    require_files("vqa answer vocabulary", paths)
    annotations = []
    for p in paths:
        annotations += field(read_json(p, "VQA v2 annotations: {\"annotations\": [...]}"), "annotations", p)
    return answer_vocabulary(annotations, min_count)


def read_vqa(data_root, split):
    """VQA records of a split, (question_id, question, image path, answer_type, answers), and the annotations read
    (so that the "train+val" split, which reads train2014 + val2014, builds the answer vocabulary without a
    second parse of those large files)."""
    if split not in VQA_SPLITS:
        raise DataError(f"vqa: unknown split {split!r} (expected one of {', '.join(VQA_SPLITS)})")
    vqa_dir, coco_dir = os.path.join(data_root, "vqa"), os.path.join(data_root, "coco")
    subsets = VQA_SPLITS[split]
    files = [os.path.join(vqa_dir, VQA_QUESTION_FILES[s]) for s in subsets]
    files += [os.path.join(vqa_dir, VQA_ANNOTATION_FILES[s]) for s in subsets if s in VQA_ANNOTATION_FILES]
    files += [os.path.join(coco_dir, VQA_IMAGE_FOLDERS[s]) for s in subsets]
    require_files(f"vqa {split}", files)
    records, all_annotations = [], []
    for s in subsets:
        q_path = os.path.join(vqa_dir, VQA_QUESTION_FILES[s])
        questions = field(read_json(q_path, "VQA v2 questions: {\"questions\": [...]}"), "questions", q_path)
        annotations = {}
        if s in VQA_ANNOTATION_FILES:
            a_path = os.path.join(vqa_dir, VQA_ANNOTATION_FILES[s])
            for k, a in enumerate(field(read_json(a_path, "VQA v2 annotations"), "annotations", a_path)):
                field(a, "multiple_choice_answer", f"{a_path}: annotations[{k}]")
                annotations[field(a, "question_id", f"{a_path}: annotations[{k}]")] = (a, k)
                all_annotations.append(a)
        folder = VQA_IMAGE_FOLDERS[s]
        for k, q in enumerate(questions):
            at = f"{q_path}: questions[{k}]"
            qid, image_id = field(q, "question_id", at), field(q, "image_id", at)
            path = os.path.join(coco_dir, folder, f"COCO_{folder}_{image_id:012d}.jpg")
            answer_type, answers = None, []
            if s in VQA_ANNOTATION_FILES:
                if qid not in annotations:
                    raise DataError(f"{at}: question_id {qid} has no annotation in {VQA_ANNOTATION_FILES[s]}")
                a, ak = annotations[qid]
                a_at = f"{os.path.join(vqa_dir, VQA_ANNOTATION_FILES[s])}: annotations[{ak}]"
                answer_type = field(a, "answer_type", a_at)
                if answer_type not in VQA_ANSWER_TYPES:
                    raise DataError(f"{a_at}: unknown answer_type {answer_type!r} (expected {VQA_ANSWER_TYPES})")
                answers = [str(field(x, "answer", a_at + ".answers")) for x in field(a, "answers", a_at)]
            records.append((qid, str(field(q, "question", at)), path, answer_type, answers))
    return records, all_annotations




def build_dataset(task, split, data_root, tokenizer, config_like, **opts):
    """The dataset of a task and split read from `data_root` (layout in the module docstring).

    config_like: anything with image_short, image_long and max_text_len (a SOHOConfig).
    opts: seed (None: fresh randomness from torch's generator; an int: the same draws for (seed, epoch, index),
    see set_epoch), skip_bad_images (False), source ("coco" or "flickr30k", retrieval), answer_vocab (a list,
    VQA; default: built from train2014 + val2014 annotations), min_answer_count (9), negatives (one of
    NEGATIVES, pretrain), use_vg (True, pretrain), text_only (False: every image replaced by one constant image,
    the control that cannot see).
    The returned dataset's `.collate` is the DataLoader collate_fn.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    common = {"image_short": config_like.image_short, "image_long": config_like.image_long,
              "max_text_len": config_like.max_text_len, "skip_bad_images": opts.get("skip_bad_images", False),
              "seed": opts.get("seed"), "text_only": opts.get("text_only", False)}
    builders = {"pretrain": build_pretrain, "retrieval": build_retrieval, "vqa": build_vqa, "nlvr2": build_nlvr2,
                "snli-ve": build_snli_ve}
    return builders[task](split, data_root, tokenizer, common, opts)


def build_pretrain(split, data_root, tokenizer, common, opts):
    """Pre-training pairs: train = COCO train + restval and VG (less VG copies of COCO val / test images); val and
    test = COCO's held-out images, nothing masked, for held-out ITM."""
    coco_json = os.path.join(data_root, "coco", "dataset_coco.json")
    negatives = opts.get("negatives", "random")
    if split in ("val", "test"):
        # held-out pairs: COCO's Karpathy val / test images, which pre-training never sees (VG copies of them are
        # dropped from the training set), with mismatched captions drawn from the same held-out images
        require_files(f"pretrain {split}", [coco_json])
        images, _ = read_karpathy(coco_json, coco_image_path(os.path.join(data_root, "coco")), (split,))
        return PretrainDataset([(p, caps, f"coco:{cocoid}") for p, caps, cocoid in images], tokenizer,
                               negatives=negatives, mlm_prob=0.0, **common)
    if split != "train":
        raise DataError(f"pretrain: unknown split {split!r} (expected train, or val / test for held-out ITM)")
    vg_dir = os.path.join(data_root, "vg")
    vg_files = [os.path.join(vg_dir, "region_descriptions.json"), os.path.join(vg_dir, "image_data.json")]
    has_coco = os.path.isfile(coco_json)
    has_vg = opts.get("use_vg", True) and all(os.path.isfile(p) for p in vg_files)
    if not has_coco and not has_vg:
        raise DataError(f"pretrain: found neither {coco_json} nor {' and '.join(vg_files)}")
    images, stats = [], collections.Counter()
    if has_coco:
        coco, empty = read_karpathy(coco_json, coco_image_path(os.path.join(data_root, "coco")), ("train", "restval"))
        images += [(p, caps, f"coco:{cocoid}") for p, caps, cocoid in coco]
        stats["coco_images"], stats["empty_captions"] = len(coco), empty
    if has_vg:
        if not has_coco:
            log.warning("pretrain: no %s, so VG images of COCO val/test cannot be dropped", coco_json)
        vg, vg_stats = read_visual_genome(vg_dir, coco_held_out_ids(coco_json) if has_coco else ())
        # a VG image that is a COCO image is the same photograph: same key, so never a mismatch of itself
        images += [(p, caps, f"coco:{cid}" if cid is not None else f"vg:{os.path.basename(p)}") for p, caps, cid in vg]
        stats["vg_images"] = len(vg)
        stats.update(vg_stats)
    dataset = PretrainDataset(images, tokenizer, negatives=negatives, mlm_prob=opts.get("mlm_prob", 0.15),
                              subject_from_epoch=opts.get("subject_from_epoch", -1), **common)
    dataset.stats.update(stats)
    return dataset


def build_retrieval(split, data_root, tokenizer, common, opts):
    """Retrieval on COCO or Flickr30K (Karpathy splits): train = one caption per image per epoch; val / test =
    the protocol's first 5 captions of each image."""
    source = opts.get("source", "coco")
    if source == "coco":
        json_path = os.path.join(data_root, "coco", "dataset_coco.json")
        path_of = coco_image_path(os.path.join(data_root, "coco"))
        splits = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
    elif source == "flickr30k":
        json_path = os.path.join(data_root, "flickr30k", "dataset_flickr30k.json")
        path_of = flickr_image_path(os.path.join(data_root, "flickr30k"))
        splits = {"train": ("train",), "val": ("val",), "test": ("test",)}
    else:
        raise DataError(f"retrieval: unknown source {source!r} (expected 'coco' or 'flickr30k')")
    if split not in splits:
        raise DataError(f"retrieval: unknown split {split!r} (expected train, val or test)")
    require_files(f"retrieval {source} {split}", [json_path])
    if split == "train":
        images, empty = read_karpathy(json_path, path_of, splits[split])
        dataset = RetrievalTrainDataset(images, tokenizer, **common)
    else:  # the protocol: the first 5 captions of each test image
        images, empty = read_karpathy(json_path, path_of, splits[split], first_captions=5)
        dataset = RetrievalImageDataset(images, tokenizer, **common)
    dataset.stats["empty_captions"] = empty
    return dataset


def build_vqa(split, data_root, tokenizer, common, opts):
    """VQA v2 questions of a split (VQA_SPLITS); the answer classes always come from train2014 + val2014."""
    records, annotations = read_vqa(data_root, split)
    min_count = opts.get("min_answer_count", 9)
    answer_vocab = opts.get("answer_vocab")
    if not answer_vocab:  # always from train2014 + val2014, whichever split this is
        answer_vocab = (answer_vocabulary(annotations, min_count) if split == "train+val"
                        else build_vqa_answer_vocab(data_root, min_count))
    return VQADataset(records, answer_vocab, tokenizer, **common)


def build_nlvr2(split, data_root, tokenizer, common, opts):
    """NLVR2 examples (two images and a sentence) of train, dev or test1."""
    if split not in ("train", "dev", "test1"):
        raise DataError(f"nlvr2: unknown split {split!r} (expected train, dev or test1)")
    nlvr2_dir = os.path.join(data_root, "nlvr2")
    json_path = os.path.join(nlvr2_dir, f"{split}.json")
    require_files(f"nlvr2 {split}", [json_path])
    examples = read_nlvr2(json_path, nlvr2_image_dir(nlvr2_dir, split), split)
    return NLVR2Dataset(examples, tokenizer, **common)


def build_snli_ve(split, data_root, tokenizer, common, opts):
    """SNLI-VE (a Flickr30K image as premise, a hypothesis sentence) of train, dev or test."""
    if split not in ("train", "dev", "test"):
        raise DataError(f"snli-ve: unknown split {split!r} (expected train, dev or test)")
    jsonl = os.path.join(data_root, "snli-ve", f"snli_ve_{split}.jsonl")
    image_dir = os.path.join(data_root, "flickr30k", "flickr30k-images")
    require_files(f"snli-ve {split}", [jsonl, image_dir])
    return SNLIVEDataset(read_snli_ve(jsonl, image_dir), tokenizer, **common)


# ---- Random batches ----
# Batches with the keys, shapes and dtypes of a task's collate (see the table at the top) and random content, for
# tests and speed measurements that need a batch but no data set. Token ids follow the synthetic world's vocabulary,
# whose special tokens come first in SPECIAL_TOKENS order: [PAD] = 0, [UNK] = 1, [CLS] = 2, [SEP] = 3, [MASK] = 4.

RANDOM_BATCH_TOKENS = types.SimpleNamespace(  # the ids a vocabulary that opens with SPECIAL_TOKENS gives them
    pad_id=SPECIAL_TOKENS.index("[PAD]"), cls_id=SPECIAL_TOKENS.index("[CLS]"), sep_id=SPECIAL_TOKENS.index("[SEP]"),
    mask_id=SPECIAL_TOKENS.index("[MASK]"), special_ids=tuple(range(len(SPECIAL_TOKENS))))


def random_images(n, image_size, generator):
    """n images of image_size (h, w), N(0, 1) pixels, padded as pad_images pads: (images, image_mask)."""
    h, w = image_size
    return pad_images([torch.randn(3, h, w, generator=generator) for _ in range(n)])


def random_texts(n, text_len, vocab_size, generator):
    """n texts `[CLS] words [SEP] [PAD]..` of 3 to text_len ids, the first one text_len long (as a collate pads
    to the longest text): (input_ids long [n, text_len], text_mask bool [n, text_len])."""
    tokens = RANDOM_BATCH_TOKENS
    lengths = torch.randint(3, text_len + 1, (n,), generator=generator)
    lengths[0] = text_len
    words = torch.randint(len(tokens.special_ids), vocab_size, (n, text_len - 2), generator=generator)
    rows = [[tokens.cls_id] + words[i, :lengths[i] - 2].tolist() + [tokens.sep_id] for i in range(n)]
    return pad_token_rows(rows, tokens.pad_id)


def random_batch(task, config, n, image_size=None, text_len=None, seed=0):
    """A batch of `task` as its collate returns it (the training collate: RetrievalTrainDataset for retrieval),
    with random content, on the CPU; the same for the same arguments.

    config: anything with vocab_size, num_answers, image_short and max_text_len (a SOHOConfig).
    n: images for pretrain (each with 4 texts: 2 matched, 2 mismatched), examples otherwise (NLVR2: 2n images).
    image_size: (h, w) of every image (default: image_short square), padded to a multiple of 32 as pad_images does.
    text_len: the width of input_ids (default: max_text_len, at least 3); each text is 3 to text_len ids long.
    Pre-training texts are masked as PretrainDataset masks them (mask_tokens: every text, at least one target per
    text, never [CLS] or [SEP]); the MLM labels are kept on the matched texts only.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    g = torch.Generator().manual_seed(seed)
    text_len = max(3, text_len or config.max_text_len)
    n_images = 2 * n if task == "nlvr2" else n
    n_texts = 4 * n if task == "pretrain" else n
    images, image_mask = random_images(n_images, image_size or (config.image_short, config.image_short), g)
    input_ids, text_mask = random_texts(n_texts, text_len, config.vocab_size, g)
    batch = {"images": images, "image_mask": image_mask, "input_ids": input_ids, "text_mask": text_mask}
    if task == "pretrain":
        batch.update(_random_pretrain_fields(batch, config.vocab_size, n, g))
    elif task == "retrieval":
        batch.update(image_ids=list(range(n)), texts=[f"text {i}" for i in range(n)])
    elif task == "vqa":
        batch.update(_random_vqa_fields(config.num_answers, n, g))
    elif task == "nlvr2":
        batch.update(labels=torch.randint(2, (n,), generator=g), identifier=[f"random-{i}-0" for i in range(n)])
    else:
        batch.update(labels=torch.randint(len(SNLI_VE_LABELS), (n,), generator=g),
                     pair_id=[f"random#{i}" for i in range(n)])
    batch["skipped"] = 0
    return batch


def _random_pretrain_fields(batch, vocab_size, n, g):
    """What PretrainDataset.collate adds to images and texts: image i's texts are rows 4i..4i+3, matched, matched,
    mismatched (a text of image text_source), mismatched."""
    tokenizer = types.SimpleNamespace(vocab_size=vocab_size, **vars(RANDOM_BATCH_TOKENS))
    masked, labels = mask_tokens(batch["input_ids"], batch["text_mask"], tokenizer, generator=g)
    itm_label = torch.tensor([1, 1, 0, 0]).repeat(n)
    other = (torch.arange(n)[:, None] + torch.randint(1, max(n, 2), (n, 2), generator=g)) % n  # another image
    text_source = torch.cat([torch.arange(n)[:, None].expand(n, 2), other], dim=1).flatten()
    return {"input_ids": masked, "img_index": torch.arange(n).repeat_interleave(4), "itm_label": itm_label,
            "mlm_labels": labels.masked_fill(itm_label[:, None] == 0, IGNORE),
            "image_ids": [f"random:{i}" for i in range(n)], "texts": [f"text {k}" for k in range(4 * n)],
            "text_source": text_source}


def _random_vqa_fields(num_answers, n, g):
    """What VQADataset.collate adds: soft scores of 10 annotators' answers (1 to 3 distinct ones) per question."""
    targets = torch.zeros(n, num_answers)
    answers = []
    for i in range(n):
        distinct = torch.randperm(num_answers, generator=g)[:int(torch.randint(1, 4, (), generator=g))].tolist()
        counts = [10 - 2 * (len(distinct) - 1)] + [2] * (len(distinct) - 1)  # 10 answers in all
        for a, count in zip(distinct, counts):
            targets[i, a] = vqa_soft_score(count)
        answers.append([f"answer {a}" for a, count in zip(distinct, counts) for _ in range(count)])
    answer_type = [VQA_ANSWER_TYPES[int(k)] for k in torch.randint(len(VQA_ANSWER_TYPES), (n,), generator=g)]
    return {"targets": targets, "question_id": torch.arange(n) * 1000, "answer_type": answer_type,
            "answers": answers}


# ---- Loading speed ----

def measure_data_wait(loader, step_fn, num_batches=20, warmup=2):
    """Run step_fn(batch) over a DataLoader and time how long the consumer waits for data.

    Returns {"batches", "wait_s", "step_s", "wait_share"}; wait_share = wait / (wait + step). The first `warmup`
    batches (worker start-up) are not counted.
    """
    iterator = iter(loader)
    wait = step = 0.0
    counted = 0
    for k in range(warmup + num_batches):
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        t1 = time.perf_counter()
        step_fn(batch)
        t2 = time.perf_counter()
        if k >= warmup:
            wait, step, counted = wait + t1 - t0, step + t2 - t1, counted + 1
    return {"batches": counted, "wait_s": wait, "step_s": step, "wait_share": wait / max(wait + step, 1e-9)}


# ---- Command line ----

def _image_references(name, dataset):
    """(image path, the annotation key that names it) for each image of a dataset, for `check --full`."""
    if isinstance(dataset, NLVR2Dataset):
        return [(side[i], f"{name}, identifier {dataset.identifiers[i]}")
                for i in range(len(dataset)) for side in (dataset.left, dataset.right)]
    if isinstance(dataset, (VQADataset, SNLIVEDataset)):
        key, ids = (("question_id", dataset.question_ids) if isinstance(dataset, VQADataset)
                    else ("pairID", dataset.pair_ids))
        first = {}  # image -> its first example
        for i in range(len(dataset)):
            first.setdefault(int(dataset.image_of[i]), i)
        return [(dataset.paths[j], f"{name}, {key} {ids[i]}") for j, i in sorted(first.items())]
    keys = dataset.keys if isinstance(dataset, PretrainDataset) else dataset.image_ids
    return [(dataset.paths[i], f"{name}, image {keys[i]}") for i in range(len(dataset))]


def _check(data_root, vocab, image_short, image_long, full=False):
    """Build every task and split whose files exist (every annotation record is parsed), print its size, and read
    its first example. With full=True also open every image file that any set names (and every VG image, also those
    pre-training drops), with a progress bar, then print what was read (each annotation file, the image files per
    folder) and every unreadable image with the set and annotation key that name it. Returns the number of bad
    image files (0 without full)."""
    global _files_read
    if not os.path.isdir(data_root):
        raise SystemExit(f"--data {data_root}: the folder does not exist (expected the layout of data.py's docstring)")
    print(f"check {data_root}: " + ("full mode: every annotation record parsed, every image file opened" if full
                                    else "quick mode: each set built, its first example read (--full opens every "
                                    "image file)"))
    config = types.SimpleNamespace(image_short=image_short, image_long=image_long, max_text_len=16)
    vocab = vocab or os.path.join(data_root, "vocab.txt")
    tokenizer = Tokenizer.from_vocab(vocab, 16) if os.path.isfile(vocab) else None
    if tokenizer is None:
        print(f"no vocabulary at {vocab}: counting only, not reading examples")
    _files_read = set() if full else None
    try:
        references, unavailable = _check_sets(data_root, tokenizer, config, full)
    finally:
        files_read, _files_read = _files_read, None
    if not full:
        return 0
    named_by = {}  # image path -> the first set and key naming it
    for path, where in references:
        named_by.setdefault(path, where)
    bad = []
    for path in tqdm(named_by, desc="opening images", unit="image", file=sys.stderr, dynamic_ncols=True):
        try:
            load_image(path)
        except DataError as e:
            bad.append((e, named_by[path]))
    _print_full_check(data_root, vocab if tokenizer is not None else None, files_read, named_by, unavailable, bad)
    return len(bad)


def _check_sets(data_root, tokenizer, config, full):
    """_check's first part: each task and split built and printed. Returns ([(image path, the set and key naming
    it)] when full, else [], the number of sets unavailable)."""
    references, unavailable, answer_vocab = [], 0, None
    try:
        answer_vocab = build_vqa_answer_vocab(data_root)
        print(f"vqa answer vocabulary: {len(answer_vocab)} answers")
    except DataError as e:
        print(e)
    combos = [("pretrain", "train", {})]
    combos += [("retrieval", s, {"source": src}) for src in ("coco", "flickr30k") for s in ("train", "val", "test")]
    combos += [("vqa", s, {"answer_vocab": answer_vocab}) for s in VQA_SPLITS]
    combos += [("nlvr2", s, {}) for s in ("train", "dev", "test1")]
    combos += [("snli-ve", s, {}) for s in ("train", "dev", "test")]
    for task, split, opts in combos:
        name = f"{task} {opts.get('source', '')} {split}".replace("  ", " ")
        try:
            dataset = build_dataset(task, split, data_root, tokenizer, config, seed=0, **opts)
        except DataError as e:
            print(f"{name:28s} unavailable: {e}")
            unavailable += 1
            continue
        extra = f", {len(dataset.texts)} captions" if hasattr(dataset, "texts") else ""
        extra += "".join(f", {k} {v}" for k, v in sorted(dataset.stats.items()))
        if full:
            references += _image_references(name, dataset)
        if tokenizer is not None and len(dataset):
            try:
                dataset[0]
                extra += ", first example read"
            except DataError as e:
                extra += f", first example unreadable: {e}"
        print(f"{name:28s} {len(dataset):8d} examples{extra}")
    vg_dir = os.path.join(data_root, "vg")
    vg_files = [os.path.join(vg_dir, f) for f in ("region_descriptions.json", "image_data.json")]
    if full and all(os.path.isfile(f) for f in vg_files):
        try:  # pre-training drops the VG copies of COCO val/test images: open those too
            vg, _ = read_visual_genome(vg_dir)
            references += [(p, f"vg, image {os.path.splitext(os.path.basename(p))[0]}") for p, _, _ in vg]
        except DataError as e:
            print(f"{'vg (all images)':28s} unavailable: {e}")
    return references, unavailable


def _print_full_check(data_root, vocab, files_read, named_by, unavailable, bad):
    """_check's summary in full mode: the annotation files read, the image files per folder, every bad image."""
    folders = collections.Counter(re.sub(r"[/\\]\d+$", "/<directory>", os.path.relpath(os.path.dirname(p), data_root))
                                  for p in named_by)
    print(f"\nfull check of {data_root}: read {len(files_read)} annotation files"
          + (f" and the vocabulary {vocab}" if vocab else "") + f", opened {len(named_by)} image files")
    for path in sorted(files_read):
        print(f"  {os.path.relpath(path, data_root)}")
    for folder, n in sorted(folders.items()):
        print(f"  {folder}/: {n} image files")
    if unavailable:
        print(f"{unavailable} set(s) unavailable (see above: missing files, or the annotation line at fault)")
    print(f"bad image files: {len(bad)}")
    for e, where in bad:
        print(f"  {e} (named by {where})")


def _bench(args):
    data_root = args.data
    if data_root is None:
        import synthetic  # not at the top: synthetic.py imports data.py (it writes what data.py reads)
        data_root = synthetic.ensure_synthetic_world()
    tokenizer = Tokenizer.from_vocab(args.vocab or os.path.join(data_root, "vocab.txt"), 24)
    config = types.SimpleNamespace(image_short=args.image_short, image_long=args.image_long, max_text_len=24)
    dataset = build_dataset("pretrain", "train", data_root, tokenizer, config, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, collate_fn=dataset.collate,
                                         persistent_workers=args.workers > 0)
    result = measure_data_wait(loader, lambda batch: time.sleep(args.step_ms / 1000), args.batches)
    print(f"{result['batches']} batches of {args.batch_size} images x 4 texts, {args.workers} workers, "
          f"simulated step {args.step_ms} ms: waited {result['wait_s']:.2f} s of "
          f"{result['wait_s'] + result['step_s']:.2f} s = {100 * result['wait_share']:.1f}% of the time")


def main(argv=None):
    parser = argparse.ArgumentParser(description="SOHO data: checks of a --data folder, loading benchmark "
                                     "(the synthetic world: python synthetic.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="count what a --data folder holds, task by task")
    p.add_argument("--data", required=True)
    p.add_argument("--vocab", default=None, help="vocab.txt (default: DIR/vocab.txt)")
    p.add_argument("--full", action="store_true", help="open every image file (progress bar) and list the bad ones "
                   "with the annotation that names them; exit status 1 if any (default: each set's first example)")
    p.add_argument("--image-short", type=int, default=600)
    p.add_argument("--image-long", type=int, default=1000)
    p = sub.add_parser("bench", help="share of time a consumer waits for pre-training batches")
    p.add_argument("--data", default=None, help="default: the synthetic world")
    p.add_argument("--vocab", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--step-ms", type=float, default=500, help="duration of the simulated training step")
    p.add_argument("--image-short", type=int, default=256)
    p.add_argument("--image-long", type=int, default=384)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "check":
        if _check(args.data, args.vocab, args.image_short, args.image_long, full=args.full):
            sys.exit(1)
    else:
        _bench(args)


if __name__ == "__main__":
    main()
