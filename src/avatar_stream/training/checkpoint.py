"""Checkpoints without pickles (docs/design.md §4: safetensors, a checkpoint carries its config).

``save_checkpoint("run/step1000", {"generator": g.state_dict(), ...}, cfg, extra)`` writes

    run/step1000.safetensors        model tensors, keys "<module>/<param>"; metadata holds the
                                    format version and the config JSON (self-describing)
    run/step1000.json               {"format", "format_version", "config", "modules", "extra",
                                     "optimizer"}: readable by people and tools
    run/step1000.optim.safetensors  (optional) optimizer tensors; the non-tensor part of each
                                    optimizer state_dict is JSON in the file's metadata

A bare state_dict is stored as module "model". ``load_checkpoint`` takes the stem or either
file path. Unknown or newer format versions are refused with a message naming the version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from avatar_stream.errors import AvatarError
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.models import TalkingHead

FORMAT = "avatar-stream-checkpoint"
FORMAT_VERSION = 1
GENERATOR = "generator"  # module name build_model_from_checkpoint looks for first


class CheckpointError(AvatarError, ValueError):
    """A checkpoint is missing, unreadable or from a format this version does not know."""


def _stem(path: str | Path) -> Path:
    p = Path(path)
    for suffix in (".optim.safetensors", ".safetensors", ".json"):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def _is_state_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and all(isinstance(v, torch.Tensor) for v in x.values())


# -- nested structures (optimizer state_dicts) <-> tensors + JSON ---------------------------

def _encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of ``obj``; tensors move to ``tensors`` under path-like keys."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}}
        # Optimizer state is keyed by int param ids: keep the keys' types.
        return {"__items__": [[_encode(k, f"{prefix}/key{i}", tensors), _encode(v, f"{prefix}/{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint "
                    "(tensors, dicts, lists, tuples, numbers, strings and None only)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        raise CheckpointError(f"unknown entry {sorted(obj)} in a checkpoint structure")
    return obj


# -- save / load ----------------------------------------------------------------------------

def save_checkpoint(path_stem: str | Path, states: Mapping[str, Any], cfg: ModelConfig,
                    extra: Mapping[str, Any] | None = None,
                    optimizers: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (+ ``<stem>.optim.safetensors`` when
    ``optimizers`` = {name: optimizer.state_dict()} is given). ``states`` is either one
    state_dict or {module name: state_dict}. ``extra`` must be JSON-serialisable (step,
    epoch, metrics...). Returns the ``.safetensors`` path."""
    stem = _stem(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    modules = {"model": states} if _is_state_dict(states) else dict(states)
    flat: dict[str, torch.Tensor] = {}
    for name, sd in modules.items():
        if "/" in name or not _is_state_dict(sd):
            raise TypeError(f"module {name!r}: expected a state_dict of tensors under a name without '/'")
        for k, v in sd.items():
            # clone: safetensors refuses tensors that share storage (views, tied weights).
            flat[f"{name}/{k}"] = v.detach().cpu().contiguous().clone()
    try:
        extra_json = json.loads(json.dumps(dict(extra or {})))
    except TypeError as e:
        raise TypeError(f"checkpoint extra must be JSON-serialisable: {e}") from e
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": cfg.to_json()}
    save_file(flat, str(stem.with_name(stem.name + ".safetensors")), metadata=meta)
    optim_name = None
    if optimizers:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = {name: _encode(sd, name, tensors) for name, sd in optimizers.items()}
        optim_name = stem.name + ".optim.safetensors"
        save_file(tensors, str(stem.with_name(optim_name)),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                            "structure": json.dumps(skeleton)})
    card = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
            "modules": sorted(modules), "extra": extra_json, "optimizer": optim_name}
    stem.with_name(stem.name + ".json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return stem.with_name(stem.name + ".safetensors")


def _check_format(meta: Mapping[str, Any], path: Path) -> None:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an avatar-stream checkpoint (format {meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", -1))
    except (TypeError, ValueError):
        version = -1
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than this "
                              f"avatar-stream understands ({FORMAT_VERSION}): upgrade avatar-stream")
    if version < 1:
        raise CheckpointError(f"{path} has an unknown checkpoint format version {meta.get('format_version')!r}")


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist: check the path (a checkpoint is "
                              f"<stem>.safetensors + <stem>.json written by training)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    _check_format(meta, path)
    return meta, tensors


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``path`` (stem, .safetensors or .json) -> ``(cfg, {module: state_dict}, extra)``."""
    stem = _stem(path)
    weights = stem.with_name(stem.name + ".safetensors")
    meta, flat = _read_safetensors(weights)
    try:
        cfg = ModelConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{weights}: bad model config: {e}") from e
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        module, _, name = key.partition("/")
        states.setdefault(module, {})[name] = tensor
    card_path = stem.with_name(stem.name + ".json")
    extra: dict[str, Any] = {}
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        _check_format(card, card_path)
        extra = card.get("extra", {})
    return cfg, states, extra


def load_optimizer_states(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: optimizer state_dict}`` saved with the checkpoint at ``path``."""
    stem = _stem(path)
    meta, tensors = _read_safetensors(stem.with_name(stem.name + ".optim.safetensors"))
    return {name: _decode(skeleton, tensors) for name, skeleton in json.loads(meta["structure"]).items()}


def build_model_from_checkpoint(path: str | Path, module: str | None = None) -> TalkingHead:
    """Rebuild the TalkingHead a checkpoint describes, weights loaded, in eval mode.

    ``module`` names the stored state_dict; default "generator", else the only one stored."""
    cfg, states, _ = load_checkpoint(path)
    if module is None:
        module = GENERATOR if GENERATOR in states else (next(iter(states)) if len(states) == 1 else None)
    if module not in states:
        raise CheckpointError(f"{path}: no module {module!r} in the checkpoint (it holds {sorted(states)}); "
                              "pass module=<one of those>")
    model = TalkingHead(cfg)
    try:
        model.load_state_dict(states[module])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights of {module!r} do not fit the model its config describes: "
                              f"{str(e).splitlines()[0]}") from e
    return model.eval()
