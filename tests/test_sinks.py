"""Sinks with real components: mp4 files written by PyAV and read back by PyAV and ffprobe,
real signals to real child processes, pyvirtualcam through its supported backend
registry, and a real PortAudio output stream into an ALSA ``file`` PCM."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from avatar_stream.engine.audio import load_audio, resample
from avatar_stream.engine.sinks import (
    AudioOutSink,
    Mp4Sink,
    MultiSink,
    Sink,
    SinkError,
    VirtualCamSink,
    WindowSink,
    _window_problem,
)
from avatar_stream.engine.timebase import SAMPLE_RATE, SAMPLES_PER_FRAME

try:
    import pyvirtualcam
except ImportError:  # the [webcam] extra; the tests that need it say so
    pyvirtualcam = None

REPO = Path(__file__).resolve().parents[1]
needs_pyvirtualcam = pytest.mark.skipif(pyvirtualcam is None, reason="pyvirtualcam (the [webcam] extra) is not installed")


def _frames(astronaut: np.ndarray, n: int, size: tuple[int, int] = (128, 128)) -> list[np.ndarray]:
    """n real-image frames (a crop sliding over the astronaut photo), RGB uint8."""
    w, h = size
    return [np.ascontiguousarray(astronaut[100 + k : 100 + k + h, 150 + 2 * k : 150 + 2 * k + w]) for k in range(n)]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def _write_clip(path: Path, frames, audio, **kw) -> Mp4Sink:
    """Write as the engine does: the audio of frame k arrives before frame k."""
    h, w = frames[0].shape[:2]
    with Mp4Sink(path, size=(w, h), **kw) as sink:
        for k, frame in enumerate(frames):
            sink.write_audio(audio[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME])
            sink.write(frame, k * SAMPLES_PER_FRAME)
    return sink


# ---------------------------------------------------------------- mp4


def test_mp4_has_both_streams_in_sync_from_zero(tmp_path, astronaut, speech_wav):
    frames = _frames(astronaut, 50)
    audio = load_audio(speech_wav)[: 2 * SAMPLE_RATE]
    sink = _write_clip(tmp_path / "out.mp4", frames, audio)
    assert sink.frames_written == 50 and sink.audio_samples_written == 2 * SAMPLE_RATE
    with av.open(str(tmp_path / "out.mp4")) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, v.codec_context.pix_fmt, a.codec_context.name) == ("h264", "yuv420p", "aac")
        assert a.rate == SAMPLE_RATE and a.codec_context.layout.name == "mono"
        frame_s = 1 / 25
        assert abs(float(v.duration * v.time_base) - 2.0) <= frame_s
        assert abs(float(a.duration * a.time_base) - 2.0) <= frame_s
        assert v.start_time == 0 and a.start_time == 0
    with av.open(str(tmp_path / "out.mp4")) as c:
        decoded = [(f.pts, f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    assert decoded[0][0] == 0 and decoded[0][1] == 0.0
    assert [round(t * 25) for _, t, _ in decoded] == list(range(50))
    assert min(_psnr(img, ref) for (_, _, img), ref in zip(decoded, frames, strict=True)) > 30
    with av.open(str(tmp_path / "out.mp4")) as c:
        afr = list(c.decode(audio=0))
        got = np.concatenate([f.to_ndarray().reshape(-1) for f in afr])
    assert afr[0].pts == 0
    # Audio offset 0: the decoded track lines up with the input sample for sample
    # (AAC priming is trimmed by the edit list), shown by the cross-correlation peak.
    ref = audio[4000:28000]
    lags = np.arange(-300, 301)
    corr = [float(np.dot(got[4000 + lag : 28000 + lag], ref)) for lag in lags]
    assert lags[int(np.argmax(corr))] == 0
    assert np.corrcoef(got[4000:28000], ref)[0, 1] > 0.95


def test_mp4_odd_size_is_padded_and_said(tmp_path, astronaut, caplog):
    frames = _frames(astronaut, 5, size=(113, 111))
    with caplog.at_level("WARNING"):
        _write_clip(tmp_path / "odd.mp4", frames, np.zeros(5 * SAMPLES_PER_FRAME, np.float32))
    assert "113x111 has an odd side" in caplog.text and "padding to 114x112" in caplog.text
    with av.open(str(tmp_path / "odd.mp4")) as c:
        img = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert img.shape == (112, 114, 3)
    assert _psnr(img[:111, :113], frames[0]) > 30


def test_mp4_audio_rate_and_video_only(tmp_path, astronaut, speech_wav):
    frames = _frames(astronaut, 25)
    audio = load_audio(speech_wav)[:SAMPLE_RATE]
    sink = _write_clip(tmp_path / "48k.mp4", frames, audio, audio_sample_rate=48000)
    assert sink.audio_samples_written == 48000  # the resampler's tail is flushed on close
    with av.open(str(tmp_path / "48k.mp4")) as c:
        a = c.streams.audio[0]
        assert a.rate == 48000 and abs(float(a.duration * a.time_base) - 1.0) <= 0.04
    _write_clip(tmp_path / "video_only.mp4", frames, audio, audio_sample_rate=None)
    with av.open(str(tmp_path / "video_only.mp4")) as c:
        assert len(c.streams.audio) == 0 and len(c.streams.video) == 1


def test_mp4_open_errors(tmp_path):
    with pytest.raises(SinkError, match=r"^cannot write .*no_such_dir/x\.mp4: No such file or directory"):
        Mp4Sink(tmp_path / "no_such_dir" / "x.mp4", size=(64, 64))
    with pytest.raises(SinkError, match=r"^cannot write .*: Is a directory"):
        Mp4Sink(tmp_path, size=(64, 64))
    with pytest.raises(SinkError, match="mp4 fps must be a positive integer"):
        Mp4Sink(tmp_path / "x.mp4", fps=0, size=(64, 64))


def test_frame_validation_messages(tmp_path):
    sink = Mp4Sink(tmp_path / "v.mp4", size=(64, 48))
    good = np.zeros((48, 64, 3), np.uint8)
    cases = [
        (good.astype(np.float32), 0, r"frame dtype is float32, expected uint8 RGB"),
        (np.zeros((48, 64), np.uint8), 0, r"frame shape is \(48, 64\), expected \(height, width, 3\)"),
        (np.zeros((48, 64, 4), np.uint8), 0, r"frame shape is \(48, 64, 4\), expected \(height, width, 3\) RGB"),
        (np.zeros((50, 64, 3), np.uint8), 0, r"frame is 64x50 but this sink was opened for 64x48"),
        (good.tolist(), 0, r"frame must be a numpy array, got list"),
        (good, 0.5, r"pts_samples must be an integer sample count"),
        (good, -640, r"pts_samples must be >= 0 and increase"),
    ]
    for frame, pts, msg in cases:
        with pytest.raises(SinkError, match="^mp4: " + msg):
            sink.write(frame, pts)
    sink.write(good, 0)
    with pytest.raises(SinkError, match=r"must be >= 0 and increase, got 0 after 0"):
        sink.write(good, 0)
    with pytest.raises(ValueError, match=r"expected mono samples"):
        sink.write_audio(np.zeros((10, 2), np.float32))
    assert sink.frames_written == 1
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(SinkError, match="write after close"):
        sink.write(good, 640)


def test_mp4_frames_closer_than_one_output_frame_are_refused(tmp_path):
    with Mp4Sink(tmp_path / "10fps.mp4", fps=10, size=(32, 32)) as sink:
        sink.write(np.zeros((32, 32, 3), np.uint8), 0)
        with pytest.raises(SinkError, match=r"falls on mp4 frame 0, already written"):
            sink.write(np.zeros((32, 32, 3), np.uint8), SAMPLES_PER_FRAME)
        sink.write(np.zeros((32, 32, 3), np.uint8), 4 * SAMPLES_PER_FRAME)  # 0.16 s -> frame 2
    with av.open(str(tmp_path / "10fps.mp4")) as c:
        assert [round(f.time * 10) for f in c.decode(video=0)] == [0, 2]


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
def test_close_requested_by_a_signal_handler_during_write_waits_for_the_write(tmp_path, astronaut):
    """A real signal arrives while write() is running; its handler calls close(), which must
    be deferred until the frame is fully muxed, then run exactly once."""
    frames = _frames(astronaut, 10)

    class SignalledMp4(Mp4Sink):
        closes = 0

        def _write_frame(self, frame, pts):
            if self.frames_written == 6:
                os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs right here
                assert not self.closed
            super()._write_frame(frame, pts)

        def _close(self):
            SignalledMp4.closes += 1
            super()._close()

    sink = SignalledMp4(tmp_path / "sig.mp4", size=(128, 128))
    old = signal.signal(signal.SIGUSR1, lambda *_: sink.close())
    try:
        for k, frame in enumerate(frames):
            if sink.closed:
                break
            sink.write(frame, k * SAMPLES_PER_FRAME)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert sink.closed and sink.frames_written == 7 and SignalledMp4.closes == 1
    sink.close()
    assert SignalledMp4.closes == 1
    with av.open(str(tmp_path / "sig.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 7


# ---------------------------------------------------------------- mp4 + process signals

_WRITER = """
import json, signal, sys
import numpy as np
from avatar_stream.engine.sinks import Mp4Sink
path, mode = sys.argv[1], sys.argv[2]
sink = Mp4Sink(path, size=(160, 120))
if mode == "term":  # what the CLI does: its handler closes the sinks, then exits
    def on_term(signum, frame):
        sink.close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
