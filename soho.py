"""
SOHO: "Seeing Out of tHe bOx", end-to-end vision-language pre-training (Huang et al., CVPR 2021).

The whole model in one file, read top to bottom beside the paper:

    1. Config and presets        SOHOConfig, PRESETS (tiny / r18 / r101)
    2. The equations              encode (Eq. 1), vq_lookup (Eq. 2), vd_embed (Eq. 3), ema_update (Eq. 4),
                                  straight_through (Eq. 5), mask_by_index (MVM masking, Eq. 7),
                                  pretraining_objective (Eq. 9), sine_position_embedding_2d (Sec. 3.3)
    3. The visual encoder         ResNet with torchvision's parameter names
    4. The visual dictionary      VisualDictionary: a buffer, updated by Eq. 4 once per optimizer step
    5. The cross-modal transformer  a BERT encoder (post-LayerNorm, GELU) over [text ; visual tokens]
    6. SOHO                       the model: pre-training losses (Eq. 6-9) and the downstream heads
    7. Pretrained weights         from a local Hugging Face BERT directory and a torchvision ResNet file

Every equation is a plain, pure function: it returns new tensors and never changes its inputs. Modules own
parameters and buffers and call these functions. There is no training logic here (see train.py).
"""

import json
import os
import struct
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SOHOConfig:
    # visual encoder E (Eq. 1): ResNet, then a 1x1 conv to hidden_size, then 2x2 max pooling (stride 64 in all)
    resnet_depth: int = 18  # 18, 34, 50, 101 or 152
    resnet_width: int = 64  # channels of the first stage; torchvision's ResNets use 64
    backbone_bn: str = "frozen"  # "frozen": BatchNorm uses its stored statistics; "train": per-batch statistics
    zero_init_residual: bool = False  # a ResNet from scratch: each block starts as the identity (see ResNet)
    average_downsample: bool = False  # shortcuts average 2x2 before their 1x1 conv ("ResNet-D"; see _downsample)
    # visual dictionary (Sec. 3.2)
    use_vd: bool = True  # False gives the "w/o VD" row of Table 7 (and no MVM)
    vd_size: int = 2048  # k, the number of entries; Table 7 finds 2048 best
    vd_gamma: float = 0.9  # the momentum of Eq. 4; the paper gives no value, see the README for why 0.9
    downstream_use_vd: bool = False  # Sec. 4.2: downstream tasks do better on the features *before* the VD
    # Beyond the paper: dead entries (entries no feature ever picks; see the README, "Differences")
    vd_init: str = "random"  # "random": N(0, 1), as the paper; "features": k-means on the first step's features
    vd_restart_after: int = 0  # re-seed an entry from a current feature after this many updates unused (0: never)
    # Beyond the paper: what the pooler reads (see CrossModalTransformer.pool and the README, "Differences")
    pool_text_mean: bool = False  # False: [CLS] alone, as the paper; True: [CLS] + the mean of the text's states
    # cross-modal transformer: BERT-base by default
    hidden_size: int = 768  # c: visual tokens and word embeddings share this width (Sec. 3.3)
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522  # bert-base-uncased
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    # pre-training
    # MVM (Sec. 3.3): the chance that a pair's visual tokens get masked (mask_by_index). Every pair is masked at
    # this rate, matched or not, so a visual [MASK] tells ITM nothing; the MVM loss is taken on the matched pairs
    # only (Sec. 4.1). The paper gives no rate: 0.3 is ours (README, "Differences").
    mvm_prob: float = 0.3
    max_text_len: int = 16  # [CLS] + words + [SEP]; the paper's Sec. 4.5 pads text to 16 tokens
    # downstream
    num_answers: int = 3129  # VQA v2 answer vocabulary (the paper's "3,192" is a typo)
    # images (Sec. 4.1): short side resized to image_short, long side at most image_long
    image_short: int = 600
    image_long: int = 1000
    # memory
    gradient_checkpointing: bool = False  # recompute activations in backward: r101 then fits on 24-32 GB GPUs


PRESETS = {
    # A narrow ResNet-18 (channels 16-32-64-128 instead of 64-...-512) and a 2-layer, 128-wide transformer, trained
    # from scratch. 256 px images give a 4x4 (up to 4x6) grid of visual tokens, so the VD and MVM have work to do,
    # and a pre-training step of 16 images x 4 texts takes about a quarter of a second on 2 CPU cores. Nothing was
    # pre-trained on ImageNet, so the ResNet trains its BatchNorm statistics and starts each block as the identity
    # (zero_init_residual), and the VD starts from the first step's features (vd_init="features"): the paper's
    # N(0, 1) start leaves all but 8 of 128 entries dead here (README, "Differences"). No dropout: in a few
    # minutes of training from scratch it only slows learning (held-out ITM 0.87 with 0.1, 0.91 without). The
    # pooler also reads the mean of the text's states (pool_text_mean): with [CLS] alone, ITM waited at chance for
    # ~300 to over 1,500 steps depending on the seed; with the mean (and ITM weighted 5, train.py) it left chance
    # by step ~940 in 14 of 15 runs on world v3 (10 seeds, batches grouped and not) and in 7 of 7 on world v4
    # (README, "Does the model look at the image?").
    "tiny": SOHOConfig(
        resnet_depth=18, resnet_width=16, backbone_bn="train", zero_init_residual=True, vd_size=128,
        vd_init="features", dropout=0.0, pool_text_mean=True,
        hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, vocab_size=1000,
        max_position_embeddings=64, max_text_len=24, num_answers=100, image_short=256, image_long=384,
    ),
    # The paper's ablation model (Table 7): ResNet-18 + the first 3 layers of BERT-base, VD of 2,048 entries,
    # 600x1000 images, 16 text tokens. The official code's only released configuration.
    "r18": SOHOConfig(resnet_depth=18, num_layers=3),
    # The paper's headline model (Tables 2-6): ResNet-101 + 12-layer BERT-base (hidden 768, 12 heads), VD 2,048.
    "r101": SOHOConfig(resnet_depth=101, num_layers=12),
}


