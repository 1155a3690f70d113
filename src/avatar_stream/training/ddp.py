"""Distributed set-up, a resumable distributed sampler, and RNG state as tensors.

Single process and ``torchrun --nproc_per_node N`` run the same code: ``init_distributed``
reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process group
(NCCL on GPUs, gloo on CPU) only when WORLD_SIZE > 1. Only rank 0 writes files.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local GPU where CUDA works, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available: use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, dev)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def mean_across(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    """Average scalar logs over ranks (so rank 0 logs the global batch)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.tolist(), strict=True)}


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch.

    The order of epoch e is a seeded permutation of (seed, e) split across ranks, exactly as
    DistributedSampler makes it; ``set_position(e, start)`` drops this rank's first ``start``
    indices, so a resumed run sees the same remaining samples as an uninterrupted one."""

    def __init__(self, dataset: Dataset, info: DistInfo, seed: int, shuffle: bool = True, drop_last: bool = True):
        super().__init__(dataset, num_replicas=info.world, rank=info.rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = int(start)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


# ----------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The process's RNG states (python, numpy, torch CPU and CUDA) as tensors."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "python": torch.tensor([py_version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if py_gauss is None else py_gauss], dtype=torch.float64),
        "numpy": torch.tensor(np.concatenate([np_keys.astype(np.int64), [np_pos, np_has_gauss]]), dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    py = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if np.isnan(gauss) else gauss))
    npv = state["numpy"].numpy()
    np.random.set_state(("MT19937", npv[:-2].astype(np.uint32), int(npv[-2]), int(npv[-1]),
                         float(state["numpy_gauss"][0])))
    # clone: a row of a stacked tensor is a view, and set_rng_state reads from the start of
    # its storage, not from the view's offset.
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu().clone())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu().clone(), device)


def gather_rng(info: DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's RNG state stacked ``(world, ...)`` (a collective call on all ranks)."""
    mine = rng_state(info.device)
    if not info.distributed:
        return {k: v.unsqueeze(0) for k, v in mine.items()}
    out = {}
    comm = info.device if info.device.type == "cuda" else torch.device("cpu")
    for k in sorted(mine):
        t = mine[k].to(comm)
        parts = [torch.empty_like(t) for _ in range(info.world)]
        dist.all_gather(parts, t)
        out[k] = torch.stack([p.cpu() for p in parts])
    return out


def restore_rng(states: dict[str, torch.Tensor], info: DistInfo) -> bool:
    """Set this rank's RNG from ``gather_rng`` output; False (nothing set) when the saved run
    had a different number of processes."""
    if not states or next(iter(states.values())).shape[0] != info.world:
        return False
    set_rng_state({k: v[info.rank] for k, v in states.items()}, info.device)
    return True
