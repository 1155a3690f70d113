"""The torch-tensorrt path: the same three graph wrappers compiled from torch directly.

The engine does not use it (it runs without torch); it exists to compare against the
ONNX -> TensorRT path on a GPU machine with torch (same graphs, same real inputs, same
tolerances), and for torch-side users who want TensorRT speed inside a torch program.
Saved programs land in ``<out>/torch_trt/<graph>.ep`` (torch.export ExportedProgram format).

FP16: torch-tensorrt >= 2.10 deprecates ``enabled_precisions`` (TensorRT weak typing) in favour
of explicit typing with its rule-based autocast; whichever the installed version offers is used.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from avatar_stream.errors import AvatarError
from avatar_stream.export.graphs import SPEC_BY_NAME, SPECS, example_inputs, run_torch
from avatar_stream.export.parity import ParityResult


class TorchTrtError(AvatarError, RuntimeError):
    """torch-tensorrt or a CUDA GPU is missing; the message says what to install."""


INSTALL = "pip install torch-tensorrt matching your torch and CUDA, on an NVIDIA GPU machine"


def _import():
    try:
        import torch_tensorrt
    except ImportError as e:
        raise TorchTrtError(f"the torch-tensorrt path needs torch_tensorrt ({e}): {INSTALL}") from None
    if not torch.cuda.is_available():
        raise TorchTrtError(f"the torch-tensorrt path needs a CUDA GPU (torch.cuda.is_available() is False): {INSTALL}")
    return torch_tensorrt


def _precision_options(torch_tensorrt, fp16: bool) -> dict:
    if not fp16:
        return {}
    params = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    if "enable_autocast" in params:
        return {"use_explicit_typing": True, "enable_autocast": True, "low_precision_type": torch.float16}
    return {"enabled_precisions": {torch.float16}}


def compile_graph(model: torch.nn.Module, graph: str, *, fp16: bool = True, batch_max: int = 8,
                  device: str = "cuda") -> torch.nn.Module:
    """Compile one graph wrapper with a dynamic batch 1..``batch_max`` (float32 I/O)."""
    torch_tensorrt = _import()
    spec = SPEC_BY_NAME[graph]
    module = spec.wrapper(model).eval().to(device)
    example = example_inputs(model.to("cpu"), 2)[graph]
    model.to(device)
    inputs = [
        torch_tensorrt.Input(min_shape=(1, *t.shape[1:]), opt_shape=(1, *t.shape[1:]),
                             max_shape=(batch_max, *t.shape[1:]), dtype=torch.float32, name=n)
        for n, t in ((n, example[n]) for n in spec.input_names)
    ]
    return torch_tensorrt.compile(module, ir="dynamo", arg_inputs=inputs, min_block_size=1,
                                  **_precision_options(torch_tensorrt, fp16))


@torch.no_grad()
def check_compiled(compiled: torch.nn.Module, model: torch.nn.Module, graph: str,
                   inputs: dict[str, torch.Tensor], fp16: bool, device: str = "cuda") -> ParityResult:
    """Compiled graph vs the eager wrapper on the same (real) inputs, on ``device``."""
    spec = SPEC_BY_NAME[graph]
    feed = {k: v.to(device) for k, v in inputs.items()}
    want = run_torch(spec.wrapper(model).eval().to(device), spec, feed)
    got = compiled(*(feed[n] for n in spec.input_names))
    got = dict(zip(spec.output_names, got if isinstance(got, tuple | list) else (got,), strict=True))
    errors = {n: float((got[n].float() - want[n]).abs().max()) for n in spec.output_names}
    scales = {n: float(max(1.0, want[n].abs().max())) for n in spec.output_names}
    return ParityResult(f"{graph}[torch-trt]", "fp16" if fp16 else "fp32", errors, scales,
                        batch=next(iter(inputs.values())).shape[0])


def compile_all(model: torch.nn.Module, out_dir: str | Path, real: dict[str, dict[str, torch.Tensor]], *,
                fp16: bool = True, batch_max: int = 8) -> list[ParityResult]:
    """Compile, check against eager on ``real`` inputs, and save every graph under
    ``out_dir/torch_trt``. Returns the parity results (the caller gates them)."""
    torch_tensorrt = _import()
    target = Path(out_dir) / "torch_trt"
    target.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in SPECS:
        compiled = compile_graph(model, spec.name, fp16=fp16, batch_max=batch_max)
        inputs = {k: v[:batch_max] for k, v in real[spec.name].items()}
        results.append(check_compiled(compiled, model, spec.name, inputs, fp16))
        args = [inputs[n].cuda() for n in spec.input_names]
        torch_tensorrt.save(compiled, str(target / f"{spec.name}.ep"), output_format="exported_program",
                            arg_inputs=args)
    return results
