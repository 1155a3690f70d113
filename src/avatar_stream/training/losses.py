"""Training losses (paper §3.2, docs/design.md §4):

    L_total = w_rec L_rec + w_id L_id + w_per L_per + w_au L_au   (1.5, 1.5, 0.07, 0.02)
              [+ w_mouth L_mouth: ours, not the paper's, 0 by default]

- L_rec: L1 between generated and real frames.
- L_id: L1 between the upper halves (rows 0 .. S/2) of the generated frames and the identity image.
- L_per: mean over the VGG-19 layers relu1_2, relu2_2, relu3_4, relu4_4, relu5_4 of the L1
  between features (frozen, ImageNet-normalised input).
- L_au: weighted BCE + weighted Dice between AU logits (the AU classifier on generated frames)
  and AU occurrence labels, per-AU weights w_i ∝ 1/r_i normalised to sum to n_au.
- L_mouth (``mouth_loss``): L1 over ``MOUTH_BOX``.

VGG-19 is built here (torchvision is not installable beside our torch) with torchvision's
layer indices, so torchvision's ImageNet file ``vgg19-dcbb9e9d.pth`` loads by key name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from avatar_stream.errors import AvatarError
from avatar_stream.training.config import ModelConfig

log = logging.getLogger(__name__)

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
# torchvision's cfg "E": conv widths, "M" = max-pool.
_VGG19_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
# Indices (in torchvision's ``features`` Sequential) of the ReLUs the loss reads.
VGG19_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_4": 17, "relu4_4": 26, "relu5_4": 35}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(AvatarError, FileNotFoundError):
    """A weight file that the user must supply is missing; the message says where to get it."""


class VGG19Features(nn.Module):
    """Frozen VGG-19 convolutional trunk up to relu5_4.

    ``forward(images (N, 3, H, W) in [0, 1]) -> list of 5 feature maps`` (VGG19_LAYERS order).
    ``features`` keeps torchvision's indices, so ``features.{i}.weight`` keys match its files.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG19_PLAN:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU()]
                c_in = int(v)
        self.features = nn.Sequential(*layers)  # indices 0..35
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._taps = set(VGG19_LAYERS.values())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:
        # Frozen: stays in eval mode whatever the surrounding model does.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                out.append(x)
        return out


def load_vgg19(weights: str | Path | None) -> VGG19Features:
    """VGG-19 with ImageNet weights from a local file, or random weights (warned) for ``None``.

    Accepts torchvision's ``vgg19-dcbb9e9d.pth`` (read with ``torch.load(weights_only=True)``,
    no pickled code runs) or a ``.safetensors`` file with the same ``features.N.*`` keys.
    """
    vgg = VGG19Features()
    if weights is None:
        log.warning("VGG-19 has random weights (weights=None): L_per is not a perceptual loss; "
                    "pass the path of %s (from %s) for training", VGG19_FILE, VGG19_URL)
        return vgg
    path = Path(weights)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"VGG-19 weights not found at {path}: download {VGG19_URL} (torchvision's ImageNet "
            f"VGG-19, {VGG19_FILE}) and pass its path, or set w_per=0 to train without L_per")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = {k: v for k, v in state.items() if k.startswith("features.")}
    expected = set(vgg.state_dict())
    missing = sorted(expected - set(wanted))
    if missing:
        raise ValueError(f"{path} is not a VGG-19 weight file: missing keys {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''} (expected torchvision's {VGG19_FILE})")
    extra = sorted(set(wanted) - expected)  # layers past relu5_4 do not exist in VGG-19's trunk
    if extra:
        raise ValueError(f"{path}: unexpected VGG keys {extra[:4]} (not VGG-19's layout?)")
    try:
        vgg.load_state_dict(wanted)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensor shapes do not match VGG-19 ({str(e).splitlines()[-1].strip()})") from e
    return vgg


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_rec: mean absolute error over all frames and pixels."""
    return F.l1_loss(pred, target)


# Rows and columns of the canonical crop that hold the mouth open or closed (template
# mouth landmarks span x 42-69, y 70-79 of 112; the jaw drops to ~y 95), as fractions of S.
MOUTH_BOX = ((0.55, 0.9), (0.3, 0.7))


def _mouth(frames: torch.Tensor) -> torch.Tensor:
    """The ``MOUTH_BOX`` of ``(..., 3, S, S)`` frames."""
    s = frames.shape[-1]
    (r0, r1), (c0, c1) = ((round(a * s), round(b * s)) for a, b in MOUTH_BOX)
    return frames[..., r0:r1, c0:c1]


def mouth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 over ``MOUTH_BOX`` of ``(..., 3, S, S)`` frames (``ModelConfig.w_mouth``)."""
    return F.l1_loss(_mouth(pred), _mouth(target))