def config_from_preset(preset, **overrides):
    """A copy of PRESETS[preset] with the given fields replaced; an unknown preset or field is an error."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(SOHOConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown SOHOConfig field(s) {unknown}; known fields: {sorted(known)}")
    return replace(PRESETS[preset], **overrides)


# ----------------------------------------------------------------------------------------------------------------
# 2. The equations
# ----------------------------------------------------------------------------------------------------------------


def encode(images, image_mask, backbone, projection):
    """Eq. 1, the trainable visual encoder:  V = E(I, theta),  V in R^{l x c}.

    E is a ResNet (its last stage, stride 32), then a 1x1 convolution to c channels, then a 2x2 max pooling,
    in the paper's order. The tokens form a grid of stride 64: token (r, c) summarises the 64x64 pixel cell at
    rows 64r..64r+63, columns 64c..64c+63. 64 is the stride, not the receptive field: each token's features see
    far beyond its cell (a ResNet-101's last stage sees hundreds of pixels around it).

    images:     [B, 3, H, W] float, H and W multiples of 32, padded bottom/right
    image_mask: [B, H, W] bool, True on real pixels
    returns     V [B, l, c] with l = gh * gw, gh = ceil(H / 64), gw = ceil(W / 64);
                valid [B, l] bool, True for tokens whose cell holds at least one real pixel;
                (gh, gw)
    """
    features = backbone(images)  # [B, C5, H/32, W/32]
    features = projection(features)  # [B, c, H/32, W/32]
    features = F.max_pool2d(features, kernel_size=2, stride=2, ceil_mode=True)  # [B, c, gh, gw]
    # A token is real if any pixel of its 64x64 cell is real; ceil_mode matches the feature pooling above.
    valid = F.max_pool2d(image_mask[:, None].float(), kernel_size=64, stride=64, ceil_mode=True)[:, 0] > 0
    gh, gw = features.shape[-2:]
    assert valid.shape[-2:] == (gh, gw), "image size must be a multiple of 32 (data.pad_images does this)"
    V = features.flatten(2).transpose(1, 2)  # [B, gh*gw, c]
    return V, valid.flatten(1), (gh, gw)


def _fp32_or_wider(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def vq_lookup(v, dictionary):
    """Eq. 2, the nearest dictionary entry:  h_i = argmin_j || v_i - d_j ||_2.

    (The paper prints argmin_j ||v_i - d_i||, an index typo: the distance is to each candidate entry d_j.)

    v:          [N, c] visual features
    dictionary: [k, c] entries d_j
    returns h   [N] long, the index of the nearest entry (the lowest index on a tie)

    ||v - d||^2 = ||v||^2 - 2 v.d + ||d||^2 needs one [N, k] matrix, never an [N, k, c] one. It runs in fp32 (or
    float64 for float64 inputs) even under autocast: in half precision the distances of close entries collide.
    """
    with torch.no_grad(), torch.autocast(device_type=v.device.type, enabled=False):
        v = _fp32_or_wider(v)
        d = _fp32_or_wider(dictionary).to(v.dtype)
        # ||v||^2 is the same for every j, so it does not change the argmin and is left out.
        distances = (d * d).sum(1)[None, :] - 2.0 * (v @ d.t())  # [N, k]
        return distances.argmin(dim=1)


def vd_embed(h, dictionary):
    """Eq. 3, the visual dictionary embedding:  f(v_i) = d_{h_i}.

    (Training uses the straight-through form of Eq. 5, whose value is this one.)

    h:          [...] long indices
    dictionary: [k, c]
    returns     [..., c]
    """
    return dictionary[h]


def assignment_statistics(v, h, k):
    """The two sums behind Eq. 4: for each entry j, sum_{h_i = j} v_i and |f^{-1}(j)|.

    The first of the two steps of ema_update; training calls it on each micro-batch, sums the results over
    micro-steps and ranks (VisualDictionary), then calls ema_update_from_statistics once per optimizer step.

    v: [N, c], h: [N] long, k: dictionary size. Returns sums [k, c] (fp32 or wider) and counts [k] (same dtype).
    """
    v = _fp32_or_wider(v.detach())
    sums = torch.zeros(k, v.shape[1], dtype=v.dtype, device=v.device).index_add_(0, h, v)
    counts = torch.bincount(h, minlength=k).to(v.dtype)
    return sums, counts


def all_reduce_statistics(sums, counts):
    """Sum the Eq. 4 statistics over all ranks, so every rank updates with the global batch; returns new tensors.

    Without a process group this is the identity. After it every rank holds bit-identical sums, hence
    bit-identical dictionaries: we do not rely on DDP's buffer broadcast (train.py turns it off).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return sums, counts
    packed = torch.cat([sums, counts[:, None]], dim=1)  # [k, c + 1]: one collective instead of two
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed[:, :-1], packed[:, -1]


def gather_features(sample):
    """All ranks' feature samples [m, c] (m equal on every rank) -> [world_size * m, c], in rank order, the same
    tensor on every rank. Without a process group this is the identity."""
    if not (dist.is_available() and dist.is_initialized()):
        return sample
    parts = [torch.empty_like(sample) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, sample.contiguous())
    return torch.cat(parts)


def ema_update_from_statistics(dictionary, sums, counts, gamma):
    """Eq. 4 from its statistics (already summed over ranks and micro-steps):

        d_j <- gamma * d_j + (1 - gamma) * sums_j / counts_j      only where counts_j != 0

    The second of the two steps of ema_update. An entry that no feature chose is left exactly where it is; an
    entry far from every feature at the start is therefore never chosen and never moves (a "dead" entry: with
    the paper's N(0, 1) start most entries of a small model stay dead; see kmeans_init, restart_dead_entries).

    dictionary: [k, c], sums: [k, c], counts: [k]. Returns a new [k, c] tensor in the dictionary's dtype.
    """
    with torch.no_grad():
        d = _fp32_or_wider(dictionary)
        nonempty = counts > 0  # [k]
        means = sums.to(d.dtype) / counts.clamp(min=1).to(d.dtype)[:, None]  # [k, c]
        updated = gamma * d + (1.0 - gamma) * means
        return torch.where(nonempty[:, None], updated, d).to(dictionary.dtype)


def ema_update(dictionary, v, h, gamma):
    """Eq. 4, the momentum update of the visual dictionary, exactly as the paper writes it:

        d_j <- gamma * d_j + (1 - gamma) * ( sum_{h_i = j} v_i ) / |f^{-1}(j)|,   only when |f^{-1}(j)| != 0

    dictionary: [k, c], v: [N, c] features (no gradient is taken), h: [N] long from Eq. 2, gamma in [0, 1].
    Returns the new dictionary [k, c]; entries that no feature chose are returned unchanged.

    This is the single-process statement, literally the two steps that training takes: assignment_statistics,
    then ema_update_from_statistics. VisualDictionary.update puts all_reduce_statistics between them, so that
    every rank applies Eq. 4 to the statistics of the global batch; there is no collective in here.
    """
    sums, counts = assignment_statistics(v, h, dictionary.shape[0])
    return ema_update_from_statistics(dictionary, sums, counts, gamma)


def kmeans_init(features, k, generator, iterations=10):
    """Beyond the paper: a start for the dictionary from features instead of N(0, 1) (as VQ codebooks often are).

    k entries drawn from the features (with repetition only when there are fewer than k), then `iterations`
    rounds of Lloyd's k-means, each Eq. 2 followed by Eq. 4 with gamma = 0; an entry that no feature picks keeps
    its place. features: [N, c]; generator: a CPU torch.Generator, the same on every rank. Returns [k, c].
    """
    N = features.shape[0]
    rows = torch.randperm(N, generator=generator)[:k] if N >= k else torch.randint(N, (k,), generator=generator)
    d = _fp32_or_wider(features)[rows.to(features.device)]
    for _ in range(iterations):
        sums, counts = assignment_statistics(features, vq_lookup(features, d), k)
        d = ema_update_from_statistics(d, sums, counts, 0.0)
    return d


def restart_dead_entries(dictionary, idle_updates, features, patience, generator):
    """Beyond the paper: an entry that no feature has picked for `patience` updates is moved onto a feature of
    the current step, so that it competes again (entries that start far from every feature never move under
    Eq. 4, which only updates chosen entries).

    dictionary: [k, c]; idle_updates: [k] long, updates since each entry was last chosen; features: [N, c], the
    same on every rank (gather_features); generator: a CPU torch.Generator, the same on every rank.
    Returns the new dictionary [k, c] and idle_updates [k] (0 where an entry was re-seeded).
    """
    dead = idle_updates >= patience  # [k]
    n = int(dead.sum())
    if n == 0:
        return dictionary, idle_updates
    rows = torch.randint(features.shape[0], (n,), generator=generator).to(features.device)
    d = dictionary.clone()
    d[dead] = features[rows].to(d.dtype)
    return d, idle_updates.masked_fill(dead, 0)


def straight_through(v, d):
    """Eq. 5, the straight-through estimator:  f(v_i) = sg[d_{h_i} - v_i] + v_i.

    v: [..., c] features (with gradient), d: [..., c] their dictionary entries.
    The value equals d; the gradient reaches v unchanged; nothing flows into d (the VD learns by Eq. 4 alone).
    """
    return (d - v).detach() + v


def mask_by_index(h, valid, prob, generator=None):
    """The masking of Masked Visual Modeling (Sec. 3.3, Eq. 7): mask all tokens that share one VD index.

    Neighbouring tokens often share an index, so masking single tokens would let the model copy the label from
    a neighbour. The paper: "we first randomly select an existing label index j, then replace all visual
    embedding vectors in f^{-1}(j) with the [MASK] embedding". It does not say per what the index is drawn, nor
    how often; our choices: the draw is per row (image-text pair), each row is masked with probability `prob`
    (SOHOConfig.mvm_prob), and its index j is uniform among the indices present in its valid tokens, so every
    valid token of that row with index j is masked. Rows mask independently, even two texts of one image.

    h:      [B, L] long VD indices
    valid:  [B, L] bool, False for padding (never masked)
    returns [B, L] bool, True where the token is replaced by the [MASK] embedding
    """
    B, L = h.shape
    device = h.device
    if B == 0 or L == 0:
        return torch.zeros(B, L, dtype=torch.bool, device=device)
    chosen = torch.rand(B, generator=generator, device=device) < prob  # [B]
    k = int(h.max().item()) + 1
    present = torch.zeros(B, k, dtype=torch.bool, device=device)
    present[torch.arange(B, device=device)[:, None].expand(B, L)[valid], h[valid]] = True  # [B, k]
    # The argmax of uniform noise over the present indices is a uniform draw among them.
    noise = torch.rand(B, k, generator=generator, device=device).masked_fill(~present, -1.0)  # [B, k]
    j = noise.argmax(dim=1)  # [B]
    has_valid = valid.any(dim=1)  # [B]
    return valid & (h == j[:, None]) & (chosen & has_valid)[:, None]


def sine_position_embedding_2d(gh, gw, dim, temperature=10000.0, device=None):
    """The 2-D sine position embedding of the visual tokens (Sec. 3.3: "2-D position embedding", after DETR).

    The first dim/2 channels encode the row, the last dim/2 the column, each as interleaved
    sin(p / T^(2i/(dim/2))), cos(p / T^(2i/(dim/2))) of the grid position p (0, 1, 2, ...). Positions are grid
    indices, so a token's embedding does not depend on the size of the image or its padding. This differs from
    DETR's, which counts positions from 1 and normalises them to [0, 2 pi] by the (unpadded) image size; the
    paper does not say which variant SOHO uses.
    returns [gh * gw, dim]
    """
    assert dim % 4 == 0, "the 2-D sine embedding needs a width divisible by 4"
    quarter = dim // 4
    freq = temperature ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # [dim/4]
    rows = torch.arange(gh, dtype=torch.float32, device=device)[:, None] * freq  # [gh, dim/4]
    cols = torch.arange(gw, dtype=torch.float32, device=device)[:, None] * freq  # [gw, dim/4]
    row_emb = torch.stack([rows.sin(), rows.cos()], dim=-1).flatten(1)  # [gh, dim/2]
    col_emb = torch.stack([cols.sin(), cols.cos()], dim=-1).flatten(1)  # [gw, dim/2]
    grid = torch.cat([row_emb[:, None].expand(gh, gw, -1), col_emb[None].expand(gh, gw, -1)], dim=-1)
    return grid.reshape(gh * gw, dim)  # [gh*gw, dim]


class LossTerm(NamedTuple):
    """One pre-training loss as a sum over its targets, so that train.py can average it over all ranks."""

    sum: torch.Tensor  # summed negative log-likelihood (with gradient)
    count: torch.Tensor  # number of targets
    correct: torch.Tensor  # number of targets predicted right

    @property
    def mean(self):
        return self.sum / self.count.clamp(min=1)


def pretraining_objective(mlm, mvm, itm, itm_weight=1.0):
    """Eq. 9:  L = L_MLM + L_MVM + w * L_ITM, with w = 1 in the paper (equal weights). Each argument is a scalar
    loss; itm_weight (w, train.py's --itm_weight) is beyond the paper: 1 in the paper's recipes, 5 in the tiny one."""
    return mlm + mvm + itm_weight * itm


# ----------------------------------------------------------------------------------------------------------------
# 3. The visual encoder: a ResNet whose state_dict keys are torchvision's (without fc.*)
# ----------------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch, ch, stride, average_downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.downsample = _downsample(in_ch, ch, stride, average_downsample)

    def forward(self, x):
        # In place, as torchvision: ReLU and the residual sum overwrite tensors nobody else holds (BatchNorm's
        # backward needs its input, not its output). A fresh feature map per op made ResNet-101 13% slower than
        # torchvision's on a CPU (eval, 16 images of 300x500; experiments/compare_speed.py), nearly all of it the
        # kernel zero-filling the new pages.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4  # torchvision's "ResNet v1.5": the stride sits in the 3x3 convolution

    def __init__(self, in_ch, ch, stride, average_downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, ch * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch * 4)
        self.downsample = _downsample(in_ch, ch * 4, stride, average_downsample)

    def forward(self, x):
        # in place, as torchvision (see BasicBlock.forward)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


def _downsample(in_ch, out_ch, stride, average=False):
    """The shortcut of a block that changes resolution or width: torchvision's strided 1x1 conv + BatchNorm, or,
    with average=True, a 2x2 average first and an unstrided 1x1 conv ("ResNet-D", He et al. 2019, Bag of Tricks).

    A strided 1x1 conv reads one pixel in four and drops the rest. Three of them (layer2-4) make the shortcut path
    of a stride-32 feature read a single stride-4 position of its 32x32 pixels; a block whose residual branch
    starts at zero (zero_init_residual) is that shortcut alone, so a random ResNet sees a small shape only if it
    happens to cover that position. Averaging passes all of them on. Not torchvision's layout, so ImageNet
    weights do not load into it: an option for a ResNet trained from scratch, off in every preset (README,
    "Where the objects are lost": it lets a random trunk see small shapes, and did not bring them to ITM)."""
    if stride == 1 and in_ch == out_ch:
        return None
    if average and stride > 1:
        return nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                             nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


RESNET_LAYOUT = {  # depth -> (block, blocks per stage)
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """torchvision's ResNet trunk (conv1 ... layer4, no avgpool/fc); forward returns layer4, stride 32."""

    def __init__(self, depth=101, width=64, bn="frozen", gradient_checkpointing=False, zero_init_residual=False,
                 average_downsample=False):
        super().__init__()
        if depth not in RESNET_LAYOUT:
            raise ValueError(f"resnet_depth must be one of {sorted(RESNET_LAYOUT)}, got {depth}")
        if bn not in ("frozen", "train"):
            raise ValueError(f"backbone_bn must be 'frozen' or 'train', got {bn!r}")
        block, counts = RESNET_LAYOUT[depth]
        self.frozen_bn, self.average_downsample = bn == "frozen", average_downsample
        self.gradient_checkpointing = gradient_checkpointing
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_ch = width
        for i, n in enumerate(counts):
            ch, stride = width * 2**i, (1 if i == 0 else 2)
            blocks = []
            for b in range(n):
                blocks.append(block(in_ch, ch, stride if b == 0 else 1, average_downsample))
                in_ch = ch * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            # Goyal et al. 2017 (torchvision's zero_init_residual): the last BatchNorm of each residual branch
            # starts at 0, so every block starts as the identity. A random 18-layer trunk otherwise washes the
            # input's colours out by layer4 (README, "Does the model look at the image?"); this one passes them on.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn2 if isinstance(m, BasicBlock) else m.bn3).weight)
        self.train()  # modules start in training mode: freeze the BatchNorms from the start

    def train(self, mode=True):
        # Frozen BatchNorm keeps the (ImageNet) running statistics: with a few 600x1000 images per GPU the batch
        # statistics are noisy, and they would differ between ranks. The affine weights still learn.
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # in place, as torchvision (see BasicBlock.forward)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # stride 4
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.gradient_checkpointing and self.training and x.requires_grad:
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x  # [B, C5, H/32, W/32]


# ----------------------------------------------------------------------------------------------------------------
# 4. The visual dictionary: a [k, c] buffer, looked up by Eq. 2-3 and updated by Eq. 4
# ----------------------------------------------------------------------------------------------------------------


class VisualDictionary(nn.Module):
    """Holds D (Sec. 3.2) and the Eq. 4 statistics gathered since the last update.

    The forward passes of one optimizer step (its micro-steps) all use the same D; `accumulate` adds their
    statistics, and `update` (called by train.py once per optimizer step) all-reduces them over the ranks and
    applies Eq. 4 once, on the global batch. D is a buffer: it gets no gradient, and the optimizer never sees it.

    Beyond the paper, and off unless asked for: init="features" replaces the random start by k-means on the
    features of the first step (kmeans_init), and restart_after=N re-seeds entries unused for N updates
    (restart_dead_entries). Both draw from features gathered from all ranks with a generator seeded by the update
    count, so every rank computes the same dictionary.
    """

    def __init__(self, size, dim, gamma, init="random", restart_after=0):
        super().__init__()
        if init not in ("random", "features"):
            raise ValueError(f"vd_init must be 'random' or 'features', got {init!r}")
        self.gamma, self.init, self.restart_after = gamma, init, restart_after
        self.register_buffer("embed", torch.randn(size, dim))  # "randomly initialized" (Sec. 3.2)
        self.register_buffer("pending_sums", torch.zeros(size, dim), persistent=False)
        self.register_buffer("pending_counts", torch.zeros(size), persistent=False)
        # state of the options beyond the paper, saved with the model so that a resumed run continues exactly
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("idle_updates", torch.zeros(size, dtype=torch.long))
        self.pending_features = None  # a sample of this step's features [<= k, c], for the options above

    @property
    def needs_features(self):
        return (self.init == "features" and self.updates == 0) or self.restart_after > 0

    def lookup(self, v):
        """Eq. 2 then Eq. 3 for features v [..., c]: returns indices h [...] and entries d_h [..., c]."""
        h = vq_lookup(v.reshape(-1, v.shape[-1]), self.embed).view(v.shape[:-1])
        return h, vd_embed(h, self.embed)

    @torch.no_grad()
    def accumulate(self, v, h):
        """Add the Eq. 4 statistics of features v [N, c] with indices h [N] (no gradient)."""
        sums, counts = assignment_statistics(v, h, self.embed.shape[0])
        self.pending_sums += sums.to(self.pending_sums.dtype)
        self.pending_counts += counts.to(self.pending_counts.dtype)
        if self.needs_features and len(v):
            k = self.embed.shape[0]
            pool = v.detach().float() if self.pending_features is None else torch.cat([self.pending_features,
                                                                                       v.detach().float()])
            self.pending_features = pool[torch.randperm(len(pool), device=pool.device)[:k]]

    @torch.no_grad()
    def update(self):
        """Apply Eq. 4 to the statistics gathered since the last call; returns the global counts [k].

        This is ema_update (Eq. 4) split at its seam: accumulate ran assignment_statistics on each micro-batch,
        all_reduce_statistics sums them over ranks (the only collective of Eq. 4), and
        ema_update_from_statistics applies the update, so every rank takes the same step on the global batch."""
        sums, counts = all_reduce_statistics(self.pending_sums.clone(), self.pending_counts.clone())
        features = self._gathered_features() if self.needs_features else None
        generator = torch.Generator().manual_seed(int(self.updates))  # the same draws on every rank
        if self.init == "features" and self.updates == 0:
            self.embed.copy_(kmeans_init(features, self.embed.shape[0], generator))
        else:
            self.embed.copy_(ema_update_from_statistics(self.embed, sums, counts, self.gamma))  # Eq. 4
        if self.restart_after:
            idle = torch.where(counts > 0, 0, self.idle_updates + 1)
            embed, idle = restart_dead_entries(self.embed, idle, features, self.restart_after, generator)
            self.embed.copy_(embed)
            self.idle_updates.copy_(idle)
        self.updates += 1
        self.discard_pending()
        return counts

    def _gathered_features(self):
        """k features of this rank (drawn again, with repetition, if it saw fewer), gathered from all ranks."""
        k, local = self.embed.shape[0], self.pending_features
        if local is None:
            raise RuntimeError("vd_init='features' / vd_restart_after need features: call accumulate first")
        if len(local) < k:
            local = local[torch.randint(len(local), (k,), device=local.device)]
        return gather_features(local)

    @torch.no_grad()
    def discard_pending(self):
        """Forget the statistics gathered since the last update (e.g. after forward passes that must not count)."""
        self.pending_sums.zero_()
        self.pending_counts.zero_()
        self.pending_features = None


# ----------------------------------------------------------------------------------------------------------------
# 5. The cross-modal transformer: BERT's encoder over [CLS] text [SEP] followed by the visual tokens
# ----------------------------------------------------------------------------------------------------------------


class TextEmbedding(nn.Module):
    """BERT's input embedding: word + position + token type (always 0 for text), LayerNorm, dropout."""

    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]
        return self.dropout(self.norm(x))  # [B, T, H]


class TransformerLayer(nn.Module):
    """One post-LayerNorm BERT layer:  x = LN(x + Attn(x));  x = LN(x + FFN(x)),  FFN = W2 GELU(W1 x)."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.attn_out = nn.Linear(H, H)
        self.attn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(H, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, H)
        self.ffn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x, attend):
        B, S, H = x.shape
        heads = lambda t: t.view(B, S, self.num_heads, H // self.num_heads).transpose(1, 2)  # [B, nh, S, hd]
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        p = self.dropout if self.training else 0.0
        # attend: [B, S] True on real tokens; every query may look at every real key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :], dropout_p=p)
        y = y.transpose(1, 2).reshape(B, S, H)  # [B, S, H]
        x = self.attn_norm(x + F.dropout(self.attn_out(y), p, self.training))
        y = self.ffn_out(F.gelu(self.ffn_in(x)))
        return self.ffn_norm(x + F.dropout(y, p, self.training))


class CrossModalTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.text_embed = TextEmbedding(cfg)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)  # BERT's pooler: tanh(W h_[CLS])
        self.pool_text_mean = cfg.pool_text_mean
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, input_ids, text_mask, visual=None, visual_mask=None):
        x, attend = self.text_embed(input_ids), text_mask.bool()
        if visual is not None:
            x = torch.cat([x, visual.to(x.dtype)], dim=1)  # [B, T + L, H]
            attend = torch.cat([attend, visual_mask.bool()], dim=1)  # [B, T + L]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attend, use_reentrant=False)
            else:
                x = layer(x, attend)
        return x

    def pool(self, hidden, text_mask):
        """tanh(W h_[CLS]) (BERT's pooler), or with pool_text_mean tanh(W (h_[CLS] + mean_t h_t)) over the
        text's real tokens t. hidden: [B, T + L, H], text_mask: [B, T]. Returns [B, H].

        Why the mean (beyond the paper; the tiny preset): a comparison of caption and image needs the caption's
        words in the pooled vector, and until ITM has learned to compare there is no reason for [CLS] to gather
        them. From scratch, MLM ties each background word to its pixels long before ITM leaves chance
        (experiments/diagnose.py, item 9); the mean puts every word in the pooled vector from the first step
        (README, "Does the model look at the image?")."""
        x = hidden[:, 0]
        if self.pool_text_mean:
            m = text_mask.to(hidden.dtype)[..., None]  # [B, T, 1]
            x = x + (hidden[:, :m.shape[1]] * m).sum(1) / m.sum(1).clamp(min=1)  # [B, H]
        return torch.tanh(self.pooler(x))  # [B, H]


class PredictionTransform(nn.Module):
    """BERT's prediction-head transform: dense, GELU, LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.norm(F.gelu(self.dense(x)))


def classifier_mlp(in_dim, hidden, out_dim):
    """The downstream head: Linear, GELU, LayerNorm, Linear (as UNITER's VQA, NLVR2 and SNLI-VE heads)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12),
                         nn.Linear(hidden, out_dim))


# ----------------------------------------------------------------------------------------------------------------
# 6. SOHO
# ----------------------------------------------------------------------------------------------------------------

TASKS = ("pretrain", "retrieval", "vqa", "nlvr2", "snli-ve")  # the one list of tasks: data.py and train.py use it
IGNORE = -100  # the label of tokens that are not predicted (PyTorch's cross_entropy ignore_index)


class SOHO(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        H = cfg.hidden_size
        if H % cfg.num_heads or H % 4:
            raise ValueError(f"hidden_size {H} must divide by num_heads {cfg.num_heads} and by 4 (2-D sine)")
        # Eq. 1: the visual encoder E = ResNet + 1x1 conv (+ the 2x2 max pooling in `encode`)
        self.backbone = ResNet(cfg.resnet_depth, cfg.resnet_width, cfg.backbone_bn, cfg.gradient_checkpointing,
                               cfg.zero_init_residual, cfg.average_downsample)
        self.projection = nn.Conv2d(self.backbone.out_channels, H, kernel_size=1)
        # Sec. 3.2: the visual dictionary (a buffer inside; nothing here is trained by gradient)
        self.visual_dictionary = (VisualDictionary(cfg.vd_size, H, cfg.vd_gamma, cfg.vd_init, cfg.vd_restart_after)
                                  if cfg.use_vd else None)
        # Sec. 3.3: visual tokens get a [MASK] vector (MVM), a 2-D sine position, and a LayerNorm
        self.visual_mask_embedding = nn.Parameter(torch.zeros(H))
        self.visual_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.transformer = CrossModalTransformer(cfg)
        # pre-training heads: MLM (Eq. 6; decoder tied to the word embeddings), MVM (Eq. 7), ITM (Eq. 8)
        self.mlm_transform = PredictionTransform(cfg)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.mvm_transform = PredictionTransform(cfg)
        self.mvm_classifier = nn.Linear(H, cfg.vd_size)
        self.itm_head = nn.Linear(H, 2)  # also the retrieval score (Sec. 4.2.1)
        # downstream heads (Sec. 4.2)
        self.vqa_head = classifier_mlp(H, 2 * H, cfg.num_answers)
        self.nlvr2_head = classifier_mlp(2 * H, 2 * H, 2)  # on the two [CLS] vectors, concatenated
        self.snli_ve_head = classifier_mlp(H, 2 * H, 3)  # entailment / neutral / contradiction
        self.apply(self._init_transformer_weights)

    @staticmethod
    def _init_transformer_weights(m):
        # BERT's initialisation; the ResNet initialises its own convolutions.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def task_parameters(self, task):
        """The parameters that a task's loss reaches. train.py trains these and freezes the rest: DDP wants every
        trained parameter to receive a gradient at every step, and heads of other tasks would not."""
        shared = [self.backbone, self.projection, self.visual_norm, self.transformer]
        heads = {
            "pretrain": [self.mlm_transform, self.itm_head]
            + ([self.mvm_transform, self.mvm_classifier] if self.config.use_vd else []),
            "retrieval": [self.itm_head],
            "vqa": [self.vqa_head],
            "nlvr2": [self.nlvr2_head],
            "snli-ve": [self.snli_ve_head],
        }[task]
        params = [p for m in shared + heads for p in m.parameters()]
        if task == "pretrain":
            params.append(self.mlm_bias)
            if self.config.use_vd:
                params.append(self.visual_mask_embedding)
        return params

    def forward(self, task, batch, generator=None):
        """pretrain_losses for "pretrain", task_logits otherwise (one entry point, so DDP can wrap the model)."""
        if task == "pretrain":
            return self.pretrain_losses(batch, generator)
        return self.task_logits(task, batch)

    # --- the visual side -------------------------------------------------------------------------------------

    def encode(self, images, image_mask):
        """Eq. 1 with this model's backbone: returns V [B, l, c], valid [B, l], (gh, gw)."""
        return encode(images, image_mask, self.backbone, self.projection)

    def embed_visual(self, features, grid, mvm_mask=None):
        """Visual tokens as the transformer sees them: LN(x + 2-D sine position), x = [MASK] where mvm_mask.

        features: [B, l, c] (VD embeddings in pre-training, pre-VD features downstream), mvm_mask: [B, l] bool.
        """
        if mvm_mask is not None:
            features = torch.where(mvm_mask[..., None], self.visual_mask_embedding.to(features.dtype), features)
        pos = sine_position_embedding_2d(*grid, features.shape[-1], device=features.device)  # [l, c]
        x = self.visual_norm(features + pos.to(features.dtype))
        return F.dropout(x, self.config.dropout, self.training)

    def image_tokens(self, images, image_mask):
        """Downstream visual tokens, computed once per image: (visual [B, l, c], valid [B, l]).

        Sec. 4.2: the features that enter the VD (pre-VD) by default; `downstream_use_vd` takes f(V) instead.
        """
        V, valid, grid = self.encode(images, image_mask)
        if self.config.use_vd and self.config.downstream_use_vd:
            _, d = self.visual_dictionary.lookup(V)
            V = straight_through(V, d)
        return self.embed_visual(V, grid), valid

    # --- the transformer --------------------------------------------------------------------------------------

    def fuse(self, input_ids, text_mask, visual=None, visual_mask=None):
        """The cross-modal transformer over [CLS] text [SEP] [PAD].. followed by the visual tokens.

        input_ids, text_mask: [B, T]; visual: [B, L, H] embedded visual tokens; visual_mask: [B, L] bool.
        Returns hidden states [B, T + L, H]; with no visual tokens, exactly BERT's encoder over the text.
        """
        return self.transformer(input_ids, text_mask, visual, visual_mask)

    def pair_logits(self, visual, visual_mask, input_ids, text_mask, head):
        """Pool each (visual row i, text row i) pair (CrossModalTransformer.pool) and apply `head`."""
        hidden = self.fuse(input_ids, text_mask, visual, visual_mask)
        return head(self.transformer.pool(hidden, text_mask))

    def itm_scores(self, visual, visual_mask, input_ids, text_mask):
        """Retrieval score of each (image, text) row pair: log p(matched) from the ITM head, [B]."""
        logits = self.pair_logits(visual, visual_mask, input_ids, text_mask, self.itm_head)
        return logits.float().log_softmax(-1)[:, 1]

    # --- pre-training: Eq. 6-9 --------------------------------------------------------------------------------

    def pretrain_losses(self, batch, generator=None):
        """MLM (Eq. 6), MVM (Eq. 7) and ITM (Eq. 8) on a pre-training batch (see data.py).

        The CNN and the VD run once per image; each image's tokens are shared by its 4 texts via img_index.
        MLM and MVM losses are taken on the matched pairs only (Sec. 4.1); the inputs of all pairs are masked
        alike, so that ITM cannot tell a matched pair by its [MASK] tokens. In training mode the batch's VD
        statistics are accumulated for the next Eq. 4 update. Returns {"mlm", "mvm", "itm"}: LossTerm, and
        "vd_indices" [N valid tokens], "mvm_mask" [4B, l] (None without the VD), "itm_correct" [4B] bool.
        """
        cfg = self.config
        V, valid, grid = self.encode(batch["images"], batch["image_mask"])  # [B, l, c], [B, l]
        img_index, itm_label = batch["img_index"], batch["itm_label"]  # [4B], [4B]
        matched = itm_label == 1
        if cfg.use_vd:
            h, d = self.visual_dictionary.lookup(V)  # Eq. 2, 3: [B, l], [B, l, c]
            if self.training:
                self.visual_dictionary.accumulate(V[valid], h[valid])  # for Eq. 4; padding is not counted
            tokens = straight_through(V, d)  # Eq. 5
            h_text = h[img_index]  # [4B, l]
            # Masking hits every pair, so that a visual [MASK] does not reveal which pairs are matched to ITM;
            # the MVM loss is taken on the matched pairs only (Sec. 4.1).
            mvm_mask = mask_by_index(h_text, valid[img_index], cfg.mvm_prob, generator)  # [4B, l]
            mvm_targets = mvm_mask & matched[:, None]
        else:
            tokens, h, h_text, mvm_mask, mvm_targets = V, None, None, None, None
        visual = self.embed_visual(tokens[img_index], grid, mvm_mask)  # [4B, l, c]
        hidden = self.fuse(batch["input_ids"], batch["text_mask"], visual, valid[img_index])  # [4B, T + l, H]
        T = batch["input_ids"].shape[1]

        # Eq. 6, MLM: predict the masked words (data.py masked matched texts only); decoder = word embeddings
        labels = batch["mlm_labels"]
        at = labels != IGNORE
        mlm = _loss_term(self.mlm_logits(hidden[:, :T][at]), labels[at])

        # Eq. 7, MVM: predict the VD index of each masked visual token
        if cfg.use_vd:
            logits = self.mvm_classifier(self.mvm_transform(hidden[:, T:][mvm_targets]))
            mvm = _loss_term(logits, h_text[mvm_targets])
        else:
            zero = hidden.sum() * 0.0
            mvm = LossTerm(zero, zero.detach(), zero.detach())

        # Eq. 8, ITM: is the text the image's caption?  A binary classifier on the pooled state (see pool)
        itm_logits = self.itm_head(self.transformer.pool(hidden, batch["text_mask"]))  # [4B, 2]
        itm = _loss_term(itm_logits, itm_label)
        return {"mlm": mlm, "mvm": mvm, "itm": itm, "vd_indices": None if h is None else h[valid],
                "mvm_mask": mvm_mask, "itm_correct": itm_logits.detach().argmax(-1) == itm_label}

    def mlm_logits(self, text_hidden):
        """Eq. 6's word scores of text hidden states [N, H] -> [N, vocab]: the decoder is the word embeddings."""
        return F.linear(self.mlm_transform(text_hidden), self.transformer.text_embed.word.weight, self.mlm_bias)

    def pretrain_visual_tokens(self, images, image_mask):
        """The visual tokens as pre-training feeds them to the transformer, with nothing masked: f(V) (Eq. 1-3),
        position, LayerNorm. Returns visual [B, l, c], valid [B, l]. For evaluation and probes."""
        V, valid, grid = self.encode(images, image_mask)  # [B, l, c], [B, l]
        if self.config.use_vd:
            V = self.visual_dictionary.lookup(V)[1]  # Eq. 2, 3
        return self.embed_visual(V, grid), valid

    def pretrain_itm_logits(self, batch):
        """ITM logits [4B, 2] of a pre-training batch with nothing masked: the held-out ITM of evaluate.py."""
        visual, valid = self.pretrain_visual_tokens(batch["images"], batch["image_mask"])
        img_index = batch["img_index"]
        return self.pair_logits(visual[img_index], valid[img_index], batch["input_ids"], batch["text_mask"],
                                self.itm_head)

    # --- downstream tasks (Sec. 4.2) --------------------------------------------------------------------------

    def task_logits(self, task, batch):
        """Logits of a downstream batch (see data.py for the batch of each task).

        retrieval: [t, t, 2], the ITM logits of image i with caption j (caption i is image i's)
        vqa: [B, num_answers];  nlvr2: [B, 2];  snli-ve: [B, 3]
        """
        visual, valid = self.image_tokens(batch["images"], batch["image_mask"])  # [N_img, l, c], [N_img, l]
        ids, tmask = batch["input_ids"], batch["text_mask"]
        if task == "retrieval":
            t = ids.shape[0]
            img = torch.arange(t, device=ids.device).repeat_interleave(t)  # pair (i, j) -> image i
            txt = torch.arange(t, device=ids.device).repeat(t)  # pair (i, j) -> text j
            logits = self.pair_logits(visual[img], valid[img], ids[txt], tmask[txt], self.itm_head)
            return logits.view(t, t, 2)
        if task == "vqa":
            return self.pair_logits(visual, valid, ids, tmask, self.vqa_head)
        if task == "snli-ve":
            return self.pair_logits(visual, valid, ids, tmask, self.snli_ve_head)
        if task == "nlvr2":
            B = ids.shape[0]
            # rows 2i and 2i+1 of the images are example i's left and right image: pair each with its sentence
            hidden = self.fuse(ids.repeat_interleave(2, 0), tmask.repeat_interleave(2, 0), visual, valid)
            pooled = self.transformer.pool(hidden, tmask.repeat_interleave(2, 0)).view(B, -1)  # [B, 2H]: left ; right
            return self.nlvr2_head(pooled)
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS[1:]}")

    # --- pretrained weights -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, preset, bert=None, resnet=None, **overrides):
        """A SOHO at `preset`, with the transformer from a Hugging Face BERT directory and the ResNet from a
        torchvision ImageNet state dict, both local files (nothing is downloaded). See section 7."""
        cfg = config_from_preset(preset, **overrides)
        bert_state, taken = None, None
        if bert is not None:
            bert_cfg = read_bert_config(bert)
            layers = overrides.get("num_layers", cfg.num_layers)
            if layers > bert_cfg["num_layers"]:
                raise ValueError(f"{bert}: has {bert_cfg['num_layers']} layers, the model wants {layers}")
            cfg = replace(cfg, **{**bert_cfg, "num_layers": layers})
            bert_state, taken = read_bert_weights(bert, layers)
        model = cls(cfg)
        if bert_state is not None:
            load_exactly(model, bert_state, f"BERT weights in {bert}")
            print(f"loaded BERT from {bert}: transformer layers {taken} of {bert_cfg['num_layers']}")
        if resnet is not None:
            load_resnet_weights(model.backbone, resnet)
        return model


def _loss_term(logits, targets):
    """Cross-entropy summed over the targets (zero, with a graph, when there are none)."""
    logits = logits.float()
    total = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum().float() if targets.numel() else total.detach() * 0
    return LossTerm(total, torch.tensor(float(targets.numel()), device=logits.device), correct)


# ----------------------------------------------------------------------------------------------------------------
# 7. Pretrained weights from local files
# ----------------------------------------------------------------------------------------------------------------

# Hugging Face BERT name -> ours. Only what differs is listed; "{i}" is the layer index.
BERT_KEY_MAP = {
    "embeddings.word_embeddings": "transformer.text_embed.word",
    "embeddings.position_embeddings": "transformer.text_embed.position",
    "embeddings.token_type_embeddings": "transformer.text_embed.token_type",
    "embeddings.LayerNorm": "transformer.text_embed.norm",
    "encoder.layer.{i}.attention.self.query": "transformer.layers.{i}.query",
    "encoder.layer.{i}.attention.self.key": "transformer.layers.{i}.key",
    "encoder.layer.{i}.attention.self.value": "transformer.layers.{i}.value",
    "encoder.layer.{i}.attention.output.dense": "transformer.layers.{i}.attn_out",
    "encoder.layer.{i}.attention.output.LayerNorm": "transformer.layers.{i}.attn_norm",
    "encoder.layer.{i}.intermediate.dense": "transformer.layers.{i}.ffn_in",
    "encoder.layer.{i}.output.dense": "transformer.layers.{i}.ffn_out",
    "encoder.layer.{i}.output.LayerNorm": "transformer.layers.{i}.ffn_norm",
    "pooler.dense": "transformer.pooler",
    # BertForPreTraining's heads: MLM carries over to MLM, next-sentence prediction (2-way) initialises ITM
    "cls.predictions.transform.dense": "mlm_transform.dense",
    "cls.predictions.transform.LayerNorm": "mlm_transform.norm",
    "cls.seq_relationship": "itm_head",
}


def read_bert_config(directory):
    """The SOHOConfig fields that a Hugging Face BERT config.json fixes."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; --bert wants a Hugging Face BERT directory "
                                "(config.json, vocab.txt, pytorch_model.bin or model.safetensors)")
    with open(path) as f:
        c = json.load(f)
    if c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act {c['hidden_act']!r}; only BERT's exact 'gelu' is supported")
    try:
        return {
            "hidden_size": c["hidden_size"], "num_layers": c["num_hidden_layers"],
            "num_heads": c["num_attention_heads"], "intermediate_size": c["intermediate_size"],
            "vocab_size": c["vocab_size"], "max_position_embeddings": c["max_position_embeddings"],
            "type_vocab_size": c.get("type_vocab_size", 2), "layer_norm_eps": c.get("layer_norm_eps", 1e-12),
        }
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e}, expected a BERT config") from None


def read_bert_weights(directory, num_layers):
    """BERT's state dict in our names, keeping the first `num_layers` layers (the paper's 3-layer ablation
    takes the first 3 of BERT-base). Returns (state, the layer indices taken)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin found")
    raw = _load_tensor_file(path)
    state, unexpected = {}, []
    for key, value in raw.items():
        key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        key = key.replace("LayerNorm.beta", "LayerNorm.bias")
        if key.endswith("position_ids") or key.startswith("cls.predictions.decoder"):
            continue  # a buffer of arange; the decoder is tied to the word embeddings
        if key == "cls.predictions.bias":
            state["mlm_bias"] = value
            continue
        parts = key.split(".")
        layer = int(parts[2]) if key.startswith("encoder.layer.") else None
        if layer is not None:
            if layer >= num_layers:
                continue  # layers beyond the ones we take
            parts[2] = "{i}"
        stem, leaf = ".".join(parts[:-1]), parts[-1]
        if stem not in BERT_KEY_MAP:
            unexpected.append(key)
            continue
        state[BERT_KEY_MAP[stem].replace("{i}", str(layer)) + "." + leaf] = value
    if unexpected:
        raise ValueError(f"{path}: unexpected keys {unexpected}")
    return state, list(range(num_layers))


