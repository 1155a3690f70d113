"""One runner interface over onnxruntime (CPU / CUDA / TensorRT EP) and standalone TensorRT.

``run(inputs: dict[str, ndarray]) -> dict[str, ndarray]`` addresses tensors by their ONNX names,
identically for every backend (docs/design.md §8, habit 6; a test compares the signatures). Every runner
also exposes ``input_names``, ``output_names``, ``providers`` (what actually runs, not what was
asked for) and ``card`` (the validated model card of its graph).

No torch here. The standalone TensorRT runner uses the TensorRT 10 Python API and cuda-python's
runtime bindings; its serialized engine gets a sidecar JSON (TensorRT version, GPU, precision,
ONNX hash, batch range) and an engine whose sidecar does not match is rebuilt, never used.
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
from typing import Protocol, runtime_checkable

import numpy as np

from avatar_stream import __version__
from avatar_stream.engine.card import ModelCard, read_card
from avatar_stream.errors import AvatarError

log = logging.getLogger(__name__)

ORT_BACKENDS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
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


def _feed(card: ModelCard, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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


# ---------------------------------------------------------------------------- GPU facts


def gpu_name(device: int = 0) -> str | None:
    """Name of CUDA device ``device`` (cuda-python, else nvidia-smi), or None without a GPU."""
    try:
        cudart = _import_cudart()
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


# ---------------------------------------------------------------------------- onnxruntime


def _profile_shapes(card: ModelCard, batch: int) -> str:
    return ",".join(
        f"{name}:" + "x".join(str(batch if d == "B" else d) for d in dims) for name, dims in card.inputs.items()
    )


def _ort_providers(backend: str, card: ModelCard, onnx_path: Path, cache_dir: Path | None, fp16: bool,
                   batch_max: int) -> list:
    if backend not in ORT_BACKENDS:
        raise RunnerError(f"unknown onnxruntime backend {backend!r}: use one of {sorted(ORT_BACKENDS)}")
    providers: list = ["CPUExecutionProvider"]
    if backend in ("cuda", "tensorrt"):
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
    if backend == "tensorrt":
        cache = (cache_dir or writable_dir(onnx_path.parent / "trt_cache")) / trt_cache_key()
        cache.mkdir(parents=True, exist_ok=True)
        opts = {
            "device_id": 0,
            "trt_fp16_enable": bool(fp16),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            # One profile over the whole batch range, so no rebuild when the batch changes.
            "trt_profile_min_shapes": _profile_shapes(card, 1),
            "trt_profile_opt_shapes": _profile_shapes(card, 1),
            "trt_profile_max_shapes": _profile_shapes(card, batch_max),
        }
        providers.insert(0, ("TensorrtExecutionProvider", opts))
    return providers


class OrtRunner:
    """An onnxruntime session on one exported graph.

    ``backend`` is ``cpu``, ``cuda`` or ``tensorrt`` (the TensorRT execution provider, FP16 when
    ``fp16``, engines cached under ``cache_dir/<GPU>_trt<version>``). onnxruntime falls back to a
    later provider when one fails to load; that is logged and kept in ``fallback``, or raised
    when ``require`` is true. ``threads``: intra-op threads (0 = one per core); ``spin=False``
    lets them sleep between calls (for a CPU session that shares the process with GPU work).
    """

    def __init__(self, onnx_path: str | Path, backend: str = "cpu", *, cache_dir: str | Path | None = None,
                 fp16: bool = True, threads: int = 0, batch_max: int = DEFAULT_BATCH_MAX,
                 require: bool = False, spin: bool = True) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        self.card = read_card(path)
        providers = _ort_providers(backend, self.card, path, Path(cache_dir) if cache_dir else None, fp16,
                                   batch_max)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if not spin:  # idle intra-op threads sleep instead of spinning on the cores others need
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime's own errors (Fail, EPFail, ...) are plain Exceptions
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RunnerError(f"{path.name}: onnxruntime could not start a {backend} session: {why}") from e
        self._batch_limit = int(batch_max) if backend == "tensorrt" else None
        self._providers = tuple(self._session.get_providers())
        self._outputs = self.card.output_names
        wanted = ORT_BACKENDS[backend]
        self.fallback: str | None = None
        if self._providers[0] != wanted:
            self.fallback = (
                f"{path.name}: asked for {wanted} but onnxruntime runs {self._providers[0]} "
                f"(available here: {ort.get_available_providers()}); install onnxruntime-gpu with matching "
                f"CUDA/TensorRT libraries to get it"
            )
            if require:
                raise RunnerError(self.fallback)
            log.warning(self.fallback)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.card.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    @property
    def batch_limit(self) -> int | None:
        """Largest batch one call takes (the TensorRT provider's profile), None for no limit."""
        return self._batch_limit

    def close(self) -> None:
        """Nothing to free by hand (the session goes with the object); here for symmetry."""

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; inputs and outputs keyed by ONNX name, float32."""
        values = self._session.run(list(self._outputs), _feed(self.card, inputs))
        return dict(zip(self._outputs, values, strict=True))


# ---------------------------------------------------------------------------- TensorRT


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _import_trt():
    try:
        import tensorrt as trt

        cudart = _import_cudart()
    except ImportError as e:
        raise RunnerError(f"the TensorRT backend needs the tensorrt and cuda-python modules ({e}): {INSTALL_TRT}") from None
    return trt, cudart


def _cuda(result):
    """Unwrap a cuda-python call ``(err, *values)``; raise on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RunnerError(f"CUDA call failed with error {err}: check the GPU and driver (nvidia-smi)")
    return values[0] if len(values) == 1 else (values or None)


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


def _network_flags(trt, card: ModelCard, fp16: bool) -> tuple[int, bool]:
    """(creation flags, use the FP16 builder flag). A graph stored in fp16 is built strongly
    typed: its own types decide. An fp32 graph with ``fp16`` uses TensorRT 10's FP16 builder
    flag (weak typing); TensorRT 11 removed that flag, so there it needs an fp16 graph."""
    strong = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if card.precision == "fp16":
        return strong, False
    if fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise RunnerError(f"TensorRT {trt.__version__} builds FP16 engines only from an fp16 graph "
                          f"(strong typing): export with avatar-export --precision fp16, or pass fp16=False")
    return 0, fp16


def engine_precision(card: ModelCard, fp16: bool) -> str:
    return "fp16" if fp16 or card.precision == "fp16" else "fp32"


def build_trt_engine(onnx_path: str | Path, engine_path: str | Path, *, fp16: bool = True,
                     batch_max: int = DEFAULT_BATCH_MAX, opt_batch: int = 1, workspace_gib: float = 2.0,
                     device: int = 0) -> dict:
    """Build a serialized TensorRT engine from an exported graph and write its sidecar JSON.

    One optimisation profile covers batch 1..``batch_max`` (``opt_batch`` tuned). I/O stays
    float32; FP16 applies to the layers inside (see ``_network_flags``). Returns the sidecar.
    """
    trt, cudart = _import_trt()
    _cuda(cudart.cudaSetDevice(device))
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    card = read_card(onnx_path)
    if card.precision == "int8":
        raise RunnerError(f"{onnx_path.name} is an int8 graph for the CPU: export with --precision fp32 or fp16 "
                          f"for TensorRT")
    flags, weak_fp16 = _network_flags(trt, card, fp16)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RunnerError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, dims in card.inputs.items():
        def shape(b: int, dims=dims) -> list[int]:
            return [b if d == "B" else int(d) for d in dims]

        profile.set_shape(name, shape(1), shape(opt_batch), shape(batch_max))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RunnerError(f"TensorRT failed to build an engine for {onnx_path.name}: see the TensorRT log above")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(blob))
    sidecar = expected_sidecar(onnx_path, engine_precision(card, fp16), batch_max, device)
    sidecar.update(graph=card.graph, opt_batch=int(opt_batch), built_by=f"avatar-stream {__version__}",
                   onnx_file=onnx_path.name)
    engine_path.with_suffix(".engine.json").write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    return sidecar


