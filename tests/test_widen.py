"""Function-preserving widening of the AU classifier (training/widen.py); the
``pretrain-au-classifier --init NARROW --set au_clf_width=W`` run is in test_train.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from avatar_stream.training.config import ModelConfig
from avatar_stream.training.models import AUClassifier
from avatar_stream.training.widen import widen_classifier


def _clf(cfg: ModelConfig) -> AUClassifier:
    torch.manual_seed(0)
    return AUClassifier(cfg).eval()


@pytest.mark.parametrize("width", [0.25, 0.375, 0.5])
def test_widened_classifier_gives_the_same_logits(width):
    cfg = ModelConfig(width=0.25, au_clf_reference=True, au_clf_symmetric=True)
    narrow = _clf(cfg)
    wide = _clf(dataclasses.replace(cfg, au_clf_width=width))
    widen_classifier(narrow, wide)
    x = torch.rand(6, 6, 56, 112)
    with torch.no_grad():
        a, b = narrow(x), wide(x)
    assert float(a.abs().max()) > 1e-3  # not a trivial all-zero output
    assert torch.allclose(a, b, atol=1e-5)
    if width > 0.25:
        assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in narrow.parameters())
        # A unit and its copy read the same inputs but hand on unequal shares: training can separate them.
        w0, w2 = wide.convs[0].weight, wide.convs[2].weight
        copy = next(j for j in range(narrow.convs[0].out_channels, w0.shape[0]))
        src = next(i for i in range(narrow.convs[0].out_channels) if torch.equal(w0[i], w0[copy]))
        assert not torch.allclose(w2[:, src], w2[:, copy])


def test_widening_refuses_a_narrower_or_other_classifier():
    cfg = ModelConfig(width=0.25, au_clf_reference=True)
    with pytest.raises(ValueError, match="narrower"):
        widen_classifier(_clf(dataclasses.replace(cfg, au_clf_width=0.5)), _clf(cfg))
    with pytest.raises(ValueError, match="input channels"):
        widen_classifier(_clf(dataclasses.replace(cfg, au_clf_reference=False)), _clf(cfg))
