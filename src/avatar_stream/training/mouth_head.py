"""The mouth head: the shape of the mouth at frame k from the audio features of frames
k-R..k+R, learned from real people talking (``avatar-train train-mouth``).

The audio features are those the exported audio graph computes per video frame (f_a and the
Audio2AU features, gated by the engine's noise gate): the same window the TCSAN sees. The
targets are the mouth measures of real video (training/landmarks.py: opening, width, jaw,
lip height, in inter-ocular distances), each relative to the recording's own rest shape
(opening and jaw: the 5th percentile, a closed mouth; width and lip height: the median), on
the audio's timeline (the recording's A/V offset removed, avreal.estimate_offsets).

The head is small on purpose: a few minutes of real video are all there is to learn from.
Per member: a shared linear map of each frame's features to ``hidden`` units, then dilated
valid convolutions over time (kernel 3, dilations 1, 2, 4: exactly 15 frames for R = 7),
then a linear read-out; heavy dropout and weight decay. (The file format allows several
members averaged; training makes one: an ensemble of three did worse on the dev speakers.)
Its output is in inter-ocular distances, scaled so that its
spread on the training speech equals the real mouths' (``scale``): a regression shrinks
towards the mean, and a mouth that moves a third as much as a real one looks mumbled.

The engine (no torch) runs the exported ``mouth.onnx`` and subtracts the output for the
features of silence, so that silence leaves the photo's mouth as it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatar_stream.errors import AvatarError
from avatar_stream.training.landmarks import MEASURES

FORMAT = "avatar-stream-mouth-head"
FORMAT_VERSION = 1


class MouthHeadError(AvatarError, ValueError):
    """A mouth head file or training input that cannot be used; one line."""


@dataclass(frozen=True)
class MouthHeadConfig:
    feature_dim: int  # D_frame of the audio graph the head reads
    lookahead_frames: int  # R: the head reads frames k-R..k+R
    hidden: int = 32
    dropout: float = 0.5
    input_dropout: float = 0.3
    members: int = 1
    measures: tuple[str, ...] = MEASURES

    @property
    def window(self) -> int:
        return 2 * self.lookahead_frames + 1

    @property
    def dilations(self) -> tuple[int, ...]:
        """Powers of two while the valid convolutions still fit in the window."""
        out, field_ = [], 1
        d = 1
        while field_ + 2 * d <= self.window:
            out.append(d)
            field_ += 2 * d
            d *= 2
        return tuple(out)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "measures": list(self.measures)})

    @classmethod
    def from_json(cls, text: str) -> MouthHeadConfig:
        d = json.loads(text)
        d["measures"] = tuple(d["measures"])
        return cls(**d)


class _Member(nn.Module):
    def __init__(self, cfg: MouthHeadConfig):
        super().__init__()
        h = cfg.hidden
        self.inp = nn.Sequential(nn.Dropout(cfg.input_dropout), nn.Linear(cfg.feature_dim, h), nn.GELU(),
                                 nn.Dropout(cfg.dropout))
        layers = []
        for d in cfg.dilations:
            layers += [nn.Conv1d(h, h, 3, dilation=d), nn.GELU()]
        self.tc = nn.Sequential(*layers)
        self.out = nn.Linear(h, len(cfg.measures))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.tc(self.inp(x).transpose(1, 2))  # (B, H, W') with W' odd, centred on frame k
        return self.out(z[:, :, z.shape[2] // 2])


class MouthHead(nn.Module):
    """``feats (B, 2R+1, D)`` -> ``(B, len(measures))`` mouth measures relative to rest, IOD."""

    def __init__(self, cfg: MouthHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(_Member(cfg) for _ in range(cfg.members))
        self.register_buffer("mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("std", torch.ones(cfg.feature_dim))
        self.register_buffer("scale", torch.ones(len(cfg.measures)))

    def normalised(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.normalised(feats)
        return torch.stack([m(x) for m in self.members]).mean(0) * self.scale


# --------------------------------------------------------------------------- files


def save_mouth_head(path, head: MouthHead, extra: dict | None = None) -> Path:
    """``<stem>.safetensors`` (tensors; metadata: format, version, config, extra) + ``<stem>.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".safetensors" else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    extra_json = json.dumps(extra or {})
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    out = stem.with_name(stem.name + ".safetensors")
    save_file(tensors, str(out), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                           "config": head.cfg.to_json(), "extra": extra_json})
    stem.with_name(stem.name + ".json").write_text(json.dumps(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.loads(head.cfg.to_json()),
         "extra": extra or {}}, indent=1) + "\n")
    return out


