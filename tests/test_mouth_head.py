"""The mouth head: training on (features, mouth measures) pairs, its file, its export into a
model directory, and what the engine does with it (Frame.mouth, silence, the warp drive)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.card import ModelCardError, load_model_dir
from avatar_stream.engine.mouth import MEASURES, mouth_measures
from avatar_stream.engine.stream import Engine, render_offline
from avatar_stream.training.mouth_head import (
    MouthHeadConfig,
    MouthHeadError,
    MouthTrainOptions,
    Recording,
    cross_validate,
    fit,
    load_mouth_head,
    predict,
    save_mouth_head,
    targets,
)


def _recordings(n_rec=8, t=160, d=12, seed=0, noise=0.3):
    """Recordings whose targets are a known function of features two frames ahead (a head
    with lookahead must find it), one speaker each."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, len(MEASURES))) * 0.05
    out = []
    for i in range(n_rec):
        f = rng.standard_normal((t, d)).astype(np.float32)
        y = np.roll(f, -2, axis=0) @ w + noise * 0.05 * rng.standard_normal((t, len(MEASURES)))
        out.append(Recording(f"r{i}", f"s{i}", f, y))
    return out


def test_targets_are_relative_to_rest_and_moved_by_the_offset():
    t = 50
    mouth = np.zeros((t, 4))
    mouth[:, 0] = np.linspace(0.1, 0.3, t)
    mouth[:, 1] = 1.0
    y = targets(mouth, 0)
    assert np.nanpercentile(y[:, 0], 5) == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(y[:, 1], 0.0)
    moved = targets(mouth, 3)
    assert np.isnan(moved[:3]).all() and np.allclose(moved[3:, 0], y[:-3, 0])


def test_head_learns_a_lookahead_relation_and_calibrates_its_spread():
    recs = _recordings()
    opts = MouthTrainOptions(epochs=25, progress=False, dropout=0.0, input_dropout=0.0, weight_decay=0.0)
    head = fit(recs[:6], lookahead_frames=3, opts=opts, log=None)
    assert head.cfg.dilations == (1, 2)  # 1 + 2 (1 + 2) = 7 = 2R + 1
    for r in recs[6:]:
        p = predict(head, r.feats)
        assert p.shape == (len(r.feats), len(MEASURES))
        assert np.corrcoef(p[3:-3, 0], r.target[3:-3, 0])[0, 1] > 0.8
    # Spread: the output's std on the training frames equals the targets'.
    x = np.concatenate([predict(head, r.feats) for r in recs[:6]])
    y = np.concatenate([r.target for r in recs[:6]])
    assert np.allclose(x.std(0), y.std(0), rtol=0.05)


def test_cross_validation_holds_out_speakers():
    res = cross_validate(_recordings(), 3, MouthTrainOptions(epochs=15, progress=False), folds=4, log=None)
    assert set(res) == set(MEASURES)
    assert res["opening"]["pooled_r"] > 0.5 and res["opening"]["amp_median"] > 0


def test_fit_refuses_too_little_data():
    with pytest.raises(MouthHeadError, match="frames"):
        fit(_recordings(n_rec=1, t=20), 3, MouthTrainOptions(progress=False), log=None)


