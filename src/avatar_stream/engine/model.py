"""An exported model directory loaded behind one backend: the three graphs, their cards,
and typed calls that convert between the engine's arrays and the graphs' tensors.

Backends the user names (``--backend``): ``auto`` (TensorRT > CUDA > CPU), ``cpu``,
``cuda``, ``tensorrt``. ``tensorrt`` uses the standalone TensorRT runner when the
``tensorrt`` Python package and a GPU are present, else onnxruntime's TensorRT execution
provider; it never falls back to another backend silently: a missing TensorRT is an error.

The audio graph (MFCC + audio encoder + five Audio2AU LSTMs) runs on the CPU by default
whatever the backend (``audio_backend="cpu"``; ``"same"`` puts it on the backend too).
Measured on an H100 with onnxruntime-gpu 1.31 (docs/export.md): its ten LSTM nodes cost about
450 us each under cuDNN, 4.6 ms per call at batch 1 and 5.8 ms at batch 32, against 0.7 ms
and 3.1 ms on that machine's 16 CPU cores; the decoder is the graph a GPU speeds up. Beside a
GPU the CPU session uses ``AUDIO_CPU_THREADS`` threads.

Every CPU session's idle intra-op threads sleep between calls instead of spinning: spinning
threads took the cores the paste-back needs. On an H100 host, one stream 190 -> 259 fps and 128
streams batched 993 -> 1290 fps; on a 2-core CPU machine, neural 3511 px photo -> 1280x720
step p50 19.5 -> 15.4 ms, p99 28.6 -> 21.0 ms, and 4 batched streams 173 -> 193 frames/s.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.card import (
    GRAPH_FILES,
    OPTIONAL_GRAPH_FILES,
    ModelCard,
    ModelCardError,
    load_model_dir,
)
from avatar_stream.engine.runners import ORT_BACKENDS, Runner, RunnerError, available_backends, make_runner
from avatar_stream.errors import AvatarError

BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
AUDIO_BACKENDS = ("cpu", "same")
AUDIO_CPU_THREADS = 4
SKIPS = ("skip0", "skip1", "skip2", "skip3")

log = logging.getLogger(__name__)


def run_batched(runner: Runner, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``runner.run(feed)`` in pieces of at most ``runner.batch_limit`` along axis 0 (TensorRT
    engines have one; many streams batched together can exceed it)."""
    limit = runner.batch_limit
    n = next(iter(feed.values())).shape[0]
    if limit is None or n <= limit:
        return runner.run(feed)
    parts = [runner.run({k: v[i : i + limit] for k, v in feed.items()}) for i in range(0, n, limit)]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


class BackendError(AvatarError, RuntimeError):
    """The requested backend cannot run on this machine; the message says what to do."""


def default_model_dir() -> Path:
    """The starter model shipped inside the package (ONNX graphs exported at release)."""
    from avatar_stream import STARTER_DIR

    return STARTER_DIR / "onnx"


def resolve_backend(requested: str) -> str:
    """Map a user backend name to a runner backend (``trt``/``tensorrt``/``cuda``/``cpu``)."""
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}: use one of {', '.join(BACKENDS)}")
    have = available_backends()
    if requested == "auto":
        return have[0] if have else "cpu"
    if requested == "tensorrt":
        for b in ("trt", "tensorrt"):
            if b in have:
                return b
        raise BackendError(
            "--backend tensorrt needs an NVIDIA GPU with TensorRT 10 (pip install "
            "'avatar-stream[tensorrt]') or onnxruntime-gpu with the TensorRT provider; "
            f"available here: {', '.join(have) or 'none'} — use --backend cpu"
        )
    if requested not in have:
        raise BackendError(
            f"--backend {requested} is not available here (available: {', '.join(have)}): "
            "install onnxruntime-gpu (pip install 'avatar-stream[gpu]') on a machine with an "
            "NVIDIA GPU, or use --backend cpu"
        )
    return requested


