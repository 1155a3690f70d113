"""The three exported graphs: torch wrappers split at the streaming boundaries (docs/design.md §6).

    IdentityGraph      face (B,3,112,112)                  -> f_id (B,512), skip0..skip3
    AudioGraph         pcm (B,4720) -> MFCC (B,12,28) -> Ea ⊕ Audio2AU -> feat (B,D), au_prob (B,5)
    TcsanDecoderGraph  feats (B,2R+1,D), f_id, skip0..3    -> frame (B,3,112,112) for the centre frame

The boundaries follow the work rate: identity runs once per face, frame once per 40 ms of
audio, the decoder once per output frame on the 2R+1 features around it. The MFCC sits inside
``frame`` so that the engine feeds raw PCM and no second MFCC exists (docs/design.md §3).
Names and dims are those of docs/interfaces.md; ``engine.card.GRAPH_IO`` is their one list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from avatar_stream.engine import timebase
from avatar_stream.engine.card import GRAPH_IO
from avatar_stream.training.mfcc import MFCC

N_SKIPS = 4


class IdentityGraph(nn.Module):
    """face (B,3,S,S) in [0,1] -> f_id (B,F_id), skip0..skip3 (shallow to deep)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, face: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f_id, skips = self.model.encode_identity(face)
        if len(skips) != N_SKIPS:
            raise ValueError(f"identity encoder returned {len(skips)} skip maps, the graph contract has {N_SKIPS}")
        return (f_id, *skips)


class AudioGraph(nn.Module):
    """pcm (B,4720) = timebase.frame_window(audio, k) -> feat (B,D) = f_a ⊕ f_au, au_prob (B,5)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.mfcc = MFCC()
        self.model = model

    def forward(self, pcm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat, au_logits = self.model.frame_features(self.mfcc(pcm))  # MFCC: (B, 12, 28)
        return feat, torch.sigmoid(au_logits)


class TcsanDecoderGraph(nn.Module):
    """feats (B,2R+1,D) of frames k-R..k+R, f_id, skip0..3 -> frame k (B,3,S,S) in [0,1]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, f_id: torch.Tensor, skip0: torch.Tensor, skip1: torch.Tensor,
                skip2: torch.Tensor, skip3: torch.Tensor) -> torch.Tensor:
        # decode maps T+2R input frames to T outputs; with exactly 2R+1 inputs T = 1.
        return self.model.decode(feats, f_id, (skip0, skip1, skip2, skip3))[:, 0]


@dataclass(frozen=True)
class GraphSpec:
    """One graph to export: its wrapper, names, and an example input of a given batch."""

    name: str
    wrapper: Callable[[nn.Module], nn.Module]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


SPECS: tuple[GraphSpec, ...] = (
    GraphSpec("identity", IdentityGraph, *GRAPH_IO["identity"]),
    GraphSpec("audio", AudioGraph, *GRAPH_IO["audio"]),
    GraphSpec("tcsan_decoder", TcsanDecoderGraph, *GRAPH_IO["tcsan_decoder"]),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}


@torch.no_grad()
def example_inputs(model: nn.Module, batch: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs of every graph at ``batch`` (for tracing only; parity uses real inputs).

    The decoder's f_id/skips come from running the identity encoder, so their shapes are the
    model's own rather than re-derived here.
    """
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    face = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    pcm = 0.1 * torch.randn(batch, timebase.WINDOW_SAMPLES, generator=g)
    f_id, *skips = IdentityGraph(model)(face)
    feats = torch.randn(batch, cfg.receptive_field, cfg.frame_feature_dim, generator=g)
    return {
        "identity": {"face": face},
        "audio": {"pcm": pcm},
        "tcsan_decoder": {"feats": feats, "f_id": f_id, **{f"skip{i}": s for i, s in enumerate(skips)}},
    }


def io_dims(inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Card dims: axis 0 of every tensor is the dynamic batch ``"B"``."""

    def dims(t: torch.Tensor) -> list:
        return ["B", *(int(d) for d in t.shape[1:])]

    return {n: dims(t) for n, t in inputs.items()}, {n: dims(t) for n, t in outputs.items()}


@torch.no_grad()
def run_torch(module: nn.Module, spec: GraphSpec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a wrapper on named inputs; named outputs."""
    out = module(*(inputs[n] for n in spec.input_names))
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip(spec.output_names, out, strict=True))
