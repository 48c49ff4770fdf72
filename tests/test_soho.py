"""Tests of soho.py: each equation against a naive float64 loop, then the model, then weight loading."""

import json
import struct
from dataclasses import replace

import pytest
import torch

import data
import soho
from soho import (PRESETS, SOHO, ema_update, encode, mask_by_index, sine_position_embedding_2d, straight_through,
                  vd_embed, vq_lookup)

# ---- Eq. 2: nearest entry ------------------------------------------------------------------------------------


def naive_nearest(v, d):
    out = []
    for i in range(v.shape[0]):
        best, best_j = None, None
        for j in range(d.shape[0]):
            dist = sum((float(v[i, c]) - float(d[j, c])) ** 2 for c in range(v.shape[1])) ** 0.5
            if best is None or dist < best:  # strict: the first of equal distances wins
                best, best_j = dist, j
        out.append(best_j)
    return torch.tensor(out)


def test_vq_lookup_matches_naive_loop_float64():
    g = torch.Generator().manual_seed(0)
    v, d = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(17, 6, generator=g, dtype=torch.float64)
    h = vq_lookup(v, d)
    assert h.dtype == torch.long and h.shape == (40,)
    assert torch.equal(h, naive_nearest(v, d))


def test_vq_lookup_ties_take_the_lowest_index():
    d = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # (0,0) is at distance 1 from entries 0, 1, 2; (1,0) and (2,0) equal entries 0 and 2; (0,1) ties 0,1,2 again
    assert naive_nearest(v, d).tolist() == [0, 0, 0, 0]
    assert vq_lookup(v, d).tolist() == [0, 0, 0, 0]


def test_vq_lookup_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(1)
    v, d = torch.randn(300, 32, generator=g), torch.randn(64, 32, generator=g)
    v_bf16 = v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = vq_lookup(v_bf16, d)
    assert torch.equal(h, naive_nearest(v_bf16.double(), d.double()))


def test_vq_lookup_never_builds_an_n_by_k_by_c_tensor():
    # [4096, 2048, 768] in fp32 would be 25 GB; the [N, k] distances are 32 MB.
    v, d = torch.randn(4096, 768), torch.randn(2048, 768)
    h = vq_lookup(v, d)
    sample = torch.arange(0, 4096, 511)
    expected = torch.cdist(v[sample].double(), d.double()).argmin(1)
    assert torch.equal(h[sample], expected)


# ---- Eq. 3: embedding --------------------------------------------------------------------------------------


def test_vd_embed_matches_loop():
    d = torch.randn(9, 5, dtype=torch.float64)
    h = torch.tensor([[3, 0, 8], [3, 3, 1]])
    out = vd_embed(h, d)
    assert out.shape == (2, 3, 5)
    for a in range(2):
        for b in range(3):
            assert torch.equal(out[a, b], d[h[a, b]])


# ---- Eq. 4: momentum update ----------------------------------------------------------------------------------


def naive_ema(d, v, h, gamma):
    new = d.clone()
    for j in range(d.shape[0]):
        members = [v[i] for i in range(v.shape[0]) if int(h[i]) == j]
        if members:  # "Eq. 4 will only be applied when |f^-1(j)| != 0"
            mean = sum(members) / len(members)
            new[j] = gamma * d[j] + (1 - gamma) * mean
    return new


@pytest.mark.parametrize("gamma", [0.0, 0.37, 0.9, 1.0])
def test_ema_update_matches_naive_loop(gamma):
    g = torch.Generator().manual_seed(2)
    d = torch.randn(12, 4, generator=g, dtype=torch.float64)
    v = torch.randn(30, 4, generator=g, dtype=torch.float64)
    h = torch.randint(0, 8, (30,), generator=g)  # entries 8..11 are never chosen
    d_before, v_before = d.clone(), v.clone()
    new = ema_update(d, v, h, gamma)
    torch.testing.assert_close(new, naive_ema(d, v, h, gamma), rtol=1e-12, atol=1e-12)
    assert torch.equal(new[8:], d[8:]), "empty groups must stay unchanged"
    assert torch.equal(d, d_before) and torch.equal(v, v_before), "ema_update must not change its inputs"
    if gamma == 1.0:
        assert torch.equal(new, d)


def test_ema_update_takes_no_gradient():
    v = torch.randn(10, 3, requires_grad=True)
    new = ema_update(torch.randn(4, 3), v, vq_lookup(v, torch.randn(4, 3)), 0.5)
    assert not new.requires_grad


