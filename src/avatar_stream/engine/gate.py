"""Noise gate: below a level, a frame's audio features become those of digital silence.

The generator normalises away the input level (the MFCCs drop c0), so a quiet hiss from a
microphone looks to it much like speech and moves the mouth. The gate fixes that where the
audio enters the model, per frame and from that frame's own PCM window only, so streaming
still equals offline exactly (every frame's gain depends on nothing but its window):

    level_j = max over 20 ms sub-frames (hop 10 ms) of the window of frame j of
              20 log10(RMS)                                (dBFS, full scale = 1.0)
    g_j     = clip((level_j - threshold) / knee + 1/2, 0, 1)
    feature_j = g_j * f(window_j) + (1 - g_j) * f(zeros)    (the same for the AU probabilities)

The window is the one the model reads for frame j (timebase.window_bounds: 127 ms before
the frame to 167 ms after), so the gate opens as soon as speech enters what the model hears
and closes once the last sound has left it: no extra hold time, no clipped word onsets.
Training never sees the gate; it is a serving-side input stage, off with ``threshold None``.

Default -45 dBFS: room noise of a headset or laptop microphone sits around -60..-50 dBFS,
speech at -35..-15 dBFS (RMS of the loudest 20 ms). A very quiet microphone needs a lower
threshold (``avatar-stream --noise-gate -55``) or none (``--noise-gate off``).
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD_DBFS = -45.0
DEFAULT_KNEE_DB = 6.0
SUBFRAME = 320  # 20 ms at 16 kHz
SUBFRAME_HOP = 160
_FLOOR_DBFS = -200.0


def window_levels(windows: np.ndarray) -> np.ndarray:
    """Loudest 20 ms (hop 10 ms) RMS level of each window, dBFS. ``windows`` (N, S)."""
    x = np.asarray(windows, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < SUBFRAME:
        raise ValueError(f"window_levels: expected (N, >= {SUBFRAME}) windows, got {x.shape}")
    starts = np.unique(np.r_[np.arange(0, x.shape[1] - SUBFRAME + 1, SUBFRAME_HOP), x.shape[1] - SUBFRAME])
    sub = np.lib.stride_tricks.sliding_window_view(x, SUBFRAME, axis=1)[:, starts]  # last one ends the window
    ms = (sub * sub).mean(axis=2).max(axis=1)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(ms)
    return np.maximum(db, _FLOOR_DBFS)


class NoiseGate:
    """Per-window gain in [0, 1] from the window's loudest sub-frame (see the module doc)."""

    def __init__(self, threshold_dbfs: float = DEFAULT_THRESHOLD_DBFS, knee_db: float = DEFAULT_KNEE_DB):
        if not np.isfinite(threshold_dbfs) or threshold_dbfs >= 0:
            raise ValueError(f"noise gate threshold {threshold_dbfs} dBFS: use a negative level such as -45, or 'off'")
        if not knee_db > 0:
            raise ValueError(f"noise gate knee {knee_db} dB: must be > 0")
        self.threshold_dbfs = float(threshold_dbfs)
        self.knee_db = float(knee_db)

    def gains(self, windows: np.ndarray) -> np.ndarray:
        """(N,) float32 gains for (N, S) PCM windows."""
        g = (window_levels(windows) - self.threshold_dbfs) / self.knee_db + 0.5
        return np.clip(g, 0.0, 1.0).astype(np.float32)

    def apply(self, windows: np.ndarray, feat: np.ndarray, au: np.ndarray,
              silent_feat: np.ndarray, silent_au: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blend each frame's features (and AU probabilities) towards those of silence."""
        g = self.gains(windows)
        if np.all(g == 1.0):
            return feat, au
        gf = g.reshape((-1,) + (1,) * (feat.ndim - 1))
        ga = g.reshape((-1,) + (1,) * (au.ndim - 1))
        feat = gf * feat + (1.0 - gf) * silent_feat
        au = ga * au + (1.0 - ga) * silent_au
        return feat.astype(np.float32), au.astype(np.float32)

    def __repr__(self) -> str:
        return f"NoiseGate(threshold_dbfs={self.threshold_dbfs}, knee_db={self.knee_db})"


def parse_gate(value: str | float | None) -> float | None:
    """CLI value -> threshold in dBFS, or None for 'off'. One-line error otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("off", "none"):
            return None
        try:
            value = float(v)
        except ValueError:
            raise ValueError(f"--noise-gate {value!r}: give a level in dBFS such as -45, or 'off'") from None
    if not np.isfinite(value) or value >= 0:
        raise ValueError(f"--noise-gate {value}: the level must be negative dBFS (e.g. -45), or 'off'")
    return float(value)
