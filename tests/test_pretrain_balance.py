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


def test_configs_of_the_deleted_motion_loss_load_only_when_it_was_off():
    """``w_motion`` (a mouth-box L1 on frame-to-frame changes) was an experiment that lost and
    was deleted: a config written with it off still loads (the shipped starter's does), one
    that trained with it says so."""
    from avatar_stream.training.config import ModelConfig

    cfg = ModelConfig.tiny()
    assert ModelConfig.from_dict({**cfg.to_dict(), "w_motion": 0.0}) == cfg
    with pytest.raises(ValueError, match="w_motion is an experiment this avatar-stream no longer has"):
        ModelConfig.from_dict({**cfg.to_dict(), "w_motion": 5.0})
    assert "w_motion" not in cfg.to_dict()


def test_cli_passes_the_new_flags_to_the_stage_options(monkeypatch, tmp_path):
    from avatar_stream.training import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_stage", lambda args, fn, opts: seen.setdefault(args.command, opts) and 0)
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "run")]
    cli.main(["pretrain-au", *base, "--augment-speech", "--balance"])
    cli.main(["pretrain-au-classifier", *base, "--balance"])
    cli.main(["train", *base, "--augment-speech", "--init", "x.safetensors", "--no-vgg"])
    assert seen["pretrain-au"].augment_speech and seen["pretrain-au"].balance
    assert seen["pretrain-au-classifier"].balance and not hasattr(seen["pretrain-au-classifier"], "augment_speech")
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
