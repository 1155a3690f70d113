"""scripts/swap_audio2au.py: a separately pretrained Audio2AU put into a trained generator by a
least-squares map folded into the fusion's first level."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.training.checkpoint import load_checkpoint, save_checkpoint
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.models import TalkingHead
from avatar_stream.training.shards import write_clip, write_split
from avatar_stream.training.stages import AUHeads

CFG = ModelConfig.tiny(tcsan_levels=1)


@pytest.fixture(scope="module")
def swap(load_script):
    return load_script("swap_audio2au")


@pytest.fixture(scope="module")
def speech_corpus(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("swapcorpus")
    base = cv2.resize(astronaut[20:300, 120:400], (112, 112), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(1)
    n = 40
    for spk in ("s1", "s2"):
        t = np.arange(n * SAMPLES_PER_FRAME) / 16000
        f0 = rng.uniform(100, 300)
        audio = (0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.5 * t)) * rng.uniform(0, 1, len(t)) ** 0.2).astype(np.float32)
        write_clip(root, spk, "u0", np.repeat(base[None], n, 0), audio, base)
    write_split(root, ["s1"], ["s2"])
    return root


def _generator(cfg: ModelConfig, seed: int) -> TalkingHead:
    torch.manual_seed(seed)
    model = TalkingHead(cfg).eval()
    with torch.no_grad():  # non-zero biases everywhere, so a wrong fold shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant,convs", [({}, {"conv", "res"}), ({"attention": "time"}, {"taps", "res"}),
                                            ({"fusion": "tcn"}, {"conv", "res"})])
def test_fold_applies_the_map_to_the_audio2au_inputs(swap, variant, convs):
    cfg = dataclasses.replace(CFG, **variant)
    model = _generator(cfg, 0)
    before = _generator(cfg, 0).fusion.blocks[0]
    d_au = cfg.n_au * cfg.au_dim
    rng = np.random.default_rng(0)
    a, c = rng.normal(0, 0.3, (d_au, d_au)), rng.normal(0, 0.3, d_au)
    assert set(swap.fold_into_fusion(model, a, c)) == convs
    x = torch.randn(2, cfg.fusion_input_dim, 9)
    start = cfg.f_id + cfg.f_a
    mapped = x.clone().double()
    mapped[:, start:] = torch.einsum("ij,bjt->bit", torch.from_numpy(a), mapped[:, start:]) + torch.from_numpy(c)[None, :, None]
    with torch.no_grad():
        assert torch.allclose(model.fusion.blocks[0](x), before(mapped.float()), atol=1e-4)


def test_fold_refuses_an_unprojected_residual(swap):
    """Fusion input as wide as the hidden size: the first level adds its input as is (no 1x1
    conv to fold into), so a fold would leave the raw new features in the residual."""
    cfg = dataclasses.replace(CFG, tcsan_hidden=CFG.fusion_input_dim, tcsan_tokens=2)
    model = _generator(cfg, 0)
    d_au = cfg.n_au * cfg.au_dim
    with pytest.raises(ValueError, match="unprojected"):
        swap.fold_into_fusion(model, np.eye(d_au), np.zeros(d_au))


def test_fit_map_recovers_a_linear_relation(swap):
    rng = np.random.default_rng(2)
    new = rng.normal(size=(4000, 6))
    a, c = rng.normal(size=(3, 6)), rng.normal(size=3)
    got_a, got_c, r2 = swap.fit_map(new, new @ a.T + c, ridge=1e-9)
    assert np.allclose(got_a, a, atol=1e-6) and np.allclose(got_c, c, atol=1e-6) and np.allclose(r2, 1.0)


def test_swapping_in_its_own_audio2au_changes_nothing_and_another_width_loads(swap, speech_corpus, tmp_path, capsys):
    model = _generator(CFG, 3)
    save_checkpoint(tmp_path / "gen", {"generator": model.state_dict()}, CFG)
    own = AUHeads(CFG)
    own.audio2au.load_state_dict(model.audio2au.state_dict())
    save_checkpoint(tmp_path / "own", {"audio2au": own.audio2au.state_dict()}, CFG)
    args = ["--generator", str(tmp_path / "gen.safetensors"), "--data", str(speech_corpus), "--windows", "40",
            "--ridge", "1e-9"]
    assert swap.main([*args, "--audio2au", str(tmp_path / "own.safetensors"), "--out", str(tmp_path / "same")]) == 0
    cfg, states, extra = load_checkpoint(tmp_path / "same")
    same = TalkingHead(cfg).eval()
    same.load_state_dict(states["generator"])
    torch.manual_seed(0)
    face, mfcc = torch.rand(1, 3, 112, 112), torch.randn(1, 2 * CFG.lookahead_frames + 3, 12, 28)
    with torch.no_grad():
        assert torch.allclose(same(face, mfcc), model(face, mfcc), atol=2e-3)
    assert extra["audio2au_from"].endswith("own.safetensors")
    # A wider Audio2AU (another seed): the result has its width and its heads.
    wide_cfg = dataclasses.replace(CFG, a2a_width=0.25)
    torch.manual_seed(5)
    wide = AUHeads(wide_cfg)
    save_checkpoint(tmp_path / "wide", {"audio2au": wide.audio2au.state_dict()}, wide_cfg)
    capsys.readouterr()
    assert swap.main([*args, "--audio2au", str(tmp_path / "wide.safetensors"), "--out", str(tmp_path / "w")]) == 0
    assert "R^2" in capsys.readouterr().out
    cfg, states, _ = load_checkpoint(tmp_path / "w")
    assert cfg.a2a_width == 0.25
    head = next(k for k in states["generator"] if k.startswith("audio2au.0.head"))
    assert torch.equal(states["generator"][head], wide.audio2au.state_dict()[head.removeprefix("audio2au.")])
    bad_cfg = dataclasses.replace(CFG, au_dim=CFG.au_dim * 2)
    save_checkpoint(tmp_path / "bad", {"audio2au": AUHeads(bad_cfg).audio2au.state_dict()}, bad_cfg)
    assert swap.main([*args, "--audio2au", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "b")]) == 2
    assert "au_dim" in capsys.readouterr().err
