"""experiments/diagnose.py's gradient measurement (item 4): each term of Eq. 9 separately, as a backward pass of
that term alone computes it."""

import os
import sys
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import data  # noqa: E402
import diagnose  # noqa: E402
import soho  # noqa: E402


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


def test_grounded_mlm_masks_only_the_background_word_and_swaps_only_the_image(world):
    """Item 9: each scored caption is a matched one with its background word (and nothing else) replaced by
    [MASK]; the three readings differ only in the visual tokens (own image, another background's image, none)."""
    cfg = soho.PRESETS["tiny"]
    tok = data.Tokenizer.from_vocab(os.path.join(world, "vocab.txt"), cfg.max_text_len)
    bg_ids = {tok.encode(bg)[1] for bg in diagnose.synthetic.SYNTH_BACKGROUNDS}
    model = fresh_model(use_vd=False).eval()  # an untrained VD would give every image the same tokens
    calls, real_fuse = [], model.fuse

    def recording_fuse(ids, mask, visual=None, valid=None):
        calls.append((ids.clone(), visual))
        return real_fuse(ids, mask, visual, valid)

    model.fuse = recording_fuse
    accuracy, n = diagnose.grounded_mlm(model, {"vocab_path": os.path.join(world, "vocab.txt"), "data_root": world},
                                        cfg, n_images=32)
    assert n > 0 and set(accuracy) == {"own image", "other image", "no image"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert len(calls) % 3 == 0
    for (own_ids, own_vis), (other_ids, other_vis), (none_ids, none_vis) in zip(*[iter(calls)] * 3):
        assert torch.equal(own_ids, other_ids) and torch.equal(own_ids, none_ids) and none_vis is None
        assert ((own_ids == tok.mask_id).sum(1) >= 1).all()  # the background word is masked in every row
        assert not any(i in bg_ids for i in own_ids.flatten().tolist())  # and no background word is left
        assert not torch.equal(own_vis, other_vis)
