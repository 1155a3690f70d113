"""training/augment.py and the datasets' ``augment`` option: determinism, levels, labels kept."""

from __future__ import annotations

import numpy as np
import torch

from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.training.augment import SpeechAugment, augment_speech
from avatar_stream.training.datasets import AudioAUDataset, ClipDataset
from avatar_stream.training.shards import write_clip, write_split

FRAMES = 10


def _tone(n: int = FRAMES * SAMPLES_PER_FRAME) -> np.ndarray:
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_same_rng_same_output_and_shape():
    x = _tone()
    a = augment_speech(x, np.random.default_rng(5))
    b = augment_speech(x, np.random.default_rng(5))
    c = augment_speech(x, np.random.default_rng(6))
    assert a.dtype == np.float32 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a).max() <= 1.0


def test_noise_snr_is_the_drawn_one():
    x = _tone(32000)
    aug = SpeechAugment(p_noise=1.0, snr_db=(20.0, 20.0), p_pink=0.0, p_reverb=0.0, p_gain=0.0)
    y = augment_speech(x, np.random.default_rng(0), aug)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert abs(snr - 20.0) < 0.5


def test_reverb_keeps_onset_and_adds_a_tail():
    x = np.zeros(16000, np.float32)
    x[4000:4800] = _tone(800)
    aug = SpeechAugment(p_noise=0.0, p_reverb=1.0, rt60_s=(0.4, 0.4), wet=(0.5, 0.5), p_gain=0.0)
    y = augment_speech(x, np.random.default_rng(1), aug)
    assert np.abs(y[:4000]).max() < 1e-6  # nothing before the sound: labels stay aligned
    assert np.abs(y[5600:6400]).max() > 1e-3  # energy after the sound ended


def test_datasets_augment_is_seeded_and_changes_only_mfcc(tmp_path):
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    frames = np.repeat(face[None], FRAMES, 0)
    au = rng.uniform(0, 1, (FRAMES, 5)).astype(np.float32)
    for spk in ("a", "b"):
        write_clip(tmp_path, spk, "u0", frames, _tone() * (1 + rng.random()), face, au=au)
    write_split(tmp_path, ["a"], ["b"])
    plain = AudioAUDataset(tmp_path, "train", per_item=4)[0]
    aug = AudioAUDataset(tmp_path, "train", per_item=4, augment=SpeechAugment(p_noise=1.0, p_gain=0.0))
    torch.manual_seed(3)
    first = aug[0]
    torch.manual_seed(3)
    again = aug[0]
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    assert (first[0] - plain[0]).abs().max() > 1e-3
    torch.testing.assert_close(first[1], plain[1])  # labels untouched
    clip_plain = ClipDataset(tmp_path, "train", context=1, clip_len=4)[0]
    clip_aug = ClipDataset(tmp_path, "train", context=1, clip_len=4, augment=SpeechAugment(p_noise=1.0))[0]
    assert clip_aug.mfcc.shape == clip_plain.mfcc.shape
    assert (clip_aug.mfcc - clip_plain.mfcc).abs().max() > 1e-3
    torch.testing.assert_close(clip_aug.frames, clip_plain.frames, rtol=0, atol=0)


def _vowel(n: int, formant_hz: float) -> np.ndarray:
    """White noise through one resonance at ``formant_hz``: a whispered one-formant vowel
    (noise, not a pulse train, so the envelope's peak is not quantised to harmonics)."""
    from scipy.signal import lfilter

    pulses = np.random.default_rng(0).standard_normal(n)
    r, theta = 0.97, 2 * np.pi * formant_hz / 16000
    y = lfilter([1.0], [1.0, -2 * r * np.cos(theta), r * r], pulses)
    return (0.3 * y / np.abs(y).max()).astype(np.float32)


def _envelope_peak_hz(x: np.ndarray) -> float:
    from scipy.signal import welch

    f, p = welch(x, fs=16000, nperseg=1024)
    env = np.convolve(p, np.ones(9) / 9, mode="same")  # smooth over the harmonics (~140 Hz)
    band = (f > 200) & (f < 2000)
    return float(f[band][np.argmax(env[band])])


