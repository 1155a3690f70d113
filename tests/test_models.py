"""Generator, config and checkpoints (docs/design.md §2, §4): shapes, receptive field, round trips."""

from __future__ import annotations

import dataclasses
import json
import time

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from avatar_stream.training.checkpoint import (
    CheckpointError,
    build_model_from_checkpoint,
    load_checkpoint,
    load_optimizer_states,
    save_checkpoint,
)
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.losses import TotalLoss
from avatar_stream.training.models import AUClassifier, TalkingHead, parameter_counts
from avatar_stream.training.modules import Audio2AU, AudioEncoder, IdentityEncoder, ImageDecoder, build_fusion

VARIANTS = [("tcsan", "feature_tokens"), ("tcsan", "time"), ("tcn", "feature_tokens"),
            ("mhatt_tcn", "feature_tokens"), ("coatt_tcn", "feature_tokens"), ("gru", "feature_tokens")]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads
    that spin against other processes make a step 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settle_bn(model: torch.nn.Module, *args) -> None:
    """One train-mode pass so BatchNorm running stats differ from their initial values."""
    model.train()
    with torch.no_grad():
        model(*args)
    model.eval()


# -- config ---------------------------------------------------------------------------------

def test_config_paper_defaults_and_derived_sizes():
    cfg = ModelConfig()
    assert (cfg.f_id, cfg.f_a, cfg.au_dim, cfg.n_au) == (512, 512, 64, 5)
    assert (cfg.n_mfcc, cfg.mfcc_frames, cfg.image_size) == (12, 28, 112)
    assert cfg.dilations == (1, 2, 4)
    assert cfg.lookahead_frames == 7 and cfg.receptive_field == 15
    assert cfg.frame_feature_dim == 512 + 5 * 64 == 832
    assert cfg.fusion_input_dim == 1344  # f_id ⊕ f_a ⊕ f_au, paper §3.1
    assert (cfg.w_rec, cfg.w_id, cfg.w_per, cfg.w_au) == (1.5, 1.5, 0.07, 0.02)
    assert ModelConfig(audio2au=False).frame_feature_dim == 512
    assert ModelConfig(tcsan_levels=2).lookahead_frames == 3
    assert ModelConfig(tcsan_kernel=5).lookahead_frames == 14


def test_config_json_round_trip_and_validation():
    cfg = ModelConfig.tiny(fusion="coatt_tcn", attention="time", w_per=0.0)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again.au_names, tuple)
    assert json.loads(cfg.to_json())["au_names"] == list(cfg.au_names)
    with pytest.raises(ValueError, match="fusion must be one of"):
        ModelConfig(fusion="lstm")
    with pytest.raises(ValueError, match="tcsan_kernel must be odd"):
        ModelConfig(tcsan_kernel=4)
    with pytest.raises(ValueError, match="divisible by tcsan_heads"):
        ModelConfig(tcsan_hidden=96, tcsan_tokens=8, tcsan_heads=5)
    with pytest.raises(ValueError, match="w_au must be >= 0"):
        ModelConfig(w_au=-1)
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="newer than this avatar-stream"):
        ModelConfig.from_dict({**cfg.to_dict(), "config_version": 99})


# -- shapes ---------------------------------------------------------------------------------

