"""Assemble the shipped starter checkpoint from the stage runs (no training, no pickles).

    .venv/bin/python scripts/assemble_starter.py --train runs/full/best.safetensors \
        --au-classifier runs/clf/best.safetensors --out src/avatar_stream/starter/starter

Writes ``OUT.safetensors`` + ``OUT.json`` (training/checkpoint.py format) holding module
``generator`` (Audio2AU inside it) from ``--train`` and ``au_classifier`` from
``--au-classifier`` (or the train run's own, when it trained with L_au), without optimizer
state or RNG rows. ``--train`` may be an assembled starter (``src/avatar_stream/starter/starter.safetensors``):
its generator, and the record of where that came from, are kept. Both must have the same
architecture (loss weights may differ); the file carries the train run's config. ``extra``
records where each came from and the stage extras, so the model card can be checked against
the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from avatar_stream.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from avatar_stream.training.config import ModelConfig

LOSS_WEIGHTS = {f.name: 0.0 for f in dataclasses.fields(ModelConfig) if f.name.startswith("w_")}
CLASSIFIER_FIELDS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name.startswith("au_clf_")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True, help="avatar-train train checkpoint")
    p.add_argument("--au-classifier", type=Path, help="pretrain-au-classifier checkpoint (default: the train run's)")
    p.add_argument("--out", type=Path, required=True, help="output stem (OUT.safetensors, OUT.json)")
    args = p.parse_args(argv)
    try:
        cfg, states, extra = load_checkpoint(args.train)
        modules = {"generator": states["generator"]}
        clf_src = args.au_classifier or args.train
        clf_cfg, clf_states, clf_extra = load_checkpoint(clf_src)
    except (CheckpointError, FileNotFoundError, KeyError) as e:
        print(f"assemble_starter: {e}", file=sys.stderr)
        return 2
    if "au_classifier" not in clf_states:
        print(f"assemble_starter: {clf_src} holds no au_classifier: pass --au-classifier", file=sys.stderr)
        return 2
    # Loss weights differ between stages (--no-vgg sets w_per=0 for train only); the
    # architecture must not.
    # The au_clf_* fields concern the classifier only: they come from its run; a2a_width
    # concerns the generator only: it stays the train run's.
    clf_only = {**LOSS_WEIGHTS, **CLASSIFIER_FIELDS, "a2a_width": 0.0}
    if dataclasses.replace(clf_cfg, **clf_only) != dataclasses.replace(cfg, **clf_only):
        print(f"assemble_starter: {clf_src} has another architecture (ModelConfig) than {args.train}", file=sys.stderr)
        return 2
    modules["au_classifier"] = clf_states["au_classifier"]
    cfg = dataclasses.replace(cfg, **{name: getattr(clf_cfg, name) for name in CLASSIFIER_FIELDS})
    # --train may be an assembled starter itself (a new classifier for the shipped generator):
    # keep where its generator came from
    gen_from, gen_extra = ((extra["generator_from"], extra["generator_extra"]) if "generator_from" in extra
                           else (str(args.train), extra))
    meta = {"generator_from": gen_from, "generator_extra": gen_extra,
            "au_classifier_from": str(clf_src), "au_classifier_extra": clf_extra}
    out = save_checkpoint(args.out, modules, cfg, extra=meta)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
