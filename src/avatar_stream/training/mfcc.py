"""The ONE MFCC of the project (docs/design.md §3), as a torch module of exportable ops.

Used by dataset preparation, by training and inside the exported ``audio.onnx`` graph,
so the engine feeds raw 16 kHz PCM and no second MFCC implementation can drift.

Definition (constants from ``engine/timebase.py``):

    frames      400-sample (25 ms) frames every 160 samples (10 ms), no centre padding,
                no pre-emphasis: frame t covers samples [160 t, 160 t + 400)
    window      periodic Hamming of 400 samples, zero-padded to n_fft = 512
    spectrum    |DFT_512|^2, bins 0..256, computed as conv1d with a fixed (cos, sin) basis
    mel         40 triangular HTK-mel filters, 20 Hz - 8 kHz, peak 1 (no area normalisation)
    log         natural log of (mel energy + 1e-6)
    cepstrum    orthonormal DCT-II, c0..c12, c0 (energy) dropped -> 12 coefficients

``(B, N) -> (B, 12, 1 + (N - 400) // 160)``; a ``WINDOW_SAMPLES`` (4720) window gives
``(B, 12, 28)``. Because nothing is padded, a frame's MFCC depends only on its own samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from avatar_stream.engine.timebase import (
    MFCC_FRAMES_PER_WINDOW,
    MFCC_HOP,
    MFCC_N_CEPS,
    MFCC_N_FFT,
    MFCC_N_MELS,
    MFCC_WIN,
    SAMPLE_RATE,
    frame_windows,
)

MEL_FMIN = 20.0
MEL_FMAX = 8000.0
LOG_FLOOR = 1e-6


def hz_to_mel_htk(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz_htk(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def dft_basis(n_fft: int = MFCC_N_FFT, win: int = MFCC_WIN) -> np.ndarray:
    """``(2 * (n_fft // 2 + 1), 1, win)`` conv1d weight: windowed cos rows, then -sin rows.

    The window is zero-padded to ``n_fft`` on the right; the padding only rotates phases,
    so the power spectrum equals that of a centred zero-padding (librosa's convention).
    """
    n = np.arange(win, dtype=np.float64)
    window = 0.54 - 0.46 * np.cos(2.0 * math.pi * n / win)  # periodic Hamming
    k = np.arange(n_fft // 2 + 1, dtype=np.float64)[:, None]
    angle = 2.0 * math.pi * k * n[None, :] / n_fft
    basis = np.concatenate([np.cos(angle), -np.sin(angle)]) * window[None, :]
    return basis[:, None, :].astype(np.float32)


def mel_filterbank(
    n_mels: int = MFCC_N_MELS,
    n_fft: int = MFCC_N_FFT,
    sample_rate: int = SAMPLE_RATE,
    fmin: float = MEL_FMIN,
    fmax: float = MEL_FMAX,
) -> np.ndarray:
    """``(n_mels, n_fft // 2 + 1)`` triangles with edges equally spaced on the HTK mel
    scale, linear in Hz between edges, peak 1."""
    edges = mel_to_hz_htk(np.linspace(hz_to_mel_htk(fmin), hz_to_mel_htk(fmax), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1, dtype=np.float64) * sample_rate / n_fft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lo) / (mid - lo)
    falling = (hi - freqs[None, :]) / (hi - mid)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def dct_matrix(n_out: int = MFCC_N_CEPS, n_in: int = MFCC_N_MELS) -> np.ndarray:
    """``(n_out, n_in)`` orthonormal DCT-II rows (scipy ``dct(type=2, norm='ortho')``)."""
    n = np.arange(n_in, dtype=np.float64)[None, :]
    k = np.arange(n_out, dtype=np.float64)[:, None]
    m = np.cos(math.pi * k * (2.0 * n + 1.0) / (2.0 * n_in)) * math.sqrt(2.0 / n_in)
    m[0] /= math.sqrt(2.0)
    return m.astype(np.float32)


class MFCC(nn.Module):
    """``(B, N)`` float32 16 kHz PCM -> ``(B, 12, 1 + (N - 400) // 160)`` MFCC (c1..c12).

    Built from conv1d, mul, add, matmul and log only, so it exports to ONNX as is. The
    fixed matrices are non-persistent buffers: they move with ``.to(device)`` but are
    not written into checkpoints.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dft", torch.from_numpy(dft_basis()), persistent=False)
        self.register_buffer("mel", torch.from_numpy(mel_filterbank()), persistent=False)
        self.register_buffer("dct", torch.from_numpy(dct_matrix()[1:]), persistent=False)
        self.n_bins = MFCC_N_FFT // 2 + 1

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        # Checked eagerly only: a traced comparison would freeze into the exported graph.
        if not torch.jit.is_tracing() and (pcm.dim() != 2 or pcm.shape[-1] < MFCC_WIN):
            raise ValueError(f"MFCC expects (B, N >= {MFCC_WIN}) PCM, got {tuple(pcm.shape)}")
        spec = nn.functional.conv1d(pcm.unsqueeze(1), self.dft, stride=MFCC_HOP)  # (B, 2F, T)
        re, im = spec[:, : self.n_bins], spec[:, self.n_bins :]
        power = re * re + im * im  # (B, F, T)
        log_mel = torch.log(torch.matmul(self.mel, power) + LOG_FLOOR)  # (B, 40, T)
        return torch.matmul(self.dct, log_mel)  # (B, 12, T)


_MODULE: MFCC | None = None


def mfcc_windows(audio: np.ndarray, n_frames: int | None = None, batch: int = 256) -> torch.Tensor:
    """MFCC windows of video frames ``0..T-1`` of a 16 kHz clip: ``(T, 12, 28)`` float32 on CPU.

    Window ``k`` is ``MFCC()(timebase.frame_window(audio, k))``; ``T`` defaults to
    ``timebase.num_frames(len(audio))``. Computed ``batch`` windows at a time to bound memory.
    """
    global _MODULE
    if _MODULE is None:
        _MODULE = MFCC().eval()
    windows = frame_windows(np.asarray(audio, dtype=np.float32), n_frames)
    out = torch.empty(len(windows), MFCC_N_CEPS - 1, MFCC_FRAMES_PER_WINDOW)
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            out[i : i + batch] = _MODULE(torch.from_numpy(windows[i : i + batch]))
    return out
