"""The onnxruntime runner: CPU, CUDA and the TensorRT execution provider."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from avatar_stream.engine.card import ModelCard, read_card
from avatar_stream.engine.runners.base import DEFAULT_BATCH_MAX, RunnerError, check_feed
from avatar_stream.engine.runners.gpu import trt_cache_key, writable_dir

log = logging.getLogger(__name__)

ORT_BACKENDS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


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
        values = self._session.run(list(self._outputs), check_feed(self.card, inputs))
        return dict(zip(self._outputs, values, strict=True))
