"""Losses (docs/design.md §4): hand-computed values, VGG-19 loading, the weighted total."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from avatar_stream.training.config import ModelConfig
from avatar_stream.training.losses import (
    VGG19_FILE,
    VGG19_URL,
    PerceptualLoss,
    TotalLoss,
    VGG19Features,
    WeightsNotFoundError,
    au_loss,
    au_weights,
    identity_loss,
    load_vgg19,
    reconstruction_loss,
    weighted_bce,
    weighted_dice,
)

LOGITS = np.array([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0], [0.0, 3.0, 1.0], [1.0, -3.0, -0.2]])
LABELS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float64)
RATES = np.array([0.5, 0.25, 0.1])


def _np_weights(rates):
    inv = 1.0 / rates
    return inv / inv.sum() * len(rates)


def test_au_weights_are_inverse_rates_summing_to_n_au():
    w = au_weights(RATES.tolist())
    # 1/r = 2, 4, 10 (sum 16) -> x 3/16
    np.testing.assert_allclose(w.numpy(), [0.375, 0.75, 1.875], rtol=1e-6)
    assert w.sum().item() == pytest.approx(3.0)
    assert w.dtype == torch.float32
    np.testing.assert_allclose(au_weights([0.3] * 5).numpy(), np.ones(5), rtol=1e-6)
    with pytest.raises(ValueError, match="never occurs in the training set"):
        au_weights([0.5, 0.0, 0.2])


def test_weighted_bce_and_dice_match_hand_computation():
    w = _np_weights(RATES)
    p = 1.0 / (1.0 + np.exp(-LOGITS))
    bce_per_au = -(LABELS * np.log(p) + (1 - LABELS) * np.log(1 - p)).mean(axis=0)
    want_bce = (w * bce_per_au).sum() / 3
    dice_per_au = 1 - (2 * (p * LABELS).sum(0) + 1.0) / (p.sum(0) + LABELS.sum(0) + 1.0)
    want_dice = (w * dice_per_au).sum() / 3

    logits, labels = torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(LABELS, dtype=torch.float32)
    wt = torch.tensor(w, dtype=torch.float32)
    assert weighted_bce(logits, labels, wt).item() == pytest.approx(want_bce, rel=1e-5)
    assert weighted_dice(logits, labels, wt).item() == pytest.approx(want_dice, rel=1e-5)
    assert au_loss(logits, labels, wt).item() == pytest.approx(want_bce + want_dice, rel=1e-5)
    # Leading dims (B, T) are flattened into the sample axis.
    assert weighted_dice(logits.reshape(2, 2, 3), labels.reshape(2, 2, 3), wt).item() == pytest.approx(
        want_dice, rel=1e-5)


def test_dice_rewards_a_correctly_absent_au_and_punishes_a_missed_one():
    w = torch.ones(1)
    absent = torch.zeros(6, 1)
    assert weighted_dice(torch.full((6, 1), -8.0), absent, w).item() < 0.01
    assert weighted_dice(torch.full((6, 1), -8.0), torch.ones(6, 1), w).item() > 0.8


def test_reconstruction_and_identity_losses():
    rng = np.random.default_rng(0)
    pred = rng.random((2, 3, 3, 8, 8)).astype(np.float32)
    target = rng.random((2, 3, 3, 8, 8)).astype(np.float32)
    ident = rng.random((2, 3, 8, 8)).astype(np.float32)
    assert reconstruction_loss(torch.from_numpy(pred), torch.from_numpy(target)).item() == pytest.approx(
        np.abs(pred - target).mean(), rel=1e-6)
    want_id = np.abs(pred[..., :4, :] - ident[:, None, :, :4, :]).mean()
    assert identity_loss(torch.from_numpy(pred), torch.from_numpy(ident)).item() == pytest.approx(want_id, rel=1e-6)
    moved = pred.copy()
    moved[..., 4:, :] = 0.0  # the lower half (mouth) is free to move
    assert identity_loss(torch.from_numpy(moved), torch.from_numpy(ident)).item() == pytest.approx(want_id, rel=1e-6)
    assert identity_loss(torch.from_numpy(pred[:, 0]), torch.from_numpy(ident)).item() == pytest.approx(
        np.abs(pred[:, 0, :, :4] - ident[..., :4, :]).mean(), rel=1e-6)


def test_vgg_missing_weight_file_says_what_to_get(tmp_path):
    missing = tmp_path / VGG19_FILE
    with pytest.raises(WeightsNotFoundError) as err:
        load_vgg19(missing)
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and VGG19_URL in msg and VGG19_FILE in msg
    with pytest.raises(WeightsNotFoundError):
        TotalLoss(ModelConfig.tiny(), vgg_weights=missing)
    TotalLoss(ModelConfig.tiny(w_per=0.0), vgg_weights=missing)  # no L_per: no file needed


def _torchvision_like_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {f"features.{k}": v.clone() for k, v in VGG19Features().features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file also holds the classifier
    return sd


def test_vgg_loads_torchvision_pth_and_safetensors(tmp_path):
    sd = _torchvision_like_state()
    torch.save(sd, tmp_path / VGG19_FILE)
    save_file(sd, str(tmp_path / "vgg19.safetensors"))
    for path in (tmp_path / VGG19_FILE, tmp_path / "vgg19.safetensors"):
        vgg = load_vgg19(path)
        for k, v in vgg.state_dict().items():
            assert torch.equal(v, sd[k]), k
        assert not any(p.requires_grad for p in vgg.parameters())
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a VGG-19 weight file: missing keys"):
        load_vgg19(tmp_path / "partial.pth")
    bad = dict(sd, **{"features.0.weight": torch.zeros(32, 3, 3, 3)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="shapes do not match VGG-19"):
        load_vgg19(tmp_path / "bad.pth")


def test_vgg_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="avatar_stream.training.losses"):
        load_vgg19(None)
    assert any("random weights" in r.message for r in caplog.records)


def test_vgg_layers_and_perceptual_loss():
    torch.manual_seed(1)
    vgg = load_vgg19(None)
    feats = vgg(torch.rand(1, 3, 112, 112))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 112, 112), (128, 56, 56), (256, 28, 28),
                                                     (512, 14, 14), (512, 7, 7)]
    assert all(f.min() >= 0 for f in feats)  # taps are ReLU outputs
    per = PerceptualLoss(vgg).train()
    assert not vgg.training  # frozen VGG stays in eval mode
    target = torch.rand(1, 2, 3, 112, 112)
    assert per(target, target).item() == 0.0
    pred = target.clone().requires_grad_(True)
    noisy = pred + 0.1 * torch.randn_like(pred)
    loss = per(noisy, target)
    flat = noisy.detach().reshape(-1, 3, 112, 112), target.reshape(-1, 3, 112, 112)
    want = np.mean([(a - b).abs().mean().item() for a, b in zip(vgg(flat[0]), vgg(flat[1]), strict=True)])
    assert loss.item() == pytest.approx(want, rel=1e-5) and want > 0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())


def test_total_loss_weights_and_switches():
    torch.manual_seed(2)
    cfg = ModelConfig.tiny()
    loss_fn = TotalLoss(cfg, vgg_weights=None, au_rates=RATES.tolist() + [0.2, 0.4])
    pred, target = torch.rand(1, 2, 3, 112, 112), torch.rand(1, 2, 3, 112, 112)
    ident = torch.rand(1, 3, 112, 112)
    logits, labels = torch.randn(1, 2, 5), (torch.rand(1, 2, 5) > 0.5).float()
    parts = loss_fn(pred, target, ident, logits, labels)
    assert set(parts) == {"rec", "id", "per", "au", "total"}
    want = 1.5 * parts["rec"] + 1.5 * parts["id"] + 0.07 * parts["per"] + 0.02 * parts["au"]
    assert parts["total"].item() == pytest.approx(want.item(), rel=1e-6)
    assert parts["au"].item() == pytest.approx(
        au_loss(logits, labels, au_weights(RATES.tolist() + [0.2, 0.4])).item(), rel=1e-6)

    only_rec = TotalLoss(ModelConfig.tiny(w_id=0, w_per=0, w_au=0))
    parts = only_rec(pred, target, ident)
    assert set(parts) == {"rec", "total"} and parts["total"].item() == pytest.approx(1.5 * parts["rec"].item())
    with pytest.raises(ValueError, match="w_au > 0 needs au_logits"):
        TotalLoss(ModelConfig.tiny(w_per=0))(pred, target, ident)
    with pytest.raises(ValueError, match="got 3 AU occurrence rates for 5 AUs"):
        TotalLoss(ModelConfig.tiny(w_per=0), au_rates=RATES.tolist())
