"""Idle life for a still photo: blinks and a slight, slow head motion.

A face that never blinks and never moves reads as a photo with a moving mouth. People blink
about every 2 to 6 s (a blink lasts 150-250 ms: the lid drops fast and rises more slowly)
and, when they talk to a camera, their head sways by a degree or two and a few pixels.

Both are functions of the frame index and a seed only, never of the audio or of wall time:
frame k of a stream looks the same whether it was rendered live or offline, in one piece or
in chunks (the streaming contract), and the mouth is untouched (silence still keeps it
as in the photo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from avatar_stream.engine.timebase import FPS

# Lid closure over the frames of one blink at 25 fps: down in two frames, up in three.
BLINK_SHAPE = (0.55, 1.0, 0.75, 0.4, 0.12)


@dataclass
class IdleMotion:
    """``blink(k)`` in [0, 1] and ``pose(k, face_height)`` = (dx px, dy px, degrees) for
    frame k. ``seed`` fixes the blink times and the sway's phases (one per stream)."""

    seed: int = 0
    blink_interval_s: tuple[float, float] = (2.0, 6.0)
    first_blink_s: tuple[float, float] = (0.8, 2.5)
    sway_degrees: float = 1.2  # peak roll of the head
    sway_shift: float = 0.012  # peak translation, in face heights
    _starts: list[int] = field(default_factory=list, init=False, repr=False)
    _rng: np.random.Generator | None = field(default=None, init=False, repr=False)
    _phases: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._starts = [int(round(self._rng.uniform(*self.first_blink_s) * FPS))]
        self._phases = np.random.default_rng(self.seed + 1).uniform(0, 2 * np.pi, 6)

    def _blink_starts_through(self, k: int) -> list[int]:
        while self._starts[-1] <= k:
            self._starts.append(self._starts[-1] + int(round(self._rng.uniform(*self.blink_interval_s) * FPS)))
        return self._starts

    def blink(self, k: int) -> float:
        """Lid closure of frame ``k`` (0 open, 1 closed)."""
        if k < 0:
            return 0.0
        starts = self._blink_starts_through(k)
        i = int(np.searchsorted(starts, k, side="right")) - 1
        if i < 0:
            return 0.0
        j = k - starts[i]
        return BLINK_SHAPE[j] if j < len(BLINK_SHAPE) else 0.0

    def pose(self, k: int, face_height: float) -> tuple[float, float, float]:
        """(dx px, dy px, degrees clockwise) of frame ``k``: sums of slow sines with periods
        that never line up (3.1 to 11.3 s), so the sway does not repeat visibly."""
        t = k / FPS
        p = self._phases
        roll = self.sway_degrees * (0.6 * np.sin(2 * np.pi * t / 7.3 + p[0]) + 0.4 * np.sin(2 * np.pi * t / 3.1 + p[1]))
        dx = self.sway_shift * face_height * (0.7 * np.sin(2 * np.pi * t / 11.3 + p[2])
                                              + 0.3 * np.sin(2 * np.pi * t / 4.3 + p[3]))
        dy = 0.6 * self.sway_shift * face_height * (0.6 * np.sin(2 * np.pi * t / 5.9 + p[4])
                                                    + 0.4 * np.sin(2 * np.pi * t / 3.7 + p[5]))
        return float(dx), float(dy), float(roll)


__all__ = ["BLINK_SHAPE", "IdleMotion"]
