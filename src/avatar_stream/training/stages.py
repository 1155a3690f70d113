"""Training stages (docs/design.md §4): ``pretrain-au``, ``pretrain-au-classifier``, ``train``.

Each builds a :class:`loop.Task` and hands it to ``loop.run`` (seeded, resumable, DDP-aware).

- pretrain-au: the 5 Audio2AU modules (with their last FC, ``head``) on single MFCC windows
  -> AU occurrence, BCE over frames with a known label. Saved as module ``audio2au``.
- pretrain-au-classifier: the AU classifier on lower-half crops -> AU occurrence, BCE.
  Saved as module ``au_classifier``.
- train: the full generator, Adam (beta1 0.5) at ``lr`` (2e-4); pretrained Audio2AU modules
  fine-tuned at ``lr_audio2au`` (1e-6) without their heads (the paper removes the last FC
  after pretraining), the pretrained AU classifier at ``lr_au_classifier`` (1e-7), through
  L_au on the generated frames. Saved as modules ``generator`` and ``au_classifier``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from avatar_stream.training.augment import SpeechAugment
from avatar_stream.training.checkpoint import load_checkpoint
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.datasets import (
    REFERENCE_SHIFT,
    AudioAUDataset,
    AUFrameDataset,
    ClipDataset,
    au_occurrence_rates,
)
from avatar_stream.training.ddp import DistInfo, seed_everything
from avatar_stream.training.loop import LoopOptions, Task, run
from avatar_stream.training.losses import TotalLoss, au_loss, au_weights
from avatar_stream.training.models import AUClassifier, TalkingHead, parameter_counts
from avatar_stream.training.modules import Audio2AU
from avatar_stream.training.shards import ShardError, read_split


@dataclass(frozen=True)
class PretrainOptions:
    """What both pretraining stages take; each stage's own options extend it."""

    data: Path
    lr: float = 1e-3
    frames_per_item: int = 8  # frames of one clip per dataset item (batch = B x this)
    # Weight positives by (1 - r) / r per AU (r = training-split occurrence rate): rare AUs
    # are otherwise learned last, and F1 at threshold 0.5 stays near 0 for them meanwhile.
    balance: bool = False
    init: Path | None = None  # start from this stage checkpoint's weights (new run, fresh optimizer)
    # Distillation: checkpoints of the same stage (any width) whose mean probability is mixed
    # into the target, ``teacher_weight * teachers + (1 - teacher_weight) * label`` (known labels only).
    teachers: tuple[Path, ...] = ()
    teacher_weight: float = 0.5
    soft_labels: float = 0.0  # tau > 0: training targets sigmoid((intensity - threshold) / tau) (datasets._FrameChunks)

    def __post_init__(self) -> None:
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError(f"--teacher-weight {self.teacher_weight} is not in [0, 1]")
        if self.soft_labels < 0:
            raise ValueError(f"--soft-labels {self.soft_labels}: give tau > 0 in AU intensity units "
                             f"(e.g. 0.03), or 0 for off")

    def record(self) -> dict:
        """The options as JSON values, kept in the stage's checkpoints."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = [str(t) for t in v] if f.name == "teachers" else str(v) if isinstance(v, Path) else v
        return out


@dataclass(frozen=True)
class AudioPretrainOptions(PretrainOptions):
    """``pretrain-au``: Audio2AU on MFCC windows."""

    augment_speech: bool = False  # training split only (training/augment.py)
    vtlp: float = 0.0  # with augment_speech: p of a vocal tract length perturbation per item


@dataclass(frozen=True)
class ClassifierPretrainOptions(PretrainOptions):
    """``pretrain-au-classifier``: the AU classifier on lower-half face crops."""

    augment_images: bool | str = False  # "colour" (= True) or "full" (AUFrameDataset)
    reference_shift: float = REFERENCE_SHIFT  # augment_images "full": px the reference alone moves (datasets.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference_shift < 0:
            raise ValueError(f"--reference-shift {self.reference_shift}: give a shift >= 0 px")


@dataclass(frozen=True)
class TrainOptions:
    data: Path
    clip_len: int = 8
    lr: float = 2e-4
    lr_audio2au: float = 1e-6
    lr_au_classifier: float = 1e-7
    audio2au: Path | None = None  # pretrain-au checkpoint
    au_classifier: Path | None = None  # pretrain-au-classifier checkpoint
    vgg_weights: Path | None = None  # None with cfg.w_per == 0 (--no-vgg)
    augment_speech: bool = False  # training split only (training/augment.py)
    vtlp: float = 0.0  # with augment_speech: p of a vocal tract length perturbation per clip
    quiet_items: float = 0.0  # p of a training item of noise or silence with the photo's mouth as target
    init: Path | None = None  # start the generator from this checkpoint's weights (fresh optimizer)
    # Train the image side only (identity encoder, TCSAN, decoder): the audio encoder and
    # Audio2AU stay as in --init, so the exported audio graph, and a mouth head that reads its
    # features, stay valid (fine-tuning on real frames).
    freeze_audio: bool = False


def _wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    module.to(info.device)
    if not info.distributed:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def _has_val(data: Path) -> bool:
    return bool(read_split(data)["test"])


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
               pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits averaged over entries with a known label (0 if none, graph kept);
    ``pos_weight`` (n_au,) scales the positive term per AU (class balance)."""
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none", pos_weight=pos_weight)
    return (per * valid).sum() / valid.sum().clamp(min=1.0)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> float:
    hit = ((logits > 0) == (labels > 0.5)).float() * valid
    return float(hit.sum() / valid.sum().clamp(min=1.0))