def test_module_shapes_at_paper_width():
    cfg = ModelConfig()
    torch.manual_seed(0)
    face = torch.rand(2, 3, 112, 112)
    mfcc = torch.randn(2, 1, 12, 28)
    with torch.no_grad():
        enc = IdentityEncoder(cfg).eval()
        f_id, skips = enc(face)
        assert f_id.shape == (2, 512)
        assert [tuple(s.shape) for s in skips] == [(2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7)]
        assert AudioEncoder(cfg).eval()(mfcc).shape == (2, 512)
        a2au = Audio2AU(cfg).eval()
        assert a2au.features(mfcc).shape == (2, 64) and a2au(mfcc).shape == (2,)
        ft = build_fusion(cfg).eval()(torch.randn(2, 3 + 14, 1344))
        assert ft.shape == (2, 3, 512)
        frames = ImageDecoder(cfg, enc.channels).eval()(torch.randn(2, 512), skips)
        assert frames.shape == (2, 3, 112, 112) and frames.min() >= 0 and frames.max() <= 1
        clf = AUClassifier(cfg).eval()
        lower = clf.lower_half(torch.rand(2, 4, 3, 112, 112))
        assert lower.shape == (8, 3, 56, 112) and clf(lower).shape == (8, 5)
        model = TalkingHead(cfg).eval()
        out = model.generate(face, torch.randn(2, 2 + 14, 12, 28))
        assert out.frames.shape == (2, 2, 3, 112, 112) and out.au_logits.shape == (2, 16, 5)


def test_parameter_counts_per_module():
    """Run with -s to see the table (reported in the task report)."""
    for name, cfg in (("paper", ModelConfig()), ("tiny", ModelConfig.tiny())):
        counts = parameter_counts(TalkingHead(cfg))
        clf = parameter_counts(AUClassifier(cfg))["total"]
        print(f"\n[{name} width={cfg.width}] " + ", ".join(f"{k}={v:,}" for k, v in counts.items())
              + f"; au_classifier={clf:,}")
        parts = ["identity_encoder", "audio_encoder", "audio2au", "fusion", "decoder"]
        assert sum(counts[p] for p in parts) == counts["total"]
        assert sum(counts[f"audio2au.{au}"] for au in cfg.au_names) == counts["audio2au"]
        assert all(counts[p] > 0 for p in parts)
    paper, tiny = parameter_counts(TalkingHead(ModelConfig())), parameter_counts(TalkingHead(ModelConfig.tiny()))
    assert paper["total"] > 20 * tiny["total"]  # width really scales the model


@pytest.mark.parametrize("fusion,attention", VARIANTS)
def test_every_fusion_variant_runs_end_to_end(fusion, attention):
    cfg = ModelConfig.tiny(fusion=fusion, attention=attention)
    model = TalkingHead(cfg).eval()
    with torch.no_grad():
        frames = model(torch.rand(2, 3, 112, 112), torch.randn(2, 3 + 2 * cfg.lookahead_frames, 12, 28))
    assert frames.shape == (2, 3, 3, 112, 112)


def test_audio2au_off_has_no_au_branch():
    cfg = ModelConfig.tiny(audio2au=False)
    model = TalkingHead(cfg).eval()
    assert not any(k.startswith("audio2au") for k in model.state_dict())
    with torch.no_grad():
        feat, au = model.frame_features(torch.randn(3, 12, 28))
        assert feat.shape == (3, cfg.f_a) and au is None
        out = model.generate(torch.rand(1, 3, 112, 112), torch.randn(1, 15, 12, 28))
    assert out.frames.shape == (1, 1, 3, 112, 112) and out.au_logits is None


def test_decode_needs_the_receptive_field():
    cfg = ModelConfig.tiny()
    model = TalkingHead(cfg).eval()
    f_id, skips = model.encode_identity(torch.rand(1, 3, 112, 112))
    with pytest.raises(ValueError, match="at least 2R\\+1 = 15 frames"):
        model.decode(torch.randn(1, 14, cfg.frame_feature_dim), f_id, skips)


# -- temporal context -----------------------------------------------------------------------

