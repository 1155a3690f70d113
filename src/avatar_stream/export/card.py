"""Writing the model card into an exported graph (the reading side is engine/card.py).

The card is built here from the timebase constants and the model's own config, then passed
through the engine's validator before it is stored: an export can never write a card that the
engine of the same version would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
import torch

from avatar_stream import __version__
from avatar_stream.engine import timebase
from avatar_stream.engine.card import (
    CARD_FORMAT,
    CARD_KEY,
    CARD_VERSION,
    IMAGE_SIZE,
    ModelCard,
    card_from_dict,
)


def exporter_version(opset: int) -> str:
    return f"avatar-export {__version__} (torch {torch.__version__}, onnx {onnx.__version__}, opset {opset})"


def check_servable(cfg) -> None:
    """Raise ValueError (one line) when the engine cannot serve a model of this config."""
    if cfg.image_size != IMAGE_SIZE:
        raise ValueError(f"model image_size {cfg.image_size} differs from the engine's {IMAGE_SIZE}: "
                         f"the engine's face crop is fixed at {IMAGE_SIZE}; train at {IMAGE_SIZE}")
    if tuple(cfg.au_names) != timebase.AU_NAMES:
        raise ValueError(f"model AU order {list(cfg.au_names)} differs from {list(timebase.AU_NAMES)}: "
                         f"the engine reports AUs in that order; train with that order")
    if not cfg.audio2au:
        raise ValueError("the model is an ablation without Audio2AU: audio.onnx must output au_prob; "
                         "export a model trained with audio2au=True")


def build_card(graph: str, cfg, inputs: Mapping[str, list], outputs: Mapping[str, list], *,
               checkpoint_sha256: str, precision: str, parity: Mapping[str, float], exporter: str,
               head: Mapping | None = None) -> ModelCard:
    """The validated card of one graph. ``cfg`` is the model's ModelConfig; ``head`` the mouth
    graph's own description (graph ``mouth`` only)."""
    check_servable(cfg)
    data = {
        "format": CARD_FORMAT,
        "card_version": CARD_VERSION,
        "graph": graph,
        "package_version": __version__,
        "sample_rate": timebase.SAMPLE_RATE,
        "fps": timebase.FPS,
        "window_samples": timebase.WINDOW_SAMPLES,
        "window_offset": timebase.WINDOW_OFFSET,
        "samples_per_frame": timebase.SAMPLES_PER_FRAME,
        "lookahead_frames": cfg.lookahead_frames,
        "receptive_field": cfg.receptive_field,
        "au_order": list(cfg.au_names),
        "image_size": cfg.image_size,
        "frame_feature_dim": cfg.frame_feature_dim,
        "inputs": {k: list(v) for k, v in inputs.items()},
        "outputs": {k: list(v) for k, v in outputs.items()},
        "config": cfg.to_dict(),
        "checkpoint_sha256": checkpoint_sha256,
        "exporter_version": exporter,
        "precision": precision,
        "parity": {k: float(v) for k, v in parity.items()},
    }
    if head:
        data["head"] = dict(head)
    return card_from_dict(data, source=f"{graph} card being written")


def write_card(model: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    """Store ``card`` in ``model.metadata_props`` (replacing an older card) and return the model."""
    keep = [p for p in model.metadata_props if p.key != CARD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card.to_json()
    model.doc_string = (f"avatar-stream {card.graph} graph ({card.precision}); model card in "
                        f"metadata_props['{CARD_KEY}']")
    return model
