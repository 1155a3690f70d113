"""torch -> ONNX for the three graphs, then precision, parity gate, card and manifest.

Exporter choice: the TorchScript-based exporter (``dynamo=False``). On this model it produces
a graph that passes ``onnx.checker`` with full shape inference, keeps the named dynamic batch
axis ``B`` through the MultiheadAttention/LSTM reshapes when traced at batch >= 2, and exports
in about a second; ``docs/export.md`` gives the node counts and times measured against the
dynamo exporter. Set ``ExportOptions.dynamo`` to compare.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from avatar_stream import __version__
from avatar_stream.engine.card import GRAPH_FILES, ModelCard
from avatar_stream.engine.runners import file_sha256
from avatar_stream.export import parity as parity_mod
from avatar_stream.export.card import build_card, exporter_version, write_card
from avatar_stream.export.graphs import SPECS, GraphSpec, example_inputs, io_dims, run_torch

OPSET = 17
PRECISIONS = ("fp32", "fp16", "int8")
# int8 targets the per-frame CPU cost; identity runs once per face and stays fp32, since
# its error would reach every frame through f_id and the skips.
INT8_GRAPHS = ("audio", "tcsan_decoder")
MANIFEST_FORMAT = "avatar-stream-model-dir"


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    example_batch: int = 2  # >= 2, or a traced reshape can bake the batch size in
    batch_max: int = 8  # largest batch the TensorRT profiles cover
    parity: bool = True
    dynamo: bool = False
    tensorrt: bool = False  # also build TensorRT engines (needs an NVIDIA GPU + TensorRT)
    trt_fp16: bool = True
    torch_tensorrt: bool = False  # also compile with torch-tensorrt (comparison path, GPU)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.example_batch < 2:
            raise ValueError("example_batch must be >= 2: a batch-1 trace can bake the batch size into reshapes")
        if self.batch_max < 1:
            raise ValueError(f"batch_max must be >= 1, got {self.batch_max}")


@dataclass
class ExportReport:
    out_dir: Path
    cards: dict[str, ModelCard] = field(default_factory=dict)
    parity: list = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    engines: dict[str, dict] = field(default_factory=dict)
    int8: dict[str, dict] = field(default_factory=dict)  # graph -> compare_int8() result


def to_onnx(module: torch.nn.Module, spec: GraphSpec, example: dict[str, torch.Tensor], *,
            dynamo: bool = False) -> onnx.ModelProto:
    """Export one wrapper with a dynamic batch axis ``B`` on every input and output."""
    args = tuple(example[n] for n in spec.input_names)
    names = (*spec.input_names, *spec.output_names)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice is expected: we choose it on purpose.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # Shape checks inside the modules become trace-time constants, as intended; and the
        # LSTM-at-batch-2 notice is answered by the batch 1 and 4 tests of every graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        if dynamo:
            batch = torch.export.Dim("B", min=1, max=1024)
            prog = torch.onnx.export(
                module, args, input_names=list(spec.input_names), output_names=list(spec.output_names),
                dynamic_shapes={n: {0: batch} for n in spec.input_names}, dynamo=True, opset_version=18,
                optimize=True, verbose=False,
            )
            return prog.model_proto
        torch.onnx.export(
            module, args, buf, input_names=list(spec.input_names), output_names=list(spec.output_names),
            dynamic_axes={n: {0: "B"} for n in names}, opset_version=OPSET, do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())


def check(model: onnx.ModelProto) -> None:
    """onnx.checker with full shape inference (raises onnx.checker.ValidationError)."""
    onnx.checker.check_model(model, full_check=True)


def _convert(model: onnx.ModelProto, graph: str, precision: str, calib: dict[str, torch.Tensor] | None
             ) -> tuple[onnx.ModelProto, str]:
    from avatar_stream.export import quantize

    if precision == "fp16":
        return quantize.to_fp16(model), "fp16"
    if precision == "int8" and graph in INT8_GRAPHS:
        return quantize.to_int8(model, calib), "int8"
    return model, "fp32"


def export_model(model: torch.nn.Module, out_dir: str | Path, opts: ExportOptions = ExportOptions(), *,
                 checkpoint_sha256: str, face_path: Path | None = None, speech_path: Path | None = None,
                 log=print) -> ExportReport:
    """Export ``model`` (a TalkingHead) into ``out_dir``: the three graphs with their cards,
    parity-gated, and ``manifest.json``. Raises ParityError when a graph fails its gate
    (nothing is written for it)."""
    model = model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(out)
    examples = example_inputs(model, opts.example_batch)
    t0 = time.perf_counter()
    real = parity_mod.parity_inputs(model, face_path, speech_path) if opts.parity else {}
    calib = _calibration(model, face_path, speech_path) if opts.precision == "int8" else {}
    report.seconds["record_inputs"] = time.perf_counter() - t0
    exporter = exporter_version(18 if opts.dynamo else OPSET)
    for spec in SPECS:
        t0 = time.perf_counter()
        module = spec.wrapper(model).eval()
        proto = to_onnx(module, spec, examples[spec.name], dynamo=opts.dynamo)
        fp32_proto = proto
        proto, precision = _convert(proto, spec.name, opts.precision, calib.get(spec.name))
        if precision == "int8":
            from avatar_stream.export.quantize import compare_int8

            probe = real.get(spec.name) or calib[spec.name]
            report.int8[spec.name] = compare_int8(fp32_proto, proto, probe,
                                                  "frame" if spec.name == "tcsan_decoder" else None)
        check(proto)
        errors: dict[str, float] = {}  # the card's parity stays empty with --no-parity
        if opts.parity:
            result = parity_mod.check_graph(proto, module, spec.name, real[spec.name], precision)
            report.parity.append(result)
            parity_mod.gate([result])
            errors = result.errors
        ins, outs = io_dims(examples[spec.name], run_torch(module, spec, examples[spec.name]))
        card = build_card(spec.name, model.cfg, ins, outs, checkpoint_sha256=checkpoint_sha256,
                          precision=precision, parity=errors, exporter=exporter)
        onnx.save(write_card(proto, card), out / GRAPH_FILES[spec.name])
        report.cards[spec.name] = card
        report.seconds[spec.name] = time.perf_counter() - t0
    if opts.tensorrt:
        from avatar_stream.export.tensorrt_build import build_engines

        probe = {g: {k: v.numpy() for k, v in d.items()} for g, d in real.items()} if real else None
        report.engines, trt_parity = build_engines(out, fp16=opts.trt_fp16, batch_max=opts.batch_max,
                                                   inputs=probe, log=log)
        report.parity.extend(trt_parity)
    if opts.torch_tensorrt:
        from avatar_stream.export.torch_trt import compile_all

        results = compile_all(model, out, real or examples, fp16=opts.trt_fp16, batch_max=opts.batch_max)
        model.to("cpu")
        if opts.parity:
            report.parity.extend(results)
            parity_mod.gate(results)
    write_manifest(report, opts, checkpoint_sha256)
    return report


def _calibration(model, face_path: Path | None, speech_path: Path | None) -> dict[str, dict[str, torch.Tensor]]:
    """int8 calibration inputs: every frame of the bundled utterance (frame windows and
    decoder windows), the bundled face."""
    crop, _ = parity_mod.real_face(face_path)
    return parity_mod.record_inputs(model, [crop], parity_mod.real_speech(speech_path))


def write_manifest(report: ExportReport, opts: ExportOptions, checkpoint_sha256: str) -> Path:
    """``manifest.json``: what the directory holds, with file hashes, for humans and tooling;
    the engine trusts the cards inside the graphs, not this file."""
    graphs = {
        g: {"file": GRAPH_FILES[g], "sha256": file_sha256(report.out_dir / GRAPH_FILES[g]),
            "precision": c.precision, "parity": dict(c.parity)}
        for g, c in report.cards.items()
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "package_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "precision": opts.precision,
        "batch_max": opts.batch_max,
        "parity_checked": opts.parity,
        "parity_tolerance": parity_mod.TOLERANCES,
        "graphs": graphs,
        "tensorrt": report.engines,
        "int8": report.int8,
    }
    path = report.out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
