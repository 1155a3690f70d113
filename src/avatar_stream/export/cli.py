"""``avatar-export``: checkpoint -> model directory (three ONNX graphs with cards, manifest.json,
optionally TensorRT engines), gated by parity against torch.

    avatar-export --checkpoint run/best.safetensors --out models/ [--precision fp32|fp16|int8]
                  [--tensorrt] [--fp16] [--batch-max N] [--no-parity]

Exit status: 0 on success, 1 when the parity gate fails, 2 on a usage or input error; every
error is one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

PROG = "avatar-export"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export a trained avatar-stream checkpoint to ONNX "
                                "(and TensorRT), each graph checked against torch on real inputs.")
    p.add_argument("--checkpoint", required=True, type=Path, help="<stem>.safetensors written by avatar-train")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="ONNX precision: fp32; fp16 (GPU); int8 (CPU: audio graph + decoder statically quantized)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (NVIDIA GPU + TensorRT)")
    p.add_argument("--torch-tensorrt", action="store_true",
                   help="also compile the graphs with torch-tensorrt into OUT/torch_trt (comparison path, GPU)")
    p.add_argument("--fp16", action="store_true", help="TensorRT engines in FP16 (with --tensorrt / --torch-tensorrt)")
    p.add_argument("--batch-max", type=int, default=8, help="largest batch of the TensorRT profiles (default 8)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity gate (cards then carry no errors)")
    p.add_argument("--dynamo", action="store_true", help="use torch's dynamo exporter instead of TorchScript")
    p.add_argument("--module", default=None, help="state_dict inside the checkpoint (default: the generator)")
    p.add_argument("--face", type=Path, default=None, help="face photo for parity/calibration (default: bundled)")
    p.add_argument("--speech", type=Path, default=None, help="speech for parity/calibration (default: bundled)")
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _load(args) -> tuple[object, str]:
    from avatar_stream.engine.runners import file_sha256
    from avatar_stream.export.card import check_servable
    from avatar_stream.training.checkpoint import build_model_from_checkpoint

    ckpt = args.checkpoint
    if ckpt.suffix != ".safetensors":
        ckpt = ckpt.with_name(ckpt.name + ".safetensors") if not ckpt.name.endswith(".json") else \
            ckpt.with_suffix(".safetensors")
    if not ckpt.is_file():
        raise ValueError(f"checkpoint {args.checkpoint} not found: pass the <stem>.safetensors written by avatar-train")
    model = build_model_from_checkpoint(ckpt, args.module)
    try:
        check_servable(model.cfg)
    except ValueError as e:
        raise ValueError(f"{ckpt}: {e}") from None
    return model, file_sha256(ckpt)


def _check_gpu_tools(args) -> None:
    if args.tensorrt:
        from avatar_stream.engine.runners import RunnerError, gpu_name, import_trt

        import_trt()
        if gpu_name() is None:
            raise RunnerError("--tensorrt needs an NVIDIA GPU and none was found (nvidia-smi / cuda-python)")
    if args.torch_tensorrt:
        from avatar_stream.export.torch_trt import _import

        _import()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.fp16 and not (args.tensorrt or args.torch_tensorrt):
        return _fail("--fp16 selects FP16 TensorRT engines and needs --tensorrt (for fp16 ONNX use --precision fp16)")
    if args.tensorrt and args.precision == "int8":
        return _fail("int8 graphs are for the CPU; for TensorRT export --precision fp32 (or fp16) with --tensorrt")
    if args.batch_max < 1:
        return _fail(f"--batch-max must be >= 1, got {args.batch_max}")
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", message=r".*TracerWarning.*|Converting a tensor to a Python")

    from avatar_stream.engine.card import ModelCardError
    from avatar_stream.engine.runners import RunnerError
    from avatar_stream.export.onnx_export import ExportOptions, export_model
    from avatar_stream.export.parity import ParityError
    from avatar_stream.export.torch_trt import TorchTrtError
    from avatar_stream.training.checkpoint import CheckpointError

    try:
        _check_gpu_tools(args)  # fail before a long export, not after it
        model, sha = _load(args)
        opts = ExportOptions(precision=args.precision, batch_max=args.batch_max, parity=not args.no_parity,
                             dynamo=args.dynamo, tensorrt=args.tensorrt, trt_fp16=args.fp16,
                             torch_tensorrt=args.torch_tensorrt)
        report = export_model(model, args.out, opts, checkpoint_sha256=sha, face_path=args.face,
                              speech_path=args.speech)
    except ParityError as e:
        return _fail(str(e), 1)
    except (CheckpointError, ModelCardError, RunnerError, TorchTrtError, ValueError, OSError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    _print_report(report, args)
    return 0


def _print_report(report, args) -> None:
    from avatar_stream.export.parity import parity_table

    if report.parity:
        print(parity_table(report.parity))
    else:
        print("parity gate skipped (--no-parity)")
    for g, card in report.cards.items():
        secs = report.seconds.get(g, 0.0)
        print(f"wrote {args.out / (g + '.onnx')}  ({card.precision}, {secs:.1f} s)")
    if report.int8:
        for g, r in report.int8.items():
            psnr = f", PSNR vs fp32 {r['psnr_db']:.1f} dB" if "psnr_db" in r else ""
            print(f"int8 {g}: {r['fp32_ms']:.2f} ms -> {r['int8_ms']:.2f} ms at batch 1 "
                  f"({r['speedup']:.2f}x){psnr}")
    for s in report.engines.values():
        print(f"wrote {args.out / s['file']}  (TensorRT {s['tensorrt_version']}, {s['gpu']}, {s['precision']})")
    print(f"wrote {args.out / 'manifest.json'}")


if __name__ == "__main__":
    sys.exit(main())
