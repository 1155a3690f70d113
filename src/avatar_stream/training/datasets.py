"""The datasets the training stages read, over shards (training/shards.py): clip windows
for the generator (``ClipDataset``), frame chunks for the AU classifier (``AUFrameDataset``)
and for Audio2AU (``AudioAUDataset``), the MFCC cache they share, image augmentation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from avatar_stream.engine.timebase import AU_NAMES, SAMPLES_PER_FRAME
from avatar_stream.training.augment import SpeechAugment, augment_speech, quiet_audio
from avatar_stream.training.shards import (
    CROP,
    N_AU,
    ShardError,
    atomic_write,
    load_clip,
    load_frames,
    split_entries,
)

# ----------------------------------------------------------------------------- MFCC cache


class MFCCCache:
    """MFCC windows ``(T, 12, 28)`` per clip, computed once with training/mfcc.py and kept on
    disk under ``ROOT/cache/mfcc-<fingerprint>`` (the fingerprint changes with the MFCC
    definition, so a stale cache is never read) and in memory. A read-only ROOT disables the
    disk cache silently (memory only)."""

    def __init__(self, root, memory_items: int = 256):
        from avatar_stream.training.mfcc import mfcc_windows

        self._mfcc = mfcc_windows
        self.root = Path(root)
        self.dir = self.root / "cache" / f"mfcc-{self._fingerprint()}"
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_items = memory_items

    def _fingerprint(self) -> str:
        # The MFCC of a fixed chirp: any change of the definition changes the hash.
        t = np.arange(4 * SAMPLES_PER_FRAME, dtype=np.float64) / 16000.0
        x = (0.5 * np.sin(2 * np.pi * (200 + 2000 * t) * t)).astype(np.float32)
        m = np.asarray(self._mfcc(x), dtype=np.float32)
        return hashlib.sha1(np.round(m, 3).tobytes()).hexdigest()[:10]

    def get(self, entry: dict, audio: np.ndarray | None = None) -> np.ndarray:
        key = entry["path"]
        if key in self._mem:
            self._mem.move_to_end(key)
            return self._mem[key]
        path = self.dir / (key[: -len(".npz")] + ".npy")
        m = None
        if path.exists():
            try:
                m = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                m = None  # a damaged cache file is recomputed
            if m is not None and m.shape[0] != entry["frames"]:
                m = None
        if m is None:
            if audio is None:
                audio = load_clip(self.root, entry, ("audio",))["audio"]
            with torch.no_grad():
                m = np.asarray(self._mfcc(audio), dtype=np.float32)
            try:
                atomic_write(path, lambda f: np.save(f, m))
            except OSError:
                pass  # read-only dataset: memory cache only
        self._mem[key] = m
        if len(self._mem) > self._memory_items:
            self._mem.popitem(last=False)
        return m


# ----------------------------------------------------------------------------- datasets


def augmented_mfcc(root, entry: dict, idx: np.ndarray, aug: SpeechAugment) -> np.ndarray:
    """MFCC windows ``idx`` of the clip's audio after ``augment_speech`` (never cached). The
    rng seed comes from torch's RNG, which the loop seeds per worker from (seed, epoch, position)."""
    from avatar_stream.engine.timebase import frame_windows

    audio = load_clip(root, entry, ("audio",))["audio"]
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
    windows = frame_windows(augment_speech(audio, rng, aug), entry["frames"])[idx]
    return _mfcc_of(windows)


def _mfcc_of(windows: np.ndarray) -> np.ndarray:
    """MFCC (training/mfcc.py, the one definition) of audio windows ``(k, WINDOW_SAMPLES)``."""
    from avatar_stream.training.mfcc import MFCC

    global _AUG_MFCC
    if _AUG_MFCC is None:
        _AUG_MFCC = MFCC().eval()
    with torch.no_grad():
        return _AUG_MFCC(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))).numpy()


_AUG_MFCC = None


class ClipSample(NamedTuple):
    identity: torch.Tensor  # (3, 112, 112) float [0, 1]
    mfcc: torch.Tensor  # (T + 2R, 12, 28)
    frames: torch.Tensor  # (T, 3, 112, 112) float [0, 1]
    au: torch.Tensor  # (T, 5) float, NaN where unknown
    au_label: torch.Tensor  # (T, 5) float 0/1


