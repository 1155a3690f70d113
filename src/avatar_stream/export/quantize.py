"""Lower-precision graphs: fp16 (GPU) and int8 static quantization (CPU).

Both keep float32 inputs and outputs, so the runner interface and the engine are unchanged.
Both leave the MFCC front-end of ``frame`` in float32: its power spectrum reaches ~1e5 for a
full-scale window (beyond float16's 65504) and its log compresses values that 8 bits cannot
resolve. The MFCC's nodes are found by the ``/mfcc/`` scope the exporter gives them.

fp16: ``onnxruntime.transformers.float16`` (ships with onnxruntime; no extra package).
int8: ``onnxruntime.quantization.quantize_static``, QDQ format (onnxruntime's CPU provider
fuses QuantizeLinear/DequantizeLinear pairs into integer kernels), per-channel int8 weights,
uint8 activations, calibrated on real inputs through ``RecordedReader``.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

FRONTEND_SCOPE = "/mfcc/"
CALIB_BATCH = 16
# ConvTranspose is left in float: onnxruntime's CPU provider has no integer ConvTranspose
# kernel, so quantizing it only adds DequantizeLinear work (measured: the paper-width decoder
# got 12% slower with it, its six ConvTranspose layers being ~80% of the decoder's time).
INT8_OPS = ("Conv", "MatMul", "Gemm")


def frontend_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MFCC nodes (kept in float32)."""
    return [n.name for n in model.graph.node if n.name.startswith(FRONTEND_SCOPE)]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and activations, float32 I/O and MFCC."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=frontend_nodes(model))
    drop_roundtrip_casts(half)
    # The converter appends its Cast nodes at the end of the node list; ONNX requires
    # topological order (onnx.checker and TensorRT's parser both enforce it).
    wrapped = OnnxModel(half)
    wrapped.topological_sort()
    return wrapped.model


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def drop_roundtrip_casts(model: onnx.ModelProto) -> int:
    """Remove float32 -> float16 -> float32 Cast pairs (in place); returns how many.

    The float16 converter wraps every blocked node in casts, so a tensor passing between two
    blocked MFCC nodes would still be rounded to float16 (10-bit mantissa; log-mel energies of
    near-silence underflow). Reading the float32 source directly is exact and cheaper."""
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    producer = {o: n for n in graph.node for o in n.output}
    rename = {}
    for node in graph.node:
        up = producer.get(node.input[0]) if _cast_to(node) == f32 else None
        if up is not None and _cast_to(up) == f16 and types.get(up.input[0], f32) == f32:
            rename[node.output[0]] = up.input[0]
    if not rename:
        return 0
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    outputs = {o.name for o in graph.output}
    while True:  # drop casts nobody reads any more (the pair, and chains of them)
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    return len(rename)


class RecordedReader:
    """onnxruntime CalibrationDataReader over recorded real inputs, ``CALIB_BATCH`` at a time."""

    def __init__(self, inputs: dict[str, torch.Tensor | np.ndarray], batch: int = CALIB_BATCH) -> None:
        arrays = {k: np.ascontiguousarray(np.asarray(v), dtype=np.float32) for k, v in inputs.items()}
        n = len(next(iter(arrays.values())))
        self._batches = [{k: a[i : i + batch] for k, a in arrays.items()} for i in range(0, n, batch)]
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._batches):
            return None
        self._pos += 1
        return self._batches[self._pos - 1]

    def rewind(self) -> None:
        self._pos = 0

    def __len__(self) -> int:
        return len(self._batches)


def to_int8(model: onnx.ModelProto, calibration: dict[str, torch.Tensor] | None,
            method: str = "percentile") -> onnx.ModelProto:
    """Static int8 quantization calibrated on ``calibration`` (input name -> real inputs).

    ``method``: ``minmax`` | ``percentile`` (99.999th, robust to rare peaks) | ``entropy``.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("int8 quantization needs calibration inputs (recorded real inputs of the graph)")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    reader = RecordedReader(calibration)
    CalibrationDataReader.register(RecordedReader)
    with tempfile.TemporaryDirectory(prefix="avatar-int8-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save(model, src)
        # Shape inference + graph optimisation first, as onnxruntime recommends for QDQ.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # The calibrator prints its progress to stdout, which would interleave with the CLI's report.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(pre), str(dst), reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                # The layers that carry the compute; norms, softmax and elementwise ops stay float.
                op_types_to_quantize=list(INT8_OPS),
                calibrate_method=methods[method],
                nodes_to_exclude=frontend_nodes(onnx.load(str(pre))),
                extra_options={"CalibMovingAverage": False},
            )
        return onnx.load(str(dst))


def _latency_ms(session, feed: dict[str, np.ndarray], repeats: int) -> float:
    import time

    for _ in range(3):
        session.run(None, feed)
    best = float("inf")
    for _ in range(repeats):  # best of: other processes on the machine only ever add time
        t0 = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def compare_int8(fp32: onnx.ModelProto, int8: onnx.ModelProto, inputs: dict[str, torch.Tensor | np.ndarray],
                 image_output: str | None = None, repeats: int = 30) -> dict[str, float]:
    """Speed and quality of an int8 graph against its fp32 source on onnxruntime CPU (1 thread):
    batch-1 latency of each (best of ``repeats``), and when ``image_output`` names an image in
    [0, 1], the PSNR of the int8 image against the fp32 one over all ``inputs``."""
    from avatar_stream.export.parity import ort_session

    feeds = {k: np.ascontiguousarray(np.asarray(v), dtype=np.float32) for k, v in inputs.items()}
    s32, s8 = ort_session(fp32, threads=1), ort_session(int8, threads=1)
    one = {k: v[:1] for k, v in feeds.items()}
    out = {"fp32_ms": _latency_ms(s32, one, repeats), "int8_ms": _latency_ms(s8, one, repeats)}
    out["speedup"] = out["fp32_ms"] / out["int8_ms"]
    if image_output is not None:
        a = s32.run([image_output], feeds)[0].astype(np.float64)
        b = s8.run([image_output], feeds)[0].astype(np.float64)
        mse = float(np.mean((a - b) ** 2))
        out["psnr_db"] = float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))
    return out