def test_visual_dictionary_accumulates_micro_steps_into_one_update():
    torch.manual_seed(3)
    vd = soho.VisualDictionary(16, 8, gamma=0.8)
    d0 = vd.embed.clone()
    v1, v2 = torch.randn(20, 8), torch.randn(13, 8)
    h1, h2 = vq_lookup(v1, d0), vq_lookup(v2, d0)
    vd.accumulate(v1, h1)
    vd.accumulate(v2, h2)
    counts = vd.update()
    expected = ema_update(d0, torch.cat([v1, v2]), torch.cat([h1, h2]), 0.8)
    torch.testing.assert_close(vd.embed, expected)
    assert counts.sum().item() == 33
    assert vd.pending_counts.sum().item() == 0


# ---- dead entries: the options beyond the paper -----------------------------------------------------------------


def naive_lloyd(features, d, iterations):
    """k-means by loops in float64: assign each feature to its nearest entry, move each chosen entry to the mean."""
    d = [[float(x) for x in row] for row in d]
    for _ in range(iterations):
        h = naive_nearest(features, torch.tensor(d, dtype=torch.float64)).tolist()
        for j in range(len(d)):
            members = [features[i].tolist() for i in range(len(h)) if h[i] == j]
            if members:
                d[j] = [sum(col) / len(members) for col in zip(*members)]
    return torch.tensor(d, dtype=torch.float64)


def test_kmeans_init_matches_naive_lloyd_and_keeps_its_input():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 3, generator=g, dtype=torch.float64)
    before = features.clone()
    d = soho.kmeans_init(features, 5, torch.Generator().manual_seed(1), iterations=3)
    start = features[torch.randperm(40, generator=torch.Generator().manual_seed(1))[:5]]
    torch.testing.assert_close(d, naive_lloyd(features, start, 3))
    assert torch.equal(features, before)
    # fewer features than entries: entries repeat features, nothing fails
    assert soho.kmeans_init(features[:3], 8, torch.Generator().manual_seed(0)).shape == (8, 3)


def test_restart_dead_entries_moves_only_idle_entries_onto_features():
    d, idle = torch.randn(6, 4), torch.tensor([0, 5, 2, 7, 0, 3])
    features = torch.randn(9, 4)
    d_before, idle_before = d.clone(), idle.clone()
    new_d, new_idle = soho.restart_dead_entries(d, idle, features, 3, torch.Generator().manual_seed(0))
    dead = idle >= 3
    assert torch.equal(new_d[~dead], d[~dead]) and torch.equal(new_idle[~dead], idle[~dead])
    assert (new_idle[dead] == 0).all()
    for row in new_d[dead]:
        assert any(torch.equal(row, f) for f in features)
    assert torch.equal(d, d_before) and torch.equal(idle, idle_before)  # pure: the inputs are untouched


def test_visual_dictionary_options_use_its_entries():
    """Features far from the N(0, 1) start: the paper's dictionary picks a handful of entries and keeps the rest
    dead; the k-means start and the restarts put the entries where the features are."""
    torch.manual_seed(0)
    centres = 5 + torch.randn(32, 8)
    used = {}
    for init, restart in (("random", 0), ("features", 0), ("features", 2)):
        torch.manual_seed(1)
        vd = soho.VisualDictionary(32, 8, gamma=0.9, init=init, restart_after=restart)
        for step in range(6):
            v = centres[torch.randint(32, (200,))] + 0.05 * torch.randn(200, 8)
            vd.accumulate(v, vd.lookup(v)[0])
            counts = vd.update()
        used[(init, restart)] = int((counts > 0).sum())
        assert vd.pending_features is None and vd.pending_counts.sum() == 0
    assert used[("random", 0)] <= 8
    assert used[("features", 0)] >= 16 and used[("features", 2)] >= used[("features", 0)]


# ---- Eq. 5: straight-through -----------------------------------------------------------------------------------


def test_straight_through_value_and_gradients():
    v = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    d = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = straight_through(v, d)
    assert torch.allclose(out, d)
    upstream = torch.randn(5, 4, dtype=torch.float64)
    gv, = torch.autograd.grad(out, v, upstream, retain_graph=True)
    assert torch.equal(gv, upstream), "the gradient reaches v unchanged"
    gd, = torch.autograd.grad(out, d, upstream, allow_unused=True)
    assert gd is None or torch.count_nonzero(gd) == 0, "nothing flows into the dictionary"


