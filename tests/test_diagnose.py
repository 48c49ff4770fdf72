"""experiments/diagnose.py's gradient measurement (item 4): each term of Eq. 9 separately, as a backward pass of
that term alone computes it."""

import os
import sys
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import data  # noqa: E402
import diagnose  # noqa: E402
import soho  # noqa: E402
import synthetic  # noqa: E402


def fresh_model(**overrides):
    torch.manual_seed(0)
    return soho.SOHO(replace(soho.PRESETS["tiny"], mvm_prob=1.0, **overrides)).train()


def test_term_gradients_are_each_terms_own_gradient():
    batch = data.random_batch("pretrain", soho.PRESETS["tiny"], 2, image_size=(128, 128), text_len=8)
    norms = diagnose.term_gradients(fresh_model(), batch)
    assert set(norms) == {"mlm", "mvm", "itm"}
    for term in norms:  # the same model, that term alone backpropagated
        model = fresh_model()
        model.pretrain_losses(batch, torch.Generator().manual_seed(0))[term].mean.backward()
        expected = torch.sqrt(sum((p.grad ** 2).sum() for p in model.transformer.parameters()
                                  if p.grad is not None)).item()
        assert abs(norms[term]["transformer"] - expected) <= 1e-5 * expected
        assert norms[term]["resnet"] > 0
    no_vd = diagnose.term_gradients(fresh_model(use_vd=False), batch)
    assert set(no_vd) == {"mlm", "itm"}


