"""GPU and TensorRT facts, and where TensorRT engines and caches live.

Engines are only valid on the GPU model and TensorRT build they were made with: every engine
gets a sidecar JSON (TensorRT version, GPU, precision, ONNX hash, batch range) and one whose
sidecar does not match is rebuilt, never used. Caches go beside the model when that folder is
writable, else under the user cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from avatar_stream.engine.runners.base import INSTALL_TRT, RunnerError, file_sha256

log = logging.getLogger(__name__)

def gpu_name(device: int = 0) -> str | None:
    """Name of CUDA device ``device`` (cuda-python, else nvidia-smi), or None without a GPU."""
    try:
        cudart = import_cudart()
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            return props.name.split(b"\0", 1)[0].decode()
    except (ImportError, RunnerError):
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    res = subprocess.run(
        [smi, f"--id={device}", "--query-gpu=name", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20, check=False,
    )
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def tensorrt_version() -> str | None:
    """Version of the TensorRT library that would run (Python module, else libnvinfer)."""
    try:
        import tensorrt as trt

        return str(trt.__version__)
    except ImportError:
        pass
    # The onnxruntime TensorRT EP loads libnvinfer without the Python module.
    for name in ("nvinfer", "nvinfer_10", "nvinfer_11"):
        lib = ctypes.util.find_library(name)
        if lib:
            try:
                v = ctypes.CDLL(lib).getInferLibVersion()
            except (OSError, AttributeError):  # found but not loadable: no TensorRT here
                return None
            return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else f"{v // 1000}.{v // 100 % 10}.{v % 100}"
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def trt_cache_key() -> str:
    """Cache sub-folder for TensorRT engines: GPU name + TensorRT version. Engines are only
    valid on the GPU model and TensorRT build they were made with."""
    return f"{_slug(gpu_name() or 'no-gpu')}_trt{tensorrt_version() or 'none'}"


def writable_dir(preferred: Path) -> Path:
    """``preferred`` when it can be created and written, else a folder of the same name under
    the user cache (``$XDG_CACHE_HOME`` or ``~/.cache``)/avatar-stream/<folder>-<hash of the
    folder's path>: the starter model lives in a read-only site-packages on many installs."""
    probe = preferred
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK | os.X_OK):
        return preferred
    key = hashlib.sha256(str(preferred.parent.resolve()).encode()).hexdigest()[:10]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "avatar-stream" / f"{preferred.parent.name}-{key}" / preferred.name


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def import_trt():
    try:
        import tensorrt as trt

        cudart = import_cudart()
    except ImportError as e:
        raise RunnerError(f"the TensorRT backend needs the tensorrt and cuda-python modules ({e}): {INSTALL_TRT}") from None
    return trt, cudart


def engine_paths(onnx_path: str | Path, precision: str, engine_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Engine file and its sidecar JSON for a graph: ``<dir>/tensorrt/<stem>.<precision>.engine``."""
    p = Path(onnx_path)
    d = Path(engine_dir) if engine_dir else writable_dir(p.parent / "tensorrt")
    engine = d / f"{p.stem}.{precision}.engine"
    return engine, engine.with_suffix(".engine.json")


def expected_sidecar(onnx_path: str | Path, precision: str, batch_max: int, device: int = 0) -> dict:
    """What the sidecar of an engine usable here must say."""
    return {
        "tensorrt_version": tensorrt_version(),
        "gpu": gpu_name(device),
        "precision": precision,
        "onnx_sha256": file_sha256(onnx_path),
        "batch_max": int(batch_max),
    }


def sidecar_mismatch(engine_path: Path, sidecar_path: Path, expected: Mapping) -> str | None:
    """Why the engine on disk cannot be used (None when it can)."""
    if not engine_path.is_file():
        return "no engine built yet"
    if not sidecar_path.is_file():
        return f"{sidecar_path.name} is missing, so the engine's TensorRT version and GPU are unknown"
    try:
        have = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError:
        return f"{sidecar_path.name} is not valid JSON"
    diffs = [f"{k} {have.get(k)!r} != {v!r}" for k, v in expected.items() if have.get(k) != v]
    return "; ".join(diffs) or None
