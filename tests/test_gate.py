"""The noise gate (engine/gate.py): levels and gains by hand, quiet input renders exactly the
frames of digital silence, loud input is untouched, and ``avatar-stream --noise-gate``."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_stream import DEMO_FACE, DEMO_SPEECH
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.face import read_image
from avatar_stream.engine.gate import NoiseGate, parse_gate, window_levels
from avatar_stream.engine.stream import Engine


def _sine(amplitude: float, n: int = tb.WINDOW_SAMPLES) -> np.ndarray:  # 8 periods per 20 ms
    return (amplitude * np.sin(2 * np.pi * 400 * np.arange(n) / tb.SAMPLE_RATE)).astype(np.float32)


def test_window_levels_by_hand():
    w = np.stack([_sine(0.1), np.zeros(tb.WINDOW_SAMPLES, np.float32), _sine(1.0)])
    lv = window_levels(w)
    assert lv[0] == pytest.approx(20 * np.log10(0.1 / np.sqrt(2)), abs=0.05)
    assert lv[1] == -200.0  # floor, not -inf
    assert lv[2] == pytest.approx(-3.01, abs=0.05)
    # the loudest 20 ms decides: a short burst at the very end of the window counts
    burst = np.zeros(tb.WINDOW_SAMPLES, np.float32)
    burst[-320:] = _sine(0.1, 320)
    assert window_levels(burst[None])[0] == pytest.approx(lv[0], abs=0.2)
    with pytest.raises(ValueError, match="windows"):
        window_levels(np.zeros((2, 100)))


def test_gains_follow_threshold_and_knee():
    gate = NoiseGate(-40.0, knee_db=6.0)
    levels = np.array([-60.0, -43.0, -41.5, -40.0, -38.5, -37.0, -20.0])
    amps = np.sqrt(2) * 10 ** (levels / 20)  # sine peak for that RMS level
    g = gate.gains(np.stack([_sine(a) for a in amps]))
    np.testing.assert_allclose(g, [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=0.01)
    for bad in (0.0, 3.0, float("nan")):
        with pytest.raises(ValueError, match="dBFS"):
            NoiseGate(bad)


def test_parse_gate():
    assert parse_gate("off") is None and parse_gate("None") is None and parse_gate(None) is None
    assert parse_gate("-50") == -50.0 and parse_gate(-45) == -45.0
    for bad in ("loud", "10", "0", "inf"):
        with pytest.raises(ValueError, match="--noise-gate"):
            parse_gate(bad)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    gated = Engine(tiny_model_dir, backend="cpu")  # the default gate
    return gated, Engine(tiny_model_dir, backend="cpu", noise_gate_dbfs=None)


def _crops(engine, face, audio):
    stream = engine.create_stream(face, crop_only=True)
    stream.accept_waveform(audio)
    stream.input_finished()
    out = []
    while stream.is_ready():
        out.append(stream.step())
    return out


def test_quiet_noise_renders_the_frames_of_silence(engines):
    gated, bare = engines
    assert gated.gate is not None and gated.gate.threshold_dbfs == -45.0 and bare.gate is None
    face = gated.prepare_face(read_image(DEMO_FACE))
    n = 40 * tb.SAMPLES_PER_FRAME
    noise = (np.random.default_rng(0).standard_normal(n) * 10 ** (-55 / 20)).astype(np.float32)
    silence = np.zeros(n, np.float32)
    ref = _crops(gated, face, silence)
    got = _crops(gated, face, noise)
    assert all(np.array_equal(a.crop, b.crop) and np.array_equal(a.au, b.au) for a, b in zip(ref, got, strict=True))
    # without the gate the (random) model does react to that noise: the gate did the work
    ungated = _crops(bare, face, noise)
    assert any(not np.array_equal(a.crop, b.crop) for a, b in zip(ref, ungated, strict=True))


def test_loud_speech_is_untouched(engines):
    """Frames whose whole 2R+1 context is above the gate are bit-identical with and without it;
    frames in a pause with faint hiss get exactly the AU probabilities of silence."""
    gated, bare = engines
    face = gated.prepare_face(read_image(DEMO_FACE))
    talk = load_audio(DEMO_SPEECH)
    pause = (np.random.default_rng(1).standard_normal(tb.SAMPLE_RATE) * 1e-3).astype(np.float32)  # -60 dBFS
    speech = np.concatenate([talk[: len(talk) // 2], pause, talk[len(talk) // 2 :]])
    a, b = _crops(gated, face, speech), _crops(bare, face, speech)
    windows = np.stack([tb.frame_window(speech, j) for j in range(len(a))])
    open_ = gated.gate.gains(windows) == 1.0
    r = gated.lookahead_frames
    full = [k for k in range(len(a)) if open_[max(k - r, 0): k + r + 1].all()]
    closed = [k for k in range(len(a)) if not open_[k]]
    assert len(full) > 20 and len(closed) > 10
    assert all(np.array_equal(a[k].crop, b[k].crop) for k in full)
    assert all(np.array_equal(a[k].au, gated.silent_features()[1]) for k in closed)


def test_cli_noise_gate_flag(capsys, tiny_model_dir, tmp_path):
    from avatar_stream.engine.cli import main

    code = main(["--audio", str(DEMO_SPEECH), "--out", str(tmp_path / "g.mp4"), "--model", str(tiny_model_dir),
                 "--backend", "cpu", "--crop-only", "--duration", "0.5", "--noise-gate", "off"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "noise gate: off" in err
    code = main(["--audio", str(DEMO_SPEECH), "--out", str(tmp_path / "h.mp4"), "--model", str(tiny_model_dir),
                 "--noise-gate", "quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 2 and len(lines) == 1 and "--noise-gate" in lines[0]
    assert not (tmp_path / "h.mp4").exists()