# ----------------------------------------------------------------------------- pretraining


class AUHeads(nn.Module):
    """The n_au Audio2AU modules as one network: ``mfcc (N, 12, 28) -> logits (N, n_au)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.audio2au = nn.ModuleList(Audio2AU(cfg) for _ in cfg.au_names)

    def forward(self, mfcc: torch.Tensor) -> torch.Tensor:
        x = mfcc.unsqueeze(1)
        return torch.stack([m(x) for m in self.audio2au], dim=1)


class _ClassifierOnLower(nn.Module):
    def __init__(self, clf: AUClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, lower: torch.Tensor) -> torch.Tensor:
        return self.clf(lower)


def _teacher(teachers: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor | None:
    """Mean probability of the teacher networks on ``x`` (None without teachers)."""
    if not teachers:
        return None
    with torch.no_grad():
        return torch.stack([torch.sigmoid(t(x)) for t in teachers]).mean(0)


# What a teacher must share with its student (widths may differ): same inputs, same AUs in the same order.
_TEACHER_FIELDS = ("au_names", "image_size", "n_mfcc", "mfcc_frames")


def _load_teachers(paths: tuple[Path, ...], module: str, build, dev: torch.device,
                   student: ModelConfig) -> tuple[nn.Module, ...]:
    """Each checkpoint's ``module`` built with that checkpoint's own config (widths may differ from
    the student's) by ``build(cfg, state) -> nn.Module``, frozen, in eval mode. Built under a
    forked RNG: a run with teachers draws the same random numbers as one without."""
    nets = []
    for path in paths:
        cfg, states, _ = load_checkpoint(path)
        if module not in states:
            raise ValueError(f"teacher {path} holds {sorted(states)}, not {module!r}: pass a checkpoint of "
                             f"the same stage")
        for name in _TEACHER_FIELDS:
            if getattr(cfg, name) != getattr(student, name):
                raise ValueError(f"teacher {path} has {name} {getattr(cfg, name)}, the student "
                                 f"{getattr(student, name)}: a teacher must see the same inputs and AUs")
        with torch.random.fork_rng(devices=[]):
            net = build(cfg, states[module]).to(dev).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        nets.append(net)
    return tuple(nets)


def _pretrain_task(name: str, cfg: ModelConfig, net: nn.Module, saved: dict[str, nn.Module],
                   train_set, val_set, opts: PretrainOptions, info: DistInfo,
                   teachers: tuple[nn.Module, ...] = ()) -> Task:
    wrapped = _wrap(net, info)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=opts.lr)
    dev = info.device
    pos_w = None
    if opts.balance:
        rates = np.clip(au_occurrence_rates(opts.data, "train"), 0.01, 0.99)
        pos_w = torch.as_tensor((1.0 - rates) / rates, dtype=torch.float32, device=dev)

    def flat(batch):
        x, y, v = (t.to(dev) for t in batch)
        return x.reshape(-1, *x.shape[2:]), y.reshape(-1, y.shape[-1]), v.reshape(-1, v.shape[-1])

    def step(batch):
        x, y, v = flat(batch)
        logits = wrapped(x)
        soft = _teacher(teachers, x)
        target = y if soft is None else opts.teacher_weight * soft + (1.0 - opts.teacher_weight) * y
        loss = masked_bce(logits, target, v, pos_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = float(loss.detach())
        return {"bce": loss, "total": loss, "acc": _accuracy(logits.detach(), y, v)}

    def validate(batch):
        x, y, v = flat(batch)
        logits = net(x)
        loss = float(masked_bce(logits, y, v, pos_w))
        return {"bce": loss, "total": loss, "acc": _accuracy(logits, y, v)}

    return Task(name, cfg, train_set, val_set, opt, saved, step, validate,
                extra=opts.record())


def pretrain_au(cfg: ModelConfig, opts: AudioPretrainOptions, loop: LoopOptions, info: DistInfo) -> dict:
    """Pretrain the Audio2AU modules on (MFCC window, AU occurrence) pairs."""
    if not cfg.audio2au:
        raise ValueError("pretrain-au needs a config with Audio2AU on (drop --set audio2au=false)")
    seed_everything(loop.seed)
    train = AudioAUDataset(opts.data, "train", opts.frames_per_item,
                           augment=SpeechAugment(p_vtlp=opts.vtlp) if opts.augment_speech else None,
                           soft_labels=opts.soft_labels)
    val = AudioAUDataset(opts.data, "test", opts.frames_per_item) if _has_val(opts.data) else None
    net = AUHeads(cfg)
    if opts.init is not None:
        load_pretrained(opts.init, "audio2au", net.audio2au)

    def build(tcfg: ModelConfig, state: dict) -> nn.Module:
        heads = AUHeads(tcfg)
        heads.audio2au.load_state_dict(state)
        return heads

    teachers = _load_teachers(opts.teachers, "audio2au", build, info.device, cfg)
    task = _pretrain_task("pretrain-au", cfg, net, {"audio2au": net.audio2au}, train, val, opts, info, teachers)
    return run(task, loop, info)


def _init_classifier(path: Path, cfg: ModelConfig, clf: AUClassifier, info: DistInfo) -> None:
    """``--init``: the checkpoint's classifier; a narrower one (another ``au_clf_width``) is
    widened without changing its outputs (training/widen.py)."""
    init_cfg, _, _ = load_checkpoint(path)
    narrow = AUClassifier(init_cfg)
    if [p.shape for p in narrow.parameters()] == [p.shape for p in clf.parameters()]:
        load_pretrained(path, "au_classifier", clf)
        return
    from avatar_stream.training.widen import widen_classifier

    load_pretrained(path, "au_classifier", narrow)
    widen_classifier(narrow, clf)
    if info.main:
        n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (narrow, clf))
        print(f"pretrain-au-classifier: widened {path} from {n0:,} to {n1:,} parameters (same outputs)",
              file=sys.stderr)


def pretrain_au_classifier(cfg: ModelConfig, opts: ClassifierPretrainOptions, loop: LoopOptions, info: DistInfo) -> dict:
    """Pretrain the AU classifier on (lower-half crop, AU occurrence) pairs."""
    seed_everything(loop.seed)
    ref = cfg.au_clf_reference
    train = AUFrameDataset(opts.data, "train", opts.frames_per_item, reference=ref, jitter=opts.augment_images,
                           soft_labels=opts.soft_labels, reference_shift=opts.reference_shift)
    val = AUFrameDataset(opts.data, "test", opts.frames_per_item, reference=ref) if _has_val(opts.data) else None
    clf = AUClassifier(cfg)
    if opts.init is not None:
        _init_classifier(opts.init, cfg, clf, info)

    def build(tcfg: ModelConfig, state: dict) -> nn.Module:
        if tcfg.au_clf_reference != ref:
            raise ValueError("a teacher classifier must take the same input as the student "
                             f"(au_clf_reference {tcfg.au_clf_reference} vs {ref})")
        teacher = AUClassifier(tcfg)
        teacher.load_state_dict(state)
        return _ClassifierOnLower(teacher)

    teachers = _load_teachers(opts.teachers, "au_classifier", build, info.device, cfg)
    task = _pretrain_task("pretrain-au-classifier", cfg, _ClassifierOnLower(clf), {"au_classifier": clf},
                          train, val, opts, info, teachers)
    return run(task, loop, info)


# ----------------------------------------------------------------------------- full model


def load_pretrained(path: Path, module: str, target: nn.Module, skip: str | None = None) -> None:
    """Load ``module`` from a stage checkpoint into ``target``, with a one-line error on mismatch.
    ``skip``: a key prefix (e.g. ``"audio2au."``) left out on both sides: the caller loads that
    part from elsewhere, so it may have another shape in this checkpoint."""
    _, states, extra = load_checkpoint(path)
    if module not in states:
        raise ValueError(f"{path} holds {sorted(states)}, not {module!r}: pass the checkpoint of "
                         f"{'pretrain-au' if module == 'audio2au' else 'pretrain-au-classifier'}")
    state = states[module]
    if skip is not None:  # the skipped part keeps the target's own tensors; the rest must fit
        own = {k: v for k, v in target.state_dict().items() if k.startswith(skip)}
        state = {**{k: v for k, v in state.items() if not k.startswith(skip)}, **own}
    try:
        target.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: {module} weights do not fit this model ({str(e).splitlines()[1].strip()}): "
                         f"pretrain with the same --width / --tiny / --set flags") from e


class GeneratorObjective(nn.Module):
    """Generator + L_total in one module (the unit DDP synchronises).

    ``forward(identity, mfcc, frames, au, au_label) -> ({loss terms, "total"}, generated)``.
    L_au uses only frames whose AU labels are known (``au`` finite)."""

    def __init__(self, model: TalkingHead, loss: TotalLoss, au_clf: AUClassifier | None,
                 au_w: torch.Tensor | None, w_au: float):
        super().__init__()
        self.model, self.loss, self.au_clf, self.w_au = model, loss, au_clf, w_au
        self.register_buffer("au_w", au_w if au_w is not None else torch.ones(model.cfg.n_au))

    def forward(self, identity, mfcc, frames, au, au_label):
        pred = self.model(identity, mfcc)
        parts = dict(self.loss(pred, frames, identity))
        if self.au_clf is not None:
            logits = self.au_clf(self.au_clf.inputs(pred, identity))
            y = au_label.reshape(-1, au_label.shape[-1])
            valid = torch.isfinite(au).reshape(-1, au.shape[-1]).all(-1)
            # A batch without labels still touches the classifier (zero loss) so that every
            # rank's backward reduces the same parameters.
            l_au = au_loss(logits[valid], y[valid], self.au_w) if valid.any() else logits.sum() * 0.0
            parts["au"] = l_au
            parts["total"] = parts["total"] + self.w_au * l_au
        return parts, pred


def _image_grid(identity: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Rows of (identity | real middle frame | generated middle frame) for up to n samples."""
    mid = target.shape[1] // 2
    rows = [torch.cat([identity[i], target[i, mid], pred[i, mid]], dim=-1) for i in range(min(n, len(identity)))]
    return torch.cat(rows, dim=-2).detach().cpu()


def _train_parts(cfg: ModelConfig, opts: TrainOptions, info: DistInfo):
    """Model, AU classifier (or None), parameter groups and the effective L_au weight."""
    model = TalkingHead(cfg)
    if opts.init is not None:
        # With --audio2au the init checkpoint's Audio2AU is replaced (below), so it may differ
        # in shape (another a2a_width).
        skip = "audio2au." if cfg.audio2au and opts.audio2au is not None else None
        load_pretrained(opts.init, "generator", model, skip=skip)
    groups = []
    if opts.freeze_audio:
        if opts.init is None:
            raise ValueError("--freeze-audio keeps the audio side of --init: give --init CHECKPOINT")
        model.audio_encoder.requires_grad_(False)
        if cfg.audio2au:
            model.audio2au.requires_grad_(False)
        model.freeze_audio2au_stats = model.freeze_audio_encoder_stats = True
    if cfg.audio2au and not opts.freeze_audio:
        for m in model.audio2au:
            m.head.requires_grad_(False)  # the last FC is removed after pretraining (paper §3.1)
        a2a = [p for p in model.audio2au.parameters() if p.requires_grad]
        if opts.audio2au is not None:
            # after --init: the pretrained Audio2AU replaces the one in the init checkpoint
            load_pretrained(opts.audio2au, "audio2au", model.audio2au)
        if opts.audio2au is not None or opts.init is not None:
            groups.append({"params": a2a, "lr": opts.lr_audio2au, "name": "audio2au"})
            model.freeze_audio2au_stats = True
        else:
            if info.main:
                warnings.warn("Audio2AU is not pretrained (no --audio2au): it trains with the generator "
                              "at the generator's lr", stacklevel=2)
            groups.append({"params": a2a, "lr": opts.lr, "name": "audio2au"})
    a2a_ids = {id(p) for g in groups for p in g["params"]}
    groups.insert(0, {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in a2a_ids],
                      "lr": opts.lr, "name": "generator"})
    w_au, clf = cfg.w_au, None
    if w_au > 0 and opts.au_classifier is None:
        if info.main:
            warnings.warn("no --au-classifier: L_au is off (a random classifier gives no AU signal)", stacklevel=2)
        w_au = 0.0
    if opts.au_classifier is not None:
        clf = AUClassifier(cfg)
        clf.dropout = 0.0  # a judge for L_au: au_clf_dropout is for pretraining it only
        load_pretrained(opts.au_classifier, "au_classifier", clf)
    if info.main:
        print_parameter_counts(model, clf)
    return model, clf, groups, w_au