def test_file_round_trip_and_errors(tmp_path):
    head = fit(_recordings(), 3, MouthTrainOptions(epochs=2, progress=False), log=None)
    path = save_mouth_head(tmp_path / "head", head, {"note": "x"})
    again, extra = load_mouth_head(path)
    assert extra == {"note": "x"} and again.cfg == head.cfg
    x = torch.randn(4, 7, 12)
    assert torch.equal(again(x), head.eval()(x))
    assert json.loads((tmp_path / "head.json").read_text())["config"]["lookahead_frames"] == 3
    with pytest.raises(MouthHeadError, match="does not exist"):
        load_mouth_head(tmp_path / "nothing")
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes())
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={"format": "other"})
    with pytest.raises(MouthHeadError, match="not a mouth head"):
        load_mouth_head(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def model_with_mouth(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny exported model with a mouth head trained on its own features."""
    from avatar_stream.export.mouth import export_mouth_head

    d = tmp_path_factory.mktemp("mouth_model") / "model"
    shutil.copytree(tiny_model_dir, d)
    cards = load_model_dir(d)
    audio = cards["audio"]
    rng = np.random.default_rng(1)
    recs = [Recording(f"r{i}", f"s{i}", rng.standard_normal((80, audio.frame_feature_dim)).astype(np.float32),
                      rng.standard_normal((80, 4)) * 0.05) for i in range(3)]
    head = fit(recs, audio.lookahead_frames, MouthTrainOptions(epochs=2, progress=False), log=None)
    path = save_mouth_head(d.parent / "head", head, {"audio_checkpoint_sha256": audio.checkpoint_sha256})
    export_mouth_head(path, d)
    return d, path


def test_export_writes_a_parity_checked_mouth_graph_with_its_card(model_with_mouth):
    d, _ = model_with_mouth
    cards = load_model_dir(d)
    card = cards["mouth"]
    assert card.checkpoint_sha256 == cards["audio"].checkpoint_sha256
    assert tuple(card.head["measures"]) == MEASURES and card.parity["mouth"] < 1e-4
    assert "mouth" in json.loads((d / "manifest.json").read_text())["graphs"]
    assert card.inputs["feats"] == ("B", 2 * card.lookahead_frames + 1, card.frame_feature_dim)


def test_a_head_of_another_model_is_refused(model_with_mouth, tmp_path):
    from avatar_stream.export.mouth import export_mouth_head

    d, path = model_with_mouth
    head, _ = load_mouth_head(path)
    other = save_mouth_head(tmp_path / "other", head, {"audio_checkpoint_sha256": "0" * 64})
    with pytest.raises(ModelCardError, match="trained on the features of checkpoint 000000000000"):
        export_mouth_head(other, d)


def test_engine_gives_mouth_measures_and_silence_moves_nothing(model_with_mouth, astronaut):
    d, _ = model_with_mouth
    engine = Engine(d, backend="cpu", renderer="warp", alive=False)
    assert engine.has_mouth_head
    speech = np.sin(np.arange(tb.SAMPLE_RATE) * 0.05).astype(np.float32) * 0.3
    frames = render_offline(engine, astronaut, speech)
    assert all(f.mouth is not None and f.mouth.shape == (4,) for f in frames)
    # Silence: the head's output is taken relative to silence, so the photo stays as it is.
    stream = engine.create_stream(astronaut)
    stream.accept_waveform(np.zeros(tb.SAMPLE_RATE, np.float32))
    stream.input_finished()
    still = [stream.step() for _ in range(stream.ready_count())]
    assert len(still) == 25 and all(np.array_equal(f.mouth, np.zeros(4)) for f in still)
    assert all(np.array_equal(f.image, astronaut) for f in still)


def test_warp_turns_measures_into_the_same_measured_change(astronaut):
    from avatar_stream.engine.face import FaceAligner
    from avatar_stream.engine.warp import FaceWarper, warp_landmarks

    lm = FaceAligner().landmarks(astronaut)
    w = FaceWarper(astronaut, lm)
    base = mouth_measures(lm)
    want = np.array([0.06, 0.02, 0.0, 0.0])
    got = mouth_measures(warp_landmarks(lm, w.au_for_mouth(want))) - base
    assert got[0] == pytest.approx(want[0], abs=0.01) and got[1] == pytest.approx(want[1], abs=0.01)
    assert np.array_equal(w.au_for_mouth(np.array([-0.05, 0.0, 0.0, 0.0])), np.zeros(5))  # cannot close more
    with pytest.raises(ValueError, match="finite changes"):
        w.au_for_mouth([0.1, 0.2])


def test_head_config_json_round_trip():
    cfg = MouthHeadConfig(feature_dim=288, lookahead_frames=7)
    assert MouthHeadConfig.from_json(cfg.to_json()) == cfg and cfg.dilations == (1, 2, 4)


def test_default_renderer_streams_exactly_as_offline_with_blinks_and_sway(model_with_mouth, astronaut):
    """The default: warp + mouth head + idle motion. Any chunking gives bit-identical frames,
    and the idle motion really moves the picture (blinks, sway)."""
    d, _ = model_with_mouth
    engine = Engine(d, backend="cpu")
    assert engine.renderer == "warp" and engine.alive
    t = np.arange(2 * tb.SAMPLE_RATE)
    speech = (0.3 * np.sin(t * 0.05) * (np.sin(t * 0.0008) > 0)).astype(np.float32)
    face = engine.prepare_face(astronaut)
    whole = render_offline(engine, face, speech)
    chunked = render_offline(engine, face, speech, chunks=[1, 7, 160, 333, 4096])
    assert len(whole) == len(chunked) == 50
    assert all(np.array_equal(a.image, b.image) for a, b in zip(whole, chunked, strict=True))
    still = render_offline(Engine(d, backend="cpu", alive=False), astronaut, speech)
    moved = [not np.array_equal(a.image, b.image) for a, b in zip(whole, still, strict=True)]
    assert sum(moved) > 40  # the sway moves (almost) every frame
