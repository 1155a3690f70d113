"""The talking-head generator of the paper (§3.1), assembled from ``training.modules``.

Pure torch: no files, no prints. One frame k of output needs the face (once per identity)
and the frame features of k-R .. k+R (``cfg.receptive_field`` = 2R+1 MFCC windows):

    face (B, 3, S, S) --Eid--> f_id (B, 512), skips (4 maps)
    mfcc (B, 12, 28)  --Ea, Audio2AU x5--> feat_k = f_a ⊕ f_au (B, 832), au_logits (B, 5)
    [f_id ⊕ feat_j for j in k-R..k+R] --fusion (TCSAN)--> ft_k (B, 512) --decoder + skips--> frame k

Shape letters: B batch, T output frames, R lookahead (7), D frame-feature size, S side (112).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avatar_stream.training.config import ModelConfig
from avatar_stream.training.modules import (
    AUClassifier,
    Audio2AU,
    AudioEncoder,
    IdentityEncoder,
    ImageDecoder,
    build_fusion,
)

__all__ = ["AUClassifier", "GeneratorOutput", "ModelConfig", "TalkingHead", "parameter_counts"]


@dataclass
class GeneratorOutput:
    frames: torch.Tensor  # (B, T, 3, S, S) in [0, 1]
    au_logits: torch.Tensor | None  # (B, T+2R, n_au) Audio2AU logits per input frame; None without Audio2AU


class TalkingHead(nn.Module):
    """Generator: identity encoder, audio encoder, Audio2AU x n_au, temporal fusion, decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.identity_encoder = IdentityEncoder(cfg)
        self.audio_encoder = AudioEncoder(cfg)
        # Absent (not an empty list) when switched off, so a checkpoint of the ablation holds
        # no Audio2AU keys at all.
        self.audio2au = nn.ModuleList(Audio2AU(cfg) for _ in cfg.au_names) if cfg.audio2au else None
        self.fusion = build_fusion(cfg)
        self.decoder = ImageDecoder(cfg, self.identity_encoder.channels)
        # Set by the train stage when Audio2AU is pretrained: its batch-norm layers keep the
        # statistics of pretraining (eval mode) while the rest trains. Otherwise every
        # generator batch re-estimates them, and batches unlike pretraining's (noise-only
        # items, a noise floor) shift Audio2AU's outputs although its weights barely move.
        self.freeze_audio2au_stats = False
        self.freeze_audio_encoder_stats = False  # --freeze-audio: its BatchNorm statistics too

    def train(self, mode: bool = True) -> TalkingHead:
        super().train(mode)
        if mode and self.freeze_audio2au_stats and self.audio2au is not None:
            for m in self.audio2au.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if mode and self.freeze_audio_encoder_stats:
            for m in self.audio_encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def encode_identity(self, face: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``face (B, 3, S, S)`` in [0, 1] -> ``f_id (B, f_id)``, 4 skip maps (shallow to deep)."""
        return self.identity_encoder(face)

    def frame_features(self, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mfcc (B, 12, 28)`` -> ``feat (B, D_frame)`` = f_a ⊕ f_au_1..n, ``au_logits (B, n_au)``.

        With ``cfg.audio2au`` off, feat = f_a (D_frame = f_a) and au_logits is None: there is
        no AU prediction to report (zeros would read as probability 0.5 for every AU).
        """
        x = mfcc.unsqueeze(1)  # (B, 1, 12, 28): one-channel time-frequency image
        f_a = self.audio_encoder(x)  # (B, f_a)
        if self.audio2au is None:
            return f_a, None
        f_au = [m.features(x) for m in self.audio2au]  # n_au x (B, au_dim)
        logits = torch.stack([m.head(f).squeeze(-1) for m, f in zip(self.audio2au, f_au, strict=True)], dim=1)
        return torch.cat([f_a, *f_au], dim=1), logits

    def decode(self, feats: torch.Tensor, f_id: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``feats (B, T+2R, D_frame)``, ``f_id (B, f_id)``, skips -> frames ``(B, T, 3, S, S)``.

        Output t is the frame whose features are ``feats[:, t + R]``; with T+2R = 2R+1 this is
        the single-frame call the streaming engine makes.
        """
        r, s, h = self.cfg.lookahead_frames, self.cfg.image_size, self.cfg.tcsan_hidden
        t_in = feats.shape[1]
        t_out = t_in - 2 * r
        if t_out < 1:
            raise ValueError(f"decode needs at least 2R+1 = {2 * r + 1} frames of features, got {t_in}")
        fk = torch.cat([f_id.unsqueeze(1).expand(-1, t_in, -1), feats], dim=-1)  # (B, T+2R, D_in)
        ft = self.fusion(fk).reshape(-1, h)  # (B*T, H)
        # The identity's skip maps are the same for every frame of a clip: repeat them per frame.
        rep = tuple(m.unsqueeze(1).expand(-1, t_out, -1, -1, -1).reshape(-1, *m.shape[1:]) for m in skips)
        return self.decoder(ft, rep).reshape(-1, t_out, 3, s, s)

    def generate(self, face: torch.Tensor, mfcc: torch.Tensor) -> GeneratorOutput:
        """``face (B, 3, S, S)``, ``mfcc (B, T+2R, 12, 28)`` -> frames and Audio2AU logits."""
        t_in = mfcc.shape[1]
        f_id, skips = self.encode_identity(face)
        feat, au = self.frame_features(mfcc.reshape(-1, *mfcc.shape[2:]))
        feats = feat.reshape(-1, t_in, feat.shape[-1])  # (B, T+2R, D_frame)
        frames = self.decode(feats, f_id, skips)
        return GeneratorOutput(frames, None if au is None else au.reshape(-1, t_in, au.shape[-1]))

    def forward(self, face: torch.Tensor, mfcc: torch.Tensor) -> torch.Tensor:
        """``face (B, 3, S, S)``, ``mfcc (B, T+2R, 12, 28)`` -> ``frames (B, T, 3, S, S)``."""
        return self.generate(face, mfcc).frames


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level submodule (Audio2AU also per AU as ``audio2au.<AU>``) and ``total``."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    au = getattr(model, "audio2au", None)
    if isinstance(au, nn.ModuleList) and isinstance(getattr(model, "cfg", None), ModelConfig):
        for name, m in zip(model.cfg.au_names, au, strict=True):
            counts[f"audio2au.{name}"] = sum(p.numel() for p in m.parameters())
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
