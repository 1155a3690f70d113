"""A real PortAudio microphone (pyaudio reading a speech file through an ALSA file PCM, see
../shared/ENVIRONMENT.md) drives the engine: its frames equal those of the file source."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from avatar_stream import DEMO_FACE
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.face import read_image
from avatar_stream.engine.stream import Engine, render_offline

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the ALSA file-PCM trick is Linux only")

_CHILD = """
    import json
    import numpy as np
    from avatar_stream import DEMO_FACE
    from avatar_stream.engine.face import read_image
    from avatar_stream.engine.session import SessionOptions, limit_samples, run_session
    from avatar_stream.engine.sources import MicSource
    from avatar_stream.engine.stream import Engine

    engine = Engine({model!r}, backend="cpu")
    stream = engine.create_stream(read_image(DEMO_FACE), crop_only=True)

    class Keep:
        def __init__(self):
            self.crops, self.pts = [], []
        def write(self, image, pts):
            self.crops.append(image)
            self.pts.append(pts)

    sink = Keep()
    # The ALSA file PCM is not a real-time device: it runs as fast as it can, and when its
    # reader falls behind it hands out silence instead of the file (measured: ~0.5 s of zeros
    # in about half the runs when the engine ran inside the capture loop). So the chunks are
    # captured first, exactly as the device delivered them (sizes and order kept), and then
    # drive the session. On a real microphone capture and compute overlap (engine/session.py).
    heard = []
    with MicSource(sample_rate={rate}, max_buffer_seconds=600.0, frames_per_buffer=1000) as mic:
        n = 0
        for chunk in mic:
            heard.append(chunk)
            n += len(chunk)
            if n >= {want}:
                break
        device = mic.device_name
        overflows, underflows = mic.input_overflows, mic.input_underflows
    report = run_session(stream, limit_samples(heard, {want}), [sink], (), SessionOptions(live=False))
    np.save({out!r}, np.stack(sink.crops))
    np.save({out!r} + ".audio.npy", np.concatenate(heard)[:{want}])
    print(json.dumps(dict(frames=report.frames, dropped=report.dropped, pts=sink.pts, device=device,
                          overflows=overflows, underflows=underflows)))
"""


@pytest.mark.parametrize("rate", [16000, 48000])
def test_microphone_frames_equal_file_frames(speech_wav, tiny_model_dir, tmp_path, alsa_home, rate):
    pytest.importorskip("pyaudio", reason="pyaudio is the [mic] extra")
    from avatar_stream.engine.audio import StreamResampler, resample

    speech = load_audio(speech_wav)
    pcm = (np.clip(speech, -1, 1) * 32767).round().astype("<i2")
    device_pcm = pcm if rate == 16000 else (
        np.clip(resample(pcm.astype(np.float32) / 32768, tb.SAMPLE_RATE, rate), -1, 1) * 32767).round().astype("<i2")
    raw = tmp_path / "mic.raw"
    device_pcm.tofile(raw)
    home = alsa_home(raw)
    # 16 kHz samples whose value is fully determined by the file (the resampler's lookahead
    # at 48 kHz needs samples past the cut; stay inside the file).
    want = (len(pcm) // tb.SAMPLES_PER_FRAME - 2) * tb.SAMPLES_PER_FRAME
    out = tmp_path / "mic_crops.npy"
    code = _CHILD.format(model=str(tiny_model_dir), rate=rate, want=want, out=str(out))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, HOME=str(home)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    mic_crops = np.load(out)

    # The same samples through the file path: what the microphone delivered, exactly.
    x = device_pcm.astype(np.float32) / 32768.0
    if rate != tb.SAMPLE_RATE:
        r = StreamResampler(rate)
        x = np.concatenate([r.process(x), r.flush()])
    assert info["overflows"] == info["underflows"] == 0
    heard = np.load(str(out) + ".audio.npy")
    assert len(heard) == want
    np.testing.assert_array_equal(heard, x[:want])  # the microphone delivered the file exactly
    engine = Engine(tiny_model_dir, backend="cpu")
    ref = render_offline(engine, engine.prepare_face(read_image(DEMO_FACE)), x[:want], crop_only=True)
    assert info["dropped"] == 0 and info["frames"] == len(ref) == want // tb.SAMPLES_PER_FRAME
    assert info["pts"] == [k * tb.SAMPLES_PER_FRAME for k in range(len(ref))]
    diff = int(np.abs(mic_crops.astype(np.int16) - np.stack([f.crop for f in ref]).astype(np.int16)).max())
    print(f"{rate} Hz microphone ({info['device']}): {len(ref)} frames, max abs diff vs file source {diff}")
    assert diff == 0


@pytest.mark.parametrize("with_device", [True, False])
def test_list_devices(tmp_path, alsa_home, with_device):
    """`avatar-stream --list-devices` lists PortAudio's input devices (the ALSA file PCM as
    the default device), or says there are none."""
    pytest.importorskip("pyaudio", reason="pyaudio is the [mic] extra")
    raw = None
    if with_device:
        raw = tmp_path / "x.raw"
        np.zeros(16000, "<i2").tofile(raw)
    home = alsa_home(raw)
    r = subprocess.run([sys.executable, "-m", "avatar_stream.engine.cli", "--list-devices"],
                       env=dict(os.environ, HOME=str(home)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if with_device:
        assert "default" in r.stdout and "inputs:" in r.stdout
    elif "inputs:" in r.stdout:
        pytest.skip("this machine has real audio input devices")
    else:
        assert "no audio input devices found" in r.stdout
