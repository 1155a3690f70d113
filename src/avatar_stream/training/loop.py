"""The one training loop every stage runs: seeded, resumable mid-epoch, DDP-aware.

A stage supplies a :class:`Task` (what to save, how to take one step, how to validate);
``run`` owns the data order, checkpoints, logs and TensorBoard.

Run directory (only rank 0 writes)::

    RUN/last.{safetensors,json,optim.safetensors}   every --ckpt-every steps and at the end
    RUN/best.{...}                                   lowest validation loss so far
    RUN/log.jsonl                                    one line per logged step / validation
    RUN/tb/                                          TensorBoard scalars and image grids

Exact resume: the checkpoint holds the weights, the optimizer state, (step, epoch, position
in the epoch) and every rank's RNG states (tensors, no pickles). The data order of epoch e
is a function of (seed, e) alone (``ResumableSampler``) and DataLoader workers are seeded
from a generator of (seed, epoch, position), so the step after a resume sees the same batch,
the same dropout and the same weights as the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from avatar_stream.training.checkpoint import load_checkpoint, load_optimizer_states, save_checkpoint
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.ddp import (
    DistInfo,
    ResumableSampler,
    barrier,
    gather_rng,
    mean_across,
    restore_rng,
    seed_everything,
)

RNG_MODULE = "rng"
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LoopOptions:
    out: Path
    batch: int = 8
    epochs: int | None = None
    steps: int | None = None
    seed: int = 0
    workers: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    image_every: int = 200
    val_batches: int = 8
    resume: bool = False
    progress: bool = True
    lr_schedule: str = "constant"  # LR_SCHEDULES; "cosine": every group's lr -> 0 over the run


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of each parameter group's initial learning rate for optimizer step
    ``step`` (0-based) of ``total``: 1 for "constant"; 0.5 (1 + cos(pi step / total)) for
    "cosine", 1 at the first step and near 0 at the last."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}: use one of {LR_SCHEDULES}")


@dataclass
class Task:
    """One training stage.

    ``step(batch) -> {name: float}`` runs forward, backward and the optimizer step (on the
    DDP-wrapped module) and returns the logged losses; ``validate(batch) -> {name: float}`` is
    called under no_grad on rank 0; ``images(batch) -> (3, H, W)`` tensor in [0, 1] for
    TensorBoard (optional). ``states()`` gives the state_dicts saved per module name."""

    name: str
    cfg: ModelConfig
    train_set: Dataset
    val_set: Dataset | None
    optimizer: torch.optim.Optimizer
    modules: dict[str, nn.Module]
    step: Callable[[object], dict[str, float]]
    validate: Callable[[object], dict[str, float]]
    images: Callable[[object], torch.Tensor] | None = None
    extra: dict | None = None  # JSON facts saved with every checkpoint (stage arguments)

    def states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: m.state_dict() for k, m in self.modules.items()}


def _replace_files(tmp_stem: Path, stem: Path) -> None:
    # JSON last: a reader that sees the new card sees the new weights.
    for suffix in (".safetensors", ".optim.safetensors", ".json"):
        src = tmp_stem.with_name(tmp_stem.name + suffix)
        if src.exists():
            os.replace(src, stem.with_name(stem.name + suffix))


def save(task: Task, stem: Path, extra: dict, rng: dict[str, torch.Tensor] | None) -> None:
    states = task.states()
    if rng is not None:
        states[RNG_MODULE] = rng
    tmp = stem.with_name(f".{stem.name}.tmp")
    save_checkpoint(tmp, states, task.cfg, extra={**(task.extra or {}), **extra},
                    optimizers={"optimizer": task.optimizer.state_dict()})
    _replace_files(tmp, stem)


def _resume(task: Task, out: Path, info: DistInfo) -> dict:
    stem = out / "last"
    cfg, states, extra = load_checkpoint(stem)
    if extra.get("stage") != task.name:
        raise ValueError(f"{stem} was written by stage {extra.get('stage')!r}, not {task.name!r}: "
                         f"use another --out or drop --resume")
    if cfg != task.cfg:
        raise ValueError(f"{stem} has another model config than the one asked for: "
                         f"pass the same model flags as the first run, or drop --resume")
    for name, module in task.modules.items():
        module.load_state_dict(states[name])
    task.optimizer.load_state_dict(load_optimizer_states(stem)["optimizer"])
    if not restore_rng(states.get(RNG_MODULE, {}), info) and info.main:
        tqdm.write(f"[{task.name}] resumed with another process count than saved: RNG streams reseeded")
    return extra["loop"]


def _loader(task: Task, sampler: ResumableSampler, opts: LoopOptions, epoch: int, position: int) -> DataLoader:
    g = torch.Generator().manual_seed(opts.seed * 1_000_003 + epoch * 10_007 + position)
    return DataLoader(task.train_set, batch_size=opts.batch, sampler=sampler, num_workers=opts.workers,
                      drop_last=True, generator=g, pin_memory=False)


def _validate(task: Task, opts: LoopOptions) -> dict[str, float]:
    if task.val_set is None:
        return {}
    for m in task.modules.values():
        m.eval()
    sums: dict[str, float] = {}
    n = 0
    loader = DataLoader(task.val_set, batch_size=opts.batch, shuffle=False, num_workers=opts.workers)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= opts.val_batches:
                break
            for k, v in task.validate(batch).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    for m in task.modules.values():
        m.train()
    return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}


class _Log:
    def __init__(self, out: Path, main: bool, task: Task):
        self.main = main
        self.file = open(out / "log.jsonl", "a") if main else None
        self.tb = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def image(self, step: int, img: torch.Tensor) -> None:
        if self.main:
            self.tb.add_image("samples", img.clamp(0, 1), step)

    def close(self) -> None:
        if self.main:
            self.file.close()
            self.tb.close()


def run(task: Task, opts: LoopOptions, info: DistInfo) -> dict:
    """Train ``task`` for ``opts.steps`` (or ``opts.epochs``) optimizer steps; returns the final
    loop state ``{"step", "epoch", "position", "best"}``."""
    out = Path(opts.out)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    seed_everything(opts.seed + info.rank)
    sampler = ResumableSampler(task.train_set, info, seed=opts.seed)
    per_epoch = sampler.num_samples // opts.batch
    if per_epoch == 0:
        raise ValueError(f"{task.name}: {sampler.num_samples} training samples per process, fewer than "
                         f"--batch {opts.batch}: lower --batch or --clip-len, or prepare more data")
    total = opts.steps if opts.steps else (opts.epochs or 1) * per_epoch
    state = {"step": 0, "epoch": 0, "position": 0, "best": math.inf}
    if opts.resume and (out / "last.safetensors").exists():
        state = _resume(task, out, info)
        if info.main:
            tqdm.write(f"[{task.name}] resumed from {out / 'last'} at step {state['step']} "
                       f"(epoch {state['epoch']}, batch {state['position']})")
    # The optimizer's state dict carries "initial_lr", so a resumed run keeps the same schedule.
    for group in task.optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    log = _Log(out, info.main, task)
    bar = tqdm(total=total, initial=state["step"], desc=task.name, disable=not (opts.progress and info.main))
    for m in task.modules.values():
        m.train()

    def checkpoint() -> None:
        rng = gather_rng(info)  # collective: every rank takes part
        if info.main:
            val = _validate(task, opts)
            log.scalars(state["step"], val)
            score = val.get("val/total", math.nan)
            extra = {"stage": task.name, "world_size": info.world, "lr_schedule": opts.lr_schedule, "validation": val}
            if math.isfinite(score) and score < state["best"]:
                state["best"] = score
                save(task, out / "best", {**extra, "loop": dict(state)}, None)
            save(task, out / "last", {**extra, "loop": dict(state)}, rng)
        barrier(info)

    while state["step"] < total:
        sampler.set_position(state["epoch"], state["position"] * opts.batch)
        for batch in _loader(task, sampler, opts, state["epoch"], state["position"]):
            factor = lr_factor(opts.lr_schedule, state["step"], total)
            for group in task.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            losses = mean_across(info, task.step(batch))
            state["step"] += 1
            state["position"] += 1
            if state["position"] >= per_epoch:
                state["epoch"] += 1
                state["position"] = 0
            bar.update()
            bar.set_postfix(loss=f"{losses.get('total', math.nan):.4f}")
            if state["step"] % opts.log_every == 0 or state["step"] == total:
                log.scalars(state["step"], {f"train/{k}": v for k, v in losses.items()}
                            | {"epoch": state["epoch"], "lr_factor": factor})
            if task.images is not None and info.main and state["step"] % opts.image_every == 0:
                log.image(state["step"], task.images(batch))
            if state["step"] % opts.ckpt_every == 0 or state["step"] == total:
                checkpoint()
            if state["step"] >= total or state["position"] == 0:
                break
    bar.close()
    log.close()
    return state