@pytest.mark.parametrize("word", ["background", "object colour"])
def test_grounded_mlm_masks_only_the_chosen_word_and_swaps_only_the_image(world, word):
    """Items 9 and 10: each scored caption is a matched one with one word (its background, or the first object
    colour it names) replaced by [MASK], and nothing else; the three readings differ only in the visual tokens
    (own image, another background's image, none)."""
    cfg = soho.PRESETS["tiny"]
    tok = data.Tokenizer.from_vocab(os.path.join(world, "vocab.txt"), cfg.max_text_len)
    words = diagnose.synthetic.SYNTH_BACKGROUNDS if word == "background" else diagnose.SYNTH_COLORS
    word_ids = {tok.encode(w)[1] for w in words}
    model = fresh_model(use_vd=False).eval()  # an untrained VD would give every image the same tokens
    calls, real_fuse = [], model.fuse

    def recording_fuse(ids, mask, visual=None, valid=None):
        calls.append((ids.clone(), visual))
        return real_fuse(ids, mask, visual, valid)

    model.fuse = recording_fuse
    accuracy, n = diagnose.grounded_mlm(model, {"vocab_path": os.path.join(world, "vocab.txt"), "data_root": world},
                                        cfg, n_images=32, word=word)
    assert n > 0 and set(accuracy) == {"own image", "other image", "no image"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert len(calls) % 3 == 0
    for (own_ids, own_vis), (other_ids, other_vis), (none_ids, none_vis) in zip(*[iter(calls)] * 3):
        assert torch.equal(own_ids, other_ids) and torch.equal(own_ids, none_ids) and none_vis is None
        assert ((own_ids == tok.mask_id).sum(1) >= 1).all()  # the chosen word is masked in every row
        if word == "background":  # a caption names its background once: none is left
            assert not any(i in word_ids for i in own_ids.flatten().tolist())
        else:  # the first object colour is masked, so no object colour comes before the [MASK]
            for row in own_ids.tolist():
                assert not any(i in word_ids for i in row[:row.index(tok.mask_id)])
        assert not torch.equal(own_vis, other_vis)


@pytest.mark.parametrize("cell", [64, 32])
def test_cell_pixels_are_each_cells_block_means_in_a_loop(cell):
    """Item 7's reference: every cell of the token grid as the mean colour of its 16 blocks, a side that is not a
    whole number of cells (288 = 4.5 x 64) padded with zeros, against a loop over cells and blocks."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 288, 256, generator=g, dtype=torch.float64)
    gh, gw, b_px = -(-288 // cell), 256 // cell, cell // 4
    got = diagnose.cell_pixels(images, (gh, gw), cell)
    assert got.shape == (2, gh * gw, 48)
    padded = torch.zeros(2, 3, gh * cell, 256, dtype=torch.float64)
    padded[:, :, :288] = images
    for b in range(2):
        for r in range(gh):
            for c in range(gw):
                for ch in range(3):
                    for i in range(4):
                        for j in range(4):
                            y, x = cell * r + b_px * i, cell * c + b_px * j
                            want = padded[b, ch, y:y + b_px, x:x + b_px].mean()
                            assert torch.isclose(got[b, r * gw + c, ch * 16 + i * 4 + j], want)


def test_mask_first_of_masks_each_rows_first_chosen_word_only():
    ids = torch.tensor([[1, 7, 5, 8, 5, 0],   # 5 twice, 8 once: only the first of them (5 at position 2)
                        [1, 8, 9, 5, 2, 0],   # 8 comes first
                        [1, 6, 6, 2, 0, 0]])  # none of the words: left alone
    masked, at, targets = diagnose.mask_first_of(ids, torch.tensor([5, 8]), 103)
    assert torch.equal(masked, torch.tensor([[1, 7, 103, 8, 5, 0], [1, 103, 9, 5, 2, 0], [1, 6, 6, 2, 0, 0]]))
    assert at.sum().item() == 2 and at[0, 2] and at[1, 1]
    assert targets.tolist() == [5, 8]
    assert ids[0, 2] == 5  # the input is not changed


def test_a_mismatch_is_grouped_by_the_background_it_names():
    own = "A red star on a teal background."
    assert diagnose.background_kind(own, "two shapes against a teal background") == "same background"
    assert diagnose.background_kind(own, "on a pink background a blue circle") == "other background"
    assert diagnose.background_kind(own, "a blue circle") is None
    assert diagnose.background_kind("a blue circle", own) is None


def test_mismatches_are_split_by_the_kind_of_image(world):
    """mismatches_by with image_kind: the same mismatched captions, each group split by its image's kind."""
    class SaysMismatchedAlways:
        def pretrain_itm_logits(self, batch):
            return torch.tensor([[1.0, 0.0]]).repeat(len(batch["texts"]), 1)  # class 0: mismatched

    cfg = soho.PRESETS["tiny"]
    ckpt = {"vocab_path": os.path.join(world, "vocab.txt"), "data_root": world}
    plain = diagnose.mismatches_by(SaysMismatchedAlways(), ckpt, cfg, diagnose.background_kind, n_images=32)

    def parity(image_id):  # "coco:<id>"
        return "even id" if int(image_id.split(":")[1]) % 2 == 0 else "odd id"

    split = diagnose.mismatches_by(SaysMismatchedAlways(), ckpt, cfg, diagnose.background_kind, n_images=32,
                                   image_kind=parity)
    assert plain and all(accuracy == 1.0 for accuracy, _ in [*plain.values(), *split.values()])
    assert {k.split(", ")[0] for k in split} == {"even id", "odd id"}
    for kind, (_, n) in plain.items():
        assert sum(m for k, (_, m) in split.items() if k.split(", ")[1] == kind) == n


def test_loudness_recovers_the_parts_of_a_sum_and_what_is_left():
    """Item 11 on cells built as perfect tokens are (a vector per background, plus one per colour and kind present),
    in float64: it finds each part's norm; noise added to every cell is reported as the residual, not as a part."""
    g = torch.Generator().manual_seed(0)
    n, dim = 400, 16
    bg_vec, colour_vec, kind_vec = (torch.randn(k, dim, generator=g, dtype=torch.float64) for k in (6, 6, 5))
    background = torch.randint(0, 6, (n,), generator=g)
    colours = (torch.rand(n, 6, generator=g) < 0.3).double()
    kinds = (torch.rand(n, 5, generator=g) < 0.3).double()
    x = bg_vec[background] + colours @ colour_vec + kinds @ kind_vec  # [n, dim]
    parts = diagnose.loudness(x, background, colours, kinds)
    for name, vectors in (("background", bg_vec), ("colour", colour_vec), ("kind", kind_vec)):
        spread = (vectors - vectors.mean(0)).norm(dim=1).mean().item()  # what tells one from another
        assert parts[name] == pytest.approx(spread, rel=1e-6)
    assert parts["shape present"] == pytest.approx((colour_vec.mean(0) + kind_vec.mean(0)).norm().item(), rel=1e-6)
    assert parts["residual"] < 1e-6
    noisy = diagnose.loudness(x + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64), background, colours,
                              kinds)
    assert noisy["residual"] == pytest.approx(0.5 * dim ** 0.5, rel=0.15)
    assert noisy["colour"] == pytest.approx(parts["colour"], rel=0.15)


