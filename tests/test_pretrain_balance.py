"""stages.masked_bce with class balance (``--balance``) and the mouth-box L1 (``w_mouth``)."""

from __future__ import annotations

import pytest
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


def test_mouth_loss_sees_only_the_mouth_box():
    from avatar_stream.training.config import ModelConfig
    from avatar_stream.training.losses import TotalLoss, mouth_loss

    target = torch.zeros(1, 2, 3, 112, 112)
    moved = target.clone()
    moved[..., 20:40, 40:70] = 1.0  # eyes region: not the mouth
    assert float(mouth_loss(moved, target)) == 0.0
    moved[..., 80:90, 50:60] = 1.0  # inside the box (rows 62-101, cols 34-78)
    assert float(mouth_loss(moved, target)) == pytest.approx(100 * 3 / (3 * 39 * 44))
    ident = torch.zeros(1, 3, 112, 112)
    off = TotalLoss(ModelConfig.tiny(w_per=0.0, w_au=0.0))(moved, target, ident)
    on = TotalLoss(ModelConfig.tiny(w_per=0.0, w_au=0.0, w_mouth=2.0))(moved, target, ident)
    assert "mouth" not in off and float(on["total"] - off["total"]) == pytest.approx(2.0 * float(on["mouth"]))


def test_motion_loss_penalises_jitter_and_missing_motion_in_the_mouth_box():
    from avatar_stream.training.config import ModelConfig
    from avatar_stream.training.losses import TotalLoss, motion_loss

    still = torch.full((1, 3, 3, 112, 112), 0.5)
    jitter = still.clone()
    jitter[:, 1, :, 80:90, 50:60] = 0.6  # the middle frame's mouth flickers; the target is still
    assert float(motion_loss(still, still)) == 0.0
    # two changes (up at 0->1, back at 1->2) of 0.1 over 100 px x 3 channels, 2 steps of the box
    assert float(motion_loss(jitter, still)) == pytest.approx(2 * 0.1 * 300 / (2 * 3 * 39 * 44), rel=1e-4)
    # a constant offset (same error in every frame) is not motion: that is L_rec's business
    offset = still + 0.2
    assert float(motion_loss(offset, still)) == pytest.approx(0.0, abs=1e-7)
    # a target that moves while the prediction stays still is penalised too; moving alike is not
    assert float(motion_loss(still, jitter)) > 0.0 and float(motion_loss(jitter, jitter)) == 0.0
    jitter[:, 1, :, 10:20, 10:20] = 1.0  # outside the mouth box: ignored
    assert float(motion_loss(jitter, still)) == pytest.approx(2 * 0.1 * 300 / (2 * 3 * 39 * 44), rel=1e-4)
    assert float(motion_loss(still[:, :1], jitter[:, :1])) == 0.0  # one frame: no motion
    ident = still[:, 0]
    off = TotalLoss(ModelConfig.tiny(w_per=0.0, w_au=0.0))(jitter, still, ident)
    on = TotalLoss(ModelConfig.tiny(w_per=0.0, w_au=0.0, w_motion=5.0))(jitter, still, ident)
    assert "motion" not in off and float(on["total"] - off["total"]) == pytest.approx(5.0 * float(on["motion"]))


def test_cli_passes_the_new_flags_to_the_stage_options(monkeypatch, tmp_path):
    from avatar_stream.training import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_stage", lambda args, fn, opts: seen.setdefault(args.command, opts) and 0)
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "run")]
    cli.main(["pretrain-au", *base, "--augment-speech", "--balance"])
    cli.main(["pretrain-au-classifier", *base, "--balance"])
    cli.main(["train", *base, "--augment-speech", "--init", "x.safetensors", "--no-vgg"])
    assert seen["pretrain-au"].augment_speech and seen["pretrain-au"].balance
    assert seen["pretrain-au-classifier"].balance and not seen["pretrain-au-classifier"].augment_speech
    assert seen["train"].augment_speech and str(seen["train"].init) == "x.safetensors"


def test_cli_vtlp_reaches_the_speech_augmentation(monkeypatch, tmp_path, capsys):
    from avatar_stream.training import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_stage", lambda args, fn, opts: seen.setdefault(args.command, opts) and 0)
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "run")]
    cli.main(["pretrain-au", *base, "--augment-speech", "--vtlp", "0.5", "--init", "au.safetensors"])
    cli.main(["train", *base, "--augment-speech", "--vtlp", "0.3", "--no-vgg"])
    assert seen["pretrain-au"].vtlp == 0.5 and str(seen["pretrain-au"].init) == "au.safetensors"
    assert seen["train"].vtlp == 0.3
    capsys.readouterr()
    for bad, why in ((["--vtlp", "0.5"], "only with --augment-speech"), (["--augment-speech", "--vtlp", "2"], "probability")):
        assert cli.main(["pretrain-au", *base, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err


def test_cli_quiet_items(monkeypatch, tmp_path, capsys):
    from avatar_stream.training import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_stage", lambda args, fn, opts: seen.setdefault(args.command, opts) and 0)
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--no-vgg"]
    cli.main(["train", *base, "--quiet-items", "0.2"])
    assert seen["train"].quiet_items == 0.2
    capsys.readouterr()
    assert cli.main(["train", *base, "--quiet-items", "1.5"]) == 2
    assert "not a probability" in capsys.readouterr().err
