"""Audio sources with real components: files decoded by PyAV, real pipes, and a real
PortAudio capture stream reading an ALSA ``file`` PCM (ENVIRONMENT.md, "Testing without
hardware"): the microphone tests run in a child process whose HOME holds an .asoundrc,
because ALSA reads it when PortAudio initialises."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from avatar_stream import DEMO_SPEECH
from avatar_stream.engine.audio import AudioError, StreamResampler, load_audio, read_pcm16, resample
from avatar_stream.engine.sources import (
    FileSource,
    SampleRing,
    SourceError,
    StdinSource,
    list_devices,
)
from avatar_stream.engine.timebase import SAMPLE_RATE


def _pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")


def _write_wav16(path: Path, x: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(_pcm16(x).tobytes())
    return path


# ---------------------------------------------------------------- file


def test_file_source_fast_yields_exactly_the_file(speech_wav):
    expected = load_audio(speech_wav)
    with FileSource(speech_wav, chunk_samples=333) as src:
        chunks = list(src)
    assert src.sample_rate == SAMPLE_RATE == 16000
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert all(len(c) == 333 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 333
    np.testing.assert_array_equal(np.concatenate(chunks), expected)
    assert src.samples_read == len(expected) and src.dropped_samples == 0


def test_file_source_realtime_paces_to_the_wall_clock(speech_wav, tmp_path):
    one_second = _write_wav16(tmp_path / "1s.wav", load_audio(speech_wav)[:SAMPLE_RATE])
    src = FileSource(one_second, realtime=True, chunk_samples=640)
    t0 = time.monotonic()
    ends, early = 0, []
    for chunk in src:
        ends += len(chunk)
        lag = (time.monotonic() - t0) - ends / SAMPLE_RATE
        early.append(lag)
    elapsed = time.monotonic() - t0
    assert ends == SAMPLE_RATE
    assert 0.9 <= elapsed <= 1.5, elapsed
    # A chunk is never handed out before its last sample is due.
    assert min(early) >= 0.0, min(early)


def test_file_source_realtime_delivers_the_backlog_after_a_stall(speech_wav, tmp_path):
    one_second = _write_wav16(tmp_path / "1s.wav", load_audio(speech_wav)[:SAMPLE_RATE])
    sizes = []
    for i, chunk in enumerate(FileSource(one_second, realtime=True, chunk_samples=640)):
        sizes.append(len(chunk))
        if i == 0:
            time.sleep(0.3)  # compute stalls: audio keeps arriving meanwhile
    assert sum(sizes) == SAMPLE_RATE
    assert sizes[1] >= int(0.3 * SAMPLE_RATE), sizes[:3]


def test_file_source_errors(tmp_path):
    with pytest.raises(AudioError, match="audio file not found"):
        FileSource(tmp_path / "missing.wav")
    with pytest.raises(SourceError, match="chunk_samples must be a positive integer"):
        FileSource(tmp_path / "missing.wav", chunk_samples=0)


def test_file_source_close_stops_iteration(speech_wav):
    src = FileSource(speech_wav, chunk_samples=640)
    it = iter(src)
    next(it)
    src.close()
    assert list(it) == [] and src.samples_read == 640


# ---------------------------------------------------------------- stdin


def _pipe_writer(data: bytes, sizes: list[int]):
    r, w = os.pipe()

    def run():
        with os.fdopen(w, "wb", buffering=0) as f:
            pos, i = 0, 0
            while pos < len(data):
                n = sizes[i % len(sizes)]
                f.write(data[pos : pos + n])
                pos += n
                i += 1
                time.sleep(0.0005)  # let the reader see partial samples

    t = threading.Thread(target=run)
    t.start()
    return os.fdopen(r, "rb"), t


@pytest.mark.parametrize("rate", [16000, 48000])
def test_stdin_source_from_a_real_pipe_with_odd_chunks(speech_wav, rate):
    x = load_audio(speech_wav)[: 2 * SAMPLE_RATE]
    pcm = _pcm16(resample(x, SAMPLE_RATE, rate) if rate != SAMPLE_RATE else x)
    data = pcm.tobytes()
    stream, writer = _pipe_writer(data, [1, 7, 333, 4095, 2, 3])
    with stream, StdinSource(stream, sample_rate=rate, read_bytes=1001) as src:
        got = np.concatenate(list(src))
    writer.join()
    expected = read_pcm16(data)
    if rate != SAMPLE_RATE:
        expected = resample(expected, rate)
    np.testing.assert_array_equal(got, expected)
    assert src.samples_read == len(expected)


class _OddReads:
    """A binary stream that hands out fixed odd-sized pieces (what a pipe may do)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.pos, self.i = data, sizes, 0, 0

    def read(self, n: int) -> bytes:
        k = min(n, self.sizes[self.i % len(self.sizes)])
        self.i += 1
        out = self.data[self.pos : self.pos + k]
        self.pos += len(out)
        return out