def test_cell_contents_name_what_the_cell_holds():
    scene = synthetic.Scene(256, 256, "olive", synthetic.SYNTH_BACKGROUNDS["olive"],
                            (synthetic.Thing("star", "red", "big", 96, 96, 40, (215, 45, 45)),))
    bg, colours, kinds = diagnose.cell_contents(scene, 1, 1)
    assert bg == sorted(synthetic.SYNTH_BACKGROUNDS).index("olive")
    assert colours == [float(c == "red") for c in sorted(synthetic.SYNTH_COLORS)]
    assert kinds == [float(k == "star") for k in synthetic.SYNTH_SHAPES]
    _, empty_colours, empty_kinds = diagnose.cell_contents(scene, 3, 3)
    assert sum(empty_colours) == 0 and sum(empty_kinds) == 0
    _, fine_colours, _ = diagnose.cell_contents(scene, 3, 3, cell=32)  # (96, 96) is that 32-px cell's corner
    assert fine_colours == colours


@pytest.mark.parametrize("merge", [False, True])
def test_entries_by_background_counts_each_backgrounds_tokens_and_finds_shared_entries(world, merge):
    """Item 12 with a stand-in dictionary that gives every token of an image the entry of its background (read off
    the corner pixel, which no shape reaches), or, with merge, gray's tokens black's entry."""
    names = sorted(synthetic.SYNTH_BACKGROUNDS)
    rgb = torch.tensor([synthetic.SYNTH_BACKGROUNDS[n] for n in names], dtype=torch.float32)

    class EntryOfTheBackground:
        def encode(self, images, image_mask):
            corner = (images[:, :, 0, 0] * data.IMAGENET_STD.view(1, 3) + data.IMAGENET_MEAN.view(1, 3)) * 255
            entry = torch.cdist(corner, rgb).argmin(1)  # [B] the nearest background colour (jitter is +-8)
            if merge:
                entry[entry == names.index("gray")] = names.index("black")
            V = entry[:, None, None].float().expand(-1, 20, 1)  # [B, l, 1]: the entry, carried as the token
            return V, torch.ones(len(images), 20, dtype=torch.bool), (4, 5)

        class visual_dictionary:
            @staticmethod
            def lookup(V):
                return (V[..., 0].long(),)

    cfg = soho.PRESETS["tiny"]
    ckpt = {"vocab_path": os.path.join(world, "vocab.txt"), "data_root": world}
    most, shared = diagnose.entries_by_background(EntryOfTheBackground(), ckpt, cfg, n_images=32)
    assert {"gray", "black"} <= set(most) and len(most) >= 4
    for background, entries in most.items():
        expected = names.index("black") if merge and background == "gray" else names.index(background)
        assert entries == [(expected, 1.0)], background
    assert shared == ({("black", "gray"): [names.index("black")]} if merge else {})
