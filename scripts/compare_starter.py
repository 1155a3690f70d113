"""Score a candidate model against the shipped starter on the same figures (MODEL_CARD.md).

    .venv/bin/python scripts/compare_starter.py \
        --checkpoint runs/full/best.safetensors --model models/ \
        --data data/synth --clips /work/shared/data/grid_dev [--json compare.json]

Both models are scored on the same corpus test split and the same real clips
(``training.scorecard.score``); where their AU classifiers differ, the shipped model's
generated frames are also judged by the candidate's classifier, so that generated-frame AU
F1 compares the generators under one judge. Exit status 0: the candidate beats the shipped weights
(``scorecard.beats``: no figure regresses past its tolerance and at least one improves by
its margin) and may replace pkg/starter; 1: it does not (the reasons are
printed); 2: bad input. ``--no-shipped`` scores the candidate alone (exit 0). Commit new starter weights only on exit status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avatar_stream import STARTER_DIR
from avatar_stream.training.scorecard import (
    ScoreOptions,
    beats,
    headline,
    same_classifier,
    score,
)

STARTER_CHECKPOINT = STARTER_DIR / "starter.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="candidate training checkpoint")
    p.add_argument("--model", type=Path, required=True, help="candidate exported model dir (avatar-export --out)")
    p.add_argument("--data", type=Path, required=True, help="corpus with a test split (avatar-train synth --out)")
    p.add_argument("--clips", type=Path, nargs="+", required=True, help="real talking-face clips (GRID) or folders")
    p.add_argument("--shipped-checkpoint", type=Path, default=STARTER_CHECKPOINT)
    p.add_argument("--shipped-model", type=Path, default=STARTER_DIR / "onnx")
    p.add_argument("--no-shipped", action="store_true", help="score the candidate only (e.g. for its model card)")
    p.add_argument("--max-clips", type=int, help="generator figures on the first N test clips only")
    p.add_argument("--json", type=Path, help="write both score sets here")
    args = p.parse_args(argv)
    paths = [args.checkpoint, args.model, args.data] + ([] if args.no_shipped else
                                                         [args.shipped_checkpoint, args.shipped_model])
    for path in paths:
        if not path.exists():
            print(f"compare_starter: {path} does not exist", file=sys.stderr)
            return 2
    res = {}
    runs = [("candidate", args.checkpoint, args.model)]
    if not args.no_shipped:
        runs.append(("shipped", args.shipped_checkpoint, args.shipped_model))
    # One judge for both generators: where the classifiers differ, the candidate's also scores
    # the shipped model's generated frames.
    judge = None if args.no_shipped or same_classifier(args.checkpoint, args.shipped_checkpoint) else args.checkpoint
    for name, ckpt, model in runs:
        res[name] = score(ScoreOptions(checkpoint=ckpt, model_dir=model, data=args.data, clips=tuple(args.clips),
                                       max_clips=args.max_clips, judge=judge if name == "shipped" else None))
    if judge is not None:
        print(f"generated_au_f1: both models judged by the candidate's classifier (the shipped one's own: "
              f"{res['shipped']['generator']['au_f1_own_classifier']:.4f})")
    c = headline(res["candidate"])
    s = headline(res["shipped"]) if "shipped" in res else {}
    print(f"{'figure':<32} {'candidate':>10} {'shipped':>10}")
    for k in sorted(set(c) | set(s)):
        fmt = lambda v: "-" if v is None else f"{v:10.4f}"  # noqa: E731
        print(f"{k:<32} {fmt(c.get(k)):>10} {fmt(s.get(k)):>10}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float))
    if "shipped" not in res:
        return 0
    ok, why = beats(res["candidate"], res["shipped"])
    print(("verdict: the candidate beats the shipped starter: " if ok else "verdict: keep the shipped starter: ")
          + "; ".join(why))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
