"""Seeded waveform augmentation for the speech the audio stages read (pretrain-au, train).

The corpus speech is clean (espeak-ng, studio read speech, digital silence between words); a
microphone delivers room noise, reverberation and any level. ``augment_speech`` applies, each
with its own probability: a level change, additive noise (white or pink) at an SNR measured
against the clip's speech level, reverberation (an exponentially decaying noise impulse
response mixed with the dry signal). Labels stay valid: none of these moves a phoneme in
time.

Deterministic: the result is a function of (audio, rng state) only; the datasets draw the
rng seed from the worker's torch RNG, which the training loop seeds from (seed, epoch,
position), so a resumed run sees the same augmented samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from avatar_stream.engine.timebase import SAMPLE_RATE


@dataclass(frozen=True)
class SpeechAugment:
    """Probabilities and ranges of :func:`augment_speech` (uniform draws within each range)."""

    p_noise: float = 0.6
    snr_db: tuple[float, float] = (5.0, 45.0)  # noise level below the speech RMS
    p_pink: float = 0.5  # share of noise draws that are pink (1/f) rather than white
    p_reverb: float = 0.3
    rt60_s: tuple[float, float] = (0.1, 0.6)  # time for the impulse response to decay by 60 dB
    wet: tuple[float, float] = (0.1, 0.5)  # share of reverberant energy in the mix
    p_gain: float = 0.8
    gain_db: tuple[float, float] = (-24.0, 6.0)
    # Vocal tract length perturbation (Jaitly & Hinton 2013): the spectrum's frequency axis
    # scaled by alpha, timing untouched, so the AU labels stay valid; another speaker's
    # formants from the same utterance. 0 keeps the paper-setting augmentation unchanged.
    p_vtlp: float = 0.0
    vtlp_alpha: tuple[float, float] = (0.85, 1.15)


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    # 1/f power: scale the white spectrum by 1/sqrt(f) (DC left out).
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return x / (np.std(x) + 1e-12)


def noise_at(n: int, rng: np.random.Generator, dbfs: tuple[float, float], p_pink: float) -> np.ndarray:
    """Pink (probability ``p_pink``) or white noise, RMS drawn uniformly in ``dbfs`` re full scale."""
    noise = _pink(n, rng) if rng.random() < p_pink else rng.standard_normal(n)
    return noise * 10.0 ** (rng.uniform(*dbfs) / 20.0)


def quiet_audio(n_samples: int, rng: np.random.Generator, p_zero: float = 0.2,
                dbfs: tuple[float, float] = (-75.0, -35.0)) -> np.ndarray:
    """Audio with no speech in it: digital silence (probability ``p_zero``) or white or pink
    noise with an RMS drawn in ``dbfs`` (re full scale), float32 (``train --quiet-items``)."""
    if rng.random() < p_zero:
        return np.zeros(n_samples, np.float32)
    return noise_at(n_samples, rng, dbfs, 0.5).astype(np.float32)


def _speech_rms(audio: np.ndarray) -> float:
    """RMS of the louder half of 20 ms blocks: the speech level, not diluted by pauses."""
    n = len(audio) // 320 * 320
    if n == 0:
        return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if len(audio) else 0.0
    blocks = np.mean(audio[:n].astype(np.float64).reshape(-1, 320) ** 2, axis=1)
    loud = np.sort(blocks)[len(blocks) // 2 :]
    return float(np.sqrt(np.mean(loud)))


def _reverb(audio: np.ndarray, rt60: float, wet: float, rng: np.random.Generator) -> np.ndarray:
    n = max(16, int(rt60 * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n) * np.exp(-6.91 * t / rt60)  # -60 dB at t = rt60
    ir /= np.sqrt(np.sum(ir**2)) + 1e-12
    tail = fftconvolve(audio.astype(np.float64), ir)[: len(audio)]
    return np.sqrt(1.0 - wet) * audio + np.sqrt(wet) * tail


VTLP_NPERSEG, VTLP_HOP = 512, 128  # 32 ms windows, 8 ms hop
VTLP_BOUNDARY_HZ = 4800.0  # frequencies below f0 = 4800 * min(alpha, 1) / alpha scale by alpha


def vtlp(audio: np.ndarray, alpha: float) -> np.ndarray:
    """``audio`` with its spectral envelope's frequency axis scaled by ``alpha`` (> 1 raises the
    formants, as a shorter vocal tract does), same length and timing, same RMS.

    Piecewise-linear warp (Jaitly & Hinton 2013): ``f -> alpha f`` up to a boundary, then a
    straight line to Nyquist so the band stays full. STFT magnitudes are resampled along
    frequency at the warped positions; each bin keeps its own phase; inverse STFT."""
    from scipy.signal import istft, stft

    x = np.asarray(audio, dtype=np.float64)
    if len(x) < VTLP_NPERSEG or alpha == 1.0:
        return x.copy()
    _, _, z = stft(x, fs=SAMPLE_RATE, nperseg=VTLP_NPERSEG, noverlap=VTLP_NPERSEG - VTLP_HOP)
    nyq = SAMPLE_RATE / 2.0
    f = np.linspace(0.0, nyq, z.shape[0])
    f0 = VTLP_BOUNDARY_HZ * min(alpha, 1.0) / alpha
    # Output frequency g takes the input at w^-1(g); w(f) = alpha f below f0, linear above.
    g0 = alpha * f0
    src = np.where(f <= g0, f / alpha, f0 + (f - g0) * (nyq - f0) / (nyq - g0))
    pos = src / (f[1] - f[0])
    i0 = np.minimum(pos.astype(int), len(f) - 2)
    w = (pos - i0)[:, None]
    mag = np.abs(z)
    warped = mag[i0] * (1.0 - w) + mag[i0 + 1] * w
    _, y = istft(warped * np.exp(1j * np.angle(z)), fs=SAMPLE_RATE, nperseg=VTLP_NPERSEG,
                 noverlap=VTLP_NPERSEG - VTLP_HOP)
    y = np.pad(y, (0, max(0, len(x) - len(y))))[: len(x)]
    rms_in, rms_out = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2))
    return y * (rms_in / rms_out) if rms_out > 0 else y


def augment_speech(audio: np.ndarray, rng: np.random.Generator, aug: SpeechAugment = SpeechAugment()) -> np.ndarray:
    """``audio`` float32 (N,) 16 kHz -> augmented float32 (N,), clipped to [-1, 1]."""
    x = np.asarray(audio, dtype=np.float64)
    # Drawn only when enabled, so p_vtlp == 0 leaves the rng stream (and old runs) unchanged.
    if aug.p_vtlp > 0 and rng.random() < aug.p_vtlp:
        x = vtlp(x, rng.uniform(*aug.vtlp_alpha))
    if rng.random() < aug.p_reverb:
        x = _reverb(x, rng.uniform(*aug.rt60_s), rng.uniform(*aug.wet), rng)
    if rng.random() < aug.p_noise:
        level = _speech_rms(x)
        if level > 0:
            noise = _pink(len(x), rng) if rng.random() < aug.p_pink else rng.standard_normal(len(x))
            x = x + noise * level * 10.0 ** (-rng.uniform(*aug.snr_db) / 20.0)
    if rng.random() < aug.p_gain:
        x = x * 10.0 ** (rng.uniform(*aug.gain_db) / 20.0)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


__all__ = ["SpeechAugment", "augment_speech", "noise_at", "quiet_audio", "vtlp"]
