"""The one description of the generator's architecture and loss mix (docs/design.md §2, §4).

`ModelConfig` is frozen, validated when built, and stored with every checkpoint and every
exported graph (`to_dict()` / `from_dict()` / JSON), so a set of weights always rebuilds its
own model. Its defaults are the paper's configuration.

Width: ``width`` scales the *internal* channel counts (conv channels, LSTM and FC hidden
sizes) of every module. The interface sizes ``f_id``, ``f_a``, ``au_dim`` and
``tcsan_hidden`` are set explicitly because other parts (export, engine) read them; a small
model for tests and smoke runs sets both, e.g. ``ModelConfig.tiny()``.

Temporal context: every fusion variant sees exactly the ``receptive_field`` = 2R+1 frame
features k-R..k+R to produce frame k, with R = ``lookahead_frames``:

- ``tcn``, ``mhatt_tcn``, ``coatt_tcn``, ``tcsan``: valid (unpadded) dilated Conv1d levels,
  dilation 2^(n-1), so R = (kernel - 1) / 2 * (2^levels - 1) = 7 for 3 levels of kernel 3.
- ``gru``: a bidirectional GRU run over the same 2R+1 window for each output frame (centre
  step taken). Same R as the TCN variants, so the ablation compares architectures at equal
  context and latency, and streaming equals offline for it too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from avatar_stream.engine.timebase import AU_NAMES, MFCC_FRAMES_PER_WINDOW, MFCC_N_COEFFS

FUSIONS = ("gru", "tcn", "mhatt_tcn", "coatt_tcn", "tcsan")
ATTENTIONS = ("feature_tokens", "time")
CONFIG_VERSION = 1


# Options of deleted experiments, with the value that means "off": configs written while they
# existed load when they were off (the motion loss: a mouth-box L1 on frame-to-frame changes).
_REMOVED: dict[str, Any] = {"w_motion": 0.0}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture + loss weights. Defaults = the paper (see module docstring)."""

    # -- sizes -----------------------------------------------------------------------------
    width: float = 1.0  # multiplies internal channel counts (not the interface sizes below)
    image_size: int = 112  # face crop side; 4 stride-2 convs -> image_size / 16 (7)
    f_id: int = 512  # identity feature
    f_a: int = 512  # audio-encoder feature per frame
    au_dim: int = 64  # Audio2AU feature per AU (the layer before its last FC)
    au_names: tuple[str, ...] = AU_NAMES
    n_mfcc: int = MFCC_N_COEFFS  # 12 cepstra per MFCC frame (c0 dropped)
    mfcc_frames: int = MFCC_FRAMES_PER_WINDOW  # 28 MFCC frames per video-frame window
    # -- temporal fusion -------------------------------------------------------------------
    fusion: str = "tcsan"
    audio2au: bool = True  # False: frame features are f_a only (ablation, paper table 4)
    attention: str = "feature_tokens"  # per-frame tokens (our reading) | "time" (kernel taps)
    tcsan_levels: int = 3
    tcsan_kernel: int = 3
    tcsan_heads: int = 4
    tcsan_hidden: int = 512  # ft_k size, the decoder's input
    tcsan_tokens: int = 8  # feature tokens per frame: tcsan_hidden / tcsan_tokens each
    # -- loss weights (0 switches a term off) -----------------------------------------------
    w_rec: float = 1.5
    w_id: float = 1.5
    w_per: float = 0.07
    w_au: float = 0.02
    # Not in the paper (0 = off): extra L1 on the mouth box of the canonical crop
    # (losses.MOUTH_BOX), for short CPU runs where the full-frame L_rec is dominated by
    # copying the identity and the mouth learns late.
    w_mouth: float = 0.0
    # Not in the paper (False = the paper's classifier): the AU classifier also sees the lower
    # half of the identity (neutral) image, 6 input channels, and so judges the change from
    # that face instead of guessing each unseen face's neutral mouth. Only the classifier
    # reads it; the generator and its exported graphs are the same either way.
    au_clf_reference: bool = False
    # Not in the paper (0 = off): dropout probability before each of the AU classifier's FC
    # layers while it trains (the first FC holds nearly all its weights and is where a
    # classifier trained on 50 faces memorises them). No weights change shape.
    au_clf_dropout: float = 0.0
    # Not in the paper (False = off): the AU classifier's logits are the mean of those of the
    # crop and of its mirror image. The five mouth AUs are bilateral, pretraining already
    # flips crops at random, and the mean is exactly mirror-invariant. No weights change.
    au_clf_symmetric: bool = False
    # Not in the paper (0 = use ``width``): channel multiplier of the Audio2AU modules alone.
    # They are a few percent of the weights, and at a small ``width`` their LSTMs are the
    # part of the model that has to recognise phonemes across voices.
    a2a_width: float = 0.0
    # Not in the paper (0 = use ``width``): channel multiplier of the AU classifier alone. A
    # narrower classifier checkpoint can start a wider one (``pretrain-au-classifier --init``
    # widens it without changing its outputs: ``training/widen.py``).
    au_clf_width: float = 0.0

    def __post_init__(self) -> None:
        # JSON gives lists; the dataclass is frozen and hashable, so store a tuple.
        object.__setattr__(self, "au_names", tuple(self.au_names))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        need(self.width > 0, f"width must be > 0, got {self.width}")
        need(self.image_size > 0 and self.image_size % 16 == 0,
             f"image_size must be a positive multiple of 16 (4 stride-2 stages), got {self.image_size}")
        for name in ("f_id", "f_a", "au_dim", "n_mfcc", "mfcc_frames", "tcsan_hidden",
                     "tcsan_levels", "tcsan_heads", "tcsan_tokens"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.n_mfcc >= 4 and self.mfcc_frames >= 8,
             f"the audio convs need n_mfcc >= 4 and mfcc_frames >= 8, got {self.n_mfcc}x{self.mfcc_frames}")
        need(len(self.au_names) >= 1 and len(set(self.au_names)) == len(self.au_names),
             f"au_names must be non-empty and unique, got {self.au_names}")
        need(self.fusion in FUSIONS, f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        need(self.attention in ATTENTIONS, f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        need(self.tcsan_kernel >= 3 and self.tcsan_kernel % 2 == 1,
             f"tcsan_kernel must be odd and >= 3 (symmetric, non-causal), got {self.tcsan_kernel}")
        need(self.tcsan_hidden % self.tcsan_tokens == 0,
             f"tcsan_hidden ({self.tcsan_hidden}) must be divisible by tcsan_tokens ({self.tcsan_tokens})")
        need(self.token_dim % self.tcsan_heads == 0,
             f"token size tcsan_hidden/tcsan_tokens ({self.token_dim}) must be divisible by tcsan_heads ({self.tcsan_heads})")
        need(self.tcsan_hidden % self.tcsan_heads == 0,
             f"tcsan_hidden ({self.tcsan_hidden}) must be divisible by tcsan_heads ({self.tcsan_heads})")
        need(self.fusion != "gru" or self.tcsan_hidden % 2 == 0,
             f"the bidirectional GRU needs an even tcsan_hidden, got {self.tcsan_hidden}")
        need(self.a2a_width >= 0, f"a2a_width must be >= 0 (0 = width), got {self.a2a_width}")
        need(self.au_clf_width >= 0, f"au_clf_width must be >= 0 (0 = width), got {self.au_clf_width}")
        need(0.0 <= self.au_clf_dropout < 1.0, f"au_clf_dropout must be in [0, 1), got {self.au_clf_dropout}")
        for name in (f.name for f in fields(self) if f.name.startswith("w_")):  # the loss weights
            need(getattr(self, name) >= 0, f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")

    # -- derived sizes ---------------------------------------------------------------------
    def ch(self, n: int) -> int:
        """Internal channel count ``n`` scaled by ``width`` (at least 4)."""
        return max(4, int(round(n * self.width)))

    def a2a_ch(self, n: int) -> int:
        """Audio2AU channel count ``n`` scaled by ``a2a_width`` (``width`` when 0; at least 4)."""
        return max(4, int(round(n * (self.a2a_width or self.width))))

    def clf_ch(self, n: int) -> int:
        """AU classifier channel count ``n`` scaled by ``au_clf_width`` (``width`` when 0; at least 4)."""
        return max(4, int(round(n * (self.au_clf_width or self.width))))

    @property
    def n_au(self) -> int:
        return len(self.au_names)

    @property
    def token_dim(self) -> int:
        return self.tcsan_hidden // self.tcsan_tokens

    @property
    def dilations(self) -> tuple[int, ...]:
        return tuple(2**n for n in range(self.tcsan_levels))

    @property
    def lookahead_frames(self) -> int:
        """R: frames of future (and past) context the fusion needs for one output frame."""
        return (self.tcsan_kernel - 1) // 2 * sum(self.dilations)

    @property
    def receptive_field(self) -> int:
        """2R+1: frame features k-R..k+R produce output frame k."""
        return 2 * self.lookahead_frames + 1

    @property
    def frame_feature_dim(self) -> int:
        """D_frame = f_a ⊕ f_au (5 x au_dim) per frame; f_a alone without Audio2AU."""
        return self.f_a + (self.n_au * self.au_dim if self.audio2au else 0)

    @property
    def fusion_input_dim(self) -> int:
        """f_k = f_id ⊕ f_a_k ⊕ f_au_k (1344 in the paper)."""
        return self.f_id + self.frame_feature_dim

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["au_names"] = list(self.au_names)
        d["config_version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        version = d.pop("config_version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(
                f"ModelConfig version {version!r} is newer than this avatar-stream understands "
                f"({CONFIG_VERSION}): upgrade avatar-stream to load it")
        for key, off in _REMOVED.items():  # options of experiments that were deleted
            if key in d and d.pop(key) != off:
                raise ValueError(f"ModelConfig: {key} is an experiment this avatar-stream no longer has "
                                 f"(only {key}={off} loads): use the version that trained it")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown} (written by another version?); "
                             f"known keys are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A small model with the paper's structure, for tests and smoke runs (CPU-fast)."""
        base: dict[str, Any] = dict(width=0.125, f_id=64, f_a=64, au_dim=16, tcsan_hidden=64)
        base.update(overrides)
        return cls(**base)