@pytest.mark.parametrize("fusion,attention", VARIANTS)
def test_receptive_field_is_exactly_k_minus_r_to_k_plus_r(fusion, attention):
    """Output t (frame k = t + R) changes iff an input frame in t .. t+2R changes."""
    cfg = ModelConfig.tiny(fusion=fusion, attention=attention)
    r, t_out = cfg.lookahead_frames, 4
    torch.manual_seed(1)
    fusion_net = build_fusion(cfg).eval()
    x = torch.randn(2, t_out + 2 * r, cfg.fusion_input_dim)
    with torch.no_grad():
        base = fusion_net(x)
        assert base.shape == (2, t_out, cfg.tcsan_hidden)
        for j in range(x.shape[1]):
            xj = x.clone()
            xj[:, j] = torch.randn(2, cfg.fusion_input_dim)
            diff = (fusion_net(xj) - base).abs().amax(dim=(0, 2))  # per output frame
            for t in range(t_out):
                if t <= j <= t + 2 * r:
                    assert diff[t] > 1e-4, f"output {t} ignores input {j} inside its window"
                else:
                    assert diff[t] <= 1e-6, f"output {t} depends on input {j} outside its window"


def test_single_frame_decode_equals_clip_decode():
    """The streaming call (2R+1 frames -> 1 frame) reproduces every frame of the clip call."""
    cfg = ModelConfig.tiny()
    r = cfg.lookahead_frames
    torch.manual_seed(2)
    model = TalkingHead(cfg)
    face, mfcc = torch.rand(2, 3, 112, 112), torch.randn(2, 5 + 2 * r, 12, 28)
    _settle_bn(model, face, mfcc)
    with torch.no_grad():
        f_id, skips = model.encode_identity(face)
        feat, _ = model.frame_features(mfcc.reshape(-1, 12, 28))
        feats = feat.reshape(2, -1, cfg.frame_feature_dim)
        clip = model.decode(feats, f_id, skips)
        for t in range(5):
            one = model.decode(feats[:, t : t + 2 * r + 1], f_id, skips)
            assert one.shape == (2, 1, 3, 112, 112)
            torch.testing.assert_close(one[:, 0], clip[:, t], atol=1e-5, rtol=0)


# -- checkpoints ----------------------------------------------------------------------------

def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    cfg = ModelConfig.tiny(fusion="tcsan", attention="time")
    torch.manual_seed(3)
    model, clf = TalkingHead(cfg), AUClassifier(cfg)
    face, mfcc = torch.rand(1, 3, 112, 112), torch.randn(1, 2 + 14, 12, 28)
    _settle_bn(model, face, mfcc)
    stem = tmp_path / "run" / "step10"
    path = save_checkpoint(stem, {"generator": model.state_dict(), "au_classifier": clf.state_dict()},
                           cfg, extra={"step": 10, "epoch": 1, "val": {"psnr": 21.5}})
    assert path == stem.with_name("step10.safetensors") and stem.with_name("step10.json").is_file()
    card = json.loads(stem.with_name("step10.json").read_text())
    assert card["config"] == cfg.to_dict() and card["modules"] == ["au_classifier", "generator"]

    cfg2, states, extra = load_checkpoint(path)
    assert cfg2 == cfg and extra == {"step": 10, "epoch": 1, "val": {"psnr": 21.5}}
    rebuilt = build_model_from_checkpoint(stem.with_name("step10.json"))
    clf2 = AUClassifier(cfg2)
    clf2.load_state_dict(states["au_classifier"])
    with torch.no_grad():
        assert torch.equal(rebuilt(face, mfcc), model(face, mfcc))
        lower = torch.rand(3, 3, 56, 112)
        assert torch.equal(clf2.eval()(lower), clf.eval()(lower))


