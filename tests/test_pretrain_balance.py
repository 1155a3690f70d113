"""stages.masked_bce with class balance (``--balance``): positives weighted per AU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avatar_stream.training.stages import masked_bce


def test_pos_weight_scales_only_the_positive_term_and_respects_the_mask():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.7, 1.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    valid = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    w = torch.tensor([3.0, 0.5])
    pos = -F.logsigmoid(logits) * labels * w
    neg = -F.logsigmoid(-logits) * (1 - labels)
    expected = ((pos + neg) * valid).sum() / valid.sum()
    torch.testing.assert_close(masked_bce(logits, labels, valid, w), expected)
    torch.testing.assert_close(masked_bce(logits, labels, valid), masked_bce(logits, labels, valid, torch.ones(2)))
    assert masked_bce(logits, labels, valid, w) != masked_bce(logits, labels, valid)