def to_chw(img: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) images -> float (..., 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(*range(img.ndim - 3), -1, -3, -2).float() / 255.0


def window_starts(n: int, length: int, stride: int) -> list[int]:
    """Start frames of windows of ``length`` over ``n`` frames, every ``stride``, plus one
    aligned with the end so that every frame is covered."""
    if n < length:
        return []
    starts = list(range(0, n - length + 1, stride))
    if starts[-1] != n - length:
        starts.append(n - length)
    return starts


class ClipDataset(Dataset):
    """Training windows: ``clip_len`` target frames with ``context`` frames of MFCC each side.

    Sample i = (clip, start); frames ``start - R .. start + T + R - 1`` feed the model, frames
    ``start .. start + T - 1`` are targets. Outside the clip the edge frame is replicated
    (docs/design.md §3), so the first and last frames of an utterance are trained exactly as the
    stream renders them. ``clip_len=None`` gives one sample per whole clip (variable T).
    ``augment``: MFCC from ``augment_speech``-ed audio (training/augment.py) instead of the cache.
    ``quiet``: probability that an item is a quiet one instead: its audio replaced by digital
    silence or white/pink noise at -75..-35 dBFS (``quiet_audio``), its targets by the
    identity image (the photo's own mouth) and its AU labels by zeros. Teaches the model that
    a window of only hiss is no speech; corpus pauses are too short to teach it."""

    def __init__(self, root, split: str, context: int, clip_len: int | None, stride: int | None = None,
                 augment: SpeechAugment | None = None, quiet: float = 0.0):
        self.root = Path(root)
        self.augment = augment
        self.quiet = float(quiet)
        self.context = int(context)
        self.clip_len = clip_len
        self.entries = split_entries(root, split)
        if not self.entries:
            raise ShardError(f"{self.root} has no clips in split {split!r}: check split.json")
        self.samples: list[tuple[int, int]] = []
        for ci, e in enumerate(self.entries):
            if clip_len is None:
                self.samples.append((ci, 0))
            else:
                self.samples += [(ci, s) for s in window_starts(e["frames"], clip_len, stride or clip_len)]
        if not self.samples:
            raise ShardError(f"no clip in {self.root} ({split}) has {clip_len} frames: lower --clip-len")
        self._mfcc: MFCCCache | None = None  # built lazily: one per DataLoader worker

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> ClipSample:
        ci, start = self.samples[i]
        entry = self.entries[ci]
        clip = load_clip(self.root, entry, ("identity", "au", "au_label"))
        n = entry["frames"]
        t = n if self.clip_len is None else self.clip_len
        ctx = np.clip(np.arange(start - self.context, start + t + self.context), 0, n - 1)
        # Drawn only when enabled, so quiet == 0 leaves torch's RNG stream (and old runs) unchanged.
        if self.quiet > 0:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
            if rng.random() < self.quiet:
                return self._quiet_sample(clip, n, t, ctx, rng)
        if self.augment is not None:
            mfcc = augmented_mfcc(self.root, entry, ctx, self.augment)
        else:
            if self._mfcc is None:
                self._mfcc = MFCCCache(self.root)
            mfcc = self._mfcc.get(entry)[ctx]
        return ClipSample(
            identity=to_chw(clip["identity"]),
            mfcc=torch.from_numpy(mfcc),
            frames=to_chw(load_frames(self.root, entry, np.arange(start, start + t))),
            au=torch.from_numpy(clip["au"][start : start + t].astype(np.float32)),
            au_label=torch.from_numpy(clip["au_label"][start : start + t].astype(np.float32)),
        )

    def _quiet_sample(self, clip, n: int, t: int, ctx: np.ndarray, rng: np.random.Generator) -> ClipSample:
        from avatar_stream.engine.timebase import frame_windows

        windows = frame_windows(quiet_audio(n * SAMPLES_PER_FRAME, rng), n)[ctx]
        identity = to_chw(clip["identity"])
        return ClipSample(identity=identity, mfcc=torch.from_numpy(_mfcc_of(windows)),
                          frames=identity.unsqueeze(0).repeat(t, 1, 1, 1),
                          au=torch.zeros(t, len(AU_NAMES)), au_label=torch.zeros(t, len(AU_NAMES)))


def _soft_labels(au: np.ndarray, label: np.ndarray, known: np.ndarray, tau: float, entry: dict) -> np.ndarray:
    from avatar_stream.training.au_table import OCCURRENCE_THRESHOLDS

    thr = np.asarray(OCCURRENCE_THRESHOLDS, dtype=np.float32)
    if np.any((au >= thr)[known] != (label > 0)[known]):
        raise ValueError(f"{entry.get('path', entry)}: its AU labels are not its intensities over "
                         f"OCCURRENCE_THRESHOLDS, so soft labels cannot be derived: drop --soft-labels")
    z = np.where(known, (np.nan_to_num(au) - thr) / tau, -np.inf)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # sigmoid without overflow


class _FrameChunks(Dataset):
    """Per-frame samples grouped ``per_item`` frames of one clip to an item, so that one clip
    read serves several frames. Chunk j of a clip holds frames ``j, j + m, j + 2m, ...`` (m =
    number of chunks, wrapping at the end): every frame is seen once per epoch, spread over
    the utterance. Only clips with at least one labelled frame are kept.

    ``soft_labels`` (tau > 0, training): instead of the 0/1 occurrence labels, the targets are
    ``sigmoid((intensity - threshold) / tau)`` per AU (``OCCURRENCE_THRESHOLDS``): a frame just
    past a threshold is a weaker positive than a wide-open mouth. Only for corpora whose labels
    are thresholded intensities (the synthetic corpus; checked)."""

    def __init__(self, root, split: str, per_item: int, soft_labels: float = 0.0):
        if soft_labels < 0:
            raise ValueError(f"soft labels need tau > 0 (intensity units), got {soft_labels}")
        self.root = Path(root)
        self.per_item = per_item
        self.entries = []
        self._labels: list[tuple[np.ndarray, np.ndarray]] = []
        for e in split_entries(root, split):
            arr = load_clip(root, e, ("au", "au_label"))
            known = np.isfinite(arr["au"])
            if known.any():
                self.entries.append(e)
                lab = arr["au_label"].astype(np.float32)
                if soft_labels:
                    lab = _soft_labels(arr["au"], lab, known, soft_labels, e)
                self._labels.append((lab, known))
        if not self.entries:
            raise ShardError(f"{self.root} ({split}) has no AU labels: prepare with --openface DIR, "
                             f"or use a synthetic corpus, which carries labels")
        self.items = [(ci, j) for ci, e in enumerate(self.entries) for j in range(self._chunks(e["frames"]))]

    def _chunks(self, n: int) -> int:
        return -(-n // self.per_item)

    def frame_indices(self, ci: int, j: int) -> np.ndarray:
        """The frame numbers of clip ``ci`` that item chunk ``j`` reads (spread over the clip)."""
        n = self.entries[ci]["frames"]
        return (j + self._chunks(n) * np.arange(self.per_item)) % n

    def __len__(self) -> int:
        return len(self.items)

    def labels(self, ci: int, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        lab, known = self._labels[ci]
        return torch.from_numpy(lab[idx]), torch.from_numpy(known[idx].astype(np.float32))


IMAGE_JITTER = ("off", "colour", "full")
REFERENCE_SHIFT = 1.5  # px: --augment-images full's default shift of the reference alone


def _image_jitter_full(frames: np.ndarray, ident: np.ndarray | None, rng: np.random.Generator,
                       reference_shift: float):
    """The geometric and camera part of ``--augment-images full`` on uint8 ``(k, S, S, 3)``
    frames and their ``(S, S, 3)`` identity image (or None): one random similarity transform
    (rotation +-4 deg, scale 0.94-1.06, shift +-3 px) for the frames and the identity alike
    (another face position, the same expression), the identity shifted a further
    +-``reference_shift`` px on its own (a reference never lines up to the pixel: head motion,
    a generated frame), then
    with probability 0.3 each a Gaussian blur (sigma 0.4-1.2) and Gaussian noise (sigma 1-8
    grey levels) of the frames only: generated frames are softer than the photo they come
    from. Returns float32 arrays in [0, 255]."""
    import cv2

    s = frames.shape[1]
    m = cv2.getRotationMatrix2D((s / 2.0, s / 2.0), rng.uniform(-4.0, 4.0), rng.uniform(0.94, 1.06))
    m[:, 2] += rng.uniform(-3.0, 3.0, 2)
    warp = lambda img, mat: cv2.warpAffine(img, mat, (s, s), flags=cv2.INTER_LINEAR,  # noqa: E731
                                           borderMode=cv2.BORDER_REFLECT101)
    out = np.stack([warp(f, m) for f in frames]).astype(np.float32)
    if ident is not None:
        mi = m.copy()
        mi[:, 2] += rng.uniform(-reference_shift, reference_shift, 2)
        ident = warp(ident, mi).astype(np.float32)
    if rng.random() < 0.3:
        sigma = rng.uniform(0.4, 1.2)
        out = np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in out])
    if rng.random() < 0.3:
        out = out + rng.normal(0.0, rng.uniform(1.0, 8.0), out.shape).astype(np.float32)
    return np.clip(out, 0.0, 255.0), ident


class AUFrameDataset(_FrameChunks):
    """AU classifier samples: item = (lower half crops (k, C, 56, 112) float [0, 1],
    au_label (k, 5), valid (k, 5)) for k = ``per_item`` frames of one clip. C = 3, or 6 with
    ``reference`` (the clip's identity image's lower half stacked on each frame's, as
    ``AUClassifier.inputs`` builds it).

    ``jitter`` (training; ``True`` means ``"colour"``): ``"colour"`` is one random horizontal
    flip, per-channel gain 0.8-1.2 and offset +-0.06 per item, the same for the frames and the
    reference (a different face colour, not a different expression); ``"full"`` first applies
    :func:`_image_jitter_full` (position, scale, rotation, blur, noise; the reference alone
    moved by up to ``reference_shift`` px more), then the same."""

    def __init__(self, root, split: str, per_item: int = 8, reference: bool = False,
                 jitter: bool | str = False, soft_labels: float = 0.0,
                 reference_shift: float = REFERENCE_SHIFT):
        if reference_shift < 0:
            raise ValueError(f"reference shift must be >= 0 px, got {reference_shift}")
        super().__init__(root, split, per_item, soft_labels)
        self.reference = reference
        self.reference_shift = reference_shift
        self.jitter = {True: "colour", False: "off"}.get(jitter, jitter)
        if self.jitter not in IMAGE_JITTER:
            raise ValueError(f"image jitter must be one of {IMAGE_JITTER}, got {jitter!r}")

    def __getitem__(self, i: int):
        ci, j = self.items[i]
        idx = self.frame_indices(ci, j)
        frames = load_frames(self.root, self.entries[ci], idx)
        ident = load_clip(self.root, self.entries[ci], ("identity",))["identity"] if self.reference else None
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if self.jitter != "off" else 0
        if self.jitter == "full":
            frames, ident = _image_jitter_full(frames, ident, np.random.default_rng(seed + 1), self.reference_shift)
        lower = to_chw(frames[:, CROP // 2 :])
        if ident is not None:
            ref = to_chw(ident[CROP // 2 :])
            lower = torch.cat([lower, ref.expand(len(lower), -1, -1, -1)], dim=1)
        if self.jitter != "off":
            g = torch.Generator().manual_seed(seed)
            if torch.rand((), generator=g) < 0.5:
                lower = lower.flip(-1)
            c = lower.shape[1]
            gain = 0.8 + 0.4 * torch.rand(3, generator=g)
            bias = 0.12 * torch.rand(3, generator=g) - 0.06
            gain, bias = gain.repeat(c // 3), bias.repeat(c // 3)
            lower = (lower * gain[:, None, None] + bias[:, None, None]).clamp(0.0, 1.0)
        return (lower, *self.labels(ci, idx))


class AudioAUDataset(_FrameChunks):
    """Audio2AU samples: item = (MFCC windows (k, 12, 28), au_label (k, 5), valid (k, 5));
    ``augment`` as in :class:`ClipDataset`."""

    def __init__(self, root, split: str, per_item: int = 8, augment: SpeechAugment | None = None,
                 soft_labels: float = 0.0):
        super().__init__(root, split, per_item, soft_labels)
        self._mfcc: MFCCCache | None = None
        self.augment = augment

    def __getitem__(self, i: int):
        ci, j = self.items[i]
        idx = self.frame_indices(ci, j)
        if self.augment is not None:
            m = augmented_mfcc(self.root, self.entries[ci], idx, self.augment)
            return (torch.from_numpy(m), *self.labels(ci, idx))
        if self._mfcc is None:
            self._mfcc = MFCCCache(self.root)
        m = self._mfcc.get(self.entries[ci])
        return (torch.from_numpy(m[idx]), *self.labels(ci, idx))


def au_occurrence_rates(root, split: str = "train") -> np.ndarray:
    """Occurrence rate r_i of each AU over labelled frames of ``split`` (for the L_au weights)."""
    pos = np.zeros(N_AU)
    cnt = np.zeros(N_AU)
    for e in split_entries(root, split):
        arr = load_clip(root, e, ("au", "au_label"))
        known = np.isfinite(arr["au"])
        pos += (arr["au_label"].astype(bool) & known).sum(0)
        cnt += known.sum(0)
    return np.where(cnt > 0, pos / np.maximum(cnt, 1), np.nan)
