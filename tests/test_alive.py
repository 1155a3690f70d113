"""Idle life (engine/alive.py): seeded blinks and head sway, a function of the frame index
only; and gray photos, which must give gray video with either renderer."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.alive import BLINK_SHAPE, IdleMotion
from avatar_stream.engine.image_io import is_grayscale, to_gray_rgb


def _starts(m: IdleMotion, frames: int) -> list[int]:
    vals = [m.blink(k) for k in range(frames)]
    return [k for k in range(frames) if vals[k] == BLINK_SHAPE[0] and (k == 0 or vals[k - 1] == 0.0)]


def test_blinks_come_every_two_to_six_seconds_and_are_seeded():
    m = IdleMotion(seed=3)
    starts = _starts(m, 60 * tb.FPS)
    assert 0.8 * tb.FPS <= starts[0] <= 2.5 * tb.FPS
    gaps = np.diff(starts) / tb.FPS
    assert len(gaps) >= 9 and gaps.min() >= 2.0 - 1e-9 and gaps.max() <= 6.0 + 1e-9
    assert all(0.0 <= m.blink(k) <= 1.0 for k in range(600))
    assert _starts(IdleMotion(seed=3), 600) == starts[: len(_starts(IdleMotion(seed=3), 600))]
    assert _starts(IdleMotion(seed=4), 600) != _starts(IdleMotion(seed=3), 600)


def test_idle_motion_does_not_depend_on_the_order_of_calls():
    """Frame k looks the same whether frames are asked for in order, skipped (dropped) or
    after a reset: the streaming contract."""
    a, b = IdleMotion(seed=7), IdleMotion(seed=7)
    late = [b.blink(k) for k in range(900, 1000)]
    assert [a.blink(k) for k in range(1000)][900:] == late
    assert a.pose(123, 200.0) == b.pose(123, 200.0)


def test_sway_is_slight():
    m = IdleMotion(seed=0)
    poses = np.array([m.pose(k, 200.0) for k in range(30 * tb.FPS)])
    assert np.abs(poses[:, 2]).max() <= m.sway_degrees + 1e-9 and np.abs(poses[:, 2]).max() > 0.3
    assert np.abs(poses[:, :2]).max() <= m.sway_shift * 200.0 + 1e-9
    assert np.abs(np.diff(poses[:, 2])).max() < 0.1  # smooth: under 0.1 degree per frame


@pytest.mark.parametrize("renderer", ["warp", "neural"])
def test_a_gray_photo_gives_gray_video(tiny_model_dir, astronaut, speech_wav, renderer):
    from avatar_stream.engine.audio import load_audio
    from avatar_stream.engine.stream import Engine, render_offline

    gray = to_gray_rgb(astronaut)
    assert is_grayscale(gray) and not is_grayscale(astronaut)
    engine = Engine(tiny_model_dir, backend="cpu", renderer=renderer)
    frames = render_offline(engine, gray, load_audio(speech_wav)[: tb.SAMPLE_RATE])
    spread = max(int((f.image.astype(int).max(2) - f.image.astype(int).min(2)).max()) for f in frames)
    assert spread <= 3