# ---- MVM masking (Sec. 3.3, Eq. 7) ------------------------------------------------------------------------------


def test_mask_by_index_properties():
    g = torch.Generator().manual_seed(4)
    B, L = 64, 20
    h = torch.randint(0, 6, (B, L), generator=g)
    valid = torch.rand(B, L, generator=g) > 0.3
    valid[0] = False  # a sample with no real token
    mask = mask_by_index(h, valid, prob=0.7, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (B, L)
    assert not mask[~valid].any(), "padding is never masked"
    n_masked_samples = 0
    for b in range(B):
        if not mask[b].any():
            continue
        n_masked_samples += 1
        chosen = h[b][mask[b]].unique()
        assert chosen.numel() == 1, "every masked token shares one index"
        assert torch.equal(mask[b], valid[b] & (h[b] == chosen)), "every valid token with that index is masked"
    assert 0.4 * B < n_masked_samples < 0.95 * B
    assert not mask_by_index(h, valid, prob=0.0, generator=g).any()
    everyone = mask_by_index(h, valid, prob=1.0, generator=g)
    assert torch.equal(everyone.any(1), valid.any(1))


def test_mask_by_index_draws_uniformly_among_present_indices():
    # index 0 fills five tokens and index 1 one token; a uniform draw over *indices* picks each half the time
    h = torch.tensor([[0, 0, 0, 0, 0, 1, 7]]).repeat(4000, 1)
    valid = torch.ones_like(h, dtype=torch.bool)
    valid[:, 6] = False  # index 7 sits only in padding, so it is never drawn
    mask = mask_by_index(h, valid, prob=1.0, generator=torch.Generator().manual_seed(5))
    picked_one = mask[:, 5].float().mean().item()
    assert 0.45 < picked_one < 0.55
    assert not mask[:, 6].any()


# ---- Eq. 1 and positions ---------------------------------------------------------------------------------------


def test_encode_grid_and_validity_mask():
    model = SOHO(PRESETS["tiny"]).eval()
    images = torch.randn(2, 3, 256, 384)
    image_mask = torch.zeros(2, 256, 384, dtype=torch.bool)
    image_mask[0] = True
    image_mask[1, :200, :130] = True  # a 200x130 image in a 256x384 canvas
    V, valid, grid = encode(images, image_mask, model.backbone, model.projection)
    assert grid == (4, 6) and V.shape == (2, 24, PRESETS["tiny"].hidden_size)
    assert valid[0].all()
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:4, :3] = True  # ceil(200 / 64) = 4 rows, ceil(130 / 64) = 3 columns hold real pixels
    assert torch.equal(valid[1], expected.flatten())


def test_sine_position_embedding_2d():
    pe = sine_position_embedding_2d(3, 5, 16)
    assert pe.shape == (15, 16)
    assert torch.unique(pe, dim=0).shape[0] == 15, "every cell gets its own position"
    # the first half depends on the row only, the second half on the column only
    grid = pe.view(3, 5, 16)
    assert torch.allclose(grid[:, 0, :8], grid[:, 4, :8]) and torch.allclose(grid[0, :, 8:], grid[2, :, 8:])
    assert torch.allclose(grid[0, 0, 1::2], torch.ones(8))  # cos(0) = 1


# ---- the model ---------------------------------------------------------------------------------------------------


def tiny_batch(task="pretrain", n=3):
    """A random batch of the tiny preset with 256 x 320 images: 4 x 5 = 20 visual tokens each."""
    return data.random_batch(task, PRESETS["tiny"], n, image_size=(256, 320), text_len=10)


def pretrain_loss(model, batch, generator=None):
    out = model.pretrain_losses(batch, generator)
    return soho.pretraining_objective(out["mlm"].mean, out["mvm"].mean, out["itm"].mean), out


@pytest.mark.parametrize("name", ["tiny", "r18", "r101"])
def test_presets_shapes(name):
    cfg = PRESETS[name]
    model = SOHO(cfg)
    assert model.visual_dictionary.embed.shape == (cfg.vd_size, cfg.hidden_size)
    assert len(model.transformer.layers) == cfg.num_layers
    assert model.backbone.out_channels == cfg.resnet_width * 8 * (4 if cfg.resnet_depth >= 50 else 1)
    if name == "r101":
        assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.vd_size) == (768, 12, 12, 2048)