yy, xx = np.mgrid[0:120, 0:160]
t = np.arange(640)
try:
    with sink:
        k = 0
        while True:
            sink.write_audio((0.2 * np.sin(2 * np.pi * 220 * (t + 640 * k) / 16000)).astype(np.float32))
            frame = np.stack([(xx + 3 * k) % 256, (yy + k) % 256, (xx + yy) % 256], -1).astype(np.uint8)
            sink.write(frame, 640 * k)
            k += 1
            if k == 25:
                print("ready", flush=True)
finally:
    print(json.dumps({"frames": sink.frames_written, "audio": sink.audio_samples_written}), flush=True)
"""


def _top_level_boxes(path: Path) -> list[str]:
    data = path.read_bytes()
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        boxes.append(data[pos + 4 : pos + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        if size < 8:
            break
        pos += size
    return boxes


def _interrupt_writer(tmp_path: Path, sig: int, mode: str) -> tuple[Path, int, str, str]:
    path = tmp_path / f"{mode}.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # see test_cli's SIGINT test
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    time.sleep(0.3)  # mid-stream
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return path, proc.returncode, out, err


def _ffprobe(path: Path) -> dict:
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_packets", "-show_entries",
         "stream=codec_type,nb_read_packets,start_time,duration", "-of", "json", str(path)],
        capture_output=True, text=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stderr == ""
    decode = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True, text=True)
    assert decode.returncode == 0 and decode.stderr == "", decode.stderr
    return {s["codec_type"]: s for s in json.loads(probe.stdout)["streams"]}


needs_ffprobe = pytest.mark.skipif(
    shutil.which("ffprobe") is None or os.name == "nt", reason="needs ffprobe (ffmpeg) and POSIX signals"
)


@needs_ffprobe
@pytest.mark.parametrize("sig,mode", [(signal.SIGINT, "int"), (signal.SIGTERM, "term")])
def test_mp4_interrupted_mid_stream_is_finalised_and_playable(tmp_path, sig, mode):
    path, rc, out, err = _interrupt_writer(tmp_path, sig, mode)
    if mode == "term":
        assert rc == 0, err
    else:
        assert rc != 0 and "KeyboardInterrupt" in err
    written = json.loads(out.strip().splitlines()[-1])
    assert written["frames"] > 25
    assert "moov" in _top_level_boxes(path)
    streams = _ffprobe(path)
    assert int(streams["video"]["nb_read_packets"]) == written["frames"]
    assert float(streams["video"]["start_time"]) == 0 and float(streams["audio"]["start_time"]) == 0
    assert abs(float(streams["audio"]["duration"]) - written["audio"] / SAMPLE_RATE) < 0.001


@needs_ffprobe
def test_a_killed_writer_leaves_no_playable_file(tmp_path):
    """Control for the test above: without finalisation there is no moov atom and ffprobe
    refuses the file, so that test's checks can fail."""
    path, rc, _, _ = _interrupt_writer(tmp_path, signal.SIGKILL, "kill")
    assert rc == -signal.SIGKILL
    assert "moov" not in _top_level_boxes(path)
    probe = subprocess.run(["ffprobe", "-v", "error", str(path)], capture_output=True, text=True)
    assert probe.returncode != 0 and "moov atom not found" in probe.stderr


