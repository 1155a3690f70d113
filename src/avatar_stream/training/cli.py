"""``avatar-train``: dataset preparation, the training stages and evaluation.

    avatar-train prepare grid ROOT --out DATA [--openface DIR] [--split-file F] [--workers N]
    avatar-train prepare tcd-timit ROOT --out DATA ...
    avatar-train synth --faces PHOTOS --out DATA --utterances N   (training/synth.py)
    avatar-train morph-faces --faces PHOTOS --out MORPHS --count N   (training/morph.py)
    avatar-train merge --data DATA_A --data DATA_B --out DATA
    avatar-train pretrain-au --data DATA --out RUN_AU
    avatar-train pretrain-au-classifier --data DATA --out RUN_CLF
    avatar-train train --data DATA --out RUN --audio2au RUN_AU/best.safetensors \\
        --au-classifier RUN_CLF/best.safetensors --vgg-weights vgg19-dcbb9e9d.pth
    avatar-train eval --data DATA --checkpoint RUN/best.safetensors [--json RUN/eval.json]
    avatar-train eval-mouth --model MODEL_DIR --clips GRID_CLIPS... [--json F]   (training/mouth_eval.py)
    avatar-train prepare-real --clips AV_REAL/clips --out DATA_REAL   (training/avreal.py)
    avatar-train train-mouth --data DATA_REAL --out RUN [--model MODEL_DIR --export-into MODEL_DIR]
    avatar-train eval-real --data DATA_REAL [--model MODEL_DIR] [--json F]   (training/real_eval.py)

Multi-process: ``torchrun --nproc_per_node N -m avatar_stream.training.cli train ...`` (gloo on
CPU, NCCL on GPUs). argv is parsed here only; the stages take frozen option dataclasses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (the same flags for every stage of one model)")
    g.add_argument("--tiny", action="store_true", help="small test/smoke model (ModelConfig.tiny())")
    g.add_argument("--config", metavar="PRESET|FILE.toml",
                   help=f"model preset: a bundled name ({', '.join(preset_names())}) or a TOML file whose "
                        "[model] table sets ModelConfig fields; --width and --set override it")
    g.add_argument("--width", type=float, help="internal channel multiplier (default 1.0, tiny 0.125)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any ModelConfig field, e.g. --set fusion=tcn --set tcsan_levels=2 (repeatable)")


def _loop_args(p: argparse.ArgumentParser, epochs: int, batch: int) -> None:
    g = p.add_argument_group("loop")
    g.add_argument("--data", type=Path, required=True, help="prepared shards (avatar-train prepare --out)")
    g.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log.jsonl, tb/)")
    g.add_argument("--batch", type=int, default=batch, help=f"batch per process (default {batch})")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs}; --steps wins)")
    g.add_argument("--steps", type=int, help="optimizer steps in total (overrides --epochs)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints + validation")
    g.add_argument("--image-every", type=int, default=500,
                   help="steps between TensorBoard image grids (train only: the pretraining stages draw none)")
    g.add_argument("--val-batches", type=int, default=16, help="validation batches per checkpoint")
    g.add_argument("--lr-schedule", default="constant", metavar="{constant,cosine}",
                   help="'constant' (default) or 'cosine': each learning rate decays to 0 along half a cosine "
                        "over the run's steps")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors if present")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")


_AUG_HELP = "noise, reverberation and level changes on the training speech (training/augment.py)"
_VTLP_HELP = ("with --augment-speech: probability of a vocal tract length perturbation per training item "
              "(formants scaled by 0.85-1.15, timing kept: more speakers from the same recordings)")


def _check_probability(flag: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{flag} {value} is not a probability: give a value in [0, 1]")


def _check_speech_options(args) -> None:
    _check_probability("--vtlp", args.vtlp)
    if args.vtlp > 0 and not args.augment_speech:
        raise ValueError(f"--vtlp {args.vtlp} acts only with --augment-speech: add it, or drop --vtlp")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string, e.g. fusion=tcn


PRESETS = Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def load_preset(name_or_path: str) -> dict:
    """The ``[model]`` table of a bundled preset (``starter``, ``paper``) or of a TOML file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser from PyPI (the [train] extra installs it)
        import tomli as tomllib

    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PRESETS / f"{name_or_path}.toml"
        if not path.is_file():
            raise ValueError(f"--config {name_or_path}: no such preset; use one of {', '.join(preset_names())} "
                             "or a path to a .toml file")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {name_or_path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    model = data.get("model")
    if not isinstance(model, dict) or set(data) - {"model"}:
        raise ValueError(f"--config {path}: expected one [model] table of ModelConfig fields, "
                         f"found {sorted(data) or 'nothing'}")
    return model


def model_config(args):
    from avatar_stream.training.config import ModelConfig

    over = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r} is not KEY=VALUE (e.g. --set tcsan_levels=2)")
        over[key.strip()] = _parse_value(value.strip())
    if args.width is not None:
        over["width"] = args.width
    base = ModelConfig.tiny().to_dict() if args.tiny else ModelConfig().to_dict()
    if getattr(args, "config", None):
        base.update(load_preset(args.config))
    base.update(over)
    return ModelConfig.from_dict(base)


