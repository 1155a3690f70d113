"""engine/audio.py on real media: decoding, the one resampler, and every AudioError."""

from __future__ import annotations

import math
import shutil
import subprocess
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.signal import resample_poly

from avatar_stream.engine.audio import (
    AudioError,
    StreamResampler,
    check_audio,
    load_audio,
    read_pcm16,
    resample,
)
from avatar_stream.engine.timebase import SAMPLE_RATE, SAMPLES_PER_FRAME

CHUNKS = (1, 7, 160, 333, 4096)


def _ffmpeg(*args: str) -> None:
    exe = shutil.which("ffmpeg")
    if exe is None:
        pytest.fail("ffmpeg is not installed: run `make test`, which installs it with apt")
    subprocess.run([exe, "-v", "error", "-y", *args], check=True)


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """int16 wav; ``samples`` float in [-1, 1], shape (N,) or (N, channels)."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(x * 32767).astype("<i2").tobytes())
    return path


def _native(path: Path) -> tuple[np.ndarray, int]:
    """Mono float samples at the file's own rate, decoded independently of load_audio."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0, w.getframerate()


def _lag_and_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 80) -> tuple[int, float]:
    n = min(len(a), len(b)) - 2 * max_lag
    ref = a[max_lag : max_lag + n]
    scores = [np.dot(ref, b[max_lag + d : max_lag + d + n]) for d in range(-max_lag, max_lag + 1)]
    lag = int(np.argmax(scores)) - max_lag
    return lag, float(np.corrcoef(ref, b[max_lag : max_lag + n])[0, 1])


def _push_in_chunks(r: StreamResampler, x: np.ndarray, sizes) -> np.ndarray:
    out, i = [], 0
    for size in sizes:
        if i >= len(x):
            break
        out.append(r.process(x[i : i + size]))
        i += size
    assert i >= len(x)
    out.append(r.flush())
    return np.concatenate(out)


# --- decoding real files -------------------------------------------------------------


@pytest.mark.shared
def test_grid_clips_decode_to_exactly_three_seconds(shared_data):
    clips = sorted((shared_data / "grid_dev").glob("*.mpg"))
    assert len(clips) == 4
    for clip in clips:
        x = load_audio(clip)
        assert x.dtype == np.float32 and x.shape == (48000,), (clip.name, x.shape)
        assert 0.05 < np.abs(x).max() <= 1.0
        # The mp2 track stops 22 ms before the 75th video frame ends: aligned to the video
        # timeline it is only zero-padded, never shifted.
        raw = load_audio(clip, align_to_video=False)
        assert len(raw) < 48000
        np.testing.assert_array_equal(x[: len(raw)], raw)
        assert not x[len(raw) :].any()


def test_espeak_wav_loads_and_resamples(speech_wav):
    native, rate = _native(speech_wav)
    assert rate == 22050
    x = load_audio(speech_wav)
    assert x.dtype == np.float32 and x.ndim == 1
    assert len(x) == math.ceil(len(native) * SAMPLE_RATE / rate)
    # An independent polyphase implementation (scipy) agrees to well below 16-bit noise
    # away from the edges; the spectrum above 6.5 kHz is where the two filters differ.
    ref = resample_poly(native, 320, 441)[: len(x)]
    lag, corr = _lag_and_corr(ref, x)
    assert lag == 0 and corr > 0.999, (lag, corr)


def test_mp3_flac_mp4_variants_match_wav(tmp_path, speech_wav):
    wav = load_audio(speech_wav)
    _ffmpeg("-i", str(speech_wav), str(tmp_path / "s.flac"))
    _ffmpeg("-i", str(speech_wav), "-b:a", "128k", str(tmp_path / "s.mp3"))
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=4", "-i", str(speech_wav),
        "-c:v", "libx264", "-c:a", "aac", str(tmp_path / "s.mp4"),
    )  # fmt: skip

    flac = load_audio(tmp_path / "s.flac")
    np.testing.assert_array_equal(flac, wav)  # lossless: the same samples, the same bits

    mp3_frame = math.ceil(1152 * SAMPLE_RATE / 22050)
    mp3 = load_audio(tmp_path / "s.mp3")
    assert abs(len(mp3) - len(wav)) <= mp3_frame, (len(mp3), len(wav))
    assert _lag_and_corr(wav, mp3)[0] == 0
    assert _lag_and_corr(wav, mp3)[1] > 0.97

    # With a video track the audio is laid on the video's timeline: 4 s = 100 frames.
    mp4 = load_audio(tmp_path / "s.mp4")
    assert len(mp4) == 4 * SAMPLE_RATE
    lag, corr = _lag_and_corr(wav, mp4[: len(wav)])
    assert lag == 0 and corr > 0.97, (lag, corr)
    assert np.abs(mp4[len(wav) + 2048 :]).max() < 1e-3  # beyond the speech: zero fill
    aac_frame = math.ceil(1024 * SAMPLE_RATE / 22050)
    assert abs(len(load_audio(tmp_path / "s.mp4", align_to_video=False)) - len(wav)) <= aac_frame


def test_stereo_is_averaged_to_mono(tmp_path):
    t = np.arange(8000) / 16000
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = _write_wav(tmp_path / "st.wav", np.stack([left, -0.5 * left], axis=1), 16000)
    x = load_audio(path)
    np.testing.assert_allclose(x, 0.25 * left, atol=2 / 32768)


def test_read_pcm16():
    pcm = np.array([-32768, 0, 16384, 32767], dtype="<i2").tobytes()
    np.testing.assert_array_equal(read_pcm16(pcm), np.array([-1.0, 0.0, 0.5, 32767 / 32768], np.float32))
    assert read_pcm16(pcm).dtype == np.float32


# --- the resampler -------------------------------------------------------------------