# ---------------------------------------------------------------- virtual camera

class RecordingBackend:
    """A pyvirtualcam backend (the library's extension point) that keeps what it is sent."""

    instances: list[RecordingBackend] = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.args = dict(width=width, height=height, fps=fps, fourcc=fourcc, device=device)
        self.frames: list[np.ndarray] = []
        self.closes = 0
        RecordingBackend.instances.append(self)

    def send(self, frame):
        self.frames.append(frame.copy())

    def close(self):
        self.closes += 1

    def device(self):
        return self.args["device"] or "recorder0"

    def native_fourcc(self):
        return None


@pytest.fixture
def recording_cam():
    pyvirtualcam.register_backend("avatar-test-recorder", RecordingBackend)
    RecordingBackend.instances.clear()
    yield "avatar-test-recorder"
    pyvirtualcam.camera.BACKENDS.pop("avatar-test-recorder", None)


@needs_pyvirtualcam
def test_virtual_cam_sends_rgb_frames_and_closes_once(recording_cam, astronaut):
    frames = _frames(astronaut, 4, size=(96, 64))
    with VirtualCamSink(96, 64, 25, backend=recording_cam) as cam:
        assert cam.backend == recording_cam and cam.device == "recorder0"
        for k, f in enumerate(frames):
            cam.write(f, k * SAMPLES_PER_FRAME)
        with pytest.raises(SinkError, match=r"^virtual camera: frame is 128x128 but this sink was opened for 96x64"):
            cam.write(_frames(astronaut, 1)[0], 10 * SAMPLES_PER_FRAME)
        cam.close()
    (backend,) = RecordingBackend.instances
    assert backend.args["width"] == 96 and backend.args["height"] == 64 and backend.args["fps"] == 25
    assert backend.args["fourcc"] == pyvirtualcam.util.encode_fourcc(pyvirtualcam.PixelFormat.RGB.value)
    assert cam.frames_written == 4 and backend.closes == 1
    for sent, f in zip(backend.frames, frames, strict=True):
        np.testing.assert_array_equal(sent.reshape(64, 96, 3), f)


