"""The generator's building blocks (docs/design.md §2), pure torch. `training.models` assembles them."""

from avatar_stream.training.modules.decoder import ImageDecoder
from avatar_stream.training.modules.encoders import AUClassifier, Audio2AU, AudioEncoder, IdentityEncoder
from avatar_stream.training.modules.fusion import build_fusion

__all__ = ["AUClassifier", "Audio2AU", "AudioEncoder", "IdentityEncoder", "ImageDecoder", "build_fusion"]