def _loop_options(args):
    from avatar_stream.training.loop import LoopOptions, lr_factor

    lr_factor(args.lr_schedule, 0, 1)  # one-line error for an unknown schedule
    for name in ("batch", "ckpt_every", "log_every", "image_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return LoopOptions(out=args.out, batch=args.batch, epochs=args.epochs, steps=args.steps, seed=args.seed,
                       workers=args.workers, log_every=args.log_every, ckpt_every=args.ckpt_every,
                       image_every=args.image_every, val_batches=args.val_batches, resume=args.resume,
                       progress=not args.no_progress, lr_schedule=args.lr_schedule)


# ----------------------------------------------------------------------------- commands


def cmd_prepare(args) -> int:
    from avatar_stream.training.prepare import prepare

    report = prepare(args.corpus, args.root, args.out, openface=args.openface, split_file=args.split_file,
                     workers=args.workers, retry_skipped=args.retry_skipped, progress=not args.no_progress,
                     speakers=[x for x in (args.speakers or "").split(",") if x])
    print(f"{args.out}: {report.summary()}")
    if report.skipped:
        print(f"skipped clips and reasons: {Path(args.out) / 'skipped.json'}")
    return 0


def _run_stage(args, fn, opts) -> int:
    from avatar_stream.training.ddp import init_distributed, shutdown

    info = init_distributed(args.device)
    try:
        state = fn(model_config(args), opts, _loop_options(args), info)
    finally:
        shutdown(info)
    if info.main:
        best = "none" if state["best"] == float("inf") else f"{state['best']:.5f}"
        print(f"{args.command}: {state['step']} steps, best validation loss {best}; checkpoints in {args.out}")
    return 0


def _teacher_options(args) -> dict:
    teachers = tuple(args.teacher or ())
    for path in teachers:
        if not path.with_suffix(".safetensors").is_file() and not path.is_file():
            raise ValueError(f"--teacher {path}: no such checkpoint: pass a .safetensors of this stage")
    return {"teachers": teachers, "teacher_weight": args.teacher_weight, "soft_labels": args.soft_labels}


def cmd_pretrain_au(args) -> int:
    from avatar_stream.training.stages import AudioPretrainOptions, pretrain_au

    _check_speech_options(args)
    return _run_stage(args, pretrain_au, AudioPretrainOptions(data=args.data, lr=args.lr, balance=args.balance,
                                                              augment_speech=args.augment_speech, vtlp=args.vtlp,
                                                              init=args.init, **_teacher_options(args)))


def cmd_pretrain_au_classifier(args) -> int:
    from avatar_stream.training.datasets import REFERENCE_SHIFT
    from avatar_stream.training.stages import ClassifierPretrainOptions, pretrain_au_classifier

    if args.reference_shift is not None and args.augment_images != "full":
        raise ValueError(f"--reference-shift {args.reference_shift} acts only with --augment-images full: "
                         "add it, or drop --reference-shift")
    shift = REFERENCE_SHIFT if args.reference_shift is None else args.reference_shift
    opts = ClassifierPretrainOptions(data=args.data, lr=args.lr, balance=args.balance,
                                     augment_images=args.augment_images, reference_shift=shift,
                                     init=args.init, **_teacher_options(args))
    return _run_stage(args, pretrain_au_classifier, opts)


