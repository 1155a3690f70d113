"""Build TensorRT engines for an exported model directory and gate them against onnxruntime.

The builder itself lives in ``engine.runners.build_trt_engine`` (no torch), because the engine
must be able to rebuild an engine whose sidecar names another TensorRT version or GPU. Here it
is run for each graph at export time, and each engine is checked against the same graph on
onnxruntime CPU (already gated against torch) on the recorded real inputs, at the tolerance of
the engine's precision.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from avatar_stream.engine.card import GRAPH_FILES, read_card
from avatar_stream.engine.runners import (
    DEFAULT_BATCH_MAX,
    OrtRunner,
    TrtRunner,
    build_trt_engine,
    engine_paths,
    engine_precision,
)
from avatar_stream.export.parity import ParityResult, gate


def _batches(inputs: dict[str, np.ndarray], batch_max: int):
    n = len(next(iter(inputs.values())))
    for i in range(0, n, batch_max):
        yield {k: v[i : i + batch_max] for k, v in inputs.items()}


def check_engine(onnx_path: Path, inputs: dict[str, np.ndarray], *, fp16: bool, batch_max: int) -> ParityResult:
    """TensorRT engine vs onnxruntime CPU on ``inputs`` (split into batches of ``batch_max``)."""
    ref, trt = OrtRunner(onnx_path, "cpu"), TrtRunner(onnx_path, fp16=fp16, batch_max=batch_max)
    try:
        errors = {n: 0.0 for n in ref.output_names}
        scales = {n: 1.0 for n in ref.output_names}
        for batch in _batches(inputs, batch_max):
            want, got = ref.run(batch), trt.run(batch)
            for n in ref.output_names:
                errors[n] = max(errors[n], float(np.max(np.abs(got[n] - want[n]))))
                scales[n] = max(scales[n], float(np.max(np.abs(want[n]))))
    finally:
        trt.close()
    return ParityResult(f"{ref.card.graph}[trt]", engine_precision(ref.card, fp16), errors, scales,
                        batch=min(batch_max, len(next(iter(inputs.values())))))


def build_engines(model_dir: str | Path, *, fp16: bool = True, batch_max: int = DEFAULT_BATCH_MAX,
                  opt_batch: int = 1, inputs: dict[str, dict[str, np.ndarray]] | None = None,
                  log: Callable[[str], None] = print) -> tuple[dict[str, dict], list[ParityResult]]:
    """Build ``<model_dir>/tensorrt/<graph>.<precision>.engine`` (+ sidecar JSON) for every
    graph; with ``inputs`` ({graph: {name: array}}) gate each engine against onnxruntime.
    Returns ({graph: sidecar dict, with "parity" when checked}, parity results)."""
    root = Path(model_dir)
    built: dict[str, dict] = {}
    results = []
    for graph, fname in GRAPH_FILES.items():
        onnx_path = root / fname
        precision = engine_precision(read_card(onnx_path), fp16)
        engine, _ = engine_paths(onnx_path, precision)
        log(f"[tensorrt] building {engine.relative_to(root)} (batch 1..{batch_max})")
        sidecar = build_trt_engine(onnx_path, engine, fp16=fp16, batch_max=batch_max, opt_batch=opt_batch)
        sidecar["file"] = str(engine.relative_to(root))
        if inputs is not None:
            result = check_engine(onnx_path, inputs[graph], fp16=fp16, batch_max=batch_max)
            results.append(result)
            sidecar["parity"] = result.errors
        built[graph] = sidecar
    gate(results)
    return built, results
