"""avatar-stream: a real-time streaming talking head (TCSAN + Audio2AU).

The public API, importable from here::

    from avatar_stream import Engine, read_image, load_audio, Mp4Sink

    engine = Engine()                               # the starter model, best backend
    stream = engine.create_stream(read_image("me.jpg"))
    stream.accept_waveform(load_audio("talk.wav"))  # or pushed chunk by chunk, any rate
    while stream.is_ready():
        frame = stream.step()                       # frame.image: RGB uint8

``LiveAvatar`` is the always-on session for live callers (a browser, a voice agent). Names
are loaded on first use, so ``import avatar_stream`` stays cheap. Sub-packages:
``avatar_stream.engine`` (the runtime: numpy + onnxruntime, never torch),
``avatar_stream.export`` (torch -> ONNX / TensorRT), ``avatar_stream.training`` (models,
data, stages), ``avatar_stream.integrations`` (LiveKit Agents, Pipecat).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from avatar_stream.errors import AvatarError as AvatarError  # re-exported

__version__ = "0.1.0"

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_FACE = ASSETS / "face.jpg"
DEMO_SPEECH = ASSETS / "speech.wav"
# Starter weights shipped with the package: checkpoint (safetensors + JSON) and ONNX graphs.
STARTER_DIR = Path(__file__).resolve().parent / "starter"

# public name -> the module that defines it
_PUBLIC = {
    "Engine": "avatar_stream.engine.stream",
    "Stream": "avatar_stream.engine.stream",
    "Frame": "avatar_stream.engine.stream",
    "FaceContext": "avatar_stream.engine.stream",
    "step_many": "avatar_stream.engine.stream",
    "render_offline": "avatar_stream.engine.stream",
    "LiveAvatar": "avatar_stream.engine.live",
    "LiveFrame": "avatar_stream.engine.live",
    "render_ticks": "avatar_stream.engine.live",
    "load_audio": "avatar_stream.engine.audio",
    "StreamResampler": "avatar_stream.engine.audio",
    "read_image": "avatar_stream.engine.image_io",
    "Sink": "avatar_stream.engine.sinks",
    "Mp4Sink": "avatar_stream.engine.sinks",
    "VirtualCamSink": "avatar_stream.engine.sinks",
    "WindowSink": "avatar_stream.engine.sinks",
    "AudioOutSink": "avatar_stream.engine.sinks",
    "MultiSink": "avatar_stream.engine.sinks",
    "FileSource": "avatar_stream.engine.sources",
    "MicSource": "avatar_stream.engine.sources",
    "StdinSource": "avatar_stream.engine.sources",
}

__all__ = sorted([*_PUBLIC, "AvatarError", "DEMO_FACE", "DEMO_SPEECH", "STARTER_DIR", "__version__"])


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'avatar_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