def load_resnet_weights(backbone, path):
    """A torchvision ImageNet state dict (resnet101-*.pth) into our ResNet; its fc.* classifier is dropped."""
    if backbone.average_downsample:
        raise ValueError(f"{path}: torchvision's ResNets have strided 1x1 shortcuts, and this one averages in its "
                         "shortcuts (average_downsample=True): set --average_downsample=false")
    state = {k: v for k, v in _load_tensor_file(path).items() if not k.startswith("fc.")}
    load_exactly(backbone, state, f"ResNet weights in {path}", require_all=True)


def load_exactly(module, state, what, require_all=False):
    """Copy `state` into `module`; any unexpected key or shape mismatch is an error that lists them.

    For BERT only the transformer's own keys must all be present (the VD, the ResNet and the downstream heads
    are not in a BERT checkpoint); with require_all every key of the module must be in `state`.
    """
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    expected = set(own) if require_all else {k for k in own if k.startswith("transformer.")}
    missing = sorted(expected - set(state))
    if unexpected or mismatched or missing:
        raise ValueError(f"{what} do not fit the model:\n  missing: {missing}\n  unexpected: {unexpected}\n"
                         f"  shape mismatches: {mismatched}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _load_tensor_file(path):
    """A {name: tensor} dict from a .safetensors file (read here, the format is 8 bytes of header length, a JSON
    header, then raw little-endian data) or from a torch.save file (.bin, .pth, .pt)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found")
    if not path.endswith(".safetensors"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        t = torch.frombuffer(data, dtype=_SAFETENSORS_DTYPES[meta["dtype"]], offset=start,
                             count=(end - start) // _SAFETENSORS_DTYPES[meta["dtype"]].itemsize) if end > start \
            else torch.empty(0, dtype=_SAFETENSORS_DTYPES[meta["dtype"]])
        out[name] = t.reshape(meta["shape"]).clone()
    return out


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    for name in PRESETS:
        m = SOHO(PRESETS[name])
        print(f"{name:5s}  {count_parameters(m) / 1e6:7.1f}M parameters  "
              f"(backbone {count_parameters(m.backbone) / 1e6:.1f}M)")
