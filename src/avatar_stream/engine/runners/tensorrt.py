"""The standalone TensorRT 10 runner and engine builder (TensorRT Python API + cuda-python).

The serialized engine sits beside its graph with a sidecar (runners/gpu.py); an engine whose
sidecar names another TensorRT version, GPU, precision, ONNX file or batch range is rebuilt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from avatar_stream import __version__
from avatar_stream.engine.card import ModelCard, read_card
from avatar_stream.engine.runners.base import DEFAULT_BATCH_MAX, RunnerError, check_feed
from avatar_stream.engine.runners.gpu import (
    engine_paths,
    expected_sidecar,
    import_trt,
    sidecar_mismatch,
    tensorrt_version,
)

log = logging.getLogger(__name__)

def _cuda(result):
    """Unwrap a cuda-python call ``(err, *values)``; raise on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RunnerError(f"CUDA call failed with error {err}: check the GPU and driver (nvidia-smi)")
    return values[0] if len(values) == 1 else (values or None)


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
    trt, cudart = import_trt()
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
        trt, cudart = import_trt()
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
        feed = check_feed(self.card, inputs)
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
