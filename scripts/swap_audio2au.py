"""Put a separately pretrained Audio2AU into a trained generator, without retraining it.

    .venv/bin/python scripts/swap_audio2au.py --generator src/avatar_stream/starter/starter.safetensors \
        --audio2au runs/au15/last.safetensors --data data/synth3 --out runs/swap/starter

The generator's fusion (TCSAN) reads the five Audio2AU modules' features (``au_dim`` each).
A new Audio2AU, trained on its own (another width, another seed), has features in another
basis, so it cannot simply replace the old one. This script fits, by ridge least squares on
MFCC windows of the corpus's training split, the linear map ``f_old ~= A f_new + c`` from the
new modules' features to the old ones', and folds it into the first fusion level, whose
input convolutions (dilated conv, 1x1 residual, or the "time" taps) are linear in those
features: their weights on the Audio2AU features become ``W A`` and their bias gains ``W c``.
The result is one ordinary generator (the new Audio2AU, heads included, plus the adjusted
fusion) whose Audio2AU scores as the new one, while the rest sees what the linear map can
rebuild of the old features; it prints that share (R^2) per module. A short ``train --init``
fine-tune can follow. Writes ``OUT.safetensors`` + ``OUT.json`` (the generator's other
modules, e.g. ``au_classifier``, carried over), config ``a2a_width`` from the Audio2AU run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatar_stream.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from avatar_stream.training.datasets import MFCCCache
from avatar_stream.training.models import TalkingHead
from avatar_stream.training.shards import split_entries


def sample_windows(data: Path, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` MFCC windows ``(n, 12, 28)`` spread over the training split's clips."""
    entries = split_entries(data, "train")
    if not entries:
        raise ValueError(f"{data} has no training clips")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(entries))
    per = max(1, -(-n // len(entries)))
    cache, out, total = MFCCCache(data), [], 0
    for i in order:
        m = cache.get(entries[i])
        take = rng.choice(len(m), min(per, len(m)), replace=False)
        out.append(m[take])
        total += len(take)
        if total >= n:
            break
    return np.concatenate(out)[:n].astype(np.float32)


@torch.no_grad()
def au_features(modules: nn.ModuleList, windows: np.ndarray, batch: int = 2048) -> np.ndarray:
    """Concatenated Audio2AU features ``(n, n_au * au_dim)`` of MFCC windows."""
    feats = []
    for s in range(0, len(windows), batch):
        x = torch.from_numpy(windows[s : s + batch]).unsqueeze(1)
        feats.append(torch.cat([m.features(x) for m in modules], dim=1).numpy())
    return np.concatenate(feats).astype(np.float64)


def fit_map(new: np.ndarray, old: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge least squares ``old ~= new @ A.T + c``: returns ``A (d_old, d_new)``, ``c (d_old,)``
    and the R^2 of each old feature (NaN where it does not vary)."""
    mu_n, mu_o = new.mean(0), old.mean(0)
    xn, xo = new - mu_n, old - mu_o
    gram = xn.T @ xn
    gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
    a = np.linalg.solve(gram, xn.T @ xo).T
    c = mu_o - a @ mu_n
    resid = xo - xn @ a.T
    var = xo.var(0)
    r2 = np.where(var > 1e-12, 1.0 - resid.var(0) / np.maximum(var, 1e-12), np.nan)
    return a, c, r2


@torch.no_grad()
def fold_into_fusion(model: TalkingHead, a: np.ndarray, c: np.ndarray) -> list[str]:
    """Replace the first fusion level's weights on the Audio2AU inputs by ``W A`` and add
    ``W c`` to its biases; returns the convolutions changed."""
    cfg = model.cfg
    blocks = getattr(model.fusion, "blocks", None)
    if blocks is None:
        raise ValueError(f"fusion {cfg.fusion!r} has no dilated-conv first level: only 'tcsan' and 'tcn' can be folded")
    start = cfg.f_id + cfg.f_a
    cols = slice(start, start + a.shape[0])
    first = blocks[0]
    if not isinstance(getattr(first, "res", None), nn.Conv1d):
        raise ValueError("the first fusion level adds its input unprojected (fusion input width == tcsan_hidden): "
                         "the map cannot be folded into it; fine-tune with train --init instead")
    changed = []
    for name in ("conv", "taps", "res"):
        conv = getattr(first, name, None)
        if not isinstance(conv, nn.Conv1d):
            continue
        w = conv.weight  # (out, in, k)
        if w.shape[1] != cfg.fusion_input_dim:
            raise ValueError(f"fusion level 0 {name} reads {w.shape[1]} inputs, expected {cfg.fusion_input_dim}")
        wa = w[:, cols, :].double()  # (out, d_old, k)
        at = torch.from_numpy(a)  # (d_old, d_new)
        ct = torch.from_numpy(c)
        folded = torch.einsum("oik,ij->ojk", wa, at)
        conv.bias += torch.einsum("oik,i->o", wa, ct).to(conv.bias.dtype)
        w[:, cols, :] = folded.to(w.dtype)
        changed.append(name)
    if not changed:
        raise ValueError("fusion level 0 has no convolution on its input to fold the map into")
    return changed


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", type=Path, required=True, help="train or starter checkpoint (module generator)")
    p.add_argument("--audio2au", type=Path, required=True, help="pretrain-au checkpoint to put in")
    p.add_argument("--data", type=Path, required=True, help="corpus whose training split's windows fit the map")
    p.add_argument("--windows", type=int, default=40000, help="MFCC windows for the fit (default 40000)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge, relative to the mean feature variance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output stem (OUT.safetensors, OUT.json)")
    args = p.parse_args(argv)
    try:
        cfg, states, extra = load_checkpoint(args.generator)
        au_cfg, au_states, au_extra = load_checkpoint(args.audio2au)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"swap_audio2au: {e}", file=sys.stderr)
        return 2
    if "generator" not in states or "audio2au" not in au_states:
        print("swap_audio2au: --generator needs module generator and --audio2au module audio2au", file=sys.stderr)
        return 2
    for name in ("au_dim", "au_names", "n_mfcc", "mfcc_frames"):
        if getattr(au_cfg, name) != getattr(cfg, name):
            print(f"swap_audio2au: {args.audio2au} has {name} {getattr(au_cfg, name)}, the generator "
                  f"{getattr(cfg, name)}: pretrain with the generator's --set {name}", file=sys.stderr)
            return 2
    old = TalkingHead(cfg).eval()
    old.load_state_dict(states["generator"])
    new_cfg = dataclasses.replace(cfg, a2a_width=au_cfg.a2a_width or au_cfg.width)
    model = TalkingHead(new_cfg).eval()
    own = {k: v for k, v in states["generator"].items() if not k.startswith("audio2au.")}
    model.load_state_dict({**own, **{f"audio2au.{k}": v for k, v in au_states["audio2au"].items()}})
    try:
        windows = sample_windows(args.data, args.windows, args.seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"swap_audio2au: {args.data}: {e}", file=sys.stderr)
        return 2
    f_old, f_new = au_features(old.audio2au, windows), au_features(model.audio2au, windows)
    a, c, r2 = fit_map(f_new, f_old, args.ridge)
    d = cfg.au_dim
    for j, name in enumerate(cfg.au_names):
        block = r2[j * d : (j + 1) * d]
        print(f"{name}: R^2 of the old features from the new {np.nanmean(block):.3f} "
              f"(min {np.nanmin(block):.3f}, {np.isnan(block).sum()} constant)")
    print(f"all: {np.nanmean(r2):.3f} over {len(windows)} windows of {args.data}")
    try:
        changed = fold_into_fusion(model, a, c)
    except ValueError as e:
        print(f"swap_audio2au: {e}", file=sys.stderr)
        return 2
    # Fit residual: how far the mapped new features are from the old ones (features computed above).
    print(f"folded into fusion level 0 ({', '.join(changed)}); fit residual: "
          f"{np.abs(f_new @ a.T + c - f_old).mean():.4f} (mean |f_old| {np.abs(f_old).mean():.4f})")
    out_states = {name: s for name, s in states.items() if name not in ("generator", "rng")}
    out_states["generator"] = model.state_dict()
    meta = {"generator_from": str(args.generator), "audio2au_from": str(args.audio2au),
            "swap": {"data": str(args.data), "windows": len(windows), "ridge": args.ridge,
                     "r2_mean": float(np.nanmean(r2))},
            "generator_extra": extra, "audio2au_extra": au_extra}
    out = save_checkpoint(args.out, out_states, new_cfg, extra=meta)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