@needs_pyvirtualcam
def test_virtual_cam_errors(recording_cam, monkeypatch):
    with pytest.raises(SinkError, match=r"^unknown virtual camera backend 'nope'; available here: .*avatar-test-recorder"):
        VirtualCamSink(64, 64, 25, backend="nope")
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    with pytest.raises(SinkError, match=r"pyvirtualcam is not installed .*pip install 'avatar-stream\[webcam\]'"):
        VirtualCamSink(64, 64, 25)


@needs_pyvirtualcam
@pytest.mark.skipif(platform.system() != "Linux", reason="the v4l2loopback backend is Linux only")
def test_virtual_cam_without_v4l2loopback_says_how_to_set_it_up():
    if list(Path("/dev").glob("video*")):
        pytest.skip("this machine has video devices; the missing-device path cannot be reached")
    with pytest.raises(SinkError) as e:
        VirtualCamSink(64, 64, 25, backend="v4l2loopback")
    msg = str(e.value)
    assert msg.startswith("no virtual camera available (") and "\n" not in msg
    assert "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=avatar-stream" in msg
    assert "docs/virtual-camera.md" in msg and (REPO / "docs" / "virtual-camera.md").is_file()


# ---------------------------------------------------------------- window


def test_window_error_without_a_gui_build():
    import cv2

    if "GUI:                           NONE" not in cv2.getBuildInformation():
        pytest.skip("this OpenCV build has a GUI")
    with pytest.raises(SinkError) as e:
        WindowSink("preview")
    msg = str(e.value)
    assert msg.startswith("--window needs a desktop session and the opencv-python (GUI) build: ")
    assert "no GUI (opencv-python-headless)" in msg and "pip install opencv-python" in msg and "\n" not in msg


@pytest.mark.skipif(platform.system() != "Linux", reason="DISPLAY is how Linux desktops are found")
def test_window_error_without_a_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(SinkError, match=r"^--window needs a desktop session.*no DISPLAY or WAYLAND_DISPLAY"):
        WindowSink("preview")
    monkeypatch.setenv("DISPLAY", ":0")
    assert "DISPLAY" not in (_window_problem() or "")


# ---------------------------------------------------------------- audio out (real PortAudio)


def _alsa_out_home(home: Path, names: list[str]) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        f'pcm.{n} {{ type plug slave.pcm {{ type file slave.pcm "null" file "{home / (n + ".raw")}" format "raw" }} }}'
        for n in names
    ]
    (home / ".asoundrc").write_text("\n".join(lines) + "\n")
    return home