def test_stdin_source_carries_odd_bytes_and_warns_on_a_truncated_sample(caplog):
    samples = np.arange(-500, 500, dtype="<i2") * 37
    data = samples.tobytes() + b"\x01"  # a half sample at the end
    src = StdinSource(_OddReads(data, [3, 1, 5, 1001]))
    with caplog.at_level("WARNING"):
        got = np.concatenate(list(src))
    np.testing.assert_array_equal(got, samples.astype(np.float32) / 32768.0)
    assert "middle of a 16-bit sample" in caplog.text


def test_stdin_source_rejects_a_bad_rate():
    with pytest.raises(SourceError, match="--stdin-rate must be a positive integer"):
        StdinSource(_OddReads(b"", [1]), sample_rate=0)


# ---------------------------------------------------------------- ring


def test_sample_ring_holds_the_newest_and_reports_what_was_overwritten():
    ring = SampleRing(10)
    ring.write(np.arange(7, dtype=np.int16).reshape(-1, 1))
    frames, first = ring.read(0, 7)
    assert first == 0 and frames[:, 0].tolist() == list(range(7))
    ring.write(np.arange(7, 16, dtype=np.int16).reshape(-1, 1))  # wraps, overwrites 0..5
    frames, first = ring.read(2, 16)
    assert first == 6 and frames[:, 0].tolist() == list(range(6, 16))
    ring.write(np.arange(16, 40, dtype=np.int16).reshape(-1, 1))  # longer than the ring
    assert ring.written == 40
    frames, first = ring.read(16, 40)
    assert first == 30 and frames[:, 0].tolist() == list(range(30, 40))


# ---------------------------------------------------------------- microphone (real PortAudio)

needs_alsa = pytest.mark.skipif(platform.system() != "Linux", reason="ALSA file-PCM trick is Linux only")


def _alsa_home(home: Path, infile: Path | None) -> Path:
    from conftest import write_alsa_home

    return write_alsa_home(home, infile)