@pytest.mark.parametrize("rate", [44100, 48000])
def test_resampler_chunking_is_bit_exact(rate):
    rng = np.random.default_rng(rate)
    x = (0.3 * rng.standard_normal(rate // 2)).astype(np.float32)  # 0.5 s
    one_shot = resample(x, rate)
    assert len(one_shot) == math.ceil(len(x) * SAMPLE_RATE / rate)
    r = StreamResampler(rate)
    for size in CHUNKS:
        n = len(x) if size > 1 else rate // 10  # chunk size 1 costs one call per sample
        ref = one_shot if n == len(x) else resample(x[:n], rate)
        got = _push_in_chunks(r, x[:n], [size] * n)
        assert np.array_equal(got, ref), f"chunk size {size}"
    for _ in range(3):
        got = _push_in_chunks(r, x, rng.integers(1, 3000, size=len(x)))
        assert np.array_equal(got, one_shot), "random chunk sizes"


def test_reset_stream_behaves_like_a_new_one():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(5000).astype(np.float32)
    used = StreamResampler(44100)
    used.process(rng.standard_normal(777).astype(np.float32))
    used.reset()
    assert np.array_equal(_push_in_chunks(used, x, [333] * 20), resample(x, 44100))


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44101, 96000])
def test_any_rate_has_deterministic_length_and_is_chunk_invariant(rate):
    rng = np.random.default_rng(rate)
    for n in (1, 2, 639, 4097):
        x = rng.standard_normal(n).astype(np.float32)
        y = resample(x, rate)
        assert len(y) == math.ceil(n * SAMPLE_RATE / rate)
        assert np.array_equal(_push_in_chunks(StreamResampler(rate), x, [160] * n), y)


@pytest.mark.parametrize("rate", [44100, 48000])
def test_sine_stays_a_sine_and_nothing_aliases(rate):
    t = np.arange(rate) / rate
    y = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), rate)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert np.fft.rfftfreq(len(y), 1 / SAMPLE_RATE)[np.argmax(spectrum)] == 1000.0
    ideal = np.sin(2 * np.pi * 1000 * np.arange(len(y)) / SAMPLE_RATE)
    assert np.abs(y - ideal)[200:-200].max() < 1e-3  # pass band: flat and in phase
    # 10 kHz cannot exist at 16 kHz: it must vanish, not fold down to 6 kHz.
    alias = resample(np.sin(2 * np.pi * 10000 * t).astype(np.float32), rate)
    assert np.abs(alias[200:-200]).max() < 1e-3


# --- every AudioError ----------------------------------------------------------------


def test_error_file_not_found(tmp_path):
    with pytest.raises(AudioError, match=r"not found: .*missing\.wav; check the path"):
        load_audio(tmp_path / "missing.wav")


def test_error_not_a_media_file(tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_bytes(b"this is a shopping list, not audio\n" * 10)
    with pytest.raises(AudioError, match=r"notes\.wav is not a readable media file"):
        load_audio(bad)
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_error_no_audio_stream(tmp_path):
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x64:rate=25:duration=1",
        "-c:v",
        "libx264",
        str(tmp_path / "v.mp4"),
    )
    with pytest.raises(AudioError, match=r"v\.mp4 has no audio stream \(it contains: video\)"):
        load_audio(tmp_path / "v.mp4")
    assert cv2.imwrite(str(tmp_path / "face.png"), np.full((32, 32, 3), 128, np.uint8))
    with pytest.raises(AudioError, match=r"face\.png has no audio stream"):
        load_audio(tmp_path / "face.png")


def test_error_empty(tmp_path):
    with pytest.raises(AudioError, match=r"empty \(0 samples\)"):
        load_audio(_write_wav(tmp_path / "empty.wav", np.zeros(0), 16000))


def test_error_shorter_than_one_video_frame(tmp_path):
    short = _write_wav(tmp_path / "short.wav", 0.5 * np.ones(300), 16000)
    with pytest.raises(AudioError, match=r"18\.8 ms long, shorter than one video frame; at least 40\.0 ms"):
        load_audio(short)
    assert len(load_audio(_write_wav(tmp_path / "ok.wav", 0.5 * np.ones(SAMPLES_PER_FRAME), 16000))) == 640


def test_error_nan_and_inf():
    x = np.full(1600, 0.1, dtype=np.float32)
    x[800], x[900] = np.nan, np.inf
    with pytest.raises(AudioError, match=r"2 samples are NaN or infinite \(first at 0\.050 s\)"):
        check_audio(x, SAMPLE_RATE)


def test_error_silent(tmp_path):
    quiet = _write_wav(tmp_path / "quiet.wav", np.zeros(16000), 16000)
    with pytest.raises(AudioError, match=r"quiet\.wav: audio is silent"):
        load_audio(quiet)
    assert not load_audio(quiet, allow_silence=True).any()
    with pytest.raises(AudioError, match="silent"):
        check_audio(np.full(1000, 9e-5, np.float32), SAMPLE_RATE)
    check_audio(np.full(1000, 9e-5, np.float32), SAMPLE_RATE, allow_silence=True)


def test_error_wrong_sample_rate_and_format():
    x = np.full(4410, 0.1, dtype=np.float32)
    with pytest.raises(AudioError, match=r"sample rate is 44100 Hz but 16000 Hz is required; resample"):
        check_audio(x, 44100)
    with pytest.raises(AudioError, match="expected float samples.*read_pcm16"):
        check_audio(np.ones(1000, np.int16), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"expected mono samples of shape \(N,\)"):
        check_audio(np.ones((1000, 2), np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="odd number of bytes"):
        read_pcm16(b"\x00\x01\x02")
    with pytest.raises(AudioError, match="1-D float"):
        StreamResampler(48000).process(np.ones(10, np.int16))
