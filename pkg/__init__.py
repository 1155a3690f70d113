"""avatar-stream: real-time streaming talking-head engine (TCSAN + Audio2AU).

Sub-packages: ``avatar_stream.engine`` (runtime, no torch), ``avatar_stream.export``
(torch -> ONNX / TensorRT), ``avatar_stream.training`` (models, data, stages).
"""

from pathlib import Path

__version__ = "0.1.0"

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_FACE = ASSETS / "face.jpg"
DEMO_SPEECH = ASSETS / "speech.wav"
# Starter weights shipped with the package: checkpoint (safetensors + JSON) and ONNX graphs.
STARTER_DIR = Path(__file__).resolve().parent / "starter"