def test_frozen_batchnorm_uses_stored_statistics_from_construction_on():
    model = SOHO(replace(PRESETS["tiny"], backbone_bn="frozen"))
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model.train()
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = model.backbone.bn1.running_mean.clone()
    model.encode(torch.randn(2, 3, 128, 128), torch.ones(2, 128, 128, dtype=torch.bool))
    assert torch.equal(model.backbone.bn1.running_mean, before)


def test_tiny_pretraining_forward_backward():
    torch.manual_seed(0)
    model = SOHO(replace(PRESETS["tiny"], mvm_prob=1.0)).train()
    batch = tiny_batch()
    loss, out = pretrain_loss(model, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert out["mlm"].count == (batch["mlm_labels"] != soho.IGNORE).sum() >= 6  # at least one per matched text
    assert out["itm"].count == 12 and out["mvm"].count > 0
    loss.backward()
    used = [model.backbone, model.projection, model.transformer, model.mlm_transform, model.mvm_transform,
            model.mvm_classifier, model.itm_head]
    for module in used:
        for name, p in module.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
    assert model.visual_dictionary.pending_counts.sum() == 3 * 20, "each image's tokens are counted once"


def test_mlm_and_mvm_only_on_matched_pairs():
    torch.manual_seed(0)
    model = SOHO(replace(PRESETS["tiny"], mvm_prob=1.0)).eval()
    batch = tiny_batch(n=2)
    batch["itm_label"] = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0])  # only text 0 is matched
    batch["mlm_labels"][1:] = soho.IGNORE
    out = model.pretrain_losses(batch, torch.Generator().manual_seed(0))
    # one matched sample with prob 1: one index drawn among its 20 tokens, all its tokens masked
    assert 1 <= out["mvm"].count <= 20 and out["mlm"].count == (batch["mlm_labels"][0] != soho.IGNORE).sum()
    assert out["mvm"].count == out["mvm_mask"][0].sum()
    # the inputs of mismatched pairs are masked too, so that [MASK] tells ITM nothing
    assert out["mvm_mask"][1:].any(dim=1).all()