def test_vtlp_moves_the_formant_keeps_timing_and_level():
    from avatar_stream.training.augment import vtlp

    x = np.zeros(24000, np.float32)
    x[4000:20000] = _vowel(16000, 700.0)
    assert abs(_envelope_peak_hz(x) - 700) < 40
    for alpha in (0.85, 1.15):
        y = vtlp(x, alpha)
        assert y.shape == x.shape
        assert abs(_envelope_peak_hz(y) - 700 * alpha) < 45, (alpha, _envelope_peak_hz(y))
        np.testing.assert_allclose(np.sqrt(np.mean(y**2)), np.sqrt(np.mean(x.astype(np.float64) ** 2)), rtol=1e-6)
        # Timing: the silence before and after the vowel stays (nearly) silent.
        assert np.abs(y[:3500]).max() < 0.02 and np.abs(y[20500:]).max() < 0.02
    np.testing.assert_array_equal(vtlp(x, 1.0), x)
    # In augment_speech: off by default (rng stream unchanged), on with p_vtlp.
    np.testing.assert_array_equal(augment_speech(x, np.random.default_rng(4)),
                                  augment_speech(x, np.random.default_rng(4), SpeechAugment(p_vtlp=0.0)))
    only = SpeechAugment(p_noise=0.0, p_reverb=0.0, p_gain=0.0, p_vtlp=1.0, vtlp_alpha=(1.15, 1.15))
    assert abs(_envelope_peak_hz(augment_speech(x, np.random.default_rng(0), only)) - 805) < 45


def test_quiet_items_target_the_photo_with_noise_or_silence_in(tmp_path):
    """``ClipDataset(quiet=P)``: with probability P an item is hiss or silence with the identity
    image as every target and no AU; off (0) leaves items and torch's RNG stream as they were."""
    from avatar_stream.training.augment import quiet_audio

    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    moving = np.stack([np.roll(face, k, axis=0) for k in range(FRAMES)])  # targets differ from the photo
    au = rng.uniform(0.5, 1, (FRAMES, 5)).astype(np.float32)
    for spk in ("a", "b"):
        write_clip(tmp_path, spk, "u0", moving, _tone(), face, au=au, au_label=au > 0.4)
    write_split(tmp_path, ["a"], ["b"])
    quiet = ClipDataset(tmp_path, "train", context=1, clip_len=4, quiet=1.0)
    torch.manual_seed(0)
    item = quiet[0]
    ident = item.identity
    assert item.frames.shape == (4, *ident.shape) and all(torch.equal(f, ident) for f in item.frames)
    assert float(item.au.abs().max()) == 0.0 and float(item.au_label.abs().max()) == 0.0
    plain = ClipDataset(tmp_path, "train", context=1, clip_len=4)[0]
    assert item.mfcc.shape == plain.mfcc.shape and torch.isfinite(item.mfcc).all()
    assert (item.mfcc - plain.mfcc).abs().max() > 1e-2  # not the tone's features
    # Noise levels and kinds as documented.
    levels = [quiet_audio(16000, np.random.default_rng(s)) for s in range(40)]
    zeros = sum(float(np.abs(x).max()) == 0.0 for x in levels)
    dbfs = [10 * np.log10(np.mean(x.astype(np.float64) ** 2)) for x in levels if np.abs(x).max() > 0]
    assert 1 <= zeros <= 20 and -76 < min(dbfs) and max(dbfs) < -34
    # Off: the same item and the same next torch draw as without the option.
    off = ClipDataset(tmp_path, "train", context=1, clip_len=4, quiet=0.0)
    torch.manual_seed(5)
    a = off[0]
    after_a = torch.rand(1)
    torch.manual_seed(5)
    b = ClipDataset(tmp_path, "train", context=1, clip_len=4)[0]
    torch.testing.assert_close(a.frames, b.frames, rtol=0, atol=0)
    assert torch.equal(after_a, torch.rand(1))
