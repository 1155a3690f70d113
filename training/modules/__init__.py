"""The generator's building blocks (DESIGN.md §2), pure torch. `training.models` assembles them."""

from .decoder import ImageDecoder
from .encoders import AUClassifier, Audio2AU, AudioEncoder, IdentityEncoder
from .fusion import build_fusion

__all__ = ["AUClassifier", "Audio2AU", "AudioEncoder", "IdentityEncoder", "ImageDecoder", "build_fusion"]
