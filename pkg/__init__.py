"""avatar-stream: real-time streaming talking-head engine (TCSAN + Audio2AU).

Sub-packages: ``avatar_stream.engine`` (runtime, no torch), ``avatar_stream.export``
(torch -> ONNX / TensorRT), ``avatar_stream.training`` (models, data, stages).
"""

__version__ = "0.1.0"
