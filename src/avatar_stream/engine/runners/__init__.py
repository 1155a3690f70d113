"""One runner interface over onnxruntime (CPU / CUDA / TensorRT EP) and standalone TensorRT.

- ``base.py``: the ``Runner`` protocol, ``RunnerError``, the input check every runner uses;
- ``ort.py``: ``OrtRunner`` (onnxruntime, any provider);
- ``tensorrt.py``: ``TrtRunner`` and ``build_trt_engine`` (TensorRT 10 + cuda-python);
- ``gpu.py``: GPU and TensorRT discovery, engine and cache paths, sidecars.

No torch here. ``make_runner(path, backend)`` picks the runner; ``available_backends()`` says
what can run on this machine, best first.
"""

from __future__ import annotations

from pathlib import Path

from avatar_stream.engine.runners.base import DEFAULT_BATCH_MAX, INSTALL_TRT, Runner, RunnerError, file_sha256
from avatar_stream.engine.runners.gpu import (
    engine_paths,
    expected_sidecar,
    gpu_name,
    import_trt,
    sidecar_mismatch,
    tensorrt_version,
    trt_cache_key,
    writable_dir,
)
from avatar_stream.engine.runners.ort import ORT_BACKENDS, OrtRunner
from avatar_stream.engine.runners.tensorrt import TrtRunner, build_trt_engine, engine_precision

__all__ = ["DEFAULT_BATCH_MAX", "INSTALL_TRT", "ORT_BACKENDS", "OrtRunner", "Runner", "RunnerError", "TrtRunner",
           "available_backends", "build_trt_engine", "engine_paths", "engine_precision", "expected_sidecar",
           "file_sha256", "gpu_name", "make_runner", "sidecar_mismatch", "tensorrt_version", "trt_cache_key",
           "import_trt", "writable_dir"]


def available_backends() -> tuple[str, ...]:
    """Backends that can run here, best first: ``trt`` (standalone TensorRT), then the
    onnxruntime providers ``tensorrt``, ``cuda``, ``cpu``. onnxruntime-gpu lists its TensorRT
    provider whether or not libnvinfer is installed (seen on an H100 without TensorRT: the
    session then fell back to CUDA), so ``tensorrt`` also needs the library to be found."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    found = [b for b in ("tensorrt", "cuda", "cpu") if ORT_BACKENDS[b] in have
             and (b != "tensorrt" or tensorrt_version() is not None)]
    try:
        import_trt()
        if gpu_name() is not None:
            found.insert(0, "trt")
    except RunnerError:
        pass
    return tuple(found)


def make_runner(onnx_path: str | Path, backend: str = "cpu", **options) -> OrtRunner | TrtRunner:
    """``trt`` -> TrtRunner, ``cpu``/``cuda``/``tensorrt`` -> OrtRunner with that provider.
    ``options`` go to the runner (``fp16``, ``batch_max``, ``cache_dir``/``engine_dir``, ...)."""
    if backend == "trt":
        return TrtRunner(onnx_path, **options)
    if backend in ORT_BACKENDS:
        return OrtRunner(onnx_path, backend, **options)
    raise RunnerError(f"unknown backend {backend!r}: use one of trt, {', '.join(ORT_BACKENDS)}")
