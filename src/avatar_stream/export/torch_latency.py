"""Per-graph latency of the torch path (the three export wrappers run eagerly), by device,
batch and precision: what a user who stays in PyTorch gets, and the reference for the
onnxruntime / TensorRT numbers.

    python -m avatar_stream.export.torch_latency [--checkpoint X] [--device cuda] [--batch 1,32]
        [--precision fp32,fp16] [--repeats 50] [--json out.json]

On CUDA every timing is bracketed by ``torch.cuda.synchronize()`` (kernels are
asynchronous); fp16 runs under ``torch.autocast`` (the MFCC's power spectrum stays fp32,
see docs/export.md). A benchmark, not a test: it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from avatar_stream.export.graphs import SPECS, example_inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_graph(module: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
               precision: str, repeats: int, warmup: int = 5) -> tuple[float, float]:
    """(p50 ms, p99 ms) of ``module(**inputs)`` on ``device`` in ``precision``."""
    cast = (torch.autocast(device_type=device.type, dtype=torch.float16) if precision == "fp16"
            else contextlib.nullcontext())
    times = []
    with torch.inference_mode(), cast:
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            module(*inputs.values())
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    a = np.asarray(times)
    return float(np.median(a)), float(np.percentile(a, 99))


def measure(model: torch.nn.Module, device: str, batches: list[int], precisions: list[str],
            repeats: int) -> list[dict]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    model = model.eval().cpu()
    # example_inputs runs the identity encoder on CPU tensors: build them before moving the model.
    examples = {b: example_inputs(model, b) for b in batches}
    model.to(dev)
    # The wrappers own modules of their own (the MFCC filterbank): move them too.
    modules = {spec.name: (spec, spec.wrapper(model).to(dev).eval()) for spec in SPECS}
    rows = []
    for b in batches:
        ex = {g: {k: v.to(dev) for k, v in d.items()} for g, d in examples[b].items()}
        for precision in precisions:
            for graph, (spec, module) in modules.items():
                ordered = {n: ex[graph][n] for n in spec.input_names}
                p50, p99 = time_graph(module, ordered, dev, precision, repeats)
                rows.append({"graph": graph, "batch": b, "precision": precision, "device": str(dev),
                             "ms_p50": p50, "ms_p99": p99, "ms_per_item": p50 / b})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avatar_stream.export.torch_latency",
                                description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="trained checkpoint (default: the paper-width model, initial weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--precision", default="fp32,fp16")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.checkpoint is not None:
        from avatar_stream.training.checkpoint import build_model_from_checkpoint

        model = build_model_from_checkpoint(args.checkpoint)
    else:
        from avatar_stream.training.config import ModelConfig
        from avatar_stream.training.models import TalkingHead

        torch.manual_seed(0)
        model = TalkingHead(ModelConfig())  # weights' values do not change the time
    try:
        rows = measure(model, args.device, [int(b) for b in args.batch.split(",")],
                       args.precision.split(","), args.repeats)
    except (RuntimeError, ValueError) as e:
        print(f"torch_latency: error: {str(e).splitlines()[0]}")
        return 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__} on {name}")
    print(f"{'graph':<15}{'batch':>6}{'prec':>6}{'p50 ms':>10}{'p99 ms':>10}{'ms/item':>10}")
    for r in rows:
        print(f"{r['graph']:<15}{r['batch']:>6}{r['precision']:>6}{r['ms_p50']:>10.3f}{r['ms_p99']:>10.3f}"
              f"{r['ms_per_item']:>10.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"torch": torch.__version__, "device": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
