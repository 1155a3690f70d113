"""Image decoder (paper §3.1): FC + 6 ConvTranspose2d with U-Net skips from the identity
encoder, sigmoid output. One call decodes N independent frames (N = batch x frames)."""

from __future__ import annotations

import torch
from torch import nn

from avatar_stream.training.config import ModelConfig


def _up(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # stride 2: kernel 4, padding 1 doubles the side exactly; stride 1: kernel 3 keeps it.
    k = 4 if stride == 2 else 3
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, k, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class ImageDecoder(nn.Module):
    """``forward(ft (N, H), skips) -> frames (N, 3, S, S)`` in [0, 1].

    ``skips`` are the identity encoder's maps already repeated per frame, shallow to deep:
    (N, E0, S/2, S/2), (N, E1, S/4, S/4), (N, E2, S/8, S/8), (N, E3, S/16, S/16).
    Layer plan (S = 112): FC -> (C, 7, 7); concat skip3; ConvT s1 @7; ConvT s2 -> 14;
    concat skip2; -> 28; concat skip1; -> 56; concat skip0; -> 112; ConvT s1 -> 3 + sigmoid.
    """

    def __init__(self, cfg: ModelConfig, skip_channels: tuple[int, ...]):
        super().__init__()
        e0, e1, e2, e3 = skip_channels
        self.side = cfg.image_size // 16
        self.c_fc = cfg.ch(256)
        self.fc = nn.Sequential(nn.Linear(cfg.tcsan_hidden, self.c_fc * self.side * self.side), nn.ReLU())
        c = [cfg.ch(n) for n in (512, 256, 128, 64, 32)]
        self.up = nn.ModuleList([
            _up(self.c_fc + e3, c[0], 1),  # S/16, merge ft with the deepest skip
            _up(c[0], c[1], 2),  # S/16 -> S/8
            _up(c[1] + e2, c[2], 2),  # S/8 -> S/4
            _up(c[2] + e1, c[3], 2),  # S/4 -> S/2
            _up(c[3] + e0, c[4], 2),  # S/2 -> S
        ])
        self.out = nn.ConvTranspose2d(c[4], 3, 3, 1, 1)  # 6th ConvTranspose2d: RGB at S x S

    def forward(self, ft: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        s0, s1, s2, s3 = skips
        x = self.fc(ft).reshape(-1, self.c_fc, self.side, self.side)  # (N, C, S/16, S/16)
        x = self.up[0](torch.cat([x, s3], 1))
        x = self.up[1](x)
        x = self.up[2](torch.cat([x, s2], 1))
        x = self.up[3](torch.cat([x, s1], 1))
        x = self.up[4](torch.cat([x, s0], 1))
        return torch.sigmoid(self.out(x))  # (N, 3, S, S)