def identity_loss(pred: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """L_id: L1 between the upper halves of ``pred (B, T, 3, S, S)`` (or ``(B, 3, S, S)``) and
    ``identity (B, 3, S, S)``; the upper face should not move with speech."""
    half = identity.shape[-2] // 2
    if pred.dim() == 5:
        identity = identity.unsqueeze(1)  # broadcast over frames
    return (pred[..., :half, :] - identity[..., :half, :]).abs().mean()


class PerceptualLoss(nn.Module):
    """L_per: mean over the 5 VGG-19 layers of the L1 between feature maps."""

    def __init__(self, vgg: VGG19Features):
        super().__init__()
        self.vgg = vgg

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = pred.shape[-3:]
        fp = self.vgg(pred.reshape(-1, *s))
        ft = self.vgg(target.reshape(-1, *s))
        return torch.stack([F.l1_loss(a, b) for a, b in zip(fp, ft, strict=True)]).mean()


def au_weights(occurrence_rates: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per-AU weights w_i ∝ 1 / r_i, normalised so that they sum to n_au (float32 (n_au,))."""
    r = torch.as_tensor(occurrence_rates, dtype=torch.float64).flatten()
    if r.numel() == 0 or not torch.all((r > 0) & (r <= 1)):
        raise ValueError(f"AU occurrence rates must lie in (0, 1], got {r.tolist()}: an AU that never "
                         "occurs in the training set cannot be weighted by 1/r; drop it or fix the labels")
    w = 1.0 / r
    return (w * (r.numel() / w.sum())).float()


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/n_au) Σ_i w_i · mean_n BCE(σ(logit_ni), y_ni); logits, target ``(..., n_au)``."""
    per = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    per_au = per.reshape(-1, per.shape[-1]).mean(dim=0)  # (n_au,)
    return (weights * per_au).mean()


def weighted_dice(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                  smooth: float = 1.0) -> torch.Tensor:
    """(1/n_au) Σ_i w_i · (1 - (2 Σ_n p y + s) / (Σ_n p + Σ_n y + s)), p = σ(logit).

    The sums run over all samples of the batch per AU (soft Dice); ``smooth`` keeps an AU
    absent from the batch and correctly predicted near zero loss."""
    n_au = logits.shape[-1]
    p = torch.sigmoid(logits).reshape(-1, n_au)
    y = target.to(p.dtype).reshape(-1, n_au)
    dice = 1.0 - (2.0 * (p * y).sum(0) + smooth) / (p.sum(0) + y.sum(0) + smooth)
    return (weights * dice).mean()


def au_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_au = weighted BCE + weighted Dice."""
    return weighted_bce(logits, target, weights) + weighted_dice(logits, target, weights)


class TotalLoss(nn.Module):
    """The weighted sum of the enabled terms (a term with weight 0 is not computed).

    ``forward(pred (B, T, 3, S, S), target (same), identity (B, 3, S, S), au_logits (..., n_au)
    | None, au_target (same) | None) -> {"rec", "id", "per", "au" (enabled ones), "total"}``.
    ``vgg_weights`` is the VGG-19 file (see ``load_vgg19``); ``au_rates`` the training-set AU
    occurrence rates (uniform weights when None).
    """

    def __init__(self, cfg: ModelConfig, vgg_weights: str | Path | None = None,
                 au_rates: Sequence[float] | None = None):
        super().__init__()
        self.cfg = cfg
        self.perceptual = PerceptualLoss(load_vgg19(vgg_weights)) if cfg.w_per > 0 else None
        w = torch.ones(cfg.n_au) if au_rates is None else au_weights(au_rates)
        if w.numel() != cfg.n_au:
            raise ValueError(f"got {w.numel()} AU occurrence rates for {cfg.n_au} AUs {cfg.au_names}")
        self.register_buffer("au_w", w)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, identity: torch.Tensor,
                au_logits: torch.Tensor | None = None, au_target: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        parts: dict[str, torch.Tensor] = {}
        if cfg.w_rec > 0:
            parts["rec"] = reconstruction_loss(pred, target)
        if cfg.w_id > 0:
            parts["id"] = identity_loss(pred, identity)
        if cfg.w_mouth > 0:
            parts["mouth"] = mouth_loss(pred, target)
        if self.perceptual is not None:
            parts["per"] = self.perceptual(pred, target)
        if cfg.w_au > 0:
            if au_logits is None or au_target is None:
                raise ValueError("w_au > 0 needs au_logits (AU classifier on the generated frames) "
                                 "and au_target (AU labels); pass them or set w_au=0")
            parts["au"] = au_loss(au_logits, au_target, self.au_w)
        weight = {"rec": cfg.w_rec, "id": cfg.w_id, "per": cfg.w_per, "au": cfg.w_au, "mouth": cfg.w_mouth}
        parts["total"] = sum((weight[k] * v for k, v in parts.items()), start=pred.new_zeros(()))
        return parts
