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