def test_without_vd_trains_without_mvm():
    model = SOHO(replace(PRESETS["tiny"], use_vd=False))
    assert model.visual_dictionary is None
    loss, out = pretrain_loss(model, tiny_batch())
    loss.backward()
    assert out["mvm"].count == 0 and torch.isfinite(loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = tiny_batch(n=2)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = SOHO(replace(PRESETS["tiny"], gradient_checkpointing=ckpt, dropout=0.0, backbone_bn="frozen"))
        model.train()
        loss, _ = pretrain_loss(model, batch, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_pretraining_step_on_cpu():
    model = SOHO(PRESETS["tiny"]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out = pretrain_loss(model, tiny_batch())
    loss.backward()
    assert torch.isfinite(loss) and model.visual_dictionary.pending_sums.dtype == torch.float32


@pytest.mark.parametrize("text_mean", [False, True])
def test_pool_matches_a_loop_float64(text_mean):
    """pool: tanh(W h_[CLS]) (BERT), or with pool_text_mean tanh(W (h_[CLS] + mean of the real text tokens' h)):
    padding and visual positions never enter it."""
    cfg = replace(soho.PRESETS["tiny"], pool_text_mean=text_mean)
    transformer = soho.CrossModalTransformer(cfg).double()
    g = torch.Generator().manual_seed(0)
    B, T, L, H = 3, 5, 4, cfg.hidden_size
    hidden = torch.randn(B, T + L, H, generator=g, dtype=torch.float64)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    got = transformer.pool(hidden, text_mask)
    W, b = transformer.pooler.weight, transformer.pooler.bias
    for i in range(B):
        x = hidden[i, 0].clone()
        if text_mean:
            n = int(text_mask[i].sum())
            x = x + sum(hidden[i, t] for t in range(n)) / n
        want = torch.tanh(W @ x + b)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    changed = hidden.clone()
    changed[1, 3:] += 100.0  # padding of row 1 and every visual token
    changed[:, T:] -= 50.0
    torch.testing.assert_close(transformer.pool(changed, text_mask)[1], got[1], rtol=1e-12, atol=1e-12)


def test_downstream_logits_shapes_and_pre_vd_features():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = SOHO(cfg).eval()
    batch = tiny_batch("vqa", 4)
    assert model.task_logits("vqa", batch).shape == (4, cfg.num_answers)
    assert model.task_logits("snli-ve", tiny_batch("snli-ve", 4)).shape == (4, 3)
    assert model.task_logits("retrieval", tiny_batch("retrieval", 4)).shape == (4, 4, 2)
    assert model.task_logits("nlvr2", tiny_batch("nlvr2", 2)).shape == (2, 2)  # 4 images, 2 sentences
    # downstream tokens are the pre-VD features unless downstream_use_vd is set
    V, valid, grid = model.encode(batch["images"], batch["image_mask"])
    tokens, _ = model.image_tokens(batch["images"], batch["image_mask"])
    torch.testing.assert_close(tokens, model.embed_visual(V, grid))
    model.config.downstream_use_vd = True
    tokens_vd, _ = model.image_tokens(batch["images"], batch["image_mask"])
    _, d = model.visual_dictionary.lookup(V)
    torch.testing.assert_close(tokens_vd, model.embed_visual(d, grid))


def test_retrieval_logits_pair_image_i_with_caption_j():
    torch.manual_seed(0)
    model = SOHO(PRESETS["tiny"]).eval()
    batch = tiny_batch("retrieval", 3)
    logits = model.task_logits("retrieval", batch)
    visual, valid = model.image_tokens(batch["images"], batch["image_mask"])
    one = model.itm_scores(visual[2:3], valid[2:3], batch["input_ids"][0:1], batch["text_mask"][0:1])
    torch.testing.assert_close(logits[2, 0].log_softmax(-1)[1:], one, rtol=1e-4, atol=1e-5)


def test_r101_forward_at_600x1000_has_the_papers_176_tokens():
    model = SOHO(PRESETS["r101"]).eval()
    images, mask = torch.randn(1, 3, 608, 1024), torch.zeros(1, 608, 1024, dtype=torch.bool)
    mask[0, :600, :1000] = True
    ids = torch.randint(1000, 2000, (1, 16))
    with torch.no_grad():
        visual, valid = model.image_tokens(images, mask)
        hidden = model.fuse(ids, torch.ones_like(ids, dtype=torch.bool), visual, valid)
    assert hidden.shape == (1, 176, 768)  # ceil(600/64) * ceil(1000/64) + 16 = 10 * 16 + 16 (Sec. 4.5)


# ---- weights from files ------------------------------------------------------------------------------------------


def torchvision_resnet_keys(depth):
    """torchvision's resnet{depth} state_dict keys without fc.*, written out from its naming rules."""
    block, counts = {18: ("basic", (2, 2, 2, 2)), 50: ("bottle", (3, 4, 6, 3)), 101: ("bottle", (3, 4, 23, 3))}[depth]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for stage, n in enumerate(counts, start=1):
        for b in range(n):
            p = f"layer{stage}.{b}."
            convs = 2 if block == "basic" else 3
            for c in range(1, convs + 1):
                keys += [p + f"conv{c}.weight"] + [p + f"bn{c}.{s}" for s in bn]
            has_downsample = b == 0 and (stage > 1 or block == "bottle")
            if has_downsample:
                keys += [p + "downsample.0.weight"] + [p + f"downsample.1.{s}" for s in bn]
    return keys


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_backbone_keys_equal_torchvision(depth):
    backbone = soho.ResNet(depth)
    assert sorted(backbone.state_dict()) == sorted(torchvision_resnet_keys(depth))


@torch.no_grad()
def test_average_downsample_sees_a_small_shape_anywhere_in_its_cell():
    """At initialisation (zero_init_residual: every block is its shortcut), a strided 1x1 shortcut reads one
    stride-4 position per 32x32 pixels, so a small square away from it leaves the stride-32 feature exactly as it
    was; averaging shortcuts ("ResNet-D") pass it on wherever it lies."""
    changed = {}
    for average in (False, True):
        torch.manual_seed(0)
        net = soho.ResNet(18, width=16, bn="frozen", zero_init_residual=True, average_downsample=average).eval()
        blank = torch.zeros(1, 3, 64, 64)
        base = net(blank)  # [1, 128, 2, 2]
        changed[average] = []
        for offset in (0, 8, 16, 24):
            img = blank.clone()
            img[:, :, offset:offset + 6, offset:offset + 6] = 3.0  # a 6x6 square inside the first 32x32 cell
            changed[average].append(bool((net(img)[..., 0, 0] - base[..., 0, 0]).abs().max() > 1e-4))
    assert changed[True] == [True] * 4
    assert not all(changed[False]), "the strided shortcut should be blind somewhere in its cell"


def test_resnet_loads_from_a_torchvision_file_and_rejects_a_wrong_one(tmp_path):
    source = soho.ResNet(18, width=16)
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 128), torch.randn(1000)
    path = tmp_path / "resnet18-test.pth"
    torch.save(state, path)
    model = SOHO.from_pretrained("tiny", resnet=str(path))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="average_downsample=false"):  # torchvision's layout has strided shortcuts
        SOHO.from_pretrained("tiny", resnet=str(path), average_downsample=True)
    del state["layer4.1.conv2.weight"]
    state["layer4.1.conv9.weight"] = torch.randn(3)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"(?s)missing: \['layer4.1.conv2.weight'\].*unexpected: \['layer4.1.conv9"):
        SOHO.from_pretrained("tiny", resnet=str(path))


