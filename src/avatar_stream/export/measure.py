"""Measure exported precisions: onnxruntime CPU latency per graph and int8 image quality.

    python -m avatar_stream.export.measure --checkpoint run/best.safetensors [--speech S] [--face F]
    python -m avatar_stream.export.measure --width paper      # no checkpoint: trained-like init

Exports fp32 and int8 into a temporary directory, then on held-out inputs (``--speech`` /
``--face``; default the bundled ones) prints batch-1 latency of every graph at 1 and 2 threads
(best of ``--repeats``: other load only ever adds time), and the PSNR of the int8 decoder frame
against fp32, alone and end to end (int8 features into the int8 decoder).

Without a checkpoint the model gets ``trained_like`` weights: PyTorch's default init leaves
activations so small that the frame hardly moves with the audio, which would make every
precision look perfect.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatar_stream.export import parity as P
from avatar_stream.export.onnx_export import ExportOptions, export_model
from avatar_stream.export.quantize import _latency_ms

GRAPHS = ("identity", "audio", "tcsan_decoder")


def trained_like(model: nn.Module, seed: int = 0, face_path: Path | None = None,
                 speech_path: Path | None = None) -> nn.Module:
    """Give a randomly initialised TalkingHead the activation scale of a trained one: Kaiming-
    normal conv/linear weights, then batch-norm statistics measured on a real face and speech
    (the bundled ones by default), as training would leave them. Returns the model in eval()."""
    from avatar_stream.training.mfcc import mfcc_windows

    torch.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration batch
    crop, _ = P.real_face(face_path)
    model.train()
    with torch.no_grad():
        model.frame_features(mfcc_windows(P.real_speech(speech_path)))
        model.encode_identity(P.face_tensor([crop, np.ascontiguousarray(crop[:, ::-1])]))
    return model.eval()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def measure(model: nn.Module, face_path: Path | None, speech_path: Path | None, repeats: int = 40) -> dict:
    """Export fp32 + int8 to a temporary directory and measure them (see module docstring)."""
    with tempfile.TemporaryDirectory(prefix="avatar-measure-") as tmp:
        dirs = {p: Path(tmp, p) for p in ("fp32", "int8")}
        for prec, d in dirs.items():
            export_model(model, d, ExportOptions(precision=prec), checkpoint_sha256="0" * 64, log=lambda *a: None)
        crop, _ = P.real_face(face_path)
        rec = P.record_inputs(model, [crop], P.real_speech(speech_path))
        res: dict = {"frames": int(rec["audio"]["pcm"].shape[0]), "latency_ms": {}}
        for prec, d in dirs.items():
            for g in GRAPHS:
                one = {k: v[:1].numpy() for k, v in rec[g].items()}
                for threads in (1, 2):
                    res["latency_ms"][(prec, g, threads)] = _latency_ms(
                        P.ort_session(d / f"{g}.onnx", threads=threads), one, repeats)
        dec = {k: v.numpy() for k, v in rec["tcsan_decoder"].items()}
        ref = P.ort_session(dirs["fp32"] / "tcsan_decoder.onnx").run(["frame"], dec)[0]
        dec8 = P.ort_session(dirs["int8"] / "tcsan_decoder.onnx")
        feat8 = P.ort_session(dirs["int8"] / "audio.onnx").run(["feat"], {"pcm": rec["audio"]["pcm"].numpy()})[0]
        windows8 = P.edge_windows(torch.from_numpy(feat8), list(range(len(feat8))), model.cfg.lookahead_frames)
        end2end = dec8.run(["frame"], {**dec, "feats": windows8.numpy()})[0]
        res["psnr_decoder_db"] = _psnr(ref, dec8.run(["frame"], dec)[0])
        res["psnr_end_to_end_db"] = _psnr(ref, end2end)
        res["max_abs_end_to_end"] = float(np.abs(ref - end2end).max())
        res["frame_motion"] = float(np.abs(ref[1:] - ref[:-1]).max()) if len(ref) > 1 else 0.0
    return res


def _print(res: dict) -> None:
    lat = res["latency_ms"]
    print(f"{'graph':<14} {'fp32 1t':>9} {'int8 1t':>9} {'fp32 2t':>9} {'int8 2t':>9} {'speed-up':>9}")
    for g in GRAPHS:
        row = [lat[(p, g, t)] for t in (1, 2) for p in ("fp32", "int8")]
        print(f"{g:<14} {row[0]:>7.2f}ms {row[1]:>7.2f}ms {row[2]:>7.2f}ms {row[3]:>7.2f}ms {row[0] / row[1]:>8.2f}x")
    print(f"int8 over {res['frames']} frames: decoder PSNR vs fp32 {res['psnr_decoder_db']:.1f} dB; end to end "
          f"{res['psnr_end_to_end_db']:.1f} dB (max abs {res['max_abs_end_to_end']:.3f}; fp32 frame-to-frame "
          f"motion up to {res['frame_motion']:.3f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avatar_stream.export.measure", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help="trained checkpoint (default: a trained-like random model)")
    p.add_argument("--width", choices=("tiny", "paper"), default="paper", help="model size without a checkpoint")
    p.add_argument("--face", type=Path, help="face photo for measuring (default: bundled)")
    p.add_argument("--speech", type=Path, help="speech for measuring (default: bundled)")
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.checkpoint:
        from avatar_stream.training.checkpoint import build_model_from_checkpoint

        model = build_model_from_checkpoint(args.checkpoint)
    else:
        from avatar_stream.training.config import ModelConfig
        from avatar_stream.training.models import TalkingHead

        torch.manual_seed(0)
        model = trained_like(TalkingHead(ModelConfig() if args.width == "paper" else ModelConfig.tiny()))
    _print(measure(model, args.face, args.speech, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