def test_optimizer_state_round_trip(tmp_path):
    cfg = ModelConfig.tiny()
    torch.manual_seed(4)
    model = TalkingHead(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    face, mfcc = torch.rand(1, 3, 112, 112), torch.randn(1, 16, 12, 28)

    def step(m, o):
        o.zero_grad()
        m(face, mfcc).mean().backward()
        o.step()

    for _ in range(2):
        step(model, opt)
    save_checkpoint(tmp_path / "ck", {"generator": model.state_dict()}, cfg, {"step": 2}, {"adam": opt.state_dict()})
    blob = (tmp_path / "ck.optim.safetensors").read_bytes()
    assert b"pickle" not in blob.lower()
    restored = load_optimizer_states(tmp_path / "ck")["adam"]
    orig = opt.state_dict()
    assert restored["param_groups"] == orig["param_groups"]  # tuples (betas) and int ids survive
    assert restored["state"].keys() == orig["state"].keys()
    for pid, st in orig["state"].items():
        for key, val in st.items():
            assert torch.equal(restored["state"][pid][key], val), (pid, key)

    # A resumed run continues exactly like the uninterrupted one.
    model2 = build_model_from_checkpoint(tmp_path / "ck").train()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt2.load_state_dict(restored)
    model.train()
    torch.manual_seed(5)
    step(model, opt)
    torch.manual_seed(5)
    step(model2, opt2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: check the path"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    cfg = ModelConfig.tiny()
    sd = {"generator/w": torch.zeros(2)}
    save_file(sd, str(tmp_path / "newer.safetensors"),
              metadata={"format": "avatar-stream-checkpoint", "format_version": "99", "config": cfg.to_json()})
    with pytest.raises(CheckpointError, match="format version 99, newer than .* upgrade avatar-stream"):
        load_checkpoint(tmp_path / "newer")
    future_cfg = json.dumps({**cfg.to_dict(), "config_version": 7})
    save_file(sd, str(tmp_path / "futurecfg.safetensors"),
              metadata={"format": "avatar-stream-checkpoint", "format_version": "1", "config": future_cfg})
    with pytest.raises(CheckpointError, match="bad model config: ModelConfig version 7 is newer"):
        load_checkpoint(tmp_path / "futurecfg")
    save_file(sd, str(tmp_path / "alien.safetensors"))
    with pytest.raises(CheckpointError, match="not an avatar-stream checkpoint"):
        load_checkpoint(tmp_path / "alien")
    save_checkpoint(tmp_path / "two", {"a": {"x": torch.zeros(1)}, "b": {"y": torch.zeros(1)}}, cfg)
    with pytest.raises(CheckpointError, match="no module None .* holds \\['a', 'b'\\]"):
        build_model_from_checkpoint(tmp_path / "two")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "bad", {"x": torch.zeros(1)}, cfg, extra={"when": object()})


# -- learning -------------------------------------------------------------------------------

def _tiny_clip(astronaut: np.ndarray, t: int, r: int):
    """The astronaut's face as identity; targets darken a mouth box by a per-frame amount."""
    face = cv2.resize(astronaut[20:240, 140:360], (112, 112), interpolation=cv2.INTER_AREA)
    ident = torch.from_numpy(face).permute(2, 0, 1).float().div(255).unsqueeze(0)  # (1, 3, 112, 112)
    amount = torch.linspace(0.0, 0.8, t)
    frames = ident.unsqueeze(1).repeat(1, t, 1, 1, 1)
    frames[:, :, :, 74:96, 36:76] *= (1 - amount).view(1, t, 1, 1, 1)
    gen = torch.Generator().manual_seed(6)
    mfcc = torch.randn(1, t + 2 * r, 12, 28, generator=gen)
    au_target = (amount.view(1, t, 1) > torch.tensor([0.1, 0.3, 0.5, 0.2, 0.6])).float()
    return ident, frames, mfcc, au_target


def test_full_model_overfits_a_tiny_clip(astronaut):
    cfg = ModelConfig.tiny(w_per=0.0)  # VGG-19 at 112 px costs seconds per CPU step; tested in test_losses
    torch.manual_seed(7)
    model, clf = TalkingHead(cfg), AUClassifier(cfg)
    loss_fn = TotalLoss(cfg, au_rates=[0.6, 0.4, 0.3, 0.5, 0.2])
    ident, frames, mfcc, au_target = _tiny_clip(astronaut, 4, cfg.lookahead_frames)
    opt = torch.optim.Adam([*model.parameters(), *clf.parameters()], lr=1e-3, betas=(0.5, 0.999))
    start, t0, max_steps = None, time.perf_counter(), 300
    for step in range(1, max_steps + 1):
        pred = model(ident, mfcc)
        au_logits = clf(clf.lower_half(pred)).reshape(1, 4, cfg.n_au)
        parts = loss_fn(pred, frames, ident, au_logits, au_target)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
        loss, steps = parts["total"].item(), step
        start = loss if start is None else start
        if loss < 0.3 * start:
            break
    secs = time.perf_counter() - t0
    print(f"\n[overfit] start {start:.4f} -> {loss:.4f} ({loss / start:.1%}) in {steps} steps, {secs:.1f} s")
    assert loss < 0.3 * start, f"loss only fell to {loss / start:.1%} of its start in {max_steps} steps"
    assert set(parts) == {"rec", "id", "au", "total"}


def test_au_classifier_with_reference_image():
    """au_clf_reference: 6 input channels (frame lower half + identity lower half), one
    identity per clip broadcast over its frames; the paper's 3-channel classifier refuses them."""
    torch.manual_seed(0)
    cfg = ModelConfig.tiny(au_clf_reference=True)
    clf = AUClassifier(cfg).eval()
    frames, ident = torch.rand(2, 4, 3, 112, 112), torch.rand(2, 3, 112, 112)
    x = clf.inputs(frames, ident)
    assert x.shape == (8, 6, 56, 112)
    assert torch.equal(x[:4, 3:], ident[0, :, 56:].expand(4, -1, -1, -1))
    assert torch.equal(x[4:, 3:], ident[1, :, 56:].expand(4, -1, -1, -1))
    assert torch.equal(x[5, :3], frames[1, 1, :, 56:])
    assert clf(x).shape == (8, 5)
    one = clf.inputs(frames[0], ident[:1])  # a clip's frames and its identity
    assert torch.equal(one, x[:4])
    with pytest.raises(ValueError, match="identity image"):
        clf.inputs(frames)
    with pytest.raises(ValueError, match="6"):
        clf(x[:, :3])
    paper = AUClassifier(ModelConfig.tiny())
    assert paper.in_channels == 3 and torch.equal(paper.inputs(frames, ident), paper.lower_half(frames))


def test_au_classifier_dropout_keeps_the_paper_weights_and_acts_only_in_training():
    """au_clf_dropout: the same state-dict keys and shapes as the paper's classifier (old
    checkpoints load), the same output in eval mode, a random one in training."""
    torch.manual_seed(0)
    paper, drop = AUClassifier(ModelConfig.tiny()), AUClassifier(ModelConfig.tiny(au_clf_dropout=0.5))
    assert {k: v.shape for k, v in paper.state_dict().items()} == {k: v.shape for k, v in drop.state_dict().items()}
    drop.load_state_dict(paper.state_dict())
    x = torch.rand(4, 3, 56, 112)
    with torch.no_grad():
        assert torch.allclose(paper.eval()(x), drop.eval()(x))
        drop.train()
        assert not torch.allclose(drop(x), drop(x))
    with pytest.raises(ValueError, match="au_clf_dropout"):
        ModelConfig.tiny(au_clf_dropout=1.0)


def test_au_classifier_symmetric_is_mirror_invariant_with_the_same_weights():
    """au_clf_symmetric: the same weights as the paper's classifier; its logits are the mean
    of the plain classifier's on the crop and on its mirror image, so a crop and its mirror
    get the same logits (the plain classifier gives them different ones)."""
    torch.manual_seed(0)
    paper = AUClassifier(ModelConfig.tiny(au_clf_reference=True)).eval()
    sym = AUClassifier(ModelConfig.tiny(au_clf_reference=True, au_clf_symmetric=True)).eval()
    sym.load_state_dict(paper.state_dict())
    x = torch.rand(3, 6, 56, 112)
    with torch.no_grad():
        assert torch.allclose(sym(x), 0.5 * (paper(x) + paper(x.flip(-1))), atol=1e-6)
        assert torch.allclose(sym(x), sym(x.flip(-1)), atol=1e-6)
        assert not torch.allclose(paper(x), paper(x.flip(-1)), atol=1e-4)


def test_a2a_width_scales_only_the_audio2au_modules():
    """a2a_width: the Audio2AU modules' own channel multiplier (0 = width); their output
    (au_dim features, one logit) and every other module stay as they are."""
    narrow, wide = ModelConfig.tiny(), ModelConfig.tiny(a2a_width=0.5)
    a, b = TalkingHead(narrow), TalkingHead(wide)
    assert b.audio2au[0].lstm.hidden_size == 64 and a.audio2au[0].lstm.hidden_size == narrow.ch(128)
    rest = {k: v.shape for k, v in a.state_dict().items() if not k.startswith("audio2au.")}
    assert rest == {k: v.shape for k, v in b.state_dict().items() if not k.startswith("audio2au.")}
    mfcc = torch.randn(3, 1, 12, 28)
    assert b.audio2au[0].features(mfcc).shape == a.audio2au[0].features(mfcc).shape == (3, narrow.au_dim)
    with pytest.raises(ValueError, match="a2a_width"):
        ModelConfig.tiny(a2a_width=-1.0)


def test_generator_objective_feeds_the_reference_classifier():
    """L_au in ``train`` with a reference classifier: each generated frame is judged against
    its own clip's identity image (a wrong pairing changes the loss)."""
    from avatar_stream.training.stages import GeneratorObjective

    torch.manual_seed(0)
    cfg = ModelConfig.tiny(w_per=0.0, au_clf_reference=True)
    model, clf = TalkingHead(cfg).eval(), AUClassifier(cfg).eval()
    obj = GeneratorObjective(model, TotalLoss(dataclasses.replace(cfg, w_au=0.0)), clf, None, 1.0)
    r, t = cfg.lookahead_frames, 3
    ident = torch.rand(2, 3, 112, 112)
    mfcc, frames = torch.randn(2, t + 2 * r, 12, 28), torch.rand(2, t, 3, 112, 112)
    au = torch.rand(2, t, 5)
    label = (au > 0.5).float()
    with torch.no_grad():
        parts, pred = obj(ident, mfcc, frames, au, label)
        logits = clf(clf.inputs(pred, ident))
        from avatar_stream.training.losses import au_loss

        assert torch.allclose(parts["au"], au_loss(logits, label.reshape(-1, 5), obj.au_w))
        swapped = clf(torch.cat([clf.lower_half(pred), clf.lower_half(ident.flip(0)).repeat_interleave(t, 0)], 1))
        assert not torch.allclose(parts["au"], au_loss(swapped, label.reshape(-1, 5), obj.au_w))


def test_train_init_with_a_new_audio2au(tmp_path, capsys):
    """``train --init CKPT --audio2au AU``: the generator starts from CKPT and its Audio2AU is
    replaced by the pretrained one (it used to be silently ignored); --init alone keeps CKPT's."""
    from avatar_stream.training.checkpoint import save_checkpoint
    from avatar_stream.training.ddp import DistInfo
    from avatar_stream.training.stages import TrainOptions, _train_parts

    cfg = ModelConfig.tiny(w_per=0.0, w_au=0.0)
    torch.manual_seed(0)
    base, other = TalkingHead(cfg), TalkingHead(cfg)
    save_checkpoint(tmp_path / "init", {"generator": base.state_dict()}, cfg)
    save_checkpoint(tmp_path / "au", {"audio2au": other.audio2au.state_dict()}, cfg)
    info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    both = TrainOptions(data=tmp_path, init=tmp_path / "init.safetensors", audio2au=tmp_path / "au.safetensors")
    model, _, groups, _ = _train_parts(cfg, both, info)
    assert all(torch.equal(a, b) for a, b in zip(model.audio2au.state_dict().values(),
                                                  other.audio2au.state_dict().values(), strict=True))
    ref = base.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if not k.startswith("audio2au."))
    assert [g["name"] for g in groups] == ["generator", "audio2au"] and groups[1]["lr"] == both.lr_audio2au
    # A wider pretrained Audio2AU (another a2a_width) goes into a generator initialised
    # from a narrow one: everything but the Audio2AU comes from CKPT.
    wide_cfg = dataclasses.replace(cfg, a2a_width=0.5)
    wide = TalkingHead(wide_cfg)
    save_checkpoint(tmp_path / "au_wide", {"audio2au": wide.audio2au.state_dict()}, wide_cfg)
    wide_opts = dataclasses.replace(both, audio2au=tmp_path / "au_wide.safetensors")
    model, _, _, _ = _train_parts(wide_cfg, wide_opts, info)
    assert all(torch.equal(a, b) for a, b in zip(model.audio2au.state_dict().values(),
                                                  wide.audio2au.state_dict().values(), strict=True))
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if not k.startswith("audio2au."))
    with pytest.raises(ValueError, match="do not fit"):  # without --audio2au the shapes must match
        _train_parts(wide_cfg, TrainOptions(data=tmp_path, init=tmp_path / "init.safetensors"), info)
    only = TrainOptions(data=tmp_path, init=tmp_path / "init.safetensors")
    model, _, _, _ = _train_parts(cfg, only, info)
    assert all(torch.equal(a, b) for a, b in zip(model.audio2au.state_dict().values(),
                                                  base.audio2au.state_dict().values(), strict=True))