_PLAYER = """
import json, sys
import numpy as np
from avatar_stream.engine.sinks import AudioOutSink
x = np.load(sys.argv[1])
res = {}
for name, delay, rate in json.loads(sys.argv[2]):
    with AudioOutSink(device=name, delay_samples=delay, frames_per_buffer=256, sample_rate=rate) as s:
        s.write_audio(x)
    res[name] = dict(rate=s.output_rate, dropped=s.dropped_samples, latency=s.output_latency_samples)
print(json.dumps(res))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="ALSA file-PCM trick is Linux only")
def test_audio_out_is_delayed_by_exactly_delay_samples(tmp_path, speech_wav):
    pytest.importorskip("pyaudio", reason="pyaudio is the [mic] extra")
    x16 = np.clip(np.round(load_audio(speech_wav) * 32768), -32768, 32767).astype(np.int16)
    x = x16.astype(np.float32) / 32768.0
    np.save(tmp_path / "x.npy", x)
    plan = [("outa", 0, None), ("outb", 7000, None), ("outc", 7000, 48000)]
    home = _alsa_out_home(tmp_path / "home", [n for n, _, _ in plan])
    proc = subprocess.run(
        [sys.executable, "-c", _PLAYER, str(tmp_path / "x.npy"), json.dumps(plan)],
        env=dict(os.environ, HOME=str(home)), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["outa"]["rate"] == info["outb"]["rate"] == 16000 and info["outc"]["rate"] == 48000
    assert all(v["dropped"] == 0 for v in info.values())

    def onset(y: np.ndarray, ref: np.ndarray) -> int:
        """Where ``ref`` sits in ``y``, checking that it is all there, sample-exact, after silence."""
        o = int(np.flatnonzero(y)[0]) - int(np.flatnonzero(ref)[0])
        assert o >= 0 and not y[:o].any()
        np.testing.assert_array_equal(y[o : o + len(ref)], ref)
        return o

    a, b = (np.fromfile(home / f"{n}.raw", dtype="<i2") for n in ("outa", "outb"))
    # PortAudio primes the ALSA buffer with silence when a stream starts (a device
    # latency, identical for both streams); the delay itself is exact to the sample.
    prime = onset(a, x16)
    assert prime % 256 == 0 and prime <= 4 * 256
    assert onset(b, x16) - prime == 7000
    # 48 kHz device: the zeros go through the resampler with the audio, so the delay is
    # exact in time; the device stream is StreamResampler(16 k -> 48 k) of zeros + audio.
    c = np.fromfile(home / "outc.raw", dtype="<i2")
    expected = np.clip(np.round(resample(np.concatenate([np.zeros(7000, np.float32), x]), SAMPLE_RATE, 48000) * 32768),
                       -32768, 32767).astype(np.int16)
    start = onset(c, expected)
    assert start % 256 == 0 and start <= 4 * 256


def test_audio_out_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyaudio", None)
    with pytest.raises(SinkError, match=r"pyaudio is not installed .*pip install 'avatar-stream\[mic\]'"):
        AudioOutSink()
    with pytest.raises(SinkError, match=r"delay_samples must be an integer >= 0, got -1"):
        AudioOutSink(delay_samples=-1)


# ---------------------------------------------------------------- fan-out


class _FailingClose(Sink):
    name = "failing"

    def _write_frame(self, frame, pts):
        pass

    def _close(self):
        raise OSError("disk full")


@needs_pyvirtualcam
def test_multisink_fans_out_and_closes_everything(tmp_path, recording_cam, astronaut, speech_wav):
    frames = _frames(astronaut, 10)
    audio = load_audio(speech_wav)[: 10 * SAMPLES_PER_FRAME]
    mp4 = Mp4Sink(tmp_path / "multi.mp4", size=(128, 128))
    cam = VirtualCamSink(128, 128, 25, backend=recording_cam)
    with MultiSink([mp4, cam]) as multi:
        for k, f in enumerate(frames):
            multi.write_audio(audio[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME])
            multi.write(f, k * SAMPLES_PER_FRAME)
    assert mp4.closed and cam.closed and RecordingBackend.instances[0].closes == 1
    assert multi.frames_written == mp4.frames_written == cam.frames_written == 10
    assert mp4.audio_samples_written == len(audio)
    with av.open(str(tmp_path / "multi.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 10

    failing, mp4b = _FailingClose(), Mp4Sink(tmp_path / "multi2.mp4", size=(128, 128))
    multi = MultiSink([failing, mp4b])
    multi.write(frames[0], 0)
    with pytest.raises(OSError, match="disk full"):
        multi.close()
    assert mp4b.closed and "moov" in _top_level_boxes(tmp_path / "multi2.mp4")
