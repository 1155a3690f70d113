"""How learnable are a corpus's AU occurrence labels? (docs/au_table.md)

    .venv/bin/python scripts/label_ceiling.py --data data/synth3 [--noise 0.03 0.05 0.08 0.1]

A simulated recogniser knows every frame's AU intensity up to Gaussian noise of the given
standard deviation and thresholds it like the labels (``au_table.OCCURRENCE_THRESHOLDS``);
its F1 against the true labels is the best a real recogniser of that precision can reach.
When an AU's intensity sits near its threshold most of the time, the ceiling is low whatever
the model. Uses every labelled frame of the corpus (train and test splits); seed 0 for each
noise level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from avatar_stream.engine.timebase import AU_NAMES
from avatar_stream.training.au_table import occurrence
from avatar_stream.training.metrics import au_scores
from avatar_stream.training.shards import ShardError, load_clip, split_entries


def ceiling(intensities: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Per-AU F1 (``metrics.au_scores``) of ``intensities (N, 5) + N(0, sigma)`` thresholded
    (``au_table.occurrence``), against the labels; NaN for an AU that never occurs."""
    guess = occurrence(intensities + rng.normal(0.0, sigma, intensities.shape))
    return au_scores(guess, occurrence(intensities)).f1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="corpus (avatar-train synth --out)")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.03, 0.05, 0.08, 0.1],
                    help="recogniser noise standard deviations (intensity units)")
    args = ap.parse_args(argv)
    try:
        entries = split_entries(args.data, "train") + split_entries(args.data, "test")
        arrays = [load_clip(args.data, e, ("au",))["au"] for e in entries]
    except (FileNotFoundError, ValueError, ShardError) as e:
        print(f"label_ceiling: {e}", file=sys.stderr)
        return 2
    au = np.concatenate(arrays) if arrays else np.zeros((0, len(AU_NAMES)), np.float32)
    au = au[np.isfinite(au).all(1)]
    if not len(au):
        print(f"label_ceiling: {args.data} has no frames with known AU intensities", file=sys.stderr)
        return 2
    rates = occurrence(au).mean(0)
    print(f"{args.data}: {len(au):,} frames; occurrence rate " + " ".join(f"{n} {r:.2f}" for n, r in zip(AU_NAMES, rates, strict=True)))
    print("noise  " + " ".join(f"{n:>6}" for n in AU_NAMES) + "   mean")
    for s in args.noise:
        f1 = ceiling(au, s, np.random.default_rng(0))  # same draw per level, whatever --noise lists
        print(f"{s:5.2f}  " + " ".join(f"{v:6.3f}" for v in f1) + f"  {f1.mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
