"""One definition of time, shared by dataset preparation, training, export and serving.

Everything is an integer count of 16 kHz samples (docs/design.md §8, habit 3); seconds appear only
in messages. Derived constants are computed with ``exact_div`` so that a change to one
of the base numbers that breaks an alignment fails at import time, not in a model.

Video frame k covers samples ``[k * SAMPLES_PER_FRAME, (k + 1) * SAMPLES_PER_FRAME)``.
Its MFCC window is the ``MFCC_FRAMES_PER_WINDOW`` (28) MFCC frames whose middle is the
middle of video frame k (docs/design.md §3). Those 28 frames at a 10 ms hop with a 25 ms
analysis window span ``WINDOW_SAMPLES`` = 27 * 160 + 400 = 4720 samples, so:

    window(k) = [k * 640 + 320 - 2360, k * 640 + 320 + 2360) = [640 k - 2040, 640 k + 2680)

Samples before the start of the stream (k small) and after ``input_finished`` are zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def exact_div(x: int, y: int) -> int:
    if x % y:
        raise ValueError(f"{x} is not divisible by {y}")
    return x // y


SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = exact_div(SAMPLE_RATE, FPS)  # 640

MFCC_WIN = exact_div(SAMPLE_RATE * 25, 1000)  # 400 samples = 25 ms analysis window
MFCC_HOP = exact_div(SAMPLE_RATE * 10, 1000)  # 160 samples = 10 ms hop
MFCC_N_FFT = 512  # next power of two above MFCC_WIN; the window is zero-padded to it
MFCC_N_MELS = 40
MFCC_N_CEPS = 13  # c0..c12; c0 (energy) is dropped
MFCC_N_COEFFS = MFCC_N_CEPS - 1  # 12 per MFCC frame
MFCC_FRAMES_PER_WINDOW = 28  # 280 ms of MFCC per video frame (paper §4.1)

WINDOW_SAMPLES = (MFCC_FRAMES_PER_WINDOW - 1) * MFCC_HOP + MFCC_WIN  # 4720
# Offset of the window start relative to the start of its video frame (negative: the
# window starts before the frame). Integer arithmetic: the frame middle is 320, the
# window middle is 2360, both exact.
WINDOW_OFFSET = exact_div(SAMPLES_PER_FRAME, 2) - exact_div(WINDOW_SAMPLES, 2)  # -2040
# How far the window reaches past the end of its own video frame: the audio lookahead.
AUDIO_LOOKAHEAD_SAMPLES = WINDOW_OFFSET + WINDOW_SAMPLES - SAMPLES_PER_FRAME  # 2040

AU_NAMES: tuple[str, ...] = ("AU10", "AU14", "AU20", "AU25", "AU26")


def window_bounds(k: int) -> tuple[int, int]:
    """Sample range ``[start, stop)`` of the MFCC window of video frame ``k``."""
    start = k * SAMPLES_PER_FRAME + WINDOW_OFFSET
    return start, start + WINDOW_SAMPLES


def frame_window(audio: np.ndarray, k: int) -> np.ndarray:
    """The ``WINDOW_SAMPLES`` PCM samples of frame ``k``'s window, zero outside ``audio``."""
    start, stop = window_bounds(k)
    out = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    lo, hi = max(start, 0), min(stop, len(audio))
    if hi > lo:
        out[lo - start : hi - start] = audio[lo:hi]
    return out


def frame_windows(audio: np.ndarray, n_frames: int | None = None) -> np.ndarray:
    """Windows of frames ``0..n_frames-1`` stacked as ``(n_frames, WINDOW_SAMPLES)``."""
    if n_frames is None:
        n_frames = num_frames(len(audio))
    pad_l = -WINDOW_OFFSET
    stop_last = window_bounds(n_frames - 1)[1] if n_frames else 0
    padded = np.zeros(pad_l + max(stop_last, len(audio)), dtype=np.float32)
    padded[pad_l : pad_l + len(audio)] = audio
    idx = np.arange(n_frames)[:, None] * SAMPLES_PER_FRAME + np.arange(WINDOW_SAMPLES)[None, :]
    return padded[idx]


def num_frames(n_samples: int) -> int:
    """Video frames in ``n_samples`` of audio: only whole frames count."""
    return n_samples // SAMPLES_PER_FRAME


def last_sample_needed(k: int, lookahead_frames: int = 0) -> int:
    """Exclusive sample index that must have arrived before frame ``k`` can be produced
    by a model whose temporal stage looks ``lookahead_frames`` video frames ahead."""
    return window_bounds(k + lookahead_frames)[1]


@dataclass(frozen=True)
class Latency:
    """Algorithmic latency of a model, in samples (a model property, not a measurement)."""

    lookahead_frames: int

    @property
    def samples(self) -> int:
        # Frame k's display time is k*640; it can be computed once sample
        # last_sample_needed(k) has arrived: the difference is the latency.
        return last_sample_needed(0, self.lookahead_frames)

    @property
    def ms(self) -> float:
        return 1000.0 * self.samples / SAMPLE_RATE
