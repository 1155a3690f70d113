"""Per-frame encoders (paper §3.1): identity encoder Eid, audio encoder Ea, Audio2AU, and the
AU classifier used by L_au. Pure torch; channel counts are the paper-sized numbers scaled by
``cfg.ch()`` (ModelConfig.width).

Shape letters: B batch (or batch x frames, every encoder is per frame), C channels,
F MFCC coefficients (12), W MFCC frames in a window (28), S image side (112).
"""

from __future__ import annotations

import torch
from torch import nn

from avatar_stream.training.config import ModelConfig


def _conv_bn_relu(c_in: int, c_out: int, kernel, stride=1, padding=0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


def _half(n: int) -> int:
    """Output size of a kernel-3, padding-1, stride-2 conv: ceil(n / 2)."""
    return (n - 1) // 2 + 1


class IdentityEncoder(nn.Module):
    """Eid: 4 x (Conv2d stride 2 + ReLU), then FC. S -> S/2 -> S/4 -> S/8 -> S/16 (112 -> 7).

    ``forward(face (B, 3, S, S) in [0, 1]) -> (f_id (B, f_id), skips)``, where ``skips`` are
    the 4 stage outputs, shallow to deep: (B, C0, S/2, S/2) ... (B, C3, S/16, S/16), used as
    the decoder's U-Net skips.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.channels = tuple(cfg.ch(c) for c in (64, 128, 256, 512))
        stages, c_in = [], 3
        for c in self.channels:
            # kernel 4, stride 2, padding 1 halves the side exactly and mirrors the decoder's
            # ConvTranspose2d, so the skip maps line up with the upsampled maps.
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, 4, 2, 1), nn.ReLU()))
            c_in = c
        self.stages = nn.ModuleList(stages)
        side = cfg.image_size // 16
        self.fc = nn.Linear(self.channels[-1] * side * side, cfg.f_id)

    def forward(self, face: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = face * 2.0 - 1.0  # [0, 1] -> [-1, 1]: zero-centred input for the first conv
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return self.fc(x.flatten(1)), tuple(skips)  # (B, f_id), 4 maps


class AudioEncoder(nn.Module):
    """Ea: 5 x (Conv2d + BN + ReLU) over the MFCC window, then 2 FC.

    ``forward(mfcc (B, 1, F, W)) -> f_a (B, f_a)``; F x W = 12 x 28 -> 3 x 7 after two
    stride-2 stages.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [cfg.ch(c) for c in (64, 128, 256, 256, 512)]
        strides = (1, 2, 1, 2, 1)
        layers, c_in = [], 1
        for c, s in zip(chans, strides, strict=True):
            layers.append(_conv_bn_relu(c_in, c, 3, s, 1))
            c_in = c
        self.convs = nn.Sequential(*layers)
        f, w = _half(_half(cfg.n_mfcc)), _half(_half(cfg.mfcc_frames))
        hidden = cfg.ch(512)
        self.fc = nn.Sequential(nn.Linear(chans[-1] * f * w, hidden), nn.ReLU(), nn.Linear(hidden, cfg.f_a))

    def forward(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(mfcc).flatten(1))  # (B, f_a)


class Audio2AU(nn.Module):
    """One speech-related AU from the MFCC window (paper §3.1, one module per AU).

    Convs over frequency and time reduce the frequency axis to 1; a 2-layer LSTM runs over
    the W MFCC frames; 3 FC layers follow. ``features()`` is the ``au_dim`` vector before the
    last FC (what the generator consumes once the module is pretrained); ``head`` is the last
    FC, kept for pretraining and for exporting AU probabilities. ``forward`` returns the AU
    logit (B,); ``sigmoid(logit)`` is the occurrence probability (the loss applies the
    sigmoid itself, as BCE-with-logits, for numerical stability).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c1, c2 = cfg.a2a_ch(32), cfg.a2a_ch(64)
        f2 = _half(cfg.n_mfcc)
        self.convs = nn.Sequential(
            _conv_bn_relu(1, c1, 3, 1, 1),  # (B, c1, F, W): local time-frequency patterns
            _conv_bn_relu(c1, c2, 3, (2, 1), 1),  # (B, c2, F/2, W): halve frequency only
            _conv_bn_relu(c2, c2, (f2, 1)),  # (B, c2, 1, W): whole spectrum per MFCC frame
        )
        hidden = cfg.a2a_ch(128)
        self.lstm = nn.LSTM(c2, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(hidden, cfg.a2a_ch(128)), nn.ReLU(),
                                nn.Linear(cfg.a2a_ch(128), cfg.au_dim), nn.ReLU())
        self.head = nn.Linear(cfg.au_dim, 1)

    def features(self, mfcc: torch.Tensor) -> torch.Tensor:
        """``mfcc (B, 1, F, W) -> (B, au_dim)``."""
        x = self.convs(mfcc).flatten(1, 2).transpose(1, 2)  # (B, W, c2): one step per MFCC frame
        y, _ = self.lstm(x)  # (B, W, hidden)
        # The last step has read the whole window, which is centred on the video frame.
        return self.fc(y[:, -1])

    def forward(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(mfcc)).squeeze(-1)  # (B,) logit


class AUClassifier(nn.Module):
    """AU classifier on the lower half face (paper §3.1): 4 conv + ReLU with a max-pool after
    every 2, then 3 FC (``cfg.au_clf_dropout``, not in the paper: dropout before each FC while
    training; ``cfg.au_clf_symmetric``, not in the paper: logits averaged over the crop and its
    mirror image). ``forward(lower (B, C, S/2, S) in [0, 1]) -> (B, n_au)`` logits
    (sigmoid -> probabilities). C = 3 (the paper), or 6 with ``cfg.au_clf_reference``: the
    frame's lower half stacked with the identity image's. Build the input with
    ``inputs(frames, identity)``; ``lower_half(frames)`` cuts the lower half of full frames."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c1, c2 = cfg.clf_ch(32), cfg.clf_ch(64)

        def conv(ci: int, co: int) -> list[nn.Module]:
            return [nn.Conv2d(ci, co, 3, 1, 1), nn.ReLU()]

        self.reference = cfg.au_clf_reference
        self.in_channels = 6 if self.reference else 3
        self.convs = nn.Sequential(*conv(self.in_channels, c1), *conv(c1, c1), nn.MaxPool2d(2),
                                   *conv(c1, c2), *conv(c2, c2), nn.MaxPool2d(2))
        h, w = cfg.image_size // 8, cfg.image_size // 4  # 56 x 112 -> 14 x 28
        self.fc = nn.Sequential(nn.Linear(c2 * h * w, cfg.clf_ch(256)), nn.ReLU(),
                                nn.Linear(cfg.clf_ch(256), cfg.clf_ch(128)), nn.ReLU(),
                                nn.Linear(cfg.clf_ch(128), cfg.n_au))
        self.image_size = cfg.image_size
        self.dropout = cfg.au_clf_dropout
        self.symmetric = cfg.au_clf_symmetric

    def lower_half(self, frames: torch.Tensor) -> torch.Tensor:
        """Rows S/2..S of ``(..., 3, S, S)`` frames, leading dims flattened: ``(N, 3, S/2, S)``."""
        s = self.image_size
        return frames[..., s // 2 :, :].reshape(-1, 3, s // 2, s)

    def inputs(self, frames: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier input for ``frames (..., 3, S, S)``: their lower halves ``(N, 3, S/2, S)``,
        with the reference, stacked with the lower half of ``identity`` (``(3, S, S)`` for all
        frames, or ``(B, 3, S, S)``, one per clip of frames ``(B, T, 3, S, S)``): ``(N, 6, S/2, S)``."""
        lower = self.lower_half(frames)
        if not self.reference:
            return lower
        if identity is None:
            raise ValueError("this AU classifier was trained with the identity image as reference "
                             "(au_clf_reference): pass the identity image too")
        ref = self.lower_half(identity)
        # one identity per clip: each repeated for its clip's frames (frames (B, T, ...), identity (B, ...))
        ref = ref.repeat_interleave(lower.shape[0] // ref.shape[0], dim=0)
        return torch.cat([lower, ref], dim=1)

    def forward(self, lower: torch.Tensor) -> torch.Tensor:
        if lower.shape[1] != self.in_channels:
            raise ValueError(f"AU classifier input has {lower.shape[1]} channels, expected {self.in_channels}: "
                             f"build it with inputs(frames, identity)")
        if self.symmetric:
            # cfg.au_clf_symmetric: one batch of the crops and their mirror images, logits averaged.
            both = self._logits(torch.cat([lower, lower.flip(-1)]))
            return 0.5 * (both[: len(lower)] + both[len(lower) :])
        return self._logits(lower)

    def _logits(self, lower: torch.Tensor) -> torch.Tensor:
        h = self.convs(lower * 2.0 - 1.0).flatten(1)
        if not self.dropout:
            return self.fc(h)  # (B, n_au) logits
        # Dropout (cfg.au_clf_dropout) on the FC inputs and hidden activations, applied here
        # rather than as modules so that the FC's state-dict keys stay those of the paper's net.
        for layer in self.fc:
            if isinstance(layer, nn.Linear):
                h = nn.functional.dropout(h, self.dropout, self.training)
            h = layer(h)
        return h