def load_mouth_head(path) -> tuple[MouthHead, dict]:
    """(head in eval mode, extra) from a ``save_mouth_head`` file."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if not path.is_file():
        raise MouthHeadError(f"{path} does not exist: train one with `avatar-train train-mouth`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise MouthHeadError(f"{path} is not a mouth head (format {meta.get('format')!r})")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise MouthHeadError(f"{path} has mouth-head format {meta.get('format_version')}, this version reads "
                                 f"{FORMAT_VERSION}: retrain it with this version")
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    head = MouthHead(MouthHeadConfig.from_json(meta["config"]))
    head.load_state_dict(state)
    return head.eval(), json.loads(meta.get("extra") or "{}")


# --------------------------------------------------------------------------- data


@dataclass
class Recording:
    name: str
    speaker: str
    feats: np.ndarray  # (T, D) float32
    target: np.ndarray  # (T, M) float64, NaN where unknown


def targets(mouth: np.ndarray, offset: int = 0) -> np.ndarray:
    """(T, 4) measures -> targets relative to the recording's rest shape, moved by the A/V
    ``offset`` onto the audio's timeline (real_eval.shift)."""
    from avatar_stream.training.real_eval import shift

    m = np.asarray(mouth, np.float64)
    rest = np.array([np.nanpercentile(m[:, 0], 5), np.nanmedian(m[:, 1]), np.nanpercentile(m[:, 2], 5),
                     np.nanmedian(m[:, 3])])
    y = m - rest
    return np.stack([shift(y[:, i], offset) for i in range(y.shape[1])], 1)


def load_recordings(data, split: str, engine, sync: bool = True) -> list[Recording]:
    """Features (through ``engine``) and targets of the recordings of ``split``."""
    from avatar_stream.training.avreal import recording_features
    from avatar_stream.training.real_eval import load_split

    out = []
    for e in load_split(data, split):
        with np.load(Path(data) / e["path"], allow_pickle=False) as z:
            mouth = z["mouth"]
        out.append(Recording(e["name"], e["speaker"], recording_features(Path(data), e, engine),
                             targets(mouth, int(e.get("av_offset", 0)) if sync else 0)))
    return out


