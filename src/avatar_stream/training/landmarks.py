"""Landmark tracks of talking-face video (real recordings and generated ones alike), from
which the mouth measures (engine/mouth.py, re-exported here) are taken.

Tracking: dlib's HOG detector runs on a region around the face of the previous frame,
scaled so that the face is about ``TRACK_FACE_PX`` wide (HOG's sweet spot, and a few ms
instead of a full-frame search), and on the whole frame (downscaled to ``MAX_SIDE``) when
that finds nothing. The 68 landmarks are fitted on the frame itself at a resolution of
about ``SUBPIXEL_FACE_PX`` px per face width (a face of 100 px is fitted upscaled 4x, one
of 400 px as it is): dlib returns whole pixels, and one pixel of lip gap is 1% of a
100-px face.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import cv2
import numpy as np

from avatar_stream.engine.face import FaceAligner
from avatar_stream.engine.mouth import MEASURES, iod, mouth_measures

TRACK_FACE_PX = 120
MAX_SIDE = 640
SUBPIXEL_FACE_PX = 400
MAX_SUBPIXEL = 4


def subpixel_for(face_width: float) -> int:
    """Upscaling that fits a face of ``face_width`` px at about ``SUBPIXEL_FACE_PX`` px."""
    return int(np.clip(round(SUBPIXEL_FACE_PX / max(face_width, 1.0)), 1, MAX_SUBPIXEL))


class LandmarkTracker:
    """68 landmarks of one face through a video, frame by frame (see the module doc).

    ``update(frame) -> (68, 2) float64 or None`` (no face found). Frames are RGB uint8.
    """

    def __init__(self, aligner: FaceAligner | None = None):
        self.aligner = aligner or FaceAligner()
        self._prev: tuple[int, int, int, int] | None = None

    def reset(self) -> None:
        self._prev = None

    def _detect_near(self, frame: np.ndarray) -> tuple[int, int, int, int] | None:
        x0, y0, x1, y1 = self._prev
        w, h = x1 - x0, y1 - y0
        rx0, ry0 = max(0, x0 - w), max(0, y0 - h)
        rx1, ry1 = min(frame.shape[1], x1 + w), min(frame.shape[0], y1 + h)
        s = min(1.0, TRACK_FACE_PX / max(w, 1))
        roi = frame[ry0:ry1, rx0:rx1]
        if s < 1.0:
            roi = cv2.resize(roi, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        boxes = self.aligner.detect(np.ascontiguousarray(roi))
        if not boxes:
            return None
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        best = min(boxes, key=lambda b: abs(rx0 + (b[0] + b[2]) / 2 / s - cx) + abs(ry0 + (b[1] + b[3]) / 2 / s - cy))
        return tuple(int(round(v)) for v in (rx0 + best[0] / s, ry0 + best[1] / s, rx0 + best[2] / s, ry0 + best[3] / s))

    def _detect_full(self, frame: np.ndarray) -> tuple[int, int, int, int] | None:
        s = min(1.0, MAX_SIDE / max(frame.shape[:2]))
        small = cv2.resize(frame, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1.0 else frame
        boxes = self.aligner.detect(np.ascontiguousarray(small))
        if not boxes:
            return None
        b = boxes[0]
        return tuple(int(round(v / s)) for v in b)

    def update(self, frame: np.ndarray) -> np.ndarray | None:
        frame = np.ascontiguousarray(frame)
        box = self._detect_near(frame) if self._prev is not None else None
        if box is None:
            box = self._detect_full(frame)
        if box is None:
            self._prev = None
            return None
        self._prev = box
        width = box[2] - box[0]
        s = subpixel_for(width)
        if s > 1:
            return self.aligner._fit_subpixel(frame, box, s)
        return self.aligner._fit(frame, box)


def track(frames: Iterable[np.ndarray], tracker: LandmarkTracker | None = None) -> np.ndarray:
    """(T, 68, 2) float32 landmarks of ``frames`` (NaN where no face was found)."""
    tracker = tracker or LandmarkTracker()
    tracker.reset()
    out = []
    for f in frames:
        lm = tracker.update(f)
        out.append(np.full((68, 2), np.nan) if lm is None else lm)
    return np.asarray(out, np.float32).reshape(-1, 68, 2)


def frames_25fps(path) -> Iterator[np.ndarray]:
    """RGB frames of a video resampled to 25 fps, decoded one at a time (a minute of 1080p
    does not fit in memory as a list): output frame n shows the source frame on screen at
    the middle of its interval, ``(n + 0.5) / 25`` s, as ``prepare.read_video_25fps``."""
    import av

    from avatar_stream.engine.timebase import FPS

    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = c.streams.video[0]
        rate = float(stream.average_rate or FPS)
        t0 = None
        prev, prev_t, n = None, 0.0, 0
        diffs = []
        for f in c.decode(stream):
            t = float(f.time) if f.time is not None else (n / FPS if t0 is None else prev_t + 1 / rate)
            if t0 is None:
                t0 = t
            t -= t0
            if prev is not None:
                diffs.append(t - prev_t)
                while (n + 0.5) / FPS < t:
                    yield prev
                    n += 1
            prev, prev_t = f.to_ndarray(format="rgb24"), t
        if prev is None:
            return
        step = float(np.median(diffs)) if diffs else 1.0 / FPS
        n_out = int(np.floor((prev_t + step) * FPS + 1e-6))
        while n < n_out:
            yield prev
            n += 1


__all__ = ["MEASURES", "LandmarkTracker", "frames_25fps", "iod", "mouth_measures", "subpixel_for", "track"]
