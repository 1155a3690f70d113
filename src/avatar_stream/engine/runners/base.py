"""The one runner interface every backend keeps, and what the runners share.

``run(inputs: dict[str, ndarray]) -> dict[str, ndarray]`` addresses tensors by their ONNX names,
identically for every backend (docs/design.md §8, habit 6; a test compares the signatures).
Every runner also exposes ``input_names``, ``output_names``, ``providers`` (what actually runs,
not what was asked for), ``batch_limit`` and ``card`` (the validated model card of its graph).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from avatar_stream.engine.card import ModelCard
from avatar_stream.errors import AvatarError

log = logging.getLogger(__name__)

DEFAULT_BATCH_MAX = 8
INSTALL_TRT = "install TensorRT 10+ and cuda-python (pip install 'avatar-stream[tensorrt]') on an NVIDIA GPU machine"


class RunnerError(AvatarError, RuntimeError):
    """A backend that cannot run as asked; the message says what to do."""


@runtime_checkable
class Runner(Protocol):
    card: ModelCard

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def output_names(self) -> tuple[str, ...]: ...

    @property
    def providers(self) -> tuple[str, ...]: ...

    @property
    def batch_limit(self) -> int | None: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def check_feed(card: ModelCard, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate names and shapes against the card; return C-contiguous float32 arrays."""
    names = card.input_names
    if set(inputs) != set(names):
        raise RunnerError(
            f"{card.graph} graph takes inputs {list(names)}, got {sorted(inputs)}: pass exactly those names"
        )
    out = {}
    for name in names:
        arr = np.ascontiguousarray(inputs[name], dtype=np.float32)
        dims = card.inputs[name]
        ok = arr.ndim == len(dims) and all(d == "B" or d == s for d, s in zip(dims, arr.shape, strict=True))
        if not ok:
            raise RunnerError(
                f"{card.graph} input {name!r} has shape {arr.shape}, expected {list(dims)} (B = batch)"
            )
        out[name] = arr
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