def _windows(x: np.ndarray, radius: int) -> np.ndarray:
    t = len(x)
    return x[np.clip(np.arange(t)[:, None] + np.arange(-radius, radius + 1)[None], 0, t - 1)]


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class MouthTrainOptions:
    epochs: int = 6
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 0
    hidden: int = 32
    dropout: float = 0.5
    input_dropout: float = 0.3
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _stack(recs: list[Recording], radius: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([_windows(r.feats, radius) for r in recs]).astype(np.float32)
    y = np.concatenate([r.target for r in recs])
    ok = np.isfinite(y).all(1)
    return x[ok], y[ok]


def predict(head: MouthHead, feats: np.ndarray) -> np.ndarray:
    """(T, M) outputs for a recording's (T, D) features (edge-replicated windows)."""
    with torch.no_grad():
        return head(torch.from_numpy(_windows(np.asarray(feats, np.float32), head.cfg.lookahead_frames))).numpy()


def fit(recs: list[Recording], lookahead_frames: int, opts: MouthTrainOptions = MouthTrainOptions(),
        log=print) -> MouthHead:
    """Train a head on ``recs`` (see the module doc) and set its ``scale``."""
    if not recs:
        raise MouthHeadError("no recordings to train the mouth head on")
    cfg = MouthHeadConfig(feature_dim=int(recs[0].feats.shape[1]), lookahead_frames=lookahead_frames,
                          hidden=opts.hidden, dropout=opts.dropout, input_dropout=opts.input_dropout)
    x, y = _stack(recs, lookahead_frames)
    if len(x) < 100:
        raise MouthHeadError(f"only {len(x)} frames with a face to learn from: prepare more recordings")
    torch.manual_seed(opts.seed)
    head = MouthHead(cfg)  # members initialised one after another from the seeded stream
    flat = x.reshape(-1, x.shape[-1])
    head.mean.copy_(torch.from_numpy(flat.mean(0)))
    head.std.copy_(torch.from_numpy(flat.std(0) + 1e-6))
    ys = y.std(0)
    xt = head.normalised(torch.from_numpy(x))
    yt = torch.from_numpy((y / ys).astype(np.float32))
    for i, member in enumerate(head.members):
        gen = torch.Generator().manual_seed(opts.seed * 1000 + i)
        opt = torch.optim.AdamW(member.parameters(), opts.lr, weight_decay=opts.weight_decay)
        member.train()
        for epoch in range(opts.epochs):
            perm = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for j in range(0, len(xt), opts.batch):
                b = perm[j : j + opts.batch]
                loss = ((member(xt[b]) - yt[b]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
            if log and opts.progress:
                log(f"[train-mouth] member {i + 1}/{cfg.members} epoch {epoch + 1}/{opts.epochs}: "
                    f"loss {total / len(xt):.4f}")
        member.eval()
    head.eval()
    # Spread: the head's output in target units has the real mouths' standard deviation on
    # the training frames.
    with torch.no_grad():
        raw = torch.stack([m(xt) for m in head.members]).mean(0).numpy()
    head.scale.copy_(torch.from_numpy((ys / np.maximum(raw.std(0), 1e-6)).astype(np.float32)))
    return head


def speaker_folds(recs: list[Recording], folds: int, seed: int = 0) -> list[set[str]]:
    speakers = sorted({r.speaker for r in recs})
    order = np.random.default_rng(seed).permutation(speakers)
    return [set(order[i::folds]) for i in range(folds)]


def cross_validate(recs: list[Recording], lookahead_frames: int, opts: MouthTrainOptions, folds: int = 5,
                   log=print) -> dict:
    """Per measure over held-out speakers (``folds`` folds by speaker): the pooled r, the pooled
    amplitude ratio (real_eval.pooled_amp) and the median of the recordings' own ratios (a few
    recordings whose audio throws the head far out dominate the pooled one)."""
    from avatar_stream.training.real_eval import pooled_amp, pooled_r

    pairs: dict[str, list] = {m: [] for m in MEASURES}
    quiet = MouthTrainOptions(**{**opts.__dict__, "progress": False})
    for k, fold in enumerate(speaker_folds(recs, folds, opts.seed)):
        head = fit([r for r in recs if r.speaker not in fold], lookahead_frames, quiet, log=None)
        for r in recs:
            if r.speaker in fold:
                p = predict(head, r.feats)
                for i, m in enumerate(head.cfg.measures):
                    pairs[m].append((r.target[:, i], p[:, i]))
        if log:
            log(f"[train-mouth] cross-validation fold {k + 1}/{folds} done")
    out = {}
    for m, v in pairs.items():
        amps = [pooled_amp([p]) for p in v]
        out[m] = {"pooled_r": pooled_r(v), "amp": pooled_amp(v), "amp_median": float(np.nanmedian(amps))}
    return out


def train_mouth(data, out, model=None, opts: MouthTrainOptions = MouthTrainOptions(), folds: int = 5,
                sync: bool = True, log=print) -> tuple[Path, dict]:
    """``avatar-train train-mouth``: cross-validate by speaker (``folds`` > 1) to measure the
    head on held-out speakers and to calibrate its spread there, fit it on every training
    speaker, save it under ``out/head``. ``model``: the exported model whose audio graph
    gives the features (None: the shipped starter). Returns (path, extra)."""
    from avatar_stream.engine.stream import Engine

    engine = Engine(model, backend="cpu")
    recs = load_recordings(data, "train", engine, sync=sync)
    r = engine.lookahead_frames
    extra: dict = {"audio_checkpoint_sha256": engine.model.cards["audio"].checkpoint_sha256,
                   "data": str(data), "speakers": sorted({x.speaker for x in recs}),
                   "recordings": len(recs), "frames": int(sum(np.isfinite(x.target).all(1).sum() for x in recs)),
                   "sync": sync, "options": {k: v for k, v in opts.__dict__.items() if k not in ("extra", "progress")}}
    cv = None
    if folds > 1:
        cv = cross_validate(recs, r, opts, folds, log=log)
        extra["cross_validation"] = cv
        if log:
            log("[train-mouth] held-out speakers: " + ", ".join(
                f"{m} r {v['pooled_r']:.3f} amp {v['amp']:.2f}" for m, v in cv.items()))
    head = fit(recs, r, opts, log=log)
    if cv is not None:
        # The spread on held-out speakers, not on the training frames, is what users see: the
        # typical recording's (median), not the pooled one, which a few loud outliers make.
        amp = np.array([cv[m]["amp_median"] for m in head.cfg.measures])
        head.scale.div_(torch.from_numpy(np.where(np.isfinite(amp) & (amp > 0), amp, 1.0).astype(np.float32)))
        extra["scale_from_cross_validation"] = True
    path = save_mouth_head(Path(out) / "head", head, extra)
    return path, extra


__all__ = ["MouthHead", "MouthHeadConfig", "MouthHeadError", "MouthTrainOptions", "Recording", "cross_validate",
           "fit", "load_mouth_head", "load_recordings", "predict", "save_mouth_head", "targets", "train_mouth"]