BERT_CONFIG = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
               "vocab_size": 99, "max_position_embeddings": 40, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
               "hidden_act": "gelu", "model_type": "bert"}


def fake_hf_bert_state(cfg, prefix="bert."):
    """Random weights under Hugging Face's BertForPreTraining names, written out by hand."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    s = {"embeddings.word_embeddings.weight": r(V, H), "embeddings.position_embeddings.weight": r(40, H),
         "embeddings.token_type_embeddings.weight": r(2, H), "embeddings.LayerNorm.weight": 1 + r(H),
         "embeddings.LayerNorm.bias": r(H), "embeddings.position_ids": torch.arange(40)[None],
         "pooler.dense.weight": r(H, H), "pooler.dense.bias": r(H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, shape in [("attention.self.query", (H, H)), ("attention.self.key", (H, H)),
                            ("attention.self.value", (H, H)), ("attention.output.dense", (H, H)),
                            ("intermediate.dense", (I, H)), ("output.dense", (H, I))]:
            s[p + name + ".weight"], s[p + name + ".bias"] = r(*shape), r(shape[0])
        for name in ["attention.output.LayerNorm", "output.LayerNorm"]:
            s[p + name + ".weight"], s[p + name + ".bias"] = 1 + r(H), r(H)
    s = {prefix + k: v for k, v in s.items()}
    s.update({"cls.predictions.bias": r(V), "cls.predictions.transform.dense.weight": r(H, H),
              "cls.predictions.transform.dense.bias": r(H), "cls.predictions.transform.LayerNorm.weight": 1 + r(H),
              "cls.predictions.transform.LayerNorm.bias": r(H), "cls.seq_relationship.weight": r(2, H),
              "cls.seq_relationship.bias": r(2), "cls.predictions.decoder.weight": s[prefix + "embeddings.word_embeddings.weight"]})
    return s


def write_safetensors(path, state):
    header, offset, blobs = {}, 0, []
    names = {torch.float32: "F32", torch.int64: "I64"}
    for k, v in state.items():
        raw = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_bert_weights_load_with_their_size_and_first_layers(tmp_path, fmt, capsys):
    state = fake_hf_bert_state(BERT_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(BERT_CONFIG))
    if fmt == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        write_safetensors(tmp_path / "model.safetensors", state)
    model = SOHO.from_pretrained("tiny", bert=str(tmp_path), num_layers=3, vd_size=32)
    assert "layers [0, 1, 2] of 4" in capsys.readouterr().out
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.vocab_size, cfg.num_layers) == (64, 4, 99, 3)
    assert torch.equal(model.transformer.layers[2].ffn_out.weight, state["bert.encoder.layer.2.output.dense.weight"])
    assert torch.equal(model.transformer.text_embed.word.weight, state["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.itm_head.weight, state["cls.seq_relationship.weight"])
    assert torch.equal(model.mlm_bias, state["cls.predictions.bias"])


def test_bert_unexpected_key_is_an_error(tmp_path):
    state = fake_hf_bert_state(BERT_CONFIG, prefix="")
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    (tmp_path / "config.json").write_text(json.dumps(BERT_CONFIG))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="rotary"):
        SOHO.from_pretrained("tiny", bert=str(tmp_path), num_layers=2)


def test_fuse_on_text_reproduces_hugging_face_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(**{k: v for k, v in BERT_CONFIG.items() if k != "model_type"})
    reference = transformers.BertModel(hf_cfg).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # make LayerNorms and biases non-trivial
    reference.save_pretrained(tmp_path)
    model = SOHO.from_pretrained("tiny", bert=str(tmp_path), num_layers=4).eval()
    ids = torch.randint(0, 99, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model.fuse(ids, mask.bool())
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-4, atol=1e-4)