@dataclass
class LoadedModel:
    """Three runners sharing one card set. Arrays in, arrays out; no per-call validation
    beyond what the graphs need (validate at the boundary, trust inside)."""

    model_dir: Path
    backend: str
    cards: dict[str, ModelCard]
    identity: Runner
    audio: Runner  # the audio graph: PCM windows -> per-frame features and AU probabilities
    decoder: Runner
    mouth: Runner | None = None  # the mouth head (mouth.onnx) where the directory has one

    @property
    def card(self) -> ModelCard:
        return self.cards["tcsan_decoder"]

    @property
    def lookahead_frames(self) -> int:
        return self.card.lookahead_frames

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self.decoder.providers)

    def encode_identity(self, crops: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``crops`` RGB uint8 (B, 112, 112, 3) -> (f_id (B, 512), skip maps by name)."""
        face = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        out = run_batched(self.identity, {"face": face})
        return out["f_id"], {k: out[k] for k in SKIPS}

    def frame_features(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PCM windows (B, WINDOW_SAMPLES) -> (feat (B, D), au_prob (B, 5))."""
        out = run_batched(self.audio, {"pcm": np.ascontiguousarray(windows, dtype=np.float32)})
        return out["feat"], out["au_prob"]

    def decode(self, feats: np.ndarray, f_id: np.ndarray,
               skips: dict[str, np.ndarray]) -> np.ndarray:
        """feats (B, 2R+1, D) -> RGB uint8 crops (B, 112, 112, 3). f_id/skips of batch 1 are
        broadcast to B."""
        b = feats.shape[0]
        feed = {"feats": np.ascontiguousarray(feats, dtype=np.float32)}
        for name, arr in (("f_id", f_id), *skips.items()):
            feed[name] = np.repeat(arr, b, axis=0) if arr.shape[0] != b else arr
        img = run_batched(self.decoder, feed)["frame"]
        return to_uint8_hwc(img)


    @property
    def mouth_measures(self) -> tuple[str, ...]:
        """Names of the mouth head's outputs (empty without a mouth head)."""
        return tuple(self.cards["mouth"].head.get("measures", ())) if self.mouth is not None else ()

    def mouth_shape(self, feats: np.ndarray) -> np.ndarray:
        """feats (B, 2R+1, D) -> mouth measures (B, M) relative to rest, inter-ocular distances."""
        return run_batched(self.mouth, {"feats": np.ascontiguousarray(feats, dtype=np.float32)})["mouth"]


def to_uint8_hwc(img: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, rounded."""
    return np.ascontiguousarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1))


def load_model(model_dir: str | Path | None = None, backend: str = "auto",
               audio_backend: str = "cpu") -> LoadedModel:
    """Load and validate an exported model directory (default: the shipped starter).

    A backend asked for by name must run as asked (onnxruntime may not fall back to a later
    provider); ``auto`` takes the first of ``available_backends()`` whose sessions start."""
    if audio_backend not in AUDIO_BACKENDS:
        raise BackendError(f"unknown audio backend {audio_backend!r}: use one of {', '.join(AUDIO_BACKENDS)}")
    root = Path(model_dir) if model_dir is not None else default_model_dir()
    if model_dir is None and not (root / GRAPH_FILES["audio"]).is_file():
        raise ModelCardError(
            f"the starter model is missing from this install ({root}): reinstall avatar-stream "
            "or pass --model DIR (an avatar-export output directory)"
        )
    cards = load_model_dir(root)
    card = cards["tcsan_decoder"]
    if card.window_samples != tb.WINDOW_SAMPLES:  # load_model_dir checks; keep the contract visible
        raise ModelCardError(f"{root}: window {card.window_samples} != {tb.WINDOW_SAMPLES}")
    candidates = [resolve_backend(backend)] if backend != "auto" else list(available_backends()) or ["cpu"]
    for n, runner_backend in enumerate(candidates):
        runners: dict[str, Runner] = {}
        try:
            for g, f in GRAPH_FILES.items():
                b = "cpu" if g == "audio" and audio_backend == "cpu" else runner_backend
                opts: dict = {"require": True} if b in ORT_BACKENDS else {}
                if b == "cpu":
                    opts.update(spin=False)
                    if runner_backend != "cpu":
                        opts.update(threads=min(AUDIO_CPU_THREADS, os.cpu_count() or 1))
                runners[g] = make_runner(root / f, b, **opts)
        except RunnerError as e:
            for r in runners.values():  # a standalone TensorRT runner holds device memory
                r.close()
            if n + 1 < len(candidates):
                log.warning("backend %s did not start (%s); trying %s", runner_backend,
                            str(e).splitlines()[0], candidates[n + 1])
                continue
            raise BackendError(str(e)) from e
        # The mouth head is a few thousand multiply-adds per frame: one CPU thread, whatever
        # the backend (a GPU call would cost more than the work).
        mouth = (make_runner(root / OPTIONAL_GRAPH_FILES["mouth"], "cpu", require=True, threads=1, spin=False)
                 if "mouth" in cards else None)
        return LoadedModel(model_dir=root, backend=runner_backend, cards=cards,
                           identity=runners["identity"], audio=runners["audio"],
                           decoder=runners["tcsan_decoder"], mouth=mouth)
    raise AssertionError("unreachable: candidates is never empty")
