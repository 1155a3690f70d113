"""Function-preserving widening of the AU classifier (Net2WiderNet, Chen et al. 2016).

``widen_classifier(narrow, wide)`` fills a wider :class:`AUClassifier` (more conv channels and
FC units, ``--set au_clf_width``) from a trained narrower one so that both give the same
logits: every new unit copies an existing unit's incoming weights, and the outgoing weights
of a unit and its copies are split among them in random shares that sum to one (equal
shares would keep the copies identical under gradient descent forever). Training then goes on
from the narrow classifier's accuracy with the wider one's capacity, instead of from scratch.

Layers, in order: conv0 -> conv2 -> (pool) -> conv5 -> conv7 -> (pool, flatten) -> fc0 -> fc2
-> fc4 (the logits, never widened). The flatten turns channel ``c`` of the last conv into
inputs ``c * H * W ... (c + 1) * H * W - 1`` of fc0.
"""

from __future__ import annotations

import numpy as np
import torch

from avatar_stream.training.modules import AUClassifier

# (state-dict prefix of a layer whose outputs are widened, prefix of the layer reading them)
_CHAIN = (("convs.0", "convs.2"), ("convs.2", "convs.5"), ("convs.5", "convs.7"), ("convs.7", "fc.0"),
          ("fc.0", "fc.2"), ("fc.2", "fc.4"))


def _mapping(old: int, new: int, rng: np.random.Generator) -> np.ndarray:
    """Unit j of the wide layer copies unit ``g[j]`` of the narrow one (the first ``old`` are themselves)."""
    if new < old:
        raise ValueError(f"cannot widen {old} units to {new}: the target classifier is narrower "
                         f"(--set au_clf_width must be at least the checkpoint's)")
    extra = np.concatenate([rng.permutation(old) for _ in range(-(-(new - old) // old))])[: new - old] \
        if new > old else np.zeros(0, int)
    return np.concatenate([np.arange(old), extra]).astype(int)


def _shares(g: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Per wide unit, its share of its narrow unit's outgoing weights: random, summing to 1 per narrow unit."""
    r = 1.0 + jitter * rng.uniform(-1.0, 1.0, len(g))
    total = np.bincount(g, weights=r)
    return r / total[g]


@torch.no_grad()
def widen_classifier(narrow: AUClassifier, wide: AUClassifier, seed: int = 0, jitter: float = 0.5) -> None:
    """Fill ``wide`` from ``narrow`` (same input channels, each layer at least as wide) so that
    ``wide(x) == narrow(x)`` up to float rounding. ``jitter`` in [0, 1): how unequal the
    shares of a unit and its copies are (0 = equal halves, which never diverge)."""
    if narrow.in_channels != wide.in_channels:
        raise ValueError(f"the classifiers take {narrow.in_channels} and {wide.in_channels} input channels "
                         f"(au_clf_reference differs): they cannot be widened into each other")
    rng = np.random.default_rng(seed)
    src = {k: v.clone() for k, v in narrow.state_dict().items()}
    dst = wide.state_dict()
    for out_layer, in_layer in _CHAIN:
        w_out = src[f"{out_layer}.weight"]
        old, new = w_out.shape[0], dst[f"{out_layer}.weight"].shape[0]
        g = _mapping(old, new, rng)
        idx = torch.from_numpy(g)
        src[f"{out_layer}.weight"] = w_out[idx]
        src[f"{out_layer}.bias"] = src[f"{out_layer}.bias"][idx]
        share = torch.from_numpy(_shares(g, rng, jitter)).to(w_out.dtype)
        w_in = src[f"{in_layer}.weight"]
        if in_layer == "fc.0":  # flatten: each channel is a block of H * W inputs
            hw = w_in.shape[1] // old
            blocks = w_in.reshape(w_in.shape[0], old, hw)[:, idx] * share[None, :, None]
            src[f"{in_layer}.weight"] = blocks.reshape(w_in.shape[0], new * hw)
        else:
            shape = (1, -1) + (1,) * (w_in.dim() - 2)
            src[f"{in_layer}.weight"] = w_in[:, idx] * share.reshape(shape)
    for key, value in src.items():
        if dst[key].shape != value.shape:
            raise ValueError(f"widened {key} has shape {tuple(value.shape)}, the wide classifier "
                             f"{tuple(dst[key].shape)}: the two differ in more than width")
    wide.load_state_dict(src)


__all__ = ["widen_classifier"]
