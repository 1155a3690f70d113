"""engine/framing.py: the photo is scaled and framed to the output once, so per-frame work
depends on the output's size; and the session's quit and falling-behind paths."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.framing import MAX_SIDE, find_face_box, plan


def test_no_size_keeps_the_aspect_and_never_upscales():
    f = plan((3000, 4000, 3))
    assert f.size == (MAX_SIDE, 960) and f.scale == pytest.approx(0.32)
    assert plan((300, 400, 3)).size == (400, 300) and plan((300, 400, 3)).scale == 1.0


def test_crop_centres_the_face_and_stays_inside_the_photo():
    # A portrait photo, face near the top: 1280x720 out of it.
    f = plan((4000, 3000, 3), face_box=(1300, 600, 1700, 1000), size=(1280, 720))
    assert f.scale == pytest.approx(1280 / 3000)
    cx, cy = f.matrix @ np.array([1500.0, 800.0, 1.0])
    assert abs(cx - 640) < 2 and 0 <= f.y0  # the face's centre is mid-frame; the window is in the photo
    img = f.apply(np.zeros((4000, 3000, 3), np.uint8))
    assert img.shape == (720, 1280, 3)
    # A face at the photo's edge: the window slides back inside instead of showing a border.
    edge = plan((1000, 1000, 3), face_box=(0, 400, 200, 600), size=(400, 400))
    assert edge.x0 == 0


def test_a_face_too_big_for_the_window_is_shown_whole():
    f = plan((1000, 1000, 3), face_box=(100, 0, 900, 1000), size=(1280, 360))
    # The face (1000 px tall, with the margin 1600) must fit in 360 px.
    assert 1000 * 1.6 * f.scale <= 360 + 1e-6
    assert f.apply(np.full((1000, 1000, 3), 200, np.uint8)).shape == (360, 1280, 3)


def test_letterbox_shows_the_whole_photo():
    f = plan((1000, 500, 3), size=(640, 640), fit="letterbox")
    img = f.apply(np.full((1000, 500, 3), 255, np.uint8))
    assert img.shape == (640, 640, 3) and img[:, :100].max() == 0 and img[:, 200:440].min() == 255
    with pytest.raises(ValueError, match="unknown fit"):
        plan((10, 10, 3), size=(100, 100), fit="stretch")
    with pytest.raises(ValueError, match="too small"):
        plan((10, 10, 3), size=(8, 8))


def test_engine_frames_a_big_photo_and_streams_as_offline(tiny_model_dir, astronaut):
    from avatar_stream.engine.face import FaceAligner
    from avatar_stream.engine.stream import Engine, render_offline

    big = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    box = find_face_box(big, FaceAligner())
    assert box is not None and 250 < box[2] - box[0] < 500  # in photo pixels, found on a 1024 px copy
    speech = (0.3 * np.sin(np.arange(tb.SAMPLE_RATE) * 0.05)).astype(np.float32)
    for renderer in ("warp", "neural"):
        engine = Engine(tiny_model_dir, backend="cpu", renderer=renderer)
        face = engine.prepare_face(big, output_size=(640, 360))
        assert face.photo.shape == (360, 640, 3) and face.framing.size == (640, 360)
        a = render_offline(engine, face, speech)
        b = render_offline(engine, face, speech, chunks=[160, 333])
        assert a[0].image.shape == (360, 640, 3)
        assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))


class _QuitAfter:
    """A sink that asks to stop after ``n`` frames (a preview window's q / Esc)."""

    def __init__(self, n):
        self.n, self.frames, self.quit_requested = n, 0, False

    def write(self, frame, pts):
        self.frames += 1
        self.quit_requested = self.frames >= self.n


def test_session_stops_when_a_sink_asks_and_warns_when_behind(tiny_model_dir, astronaut):
    from avatar_stream.engine.session import SessionOptions, run_session
    from avatar_stream.engine.stream import Engine

    engine = Engine(tiny_model_dir, backend="cpu")
    speech = (0.3 * np.sin(np.arange(2 * tb.SAMPLE_RATE) * 0.05)).astype(np.float32)
    chunks = [speech[i : i + 640] for i in range(0, len(speech), 640)]
    sink = _QuitAfter(5)
    rep = run_session(engine.create_stream(astronaut), chunks, [sink])
    assert rep.quit and rep.frames == 5 and sink.frames == 5 and not rep.interrupted

    class Slow:
        def __init__(self):
            self.quit_requested = False

        def write(self, frame, pts):
            time.sleep(0.1)

    warnings: list[str] = []

    def paced():
        """As a live source delivers: all the audio due by now, at once, after a stall."""
        t0, pos = time.monotonic(), 0
        while pos < len(speech):
            due = min(len(speech), int((time.monotonic() - t0) * tb.SAMPLE_RATE))
            if due - pos < 640 and due < len(speech):
                time.sleep(0.005)
                continue
            yield speech[pos:due]
            pos = due

    rep = run_session(engine.create_stream(astronaut), paced(), [Slow()],
                      options=SessionOptions(live=True, max_backlog=1, warn=warnings.append))
    assert rep.dropped > 0 and warnings and "behind real time" in warnings[0]
