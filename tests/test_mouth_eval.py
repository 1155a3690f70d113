"""training/mouth_eval.py (``avatar-train eval-mouth``): the measure, the statistics, and the
command end to end on a tiny exported model and a clip made from the astronaut photo."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.face import FaceAligner
from avatar_stream.engine.sinks import Mp4Sink
from avatar_stream.engine.warp import FaceWarper
from avatar_stream.training.mouth_eval import mouth_opening, opening_track, pearson, quiet_inputs

JAW = np.array([0.0, 0.0, 0.0, 0.6, 1.0])  # AU25 + AU26 at full opening


def test_mouth_opening_is_gap_over_face_height_and_scale_free():
    pts = np.zeros((68, 2))
    pts[27] = (50, 40)
    pts[8] = (50, 140)  # face height 100
    pts[61], pts[62], pts[63] = (45, 110), (50, 110), (55, 110)
    pts[67], pts[66], pts[65] = (45, 116), (50, 118), (55, 120)  # gaps 6, 8, 10: mean 8
    assert mouth_opening(pts) == pytest.approx(0.08)
    assert mouth_opening(pts * 3.0 + 7.0) == pytest.approx(0.08)


def test_subpixel_landmarks_follow_a_fractional_shift(astronaut):
    """dlib's landmarks are whole pixels; ``subpixel=4`` fits them on the upscaled face and
    resolves quarter pixels: the face shifted by 0.25 / 0.5 / 0.75 px moves them by that much."""
    aligner = FaceAligner()
    img = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)  # a GRID-sized face
    whole, fine = aligner.landmarks(img), aligner.landmarks(img, subpixel=4)
    assert np.array_equal(whole, np.round(whole)) and not np.array_equal(fine, np.round(fine))
    assert np.abs(whole - fine).mean() < 1.0 and np.abs((fine - whole).mean(0)).max() < 0.2  # no offset
    for dx in (0.25, 0.5, 0.75):
        moved = cv2.warpAffine(img, np.float32([[1, 0, dx], [0, 1, 0]]), (256, 256), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REFLECT)
        shift = aligner.landmarks(moved, subpixel=4) - fine
        assert shift[:, 0].mean() == pytest.approx(dx, abs=0.06) and abs(shift[:, 1].mean()) < 0.1


def test_pearson_skips_missing_frames_and_refuses_constant_input():
    a = np.array([0.0, 1.0, np.nan, 2.0, 3.0])
    b = np.array([1.0, 3.0, 100.0, 5.0, np.nan])
    assert pearson(a, b) == pytest.approx(1.0)  # (0,1) (1,3) (2,5) remain
    assert pearson(a, -b) == pytest.approx(-1.0)
    assert np.isnan(pearson(np.ones(5), np.arange(5.0)))
    assert np.isnan(pearson(np.array([1.0, 2.0]), np.array([2.0, 1.0])))


def test_quiet_inputs_level():
    q = quiet_inputs(1.0, -50.0, seed=0)
    assert not q["silence"].any()
    rms = np.sqrt(np.mean(q["noise-50dBFS"].astype(np.float64) ** 2))
    assert 20 * np.log10(rms) == pytest.approx(-50.0, abs=0.2)


def _opening_clip(photo: np.ndarray, aligner: FaceAligner, amount: np.ndarray) -> list[np.ndarray]:
    warper = FaceWarper(photo, aligner.landmarks(photo))
    return [warper.render(JAW * a) for a in amount]


def test_opening_track_follows_the_warped_jaw(astronaut):
    aligner = FaceAligner()
    amount = np.array([0.0, 0.5, 1.0, 0.25, 0.75, 0.1])
    track = opening_track(aligner, _opening_clip(astronaut, aligner, amount))
    assert np.isfinite(track).all()
    assert pearson(track, amount) > 0.9
    blank = opening_track(aligner, [np.full((200, 200, 3), 128, np.uint8)])
    assert np.isnan(blank).all()  # no face: NaN, not an error


@pytest.mark.slow
def test_eval_mouth_command_on_a_tiny_model(tiny_model_dir, astronaut, tmp_path, capsys):
    from avatar_stream.training.cli import main

    aligner = FaceAligner()
    n = 30
    amount = 0.5 + 0.5 * np.sin(np.arange(n) / 3.0)
    frames = _opening_clip(astronaut, aligner, amount)
    t = np.arange(n * tb.SAMPLES_PER_FRAME) / tb.SAMPLE_RATE
    audio = (0.3 * np.repeat(amount, tb.SAMPLES_PER_FRAME) * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    clip = tmp_path / "clips" / "talk.mp4"
    clip.parent.mkdir()
    h, w = astronaut.shape[:2]
    with Mp4Sink(clip, size=(w, h)) as sink:
        sink.write_audio(audio)
        for k, f in enumerate(frames):
            sink.write(f, k * tb.SAMPLES_PER_FRAME)
    out = tmp_path / "mouth.json"
    rc = main(["eval-mouth", "--model", str(tiny_model_dir), "--clips", str(clip.parent),
               "--silence-seconds", "0.6", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["clips"] == ["talk"] and set(res["renderers"]) == {"neural", "warp"}
    for name, r in res["renderers"].items():
        assert f"{name} |" in printed
        c = r["clips"]["talk"]
        assert c["frames"] >= n - 2 and (np.isnan(c["r"]) or -1.0 <= c["r"] <= 1.0)
        # the real track of the clip is the jaw we drew (video coding kept it readable)
        assert c["real_std"] > 0.01
        assert set(r["quiet"]) == {"silence", "noise-50dBFS"} == set(r["quiet_ungated"])
        # the engine's default noise gate (-45 dBFS) turns the -50 dBFS hiss into silence
        assert r["quiet"]["noise-50dBFS"]["std"] == pytest.approx(r["quiet"]["silence"]["std"], abs=1e-9)
    # constant input -> constant AU drive -> the warp does not move at all
    assert res["renderers"]["warp"]["quiet"]["silence"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert res["noise_gate_dbfs"] == -45.0 and "noise gate -45 dBFS" in printed