def cmd_train(args) -> int:
    from avatar_stream.training.stages import TrainOptions, train

    _check_speech_options(args)
    _check_probability("--quiet-items", args.quiet_items)
    if args.no_vgg:
        args.set.append("w_per=0")
    opts = TrainOptions(data=args.data, clip_len=args.clip_len, lr=args.lr, lr_audio2au=args.lr_audio2au,
                        lr_au_classifier=args.lr_au_classifier, audio2au=args.audio2au,
                        au_classifier=args.au_classifier, vgg_weights=args.vgg_weights,
                        augment_speech=args.augment_speech, vtlp=args.vtlp,
                        quiet_items=args.quiet_items, init=args.init, freeze_audio=args.freeze_audio)
    return _run_stage(args, train, opts)


def cmd_eval(args) -> int:
    from avatar_stream.training.evaluate import EvalOptions, evaluate, format_tables

    res = evaluate(EvalOptions(data=args.data, checkpoint=args.checkpoint, split=args.split,
                               au_classifier=args.au_classifier, max_clips=args.max_clips,
                               face_metrics=not args.no_face_metrics, face_every=args.face_every,
                               device="cuda" if args.device == "auto" and _cuda() else
                               ("cpu" if args.device == "auto" else args.device),
                               progress=not args.no_progress))
    print(format_tables(res))
    out = args.json or Path(args.checkpoint).with_name(Path(args.checkpoint).name.split(".")[0] + ".eval.json")
    from avatar_stream.training.shards import write_json

    write_json(out, res)
    print(f"metrics written to {out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_merge(args) -> int:
    from avatar_stream.training.shards import merge_corpora

    n = merge_corpora(args.data, args.out)
    print(f"{args.out}: {n['clips']} clips ({n['train']} train / {n['test']} test speakers) from {len(args.data)} corpora")
    return 0


def cmd_prepare_real(args) -> int:
    from avatar_stream.training.avreal import prepare_real

    meta = prepare_real(args.clips, args.out, manifest=args.manifest, workers=args.workers,
                        progress=not args.no_progress, model=False if args.no_sync else args.model)
    split = meta["split"]
    moved = sum(1 for e in meta["recordings"].values() if e.get("av_offset"))
    print(f"{args.out}: {len(meta['recordings'])} recordings, {len(split['train'])} train / {len(split['dev'])} dev "
          f"speakers; {moved} recordings out of sync (real.json: av_offset)")
    return 0


def cmd_train_mouth(args) -> int:
    from avatar_stream.training.mouth_head import MouthTrainOptions, train_mouth

    opts = MouthTrainOptions(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                             hidden=args.hidden, progress=not args.no_progress)
    path, extra = train_mouth(args.data, args.out, model=args.model, opts=opts, folds=args.cv,
                              sync=not args.no_sync)
    print(f"wrote {path}")
    if args.export_into:
        from avatar_stream.export.mouth import export_mouth_head

        print(f"wrote {export_mouth_head(path, args.export_into)}")
    return 0


def cmd_mouth_interior(args) -> int:
    from avatar_stream.training.avreal import build_interior

    bank = build_interior(args.data, args.recording, args.out)
    print(f"wrote {args.out}: {len(bank.ratios)} interiors (opening ratios "
          f"{', '.join(f'{r:.2f}' for r in bank.ratios)}) from {bank.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatar-train", description="avatar-stream dataset preparation, training stages and evaluation.")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="videos -> dataset shards")
    prep.add_argument("corpus", choices=["grid", "tcd-timit"])
    prep.add_argument("root", type=Path, help="corpus root as distributed (see docs/training.md)")
    prep.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    prep.add_argument("--openface", type=Path, help="folder of OpenFace CSVs, one per clip (AU labels)")
    prep.add_argument("--split-file", type=Path, help='JSON {"train": [...], "test": [...]} of speakers')
    prep.add_argument("--speakers", help="only these speakers, comma-separated (e.g. s1,s2,s3)")
    prep.add_argument("--workers", type=int, default=1, help="processes (face alignment is the cost)")
    prep.add_argument("--retry-skipped", action="store_true", help="retry clips listed in OUT/skipped.json")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=cmd_prepare)

    if importlib.util.find_spec("avatar_stream.training.synth") is not None:
        from avatar_stream.training import synth

        syn = sub.add_parser("synth", help="make a GRID-shaped corpus with AU labels (docs/design.md §5)")
        synth.add_arguments(syn)
        syn.set_defaults(func=synth.main_synth)

        from avatar_stream.training import morph

        mor = sub.add_parser("morph-faces", help="more training identities: morphs of pairs of face photos")
        morph.add_arguments(mor)
        mor.set_defaults(func=morph.main_morph)

    mrg = sub.add_parser("merge", help="one corpus made of several (symlinks to their clips)")
    mrg.add_argument("--data", type=Path, action="append", required=True, metavar="DATA",
                     help="a prepared or synth corpus (repeat for each)")
    mrg.add_argument("--out", type=Path, required=True, help="the merged corpus (a new folder)")
    mrg.set_defaults(func=cmd_merge)

    real = sub.add_parser("prepare-real", help="real talking-face recordings -> shards with landmarks, "
                          "mouth measures, a speaker split and A/V offsets")
    real.add_argument("--clips", type=Path, required=True, help="folder of the recordings")
    real.add_argument("--manifest", type=Path, help="MANIFEST.tsv (default: in --clips or beside it)")
    real.add_argument("--out", type=Path, required=True)
    real.add_argument("--model", type=Path, help="exported model whose audio features estimate the A/V "
                      "offsets (default: the starter)")
    real.add_argument("--no-sync", action="store_true", help="do not estimate A/V offsets")
    real.add_argument("--workers", type=int, default=2)
    real.add_argument("--no-progress", action="store_true")
    real.set_defaults(func=cmd_prepare_real)

    tm = sub.add_parser("train-mouth", help="learn the mouth's shape from audio features on real video "
                        "(the mouth head)")
    tm.add_argument("--data", type=Path, required=True, help="avatar-train prepare-real output")
    tm.add_argument("--out", type=Path, required=True, help="run folder (head.safetensors, head.json)")
    tm.add_argument("--model", type=Path, help="exported model whose audio graph gives the features "
                    "(default: the starter)")
    tm.add_argument("--export-into", type=Path, metavar="MODEL_DIR",
                    help="also write MODEL_DIR/mouth.onnx (the same model as --model)")
    tm.add_argument("--cv", type=int, default=5, help="folds by speaker for the held-out figures and the "
                    "spread calibration (default 5; 0: none)")
    tm.add_argument("--epochs", type=int, default=6)
    tm.add_argument("--lr", type=float, default=1e-3)
    tm.add_argument("--weight-decay", type=float, default=0.1)
    tm.add_argument("--hidden", type=int, default=32)
    tm.add_argument("--seed", type=int, default=0)
    tm.add_argument("--no-sync", action="store_true", help="ignore the recordings' A/V offsets")
    tm.add_argument("--no-progress", action="store_true")
    tm.set_defaults(func=cmd_train_mouth)

    mi = sub.add_parser("mouth-interior", help="the warp renderer's real mouth interiors, cut from one "
                        "prepared recording")
    mi.add_argument("--data", type=Path, required=True, help="avatar-train prepare-real output")
    mi.add_argument("--recording", required=True, help="the recording (name) to cut them from")
    mi.add_argument("--out", type=Path, required=True, help="the bank (.npz)")
    mi.set_defaults(func=cmd_mouth_interior)

    from avatar_stream.training import real_eval

    er = sub.add_parser("eval-real", help="rendered mouth vs real people talking (real-media evaluation)")
    real_eval.add_arguments(er)
    er.set_defaults(func=real_eval.main_eval_real)

    from avatar_stream.training import mouth_eval

    mouth = sub.add_parser("eval-mouth", help="mouth opening of an exported model vs real talking-face videos")
    mouth_eval.add_arguments(mouth)
    mouth.set_defaults(func=mouth_eval.main_eval_mouth)

    for name, func, help_ in (("pretrain-au", cmd_pretrain_au, "pretrain Audio2AU (MFCC -> AU occurrence)"),
                              ("pretrain-au-classifier", cmd_pretrain_au_classifier,
                               "pretrain the AU classifier (lower-face crops -> AU occurrence)")):
        s = sub.add_parser(name, help=help_)
        _loop_args(s, epochs=10, batch=32)
        _model_args(s)
        s.add_argument("--lr", type=float, default=1e-3)
        s.add_argument("--balance", action="store_true",
                       help="weight positive labels by (1 - r) / r per AU (r = training occurrence rate)")
        s.add_argument("--init", type=Path, help=f"start from this {name} checkpoint's weights (new run, fresh "
                                                 "optimizer and step count; e.g. after the corpus changed)")
        s.add_argument("--teacher", type=Path, action="append", metavar="CKPT",
                       help=f"distil: a {name} checkpoint (any width; repeat for several) whose mean "
                            "probability is mixed into the training targets")
        s.add_argument("--teacher-weight", type=float, default=0.5, metavar="W",
                       help="with --teacher: target = W * teachers' mean probability + (1 - W) * label "
                            "(default 0.5)")
        s.add_argument("--soft-labels", type=float, default=0.0, metavar="TAU",
                       help="train on sigmoid((intensity - threshold) / TAU) instead of 0/1 occurrence labels "
                            "(synthetic corpora, whose labels are thresholded intensities; e.g. 0.03; "
                            "validation keeps the 0/1 labels)")
        if name == "pretrain-au":
            s.add_argument("--augment-speech", action="store_true", help=_AUG_HELP)
            s.add_argument("--vtlp", type=float, default=0.0, metavar="P", help=_VTLP_HELP)
        else:
            s.add_argument("--augment-images", nargs="?", const="colour", default="off",
                           choices=["off", "colour", "full"], metavar="MODE",
                           help="jitter the training crops: 'colour' (the default when given bare): random "
                                "horizontal flip and colour gain/offset; 'full': also position, scale, "
                                "rotation, blur and noise (docs/training.md)")
            s.add_argument("--reference-shift", type=float, metavar="PX",
                           help="with --augment-images full: the identity image alone is moved by up to "
                                "this many pixels more (default 1.5)")
        s.set_defaults(func=func)

    t = sub.add_parser("train", help="train the full model")
    _loop_args(t, epochs=20, batch=8)
    _model_args(t)
    t.add_argument("--clip-len", type=int, default=8, help="target frames per sample (context added)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--lr-audio2au", type=float, default=1e-6)
    t.add_argument("--lr-au-classifier", type=float, default=1e-7)
    t.add_argument("--audio2au", type=Path, help="pretrain-au checkpoint (RUN_AU/best.safetensors)")
    t.add_argument("--au-classifier", type=Path, help="pretrain-au-classifier checkpoint (enables L_au)")
    t.add_argument("--augment-speech", action="store_true", help=_AUG_HELP)
    t.add_argument("--vtlp", type=float, default=0.0, metavar="P", help=_VTLP_HELP)
    t.add_argument("--quiet-items", type=float, default=0.0, metavar="P",
                   help="probability of a training item of only noise (-75..-35 dBFS) or silence, whose "
                        "targets are the photo's own face: keeps the mouth still on hiss")
    t.add_argument("--init", type=Path, help="start the generator from this train checkpoint (new run, fresh optimizer; "
                   "with --audio2au, that pretrained Audio2AU replaces the checkpoint's)")
    t.add_argument("--freeze-audio", action="store_true",
                   help="with --init: train the image side only; the audio encoder and Audio2AU stay as in "
                        "--init (the audio graph, and a mouth head reading it, stay valid)")
    vgg = t.add_mutually_exclusive_group()
    vgg.add_argument("--vgg-weights", type=Path, help="torchvision VGG-19 ImageNet weights (vgg19-dcbb9e9d.pth)")
    vgg.add_argument("--no-vgg", action="store_true", help="train without L_per")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="score a checkpoint (paper tables 5 and 6) and write JSON")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--split", default="test", choices=["train", "test", "all"])
    e.add_argument("--au-classifier", type=Path, help="AU classifier checkpoint (default: the one in --checkpoint)")
    e.add_argument("--json", type=Path, help="where to write the metrics (default: next to the checkpoint)")
    e.add_argument("--max-clips", type=int)
    e.add_argument("--no-face-metrics", action="store_true", help="skip LMD and identity similarity")
    e.add_argument("--face-every", type=int, default=1, help="LMD / identity on every N-th frame")
    e.add_argument("--device", default="auto")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)
    return p


def _one_line_warning(message, category, *args, **kwargs) -> str:
    return f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    # A one-line "UserWarning: ..." with no source line is what a user should see.
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    from avatar_stream.engine.face import FaceError
    from avatar_stream.training.checkpoint import CheckpointError
    from avatar_stream.training.losses import WeightsNotFoundError
    from avatar_stream.training.shards import ShardError

    try:
        return args.func(args)
    except (ShardError, CheckpointError, WeightsNotFoundError, FaceError, FileNotFoundError, ValueError,
            RuntimeError) as e:
        if args.traceback or os.environ.get("AVATAR_TRACEBACK"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"avatar-train {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
