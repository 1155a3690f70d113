"""Score a candidate model against the shipped starter on the same figures (MODEL_CARD.md).

    .venv/bin/python scripts/compare_starter.py \
        --checkpoint runs/full/best.safetensors --model models/ \
        --data data/synth --clips /work/shared/data/grid_dev \
        --real-data data/real [--json compare.json]

Two halves: the synthetic corpus's test split and the GRID clips (``--data``, ``--clips``:
``scorecard.beats``), and the real-media dev speakers (``--real-data``, an ``avatar-train
prepare-real`` output: ``eval-real`` of both models' default renderers, ``scorecard.real_beats``).
``--data`` may be left out only when the candidate's checkpoint is the shipped one (a new mouth
head, interiors or renderer): its synthetic figures are then the shipped ones.

Both models are scored on the same corpus test split and the same real clips
(``training.scorecard.score``); where their AU classifiers differ, the shipped model's
generated frames are also judged by the candidate's classifier, so that generated-frame AU
F1 compares the generators under one judge. Exit status 0: the candidate beats the shipped weights
(``scorecard.beats``: no figure regresses past its tolerance and at least one improves by
its margin) and may replace src/avatar_stream/starter; 1: it does not (the reasons are
printed); 2: bad input. ``--no-shipped`` scores the candidate alone (exit 0). Commit new starter weights only on exit status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avatar_stream import STARTER_DIR
from avatar_stream.engine.runners import file_sha256
from avatar_stream.training.scorecard import (
    ScoreOptions,
    beats,
    headline,
    real_beats,
    same_classifier,
    score,
    ship_verdict,
)

STARTER_CHECKPOINT = STARTER_DIR / "starter.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="candidate training checkpoint")
    p.add_argument("--model", type=Path, required=True, help="candidate exported model dir (avatar-export --out)")
    p.add_argument("--data", type=Path, help="corpus with a test split (avatar-train synth --out)")
    p.add_argument("--clips", type=Path, nargs="+", default=(), help="real talking-face clips (GRID) or folders")
    p.add_argument("--real-data", type=Path, help="avatar-train prepare-real output: score the real-media dev split")
    p.add_argument("--renderer", default=None, help="the candidate's default renderer (default: the engine's)")
    p.add_argument("--shipped-renderer", default=None, help="the shipped starter's default renderer "
                   "(default: the engine's; 'neural' for starters before the mouth head)")
    p.add_argument("--shipped-checkpoint", type=Path, default=STARTER_CHECKPOINT)
    p.add_argument("--shipped-model", type=Path, default=STARTER_DIR / "onnx")
    p.add_argument("--no-shipped", action="store_true", help="score the candidate only (e.g. for its model card)")
    p.add_argument("--max-clips", type=int, help="generator figures on the first N test clips only")
    p.add_argument("--json", type=Path, help="write both score sets here")
    args = p.parse_args(argv)
    paths = [args.checkpoint, args.model] + [x for x in (args.data, args.real_data) if x is not None] + \
        ([] if args.no_shipped else [args.shipped_checkpoint, args.shipped_model])
    for path in paths:
        if not path.exists():
            print(f"compare_starter: {path} does not exist", file=sys.stderr)
            return 2
    if args.data is None and not args.no_shipped and \
            file_sha256(args.checkpoint) != file_sha256(args.shipped_checkpoint):
        print("compare_starter: --data is needed: the candidate's checkpoint is not the shipped one, so its "
              "synthetic figures must be scored", file=sys.stderr)
        return 2
    if args.data is None and args.real_data is None:
        print("compare_starter: give --data (synthetic corpus), --real-data (real media), or both", file=sys.stderr)
        return 2
    real = _score_real(args) if args.real_data is not None else {}
    if args.data is None:
        return _verdict(args, None, real)
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
        args.json.write_text(json.dumps({**res, "real": real}, indent=1, default=float))
    if "shipped" not in res:
        return 0
    return _verdict(args, beats(res["candidate"], res["shipped"]), real)


def _score_real(args) -> dict:
    from avatar_stream.engine.stream import RENDERERS
    from avatar_stream.training.real_eval import RealEvalOptions, evaluate_real, format_table

    out = {}
    runs = [("candidate", args.model, args.renderer or RENDERERS[0])]
    if not args.no_shipped:
        runs.append(("shipped", args.shipped_model, args.shipped_renderer or RENDERERS[0]))
    for name, model, renderer in runs:
        out[name] = evaluate_real(RealEvalOptions(data=args.real_data, model=model, renderers=(renderer,)), progress=None)
        out[name]["default_renderer"] = renderer
        print(f"real media, {name} ({model}, {renderer}):\n{format_table(out[name])}")
    return out


def _verdict(args, synthetic, real: dict) -> int:
    if args.json and synthetic is None:
        args.json.write_text(json.dumps({"real": real}, indent=1, default=float))
    if args.no_shipped:
        return 0
    real_half = None
    if real:
        c, s = real["candidate"], real["shipped"]
        real_half = real_beats(c, s, c["default_renderer"], s["default_renderer"])
    ok, why = ship_verdict(synthetic, real_half)
    print(("verdict: the candidate beats the shipped starter: " if ok else "verdict: keep the shipped starter: ")
          + "; ".join(why))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