def test_train_keeps_the_pretrained_audio2au_batchnorm_statistics(tmp_path):
    """With a pretrained Audio2AU the train stage keeps its batch-norm statistics (they used to
    drift with every generator batch: noise-only items then moved Audio2AU's outputs on hiss
    although its weights, at lr 1e-6, hardly changed); the generator's own ones still update."""
    from avatar_stream.training.checkpoint import save_checkpoint
    from avatar_stream.training.ddp import DistInfo
    from avatar_stream.training.stages import TrainOptions, _train_parts

    cfg = ModelConfig.tiny(w_per=0.0, w_au=0.0)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "au", {"audio2au": TalkingHead(cfg).audio2au.state_dict()}, cfg)
    info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    model, _, _, _ = _train_parts(cfg, TrainOptions(data=tmp_path, audio2au=tmp_path / "au.safetensors"), info)
    bns = lambda mod: [m for m in mod.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]  # noqa: E731
    a2a_bn = bns(model.audio2au)
    other_bn = [m for m in bns(model) if all(m is not b for b in a2a_bn)]
    assert a2a_bn and other_bn
    before = [b.running_mean.clone() for b in a2a_bn]
    other_before = [b.running_mean.clone() for b in other_bn]
    model.train()
    assert not any(b.training for b in a2a_bn) and model.audio2au[0].lstm.training
    mfcc = torch.randn(2, 1 + 2 * cfg.lookahead_frames, 12, 28) * 3
    model.frame_features(mfcc.flatten(0, 1))
    model.encode_identity(torch.rand(2, 3, cfg.image_size, cfg.image_size))
    assert all(torch.equal(a, b.running_mean) for a, b in zip(before, a2a_bn, strict=True))
    assert any(not torch.equal(a, b.running_mean) for a, b in zip(other_before, other_bn, strict=True))
    # Without a pretrained Audio2AU (it trains from scratch with the generator) they update.
    scratch, _, _, _ = _train_parts(cfg, TrainOptions(data=tmp_path), info)
    scratch.train()
    assert all(b.training for b in bns(scratch.audio2au))
