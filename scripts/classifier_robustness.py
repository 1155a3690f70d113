"""Does an AU classifier judge expressions, or pixel alignment? (docs/experiments.md, "Fourth round")

    .venv/bin/python scripts/classifier_robustness.py --data data/synth3 \
        --checkpoint runs/clf8/last.safetensors runs/clf11/last.safetensors [--items 150]

Mean F1 (``metrics.au_scores``, threshold 0.5) of each checkpoint's ``au_classifier`` on the
test split's frames, as they are and perturbed the way real inputs differ from the synthetic
corpus, which renders every frame pixel-aligned with its identity image: frame and reference
shifted together by 3 px (another face position in the crop), the reference alone shifted by
1.5 px (a reference never lines up to the pixel), the frame blurred (sigma 1 px: generated
frames are softer than the photo). Every checkpoint sees the same items (``--items`` of them,
drawn with ``--seed``; 0 = all). ``--items 0`` with the "as is" column is the held-out F1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from avatar_stream.training.checkpoint import CheckpointError
from avatar_stream.training.datasets import AUFrameDataset, to_chw
from avatar_stream.training.evaluate import load_au_classifier
from avatar_stream.training.metrics import au_scores
from avatar_stream.training.models import AUClassifier
from avatar_stream.training.shards import ShardError, load_clip, load_frames


def _shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT101)


# name -> (frames (k, S, S, 3) float32, identity (S, S, 3) float32) -> the same, perturbed
PERTURBATIONS = {
    "as is": lambda f, i: (f, i),
    "joint 3 px shift": lambda f, i: (np.stack([_shift(x, 3.0, 3.0) for x in f]), _shift(i, 3.0, 3.0)),
    "reference 1.5 px shift": lambda f, i: (f, _shift(i, 1.5, 1.5)),
    "blur sigma 1 px": lambda f, i: (np.stack([cv2.GaussianBlur(x, (0, 0), 1.0) for x in f]), i),
}


def inputs(clf: AUClassifier, ds: AUFrameDataset, item: int, perturb):
    """``clf``'s input (``AUClassifier.inputs``) for one dataset item's frames and identity
    image under ``perturb``, and the item's (labels, valid)."""
    ci, j = ds.items[item]
    idx = ds.frame_indices(ci, j)
    frames = load_frames(ds.root, ds.entries[ci], idx).astype(np.float32)
    ident = load_clip(ds.root, ds.entries[ci], ("identity",))["identity"].astype(np.float32)
    frames, ident = perturb(frames, ident)
    chw = lambda a: to_chw(np.clip(a, 0, 255))  # noqa: E731
    return clf.inputs(chw(frames), chw(ident)[None]), ds.labels(ci, idx)


def score(clf: AUClassifier, ds: AUFrameDataset, items, perturb) -> float:
    probs, labels, valid = [], [], []
    with torch.no_grad():
        for i in items:
            x, (y, v) = inputs(clf, ds, int(i), perturb)
            probs.append(torch.sigmoid(clf(x)).numpy())
            labels.append(y.numpy())
            valid.append(v.numpy() > 0)
    return au_scores(np.concatenate(probs), np.concatenate(labels), np.concatenate(valid)).mean_f1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="corpus with a test split (avatar-train synth --out)")
    ap.add_argument("--checkpoint", type=Path, nargs="+", required=True, help="checkpoints holding au_classifier")
    ap.add_argument("--items", type=int, default=150, help="test items (16 frames each) to score; 0 = all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    try:
        ds = AUFrameDataset(args.data, "test", per_item=16)
        models = [(str(path), load_au_classifier(path)) for path in args.checkpoint]
    except (ShardError, CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        print(f"classifier_robustness: {e}", file=sys.stderr)
        return 2
    n = len(ds) if args.items <= 0 else min(args.items, len(ds))
    items = np.random.default_rng(args.seed).choice(len(ds), n, replace=False)
    table = {name: {p: score(clf, ds, items, fn) for p, fn in PERTURBATIONS.items()} for name, clf in models}
    print(f"mean F1 on {n} test items (up to {ds.per_item} frames each)")
    print("checkpoint | " + " | ".join(PERTURBATIONS))
    for name, row in table.items():
        print(f"{name} | " + " | ".join(f"{v:.3f}" for v in row.values()))
    if args.json:
        args.json.write_text(json.dumps({"items": n, "seed": args.seed, "mean_f1": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