def print_parameter_counts(model: TalkingHead, clf: AUClassifier | None = None) -> None:
    """The per-module parameter table (issue: "print parameter counts per module")."""
    counts = parameter_counts(model)
    if clf is not None:
        counts["au_classifier (separate)"] = sum(p.numel() for p in clf.parameters())
    width = max(len(k) for k in counts)
    print("parameters per module:", file=sys.stderr)
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>12,}", file=sys.stderr)


def _au_weighting(data: Path, w_au: float, info: DistInfo) -> tuple[torch.Tensor | None, float]:
    """L_au's per-AU weights from the training split's occurrence rates, and the effective w_au
    (0 when the split has no AU labels)."""
    if w_au <= 0:
        return None, 0.0
    rates = au_occurrence_rates(data, "train")
    if not np.isfinite(rates).all():
        if info.main:
            warnings.warn(f"{data} has no AU labels in its training split: L_au is off", stacklevel=3)
        return None, 0.0
    # An AU that never occurs would get an infinite weight: floor its rate.
    return au_weights(np.clip(rates, 1e-3, 1.0)), w_au


def train(cfg: ModelConfig, opts: TrainOptions, loop: LoopOptions, info: DistInfo) -> dict:
    """Train the full model (paper §3.2)."""
    if cfg.w_per > 0 and opts.vgg_weights is None:
        raise ValueError("L_per needs VGG-19 ImageNet weights: pass --vgg-weights vgg19-dcbb9e9d.pth, or --no-vgg")
    seed_everything(loop.seed)
    r = cfg.lookahead_frames
    train_set = ClipDataset(opts.data, "train", context=r, clip_len=opts.clip_len,
                            augment=SpeechAugment(p_vtlp=opts.vtlp)
                            if opts.augment_speech else None, quiet=opts.quiet_items)
    val_set = ClipDataset(opts.data, "test", context=r, clip_len=opts.clip_len) if _has_val(opts.data) else None
    model, clf, groups, w_au = _train_parts(cfg, opts, info)
    au_w, w_au = _au_weighting(opts.data, w_au, info)
    if w_au > 0:
        groups.append({"params": list(clf.parameters()), "lr": opts.lr_au_classifier, "name": "au_classifier"})
    elif clf is not None:
        clf.requires_grad_(False)
    loss = TotalLoss(dataclasses.replace(cfg, w_au=0.0), vgg_weights=opts.vgg_weights)
    objective = GeneratorObjective(model, loss, clf if w_au > 0 else None, au_w, w_au)
    wrapped = _wrap(objective, info)
    if clf is not None:
        clf.to(info.device)
    opt = torch.optim.Adam(groups, lr=opts.lr, betas=(0.5, 0.999))
    dev = info.device

    def unpack(batch):
        return [t.to(dev) for t in batch]

    def step(batch):
        parts, _ = wrapped(*unpack(batch))
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        opt.step()
        return {k: float(v.detach()) for k, v in parts.items()}

    def validate(batch):
        parts, _ = objective(*unpack(batch))
        return {k: float(v.detach()) for k, v in parts.items()}

    def images(batch):
        identity, mfcc, frames, _, _ = unpack(batch)
        model.eval()
        with torch.no_grad():
            pred = model(identity[:4], mfcc[:4])
        model.train()
        return _image_grid(identity, frames, pred)

    modules = {"generator": model}
    if clf is not None:
        modules["au_classifier"] = clf
    extra = {"lr": opts.lr, "lr_audio2au": opts.lr_audio2au, "lr_au_classifier": opts.lr_au_classifier,
             "w_au_effective": w_au, "clip_len": opts.clip_len, "data": str(opts.data),
             "augment_speech": opts.augment_speech, "vtlp": opts.vtlp, "quiet_items": opts.quiet_items, "init": str(opts.init) if opts.init else None,
             "audio2au": str(opts.audio2au) if opts.audio2au else None,
             "au_classifier": str(opts.au_classifier) if opts.au_classifier else None}
    task = Task("train", cfg, train_set, val_set, opt, modules, step, validate, images, extra)
    state = run(task, loop, info)
    if not math.isfinite(state["best"]) and val_set is None and info.main:
        warnings.warn(f"{opts.data} has no test speakers: best.safetensors was not written "
                      "(nothing to validate on); use last.safetensors", stacklevel=2)
    return state


__all__ = ["AudioPretrainOptions", "ClassifierPretrainOptions", "PretrainOptions", "ShardError", "TrainOptions", "pretrain_au", "pretrain_au_classifier", "train"]