def _child(home: Path, code: str, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter with HOME=home; it prints one JSON line last."""
    pytest.importorskip("pyaudio", reason="pyaudio is the [mic] extra")
    env = dict(os.environ, HOME=str(home))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CAPTURE = """
    import json
    import numpy as np
    from avatar_stream.engine.sources import MicSource
    want, rate, buf = {want}, {rate}, {buf}
    got, n = [], 0
    with MicSource(sample_rate=rate, max_buffer_seconds=buf, frames_per_buffer=1000) as mic:
        for chunk in mic:
            assert chunk.dtype == np.float32 and chunk.ndim == 1
            got.append(chunk)
            n += len(chunk)
            if n >= want:
                break  # the free-running device has captured far more; no need to drain it
    np.save({out!r}, np.concatenate(got))
    print(json.dumps(dict(dropped=mic.dropped_samples, read=mic.samples_read, rate=mic.input_rate,
                          channels=mic.channels, device=mic.device_name, overflows=mic.input_overflows)))
"""


@needs_alsa
def test_mic_capture_is_sample_exact(speech_wav, tmp_path):
    expected = _pcm16(load_audio(speech_wav))
    raw = tmp_path / "in.raw"
    expected.tofile(raw)
    home = _alsa_home(tmp_path / "home", raw)
    out = tmp_path / "captured.npy"
    # The ALSA file PCM runs free (no real-time clock): a big ring keeps the consumer ahead.
    info = _child(home, _CAPTURE.format(want=len(expected), rate=16000, buf=600.0, out=str(out)))
    got = np.load(out)
    assert info["rate"] == 16000 and info["dropped"] == 0 and info["device"] == "default"
    assert info["read"] == len(got) >= len(expected) and info["channels"] == 1
    # Sample-exact from the very first sample: the plug adds no leading samples. After the
    # file ends the ALSA file plugin delivers whatever its buffer holds, so only the file's
    # own length is compared.
    np.testing.assert_array_equal(got[: len(expected)], expected.astype(np.float32) / 32768.0)


@needs_alsa
def test_mic_capture_at_48k_is_resampled_with_the_stream_resampler(speech_wav, tmp_path):
    x48 = _pcm16(resample(load_audio(speech_wav), SAMPLE_RATE, 48000))
    raw = tmp_path / "in48.raw"
    x48.tofile(raw)
    home = _alsa_home(tmp_path / "home", raw)
    out = tmp_path / "captured.npy"
    info = _child(home, _CAPTURE.format(want=len(x48) // 3, rate=48000, buf=600.0, out=str(out)))
    got = np.load(out)
    assert info["rate"] == 48000 and info["dropped"] == 0
    r = StreamResampler(48000)
    expected = np.concatenate([r.process(x48.astype(np.float32) / 32768.0), r.flush()])
    # Outputs whose filter support lies inside the file are fully determined by it.
    n = (len(x48) - r.lookahead_samples) // 3 - 1
    np.testing.assert_array_equal(got[:n], expected[:n])


@needs_alsa
def test_mic_drops_and_counts_the_oldest_audio_when_the_consumer_stalls(speech_wav, tmp_path):
    raw = tmp_path / "in.raw"
    _pcm16(load_audio(speech_wav)).tofile(raw)
    home = _alsa_home(tmp_path / "home", raw)
    info = _child(
        home,
        """
        import json, time
        import numpy as np
        from avatar_stream.engine.sources import MicSource
        mic = MicSource(sample_rate=16000, max_buffer_seconds=0.5)
        time.sleep(0.3)  # the consumer stalls; the free-running device overfills the ring
        got = []
        for chunk in mic:
            got.append(chunk)
            if sum(map(len, got)) >= 4 * 16000:
                mic.close()
        print(json.dumps(dict(dropped=mic.dropped_samples, read=mic.samples_read,
                              written=mic._ring.written, cap=mic._ring.capacity)))
        """,
    )
    assert info["dropped"] > 0
    # Nothing is lost silently: every captured sample was either read or counted dropped.
    assert info["read"] + info["dropped"] == info["written"]


@needs_alsa
def test_mic_device_selection_and_errors(speech_wav, tmp_path):
    raw = tmp_path / "in.raw"
    _pcm16(load_audio(speech_wav)).tofile(raw)
    home = _alsa_home(tmp_path / "home", raw)
    info = _child(
        home,
        """
        import json
        from avatar_stream.engine.sources import MicSource, SourceError, list_devices
        res = {"devices": list_devices(), "errors": {}}
        for d in [99, "no-such-mic", "a"]:
            try:
                MicSource(device=d).close()
            except SourceError as e:
                res["errors"][str(d)] = str(e)
        m = MicSource(device="wavin")
        res["by_name"] = [m.device_index, m.device_name, m.input_rate]
        m.close()
        m.close()  # idempotent
        print(json.dumps(res))
        """,
    )
    names = [d[1] for d in info["devices"]]
    assert "wavin" in names and "default" in names
    assert all(len(d) == 4 and d[2] > 0 and d[3] > 0 for d in info["devices"])
    errors = info["errors"]
    assert errors["99"].startswith("--mic-device 99: no input device has that index; choose one of: ")
    assert "'wavin'" in errors["99"]
    assert errors["no-such-mic"].startswith("--mic-device 'no-such-mic': no input device has that name")
    assert "matches several input devices" in errors["a"] and "pass the index instead" in errors["a"]
    assert all("\n" not in e for e in errors.values())
    assert info["by_name"][1] == "wavin" and info["by_name"][2] == 44100  # the device's default rate


@needs_alsa
def test_mic_without_any_input_device(tmp_path):
    home = _alsa_home(tmp_path / "empty_home", None)
    info = _child(
        home,
        """
        import json
        from avatar_stream.engine.sources import MicSource, SourceError, list_devices
        devices = list_devices()
        try:
            MicSource().close()
            err = None
        except SourceError as e:
            err = str(e)
        print(json.dumps(dict(devices=devices, err=err)))
        """,
    )
    if info["devices"]:
        pytest.skip(f"this machine has real input devices: {info['devices']}")
    assert info["err"].startswith("no microphone found: ") and "--list-devices" in info["err"]


def test_mic_without_pyaudio_says_how_to_install(monkeypatch):
    from avatar_stream.engine.sources import MicSource

    monkeypatch.setitem(sys.modules, "pyaudio", None)  # what an environment without it looks like
    for make in (MicSource, list_devices):
        with pytest.raises(SourceError, match=r"pyaudio is not installed .*pip install 'avatar-stream\[mic\]'"):
            make()


def test_stdin_source_mixes_channels_and_keeps_the_raw_audio():
    left = (np.arange(2000) % 200 - 100).astype("<i2") * 100
    right = -left // 2
    data = np.stack([left, right], 1).astype("<i2").tobytes()
    src = StdinSource(_OddReads(data, [3, 7, 1001, 5000]), channels=2)
    src.keep_raw()
    got, raw = [], []
    for chunk in src:
        got.append(chunk)
        raw.append(src.take_raw())
    want = (left.astype(np.float32) + right.astype(np.float32)) / 2 / 32768.0
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-7)
    raw = np.concatenate(raw)
    assert raw.shape == (2000, 2) and src.raw_format == (16000, 2)
    np.testing.assert_array_equal(raw[:, 1], right.astype(np.float32) / 32768.0)
    with pytest.raises(SourceError, match="--stdin-channels"):
        StdinSource(_OddReads(b"", [1]), channels=0)


def test_stdin_rate_check_flags_a_live_writer_in_another_format():
    src = StdinSource(_OddReads(b"", [1]))
    assert src.check_rate(16000 * 3, 3.0) is None  # as declared
    assert src.check_rate(16000 * 300, 3.0) is None  # a file dumped into the pipe: says nothing
    assert src.check_rate(16000, 1.0) is None  # too early to tell
    msg = src.check_rate(88200 * 3, 3.0)  # 44.1 kHz stereo, live
    assert "5.5x" in msg and "--stdin-rate" in msg


def test_stdin_realtime_is_never_faster_than_the_audio():
    data = np.zeros(8000, "<i2").tobytes()  # 0.5 s
    src = StdinSource(_OddReads(data, [4000] * 5), realtime=True)
    t0 = time.monotonic()
    n = sum(len(c) for c in src)
    assert n == 8000 and time.monotonic() - t0 >= 0.45


def test_file_source_keeps_the_files_own_rate_and_channels(tmp_path):
    wav = tmp_path / "st.wav"
    subprocess.run(["sox", str(DEMO_SPEECH), "-r", "44100", "-c", "2", str(wav)], check=True)
    src = FileSource(wav, chunk_samples=333)
    src.keep_raw()
    assert src.raw_format == (44100, 2)
    raw = []
    total = 0
    for chunk in src:
        total += len(chunk)
        raw.append(src.take_raw())
    raw = np.concatenate(raw)
    assert raw.shape[1] == 2 and abs(len(raw) / 44100 - total / 16000) < 1e-3
