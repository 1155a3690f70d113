"""Held-out F1 of AU classifiers, per AU and per identity, with a paired bootstrap of their
differences (docs/experiments.md, seventh round onwards).

    .venv/bin/python scripts/classifier_f1.py --data data/synth3 \
        --checkpoint runs/clf21/last.safetensors runs/clf22/last.safetensors [--json out.json]

Every checkpoint's ``au_classifier`` (with the identity image as reference where it was
trained with one) judges every frame of the split once (``--split``, default the test split: the
10 held-out identities) at threshold 0.5; F1 is ``metrics.au_scores``, the figure
``scripts/compare_starter.py`` reports as "AU classifier F1". The first checkpoint is the
baseline: for each other one the difference of mean F1 is bootstrapped over clips
(``--resamples`` resamples of the split's clips with replacement, the same resample for both
classifiers), which gives its standard error and a 95 % interval; the same resamples give
each figure's own standard error (clips, not identities, are resampled: it does not cover
the choice of the 10 held-out faces). ``--ensemble`` adds the
mean logit of all checkpoints as one more row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from avatar_stream.engine.timebase import AU_NAMES
from avatar_stream.training.checkpoint import CheckpointError
from avatar_stream.training.datasets import AUFrameDataset, to_chw
from avatar_stream.training.evaluate import load_au_classifier
from avatar_stream.training.metrics import au_counts, au_scores, f1_from_counts
from avatar_stream.training.shards import ShardError, load_clip, load_frames


def _prob(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def logits_by_clip(clf, ds: AUFrameDataset, clips: list[int]):
    """Per clip index of ``ds``: (logits, labels, valid) of each of its frames, once."""
    out = {}
    with torch.no_grad():
        for ci in clips:
            entry = ds.entries[ci]
            idx = np.arange(entry["frames"])
            frames = to_chw(load_frames(ds.root, entry, idx))
            ident = to_chw(load_clip(ds.root, entry, ("identity",))["identity"])[None]
            logits = np.concatenate([clf(clf.inputs(frames[k : k + 256], ident)).numpy()
                                     for k in range(0, len(idx), 256)])
            y, v = ds.labels(ci, idx)
            out[ci] = (logits, y.numpy(), v.numpy() > 0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="corpus (avatar-train synth --out)")
    ap.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                    help="checkpoints holding au_classifier; the first is the baseline of the differences")
    ap.add_argument("--split", default="test", choices=("test", "train"))
    ap.add_argument("--clips", type=int, default=0, help="score only this many clips, drawn with --seed (0 = all)")
    ap.add_argument("--resamples", type=int, default=500, help="bootstrap resamples of the clips")
    ap.add_argument("--ensemble", action="store_true", help="also score the mean logit of all checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        ds = AUFrameDataset(args.data, args.split, per_item=16)
        models = [(f"{path}" + (f" #{k}" if args.checkpoint.count(path) > 1 else ""), load_au_classifier(path))
                  for k, path in enumerate(args.checkpoint)]
    except (ShardError, CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        print(f"classifier_f1: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    clips = list(range(len(ds.entries)))
    if args.clips > 0:
        clips = sorted(rng.choice(len(clips), min(args.clips, len(clips)), replace=False).tolist())
    per_model = {name: logits_by_clip(clf, ds, clips) for name, clf in models}
    if args.ensemble and len(models) > 1:
        per_model["ensemble (mean logit)"] = {
            ci: (np.mean([per_model[n][ci][0] for n, _ in models], axis=0),) + per_model[models[0][0]][ci][1:]
            for ci in clips}
    names = list(per_model)
    # counts[m, clip] (3, n_au); identity of each clip
    cnt = np.stack([[au_counts(_prob(per_model[n][ci][0]), *per_model[n][ci][1:]) for ci in clips]
                    for n in names])
    ident = [ds.entries[ci].get("identity", ds.entries[ci]["speaker"]) for ci in clips]
    frames = sum(len(per_model[names[0]][ci][1]) for ci in clips)
    # multinomial clip weights: one bootstrap resample of the clips, shared by all classifiers
    w = rng.multinomial(len(clips), np.full(len(clips), 1 / len(clips)), size=args.resamples)
    boot = np.nanmean(f1_from_counts(np.einsum("rc,mcku->mrku", w, cnt)), axis=-1)  # (models, resamples)
    table = {}
    for m, name in enumerate(names):
        f1 = f1_from_counts(cnt[m].sum(0))
        faces = {f: float(np.nanmean(f1_from_counts(cnt[m][[i for i, g in enumerate(ident) if g == f]].sum(0))))
                 for f in sorted(set(ident))}
        row = {"mean_f1": float(np.nanmean(f1)), "se": float(boot[m].std(ddof=1)), "f1": [float(v) for v in f1],
               "by_identity": faces}
        if m:
            d = boot[m] - boot[0]
            row["diff_vs_first"] = {"mean": float(np.nanmean(f1) - table[names[0]]["mean_f1"]),
                                    "se": float(d.std(ddof=1)),
                                    "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]}
        table[name] = row
    # the check every figure rests on: the same F1 as metrics.au_scores over all frames
    first = per_model[names[0]]
    ref = au_scores(_prob(np.concatenate([first[ci][0] for ci in clips])),
                    np.concatenate([first[ci][1] for ci in clips]), np.concatenate([first[ci][2] for ci in clips]))
    assert abs(ref.mean_f1 - table[names[0]]["mean_f1"]) < 1e-9
    print(f"{args.split} split: {len(clips)} clips, {frames} frames, {len(set(ident))} identities; "
          f"bootstrap {args.resamples} resamples of clips")
    print(f"checkpoint | mean F1 (SE) | per AU ({' / '.join(AU_NAMES)}) | vs first: diff (SE) [95 %]")
    for name, row in table.items():
        d = row.get("diff_vs_first")
        diff = f"{d['mean']:+.4f} ({d['se']:.4f}) [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else ""
        print(f"{name} | {row['mean_f1']:.4f} ({row['se']:.4f}) | {' / '.join(f'{v:.3f}' for v in row['f1'])} | {diff}")
    print("per identity: " + "; ".join(
        f"{f} " + " ".join(f"{table[n]['by_identity'][f]:.3f}" for n in names) for f in sorted(set(ident))))
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "clips": len(clips), "frames": frames,
                                         "resamples": args.resamples, "seed": args.seed, "models": table},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
