"""``avatar-stream`` end to end: an mp4 with both streams in sync, Ctrl-C leaves a playable
file, and every bad input gives one clear line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from avatar_stream import DEMO_FACE, DEMO_SPEECH
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_mp4_has_both_streams_in_sync(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "talk.mp4"
    report = tmp_path / "report.json"
    code, err = run_cli(capsys, "--face", DEMO_FACE, "--audio", DEMO_SPEECH, "--out", out,
                        "--model", tiny_model_dir, "--backend", "cpu", "--report-json", report)
    assert code == 0, err
    assert "backend: cpu" in err and "algorithmic latency: 447.5 ms" in err
    rep = json.loads(report.read_text())
    n = rep["frames"]
    audio_s = rep["audio_seconds"]
    assert n == tb.num_frames(round(audio_s * tb.SAMPLE_RATE)) and rep["dropped"] == 0
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert (v.width, v.height) == (512, 512)  # the full photo, not the crop
        assert v.start_time * v.time_base == 0 and a.start_time * a.time_base == 0  # audio offset 0
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == n
    with av.open(str(out)) as c:
        rate = c.streams.audio[0].sample_rate
        samples = sum(f.samples for f in c.decode(audio=0))
    assert abs(samples / rate - audio_s) < 0.05


def test_size_and_crop_only(capsys, tiny_model_dir, tmp_path):
    for extra, size in ((["--size", "320x240"], (320, 240)), (["--crop-only"], (112, 112))):
        out = tmp_path / f"{size[0]}.mp4"
        code, err = run_cli(capsys, "--face", DEMO_FACE, "--audio", DEMO_SPEECH, "--out", out,
                            "--model", tiny_model_dir, "--backend", "cpu", *extra)
        assert code == 0, err
        with av.open(str(out)) as c:
            v = c.streams.video[0]
            assert (v.width, v.height) == size


def _wait_until_streaming(proc) -> None:
    """Block until the CLI printed its start-up lines (model loaded, session starting)."""
    for line in proc.stderr:
        if "algorithmic latency" in line:
            break
    time.sleep(1.5)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe (ffmpeg) not installed")
def test_sigint_mid_stream_leaves_playable_mp4(tiny_model_dir, tmp_path):
    out = tmp_path / "interrupted.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatar_stream.engine.cli", "--face", str(DEMO_FACE), "--audio",
         str(DEMO_SPEECH), "--realtime", "--out", str(out), "--model", str(tiny_model_dir),
         "--backend", "cpu"],
        stderr=subprocess.PIPE, text=True,
        # A test run started in the background (`make test &`) passes SIGINT on ignored, and
        # Python then never raises KeyboardInterrupt: give the child the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_until_streaming(proc)  # the realtime file takes 5 s; interrupt 1.5 s in
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,nb_read_frames",
                            "-count_frames", "-of", "json", str(out)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    streams = {s["codec_type"]: int(s["nb_read_frames"]) for s in json.loads(probe.stdout)["streams"]}
    # Frames rendered before the signal survive (how many depends on the machine's load: a busy
    # CPU drops frames in live mode); a file cut off unfinalised would not decode at all.
    assert streams["video"] > 0 and "audio" in streams
    assert "frames" in err  # the end-of-run report was printed


def test_sigterm_also_finalises(tiny_model_dir, tmp_path):
    out = tmp_path / "terminated.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatar_stream.engine.cli", "--audio", str(DEMO_SPEECH), "--realtime",
         "--out", str(out), "--model", str(tiny_model_dir), "--backend", "cpu"],
        stderr=subprocess.PIPE, text=True,
    )
    _wait_until_streaming(proc)
    proc.terminate()
    proc.communicate(timeout=60)
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) > 0  # finalised: decodable, with what was rendered


# -- bad inputs: one line, non-zero exit ----------------------------------------------------

@pytest.fixture
def blank_jpg(tmp_path) -> Path:
    import cv2

    p = tmp_path / "wall.jpg"
    cv2.imwrite(str(p), np.full((300, 300, 3), 180, np.uint8))
    return p


def test_error_no_face(capsys, tiny_model_dir, blank_jpg, tmp_path):
    code, err = run_cli(capsys, "--face", blank_jpg, "--out", tmp_path / "x.mp4", "--model", tiny_model_dir)
    assert code == 2 and "no face" in error_line(err)


def test_error_unreadable_image(capsys, tiny_model_dir, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))  # fixed garbage, not a new draw per run
    code, err = run_cli(capsys, "--face", bad, "--out", tmp_path / "x.mp4", "--model", tiny_model_dir)
    assert code == 2 and "broken.jpg" in error_line(err)


def test_error_missing_model(capsys, tmp_path):
    code, err = run_cli(capsys, "--out", tmp_path / "x.mp4", "--model", tmp_path / "nowhere")
    line = error_line(err)
    assert code == 2 and "does not exist" in line and "avatar-export" in line


def test_error_foreign_model(capsys, tiny_model_dir, tmp_path):
    """A graph whose card says another sample rate (exported by another version)."""
    import onnx

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_model_dir, foreign)
    m = onnx.load(str(foreign / "audio.onnx"))
    for p in m.metadata_props:
        if p.key == "avatar_stream.card":
            card = json.loads(p.value)
            card["sample_rate"] = 22050
            p.value = json.dumps(card)
    onnx.save(m, str(foreign / "audio.onnx"))
    code, err = run_cli(capsys, "--out", tmp_path / "x.mp4", "--model", foreign)
    line = error_line(err)
    assert code == 2 and "sample_rate" in line and "22050" in line


def test_error_no_microphone(tiny_model_dir, tmp_path):
    """No sound card here: PortAudio finds no input device (HOME without an .asoundrc)."""
    pytest.importorskip("pyaudio")
    env = dict(os.environ, HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "avatar_stream.engine.cli", "--mic", "--out",
                        str(tmp_path / "x.mp4"), "--model", str(tiny_model_dir), "--backend", "cpu"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert "microphone" in line and "--list-devices" in line


def test_error_unwritable_output(capsys, tiny_model_dir, tmp_path):
    code, err = run_cli(capsys, "--out", tmp_path / "no" / "such" / "dir" / "x.mp4", "--model",
                        tiny_model_dir, "--backend", "cpu")
    assert code == 2 and "cannot write" in error_line(err)


def test_error_tensorrt_without_tensorrt(capsys, tiny_model_dir, tmp_path):
    from avatar_stream.engine.runners import available_backends

    if "trt" in available_backends() or "tensorrt" in available_backends():
        pytest.skip("TensorRT is available here")
    code, err = run_cli(capsys, "--out", tmp_path / "x.mp4", "--model", tiny_model_dir,
                        "--backend", "tensorrt")
    line = error_line(err)
    assert code == 2 and "--backend tensorrt needs" in line and "--backend cpu" in line


def test_error_file_without_audio(capsys, tiny_model_dir, tmp_path):
    code, err = run_cli(capsys, "--audio", DEMO_FACE, "--out", tmp_path / "x.mp4", "--model",
                        tiny_model_dir, "--backend", "cpu")
    assert code == 2 and "audio" in error_line(err)


def test_error_no_output(capsys, tiny_model_dir):
    code, err = run_cli(capsys, "--model", tiny_model_dir)
    assert code == 2 and "--out" in error_line(err)


def test_error_bad_size(capsys, tiny_model_dir, tmp_path):
    code, err = run_cli(capsys, "--out", tmp_path / "x.mp4", "--model", tiny_model_dir, "--size", "big")
    assert code == 2 and "WIDTHxHEIGHT" in error_line(err)


def test_duration_limits_any_source(capsys, tiny_model_dir, tmp_path):
    report = tmp_path / "r.json"
    code, err = run_cli(capsys, "--audio", DEMO_SPEECH, "--duration", "1.5", "--out", tmp_path / "d.mp4",
                        "--model", tiny_model_dir, "--backend", "cpu", "--crop-only", "--report-json", report)
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["audio_seconds"] == 1.5 and rep["frames"] == 37
    code, err = run_cli(capsys, "--audio", DEMO_SPEECH, "--duration", "0", "--out", tmp_path / "e.mp4",
                        "--model", tiny_model_dir)
    assert code == 2 and "--duration" in error_line(err)


def test_error_infinite_duration_is_one_line(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "inf.mp4"
    code, err = run_cli(capsys, "--audio", DEMO_SPEECH, "--duration", "inf", "--out", out,
                        "--model", tiny_model_dir, "--backend", "cpu")
    assert code == 2 and "--duration" in error_line(err)
    assert not out.exists()  # a usage error writes no output file


def test_error_max_backlog_below_one(capsys, tiny_model_dir, tmp_path):
    """--max-backlog 0 would drop every live frame: refused up front."""
    code, err = run_cli(capsys, "--audio", DEMO_SPEECH, "--realtime", "--max-backlog", "0", "--out",
                        tmp_path / "b.mp4", "--model", tiny_model_dir, "--backend", "cpu")
    assert code == 2 and "--max-backlog" in error_line(err)


def test_main_restores_sigterm_handler(capsys, tmp_path):
    def mine(signum, frame):  # noqa: ARG001
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        code, _ = run_cli(capsys, "--out", tmp_path / "x.mp4", "--model", tmp_path / "nowhere")
        assert code == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)


class _Stdin:
    def __init__(self, data: bytes):
        import io

        self.buffer = io.BytesIO(data)


def test_mp4_carries_the_inputs_own_rate_and_channels(capsys, tiny_model_dir, tmp_path):
    wav = tmp_path / "st44.wav"
    subprocess.run(["sox", str(DEMO_SPEECH), "-r", "44100", "-c", "2", str(wav)], check=True)
    out = tmp_path / "st.mp4"
    code, err = run_cli(capsys, "--face", DEMO_FACE, "--audio", wav, "--out", out, "--model", tiny_model_dir,
                        "--backend", "cpu", "--still")
    assert code == 0, err
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert (a.sample_rate, a.channels) == (44100, 2)
        samples = sum(f.samples for f in c.decode(audio=0))
    with av.open(str(out)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert abs(samples / 44100 - frames / tb.FPS) < 0.1


def test_stdin_empty_is_an_error_and_leaves_no_file(capsys, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Stdin(b""))
    out = tmp_path / "empty.mp4"
    code, err = run_cli(capsys, "--stdin", "--out", out, "--model", tiny_model_dir, "--backend", "cpu")
    assert code == 2 and "stdin delivered no audio" in error_line(err)
    assert not out.exists()


def test_stdin_stereo_declared_realtime_and_its_format_said(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from avatar_stream.engine.audio import load_audio

    x = load_audio(DEMO_SPEECH)[: tb.SAMPLE_RATE]
    pcm = (np.stack([x, 0.5 * x], 1) * 32767).astype("<i2").tobytes()
    monkeypatch.setattr(sys, "stdin", _Stdin(pcm))
    out = tmp_path / "stdin.mp4"
    t0 = time.monotonic()
    code, err = run_cli(capsys, "--stdin", "--stdin-channels", "2", "--realtime", "--out", out,
                        "--model", tiny_model_dir, "--backend", "cpu", "--still")
    assert code == 0, err
    assert time.monotonic() - t0 >= 0.9  # paced: one second of audio takes a second at least
    assert "2 channel(s), 16000 Hz" in err and "paced to the wall clock" in err
    with av.open(str(out)) as c:
        assert c.streams.audio[0].channels == 2


def test_a_big_photo_is_framed_once_to_the_output(capsys, tiny_model_dir, tmp_path):
    import cv2

    big = tmp_path / "big.jpg"
    photo = cv2.imread(str(DEMO_FACE))
    cv2.imwrite(str(big), cv2.resize(photo, (2000, 2000), interpolation=cv2.INTER_CUBIC))
    for extra, size in (([], (1280, 1280)), (["--size", "640x360"], (640, 360)),
                        (["--size", "640x360", "--fit", "letterbox"], (640, 360))):
        out = tmp_path / f"big{len(extra)}.mp4"
        code, err = run_cli(capsys, "--face", big, "--audio", DEMO_SPEECH, "--duration", "0.5", "--out", out,
                            "--model", tiny_model_dir, "--backend", "cpu", *extra)
        assert code == 0, err
        assert f"photo 2000x2000 -> output {size[0]}x{size[1]}" in err
        with av.open(str(out)) as c:
            frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
        assert frame.shape[:2] == (size[1], size[0])
        if "letterbox" in extra:  # the whole photo, black bars left and right
            assert frame[:, :100].max() < 20 and frame[:, 200:440].mean() > 40