class TrtRunner:
    """A standalone TensorRT 10 engine for one exported graph, behind the Runner interface.

    The engine lives beside the graph (``engine_paths``); it is (re)built from the ONNX file when
    it is missing or its sidecar names another TensorRT version, GPU, precision, ONNX file or
    batch range — the reason is logged. Device buffers for ``batch_max`` and pinned host buffers
    are allocated once; ``run`` sets the input shapes, copies in, ``execute_async_v3`` on its own
    stream, copies out and synchronises.
    """

    def __init__(self, onnx_path: str | Path, *, engine_dir: str | Path | None = None, fp16: bool = True,
                 batch_max: int = DEFAULT_BATCH_MAX, device: int = 0) -> None:
        trt, cudart = _import_trt()
        self._trt, self._cudart = trt, cudart
        self._buffers: list[tuple[str, int]] = []  # ("dev" | "host", pointer) to free in close()
        self._stream = None
        onnx_path = Path(onnx_path)
        self.card = read_card(onnx_path)
        self.batch_max = int(batch_max)
        _cuda(cudart.cudaSetDevice(device))
        precision = engine_precision(self.card, fp16)
        self.engine_path, sidecar = engine_paths(onnx_path, precision, engine_dir)
        reason = sidecar_mismatch(self.engine_path, sidecar, expected_sidecar(onnx_path, precision, batch_max, device))
        if reason:
            log.warning("building TensorRT engine %s (%s)", self.engine_path.name, reason)
            build_trt_engine(onnx_path, self.engine_path, fp16=fp16, batch_max=batch_max, device=device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise RunnerError(f"TensorRT could not load {self.engine_path}: delete it so that it is rebuilt")
        self._context = self._engine.create_execution_context()
        self._stream = _cuda(cudart.cudaStreamCreate())
        self._allocate()

    def _allocate(self) -> None:
        trt, cudart, eng, ctx = self._trt, self._cudart, self._engine, self._context
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if set(inputs) != set(self.card.input_names):
            raise RunnerError(f"{self.engine_path.name} has inputs {inputs}, the card says "
                              f"{list(self.card.input_names)}: delete the engine so that it is rebuilt")
        for n in inputs:  # the largest shapes of the profile size every buffer
            ctx.set_input_shape(n, tuple(eng.get_tensor_profile_shape(n, 0)[2]))
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, int] = {}
        for n in names:
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(n)))
            nbytes = int(np.prod(tuple(ctx.get_tensor_shape(n)))) * dtype.itemsize
            dptr = _cuda(cudart.cudaMalloc(nbytes))
            self._buffers.append(("dev", dptr))
            hptr = _cuda(cudart.cudaMallocHost(nbytes))
            self._buffers.append(("host", hptr))
            raw = (ctypes.c_char * nbytes).from_address(int(hptr))
            self._host[n] = np.frombuffer(raw, dtype=dtype)
            self._dev[n] = int(dptr)
            ctx.set_tensor_address(n, int(dptr))

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.card.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.card.output_names

    @property
    def providers(self) -> tuple[str, ...]:
        return (f"TensorRT {tensorrt_version()}",)

    @property
    def batch_limit(self) -> int | None:
        """Largest batch one call takes (the engine's profile)."""
        return self.batch_max

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; inputs and outputs keyed by ONNX name, float32."""
        cudart, ctx, stream = self._cudart, self._context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        feed = _feed(self.card, inputs)
        for name, arr in feed.items():
            if arr.shape[0] > self.batch_max:
                raise RunnerError(f"batch {arr.shape[0]} exceeds this engine's batch_max {self.batch_max}: "
                                  f"split the batch or rebuild with a larger batch_max")
            ctx.set_input_shape(name, arr.shape)
            host = self._host[name]
            host[: arr.size] = arr.ravel()
            _cuda(cudart.cudaMemcpyAsync(self._dev[name], host.ctypes.data, arr.nbytes, h2d, stream))
        if not ctx.execute_async_v3(int(stream)):
            raise RunnerError(f"TensorRT execution of {self.engine_path.name} failed: see the TensorRT log")
        shapes = {n: tuple(ctx.get_tensor_shape(n)) for n in self.output_names}
        for name, shape in shapes.items():
            host = self._host[name]
            nbytes = int(np.prod(shape)) * host.itemsize
            _cuda(cudart.cudaMemcpyAsync(host.ctypes.data, self._dev[name], nbytes, d2h, stream))
        _cuda(cudart.cudaStreamSynchronize(stream))
        # Copies: the pinned buffers are overwritten by the next call.
        return {n: self._host[n][: int(np.prod(s))].reshape(s).astype(np.float32) for n, s in shapes.items()}

    def close(self) -> None:
        """Free device and pinned buffers and the stream; safe to call twice."""
        cudart = self._cudart
        while self._buffers:
            kind, ptr = self._buffers.pop()
            (cudart.cudaFree if kind == "dev" else cudart.cudaFreeHost)(ptr)
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        _import_trt()
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
