"""``avatar-train eval``: score a checkpoint on a prepared split (docs/design.md §4 metrics).

Every clip of the split is rendered whole from its identity image and audio (edge frames
replicated at both ends, as the stream does) and compared with the real frames:

- PSNR, SSIM (training/metrics.py): mean over all frames.
- AU F1 / accuracy: the AU classifier (stored in the checkpoint by ``train``, or
  ``--au-classifier``) on the lower half of generated frames vs. the clip's AU labels, on
  frames with a known label; the same classifier on the real frames is reported as the
  reference (the paper's "AU classifier on real test frames").
- LMD and identity similarity (``FaceMetrics``) on every ``face_every``-th frame.

Printed as two tables. Our reading of the paper's layout: table 5 = image quality (PSNR,
SSIM), table 6 = AU metrics (F1, accuracy); LMD and identity similarity are extra columns
of table 5. The paper's full-model numbers are shown beside ours for the corpus the shards
were prepared from (``prepare.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avatar_stream.engine.timebase import AU_NAMES
from avatar_stream.training.checkpoint import build_model_from_checkpoint, load_checkpoint
from avatar_stream.training.datasets import ClipDataset
from avatar_stream.training.metrics import (
    AUScores,
    FaceMetrics,
    au_scores,
    cosine_similarity,
    mouth_landmark_distance,
    psnr,
    ssim,
)
from avatar_stream.training.models import AUClassifier

# Paper, full model (docs/design.md §4).
PAPER = {
    "grid": {"psnr": 29.971, "ssim": 0.772, "f1": 0.751, "acc": 0.8115, "real_f1": 0.871},
    "tcd-timit": {"psnr": 26.601, "ssim": 0.760, "f1": 0.590, "acc": 0.8651},
}


@dataclass(frozen=True)
class EvalOptions:
    data: Path
    checkpoint: Path
    split: str = "test"
    au_classifier: Path | None = None
    # Another checkpoint's AU classifier, scoring the generated frames in the same pass as the
    # model's own ("au_generated_by_judge"; only where there is an own classifier).
    judge: Path | None = None
    max_clips: int | None = None
    face_metrics: bool = True
    face_every: int = 1
    device: str = "cpu"
    progress: bool = True


def load_au_classifier(path: Path, required: bool = True) -> AUClassifier | None:
    """The ``au_classifier`` of checkpoint ``path``, built from its config, in eval mode; None
    where it holds none and ``required`` is False (else a one-line ValueError)."""
    cfg, states, _ = load_checkpoint(path)
    if "au_classifier" not in states:
        if required:
            raise ValueError(f"{path} holds no au_classifier: pass a pretrain-au-classifier or train checkpoint")
        return None
    clf = AUClassifier(cfg)
    clf.load_state_dict(states["au_classifier"])
    return clf.eval()


def _load_classifier(opts: EvalOptions) -> AUClassifier | None:
    return load_au_classifier(opts.au_classifier or opts.checkpoint, required=opts.au_classifier is not None)


def _corpus(data: Path) -> str | None:
    p = Path(data) / "prepare.json"
    return json.loads(p.read_text()).get("corpus") if p.exists() else None


def _u8(x: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) float [0, 1] -> (T, H, W, 3) uint8."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class _Acc:
    """Accumulates per-frame metrics over clips."""

    def __init__(self):
        self.psnr, self.ssim, self.lmd, self.idsim = [], [], [], []
        self.gen_p, self.real_p, self.labels, self.valid, self.judge_p = [], [], [], [], []


def _face_scores(fm: FaceMetrics, acc: _Acc, identity: torch.Tensor, real: np.ndarray, gen: np.ndarray,
                 every: int) -> None:
    ident = _u8(identity[None])[0]
    box = fm.box(ident)
    idx = range(0, len(real), every)
    acc.lmd += list(mouth_landmark_distance([fm.landmarks(gen[i], box) for i in idx],
                                            [fm.landmarks(real[i], box) for i in idx]))
    d_id = fm.descriptor(ident, box)
    d_gen = np.stack([fm.descriptor(gen[i], box) for i in idx])
    acc.idsim += list(cosine_similarity(d_gen, np.broadcast_to(d_id, d_gen.shape)))


def evaluate(opts: EvalOptions) -> dict:
    """Metrics of ``opts.checkpoint`` on ``opts.split`` of ``opts.data`` (a JSON-able dict)."""
    dev = torch.device(opts.device)
    model = build_model_from_checkpoint(opts.checkpoint).to(dev)
    clf = _load_classifier(opts)
    if clf is not None:
        clf.to(dev)
    judge = None if opts.judge is None else load_au_classifier(opts.judge).to(dev)
    ds = ClipDataset(opts.data, opts.split, context=model.cfg.lookahead_frames, clip_len=None)
    n_clips = len(ds) if opts.max_clips is None else min(len(ds), opts.max_clips)
    fm = FaceMetrics() if opts.face_metrics else None
    acc = _Acc()
    with torch.no_grad():
        for i in tqdm(range(n_clips), desc="eval", unit="clip", disable=not opts.progress):
            s = ds[i]
            pred = model(s.identity[None].to(dev), s.mfcc[None].to(dev))[0].cpu()
            acc.psnr += list(psnr(pred, s.frames))
            acc.ssim += list(ssim(pred, s.frames))
            if clf is not None:
                ident = s.identity[None].to(dev)
                acc.gen_p.append(torch.sigmoid(clf(clf.inputs(pred.to(dev), ident))).cpu().numpy())
                acc.real_p.append(torch.sigmoid(clf(clf.inputs(s.frames.to(dev), ident))).cpu().numpy())
                acc.labels.append(s.au_label.numpy())
                acc.valid.append(np.isfinite(s.au.numpy()))
                if judge is not None:
                    acc.judge_p.append(torch.sigmoid(judge(judge.inputs(pred.to(dev), ident))).cpu().numpy())
            if fm is not None:
                _face_scores(fm, acc, s.identity, _u8(s.frames), _u8(pred), opts.face_every)
    return _results(opts, acc, n_clips)


def _mean(x: list[float]) -> float | None:
    return float(np.mean(x)) if x else None


def _results(opts: EvalOptions, acc: _Acc, n_clips: int) -> dict:
    res = {"checkpoint": str(opts.checkpoint), "data": str(opts.data), "split": opts.split,
           "corpus": _corpus(opts.data), "clips": n_clips, "frames": len(acc.psnr),
           "psnr": _mean(acc.psnr), "ssim": _mean(acc.ssim), "lmd": _mean(acc.lmd),
           "identity_similarity": _mean(acc.idsim), "au_generated": None, "au_real": None,
           "au_note": "no AU classifier: pass --au-classifier, or evaluate a checkpoint trained with one"}
    if acc.labels:
        labels, valid = np.concatenate(acc.labels), np.concatenate(acc.valid)
        res["au_note"] = f"no AU labels in the {opts.split} split (prepare with --openface)"
        if valid.any():
            res["au_generated"] = au_scores(np.concatenate(acc.gen_p), labels, valid).to_dict()
            res["au_real"] = au_scores(np.concatenate(acc.real_p), labels, valid).to_dict()
            res["au_note"] = None
            if acc.judge_p:
                res["au_generated_by_judge"] = au_scores(np.concatenate(acc.judge_p), labels, valid).to_dict()
    return res


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def format_tables(res: dict) -> str:
    """The results as the paper's tables 5 (image quality) and 6 (AU metrics)."""
    paper = PAPER.get(res.get("corpus") or "", {})
    name = {"grid": "GRID", "tcd-timit": "TCD-TIMIT"}.get(res.get("corpus") or "", "this data")
    head = f"{name}, {res['split']} split: {res['clips']} clips, {res['frames']} frames"
    t5 = [f"Table 5 — image quality ({head})",
          f"| {'method':<28} | {'PSNR ↑':>8} | {'SSIM ↑':>7} | {'LMD ↓':>6} | {'ID-sim ↑':>8} |",
          f"|{'-' * 30}|{'-' * 10}|{'-' * 9}|{'-' * 8}|{'-' * 10}|"]
    if paper:
        t5.append(f"| {'paper, full model':<28} | {_f(paper.get('psnr'), '8.3f')} | "
                  f"{_f(paper.get('ssim'), '7.3f')} | {'–':>6} | {'–':>8} |")
    t5.append(f"| {'this checkpoint':<28} | {_f(res['psnr'], '8.3f')} | {_f(res['ssim'], '7.3f')} | "
              f"{_f(res['lmd'], '6.3f')} | {_f(res['identity_similarity'], '8.3f')} |")
    cols = " | ".join(f"{a:>5}" for a in AU_NAMES)
    t6 = [f"Table 6 — AU F1 per AU, mean F1 and accuracy ({head}; AU classifier on the lower face)",
          f"| {'method':<28} | {cols} | {'F1 ↑':>6} | {'Acc ↑':>7} |",
          f"|{'-' * 30}|" + "|".join("-" * 7 for _ in AU_NAMES) + f"|{'-' * 8}|{'-' * 9}|"]
    dash = " | ".join(f"{'–':>5}" for _ in AU_NAMES)
    if paper:
        acc = paper.get("acc")
        t6.append(f"| {'paper, full model':<28} | {dash} | {_f(paper.get('f1'), '6.3f')} | "
                  f"{'–' if acc is None else format(100 * acc, '6.2f') + '%'} |")
        if "real_f1" in paper:
            t6.append(f"| {'paper, classifier on real':<28} | {dash} | {paper['real_f1']:6.3f} | {'–':>7} |")
    for label, key in (("classifier on real frames", "au_real"), ("this checkpoint", "au_generated")):
        s = res.get(key)
        if s is None:
            t6.append(f"| {label:<28} | {dash} | {'–':>6} | {'–':>7} |  ({res['au_note']})")
            continue
        per = " | ".join(_f(s["per_au"][a]["f1"], "5.3f") for a in AU_NAMES)
        m_acc = s["mean_accuracy"]
        t6.append(f"| {label:<28} | {per} | {_f(s['mean_f1'], '6.3f')} | "
                  f"{'–' if m_acc is None else format(100 * m_acc, '6.2f') + '%'} |")
    return "\n".join(t5 + [""] + t6)


__all__ = ["PAPER", "AUScores", "EvalOptions", "evaluate", "format_tables"]
