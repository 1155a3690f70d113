"""Dataset shards (docs/interfaces.md) and the datasets the training stages read.

Layout::

    ROOT/clips/<speaker>/<utterance>.npz   frames, audio, identity, au, au_label (no pickles)
    ROOT/index.json                        {"version": 1, "clips": [{path, speaker, voice, identity, frames}]}
    ROOT/split.json                        {"train": [speaker...], "test": [speaker...]}
    ROOT/cache/mfcc-<fingerprint>/...      MFCC windows per clip (derived; safe to delete)

``write_clip`` is the one writer: every clip is written to a temporary file and renamed into
place, and index.json is updated under a file lock, so several processes may write to one ROOT
and an interrupted run leaves only whole clips behind.

Label convention: ``au`` is NaN where the AU intensity of a frame is unknown (no OpenFace
track); such frames are excluded from AU losses and metrics, whatever their ``au_label``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from avatar_stream.engine.timebase import AU_NAMES, SAMPLES_PER_FRAME
from avatar_stream.errors import AvatarError
from avatar_stream.training.augment import SpeechAugment, augment_speech, quiet_audio

INDEX_VERSION = 1
CROP = 112
N_AU = len(AU_NAMES)
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class ShardError(AvatarError, ValueError):
    """A dataset root that cannot be read or written as asked (one-line message)."""


# ----------------------------------------------------------------------------- writing


def clip_relpath(speaker: str, utt: str) -> str:
    return f"clips/{speaker}/{utt}.npz"


def _check_name(kind: str, name: str) -> None:
    if not _SAFE.match(name):
        raise ShardError(f"{kind} name {name!r} is not a safe file name: use letters, digits, '.', '_', '-'")


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_FILE_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; shards should be readable like any file


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


@contextmanager
def _index_lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".index.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _validate_clip(frames, audio, identity, au, au_label):
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (CROP, CROP, 3) or len(frames) == 0:
        raise ShardError(f"frames must be uint8 (T, {CROP}, {CROP}, 3) with T >= 1, got {frames.dtype} {frames.shape}")
    t = len(frames)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape != (t * SAMPLES_PER_FRAME,):
        raise ShardError(f"audio must have exactly T*{SAMPLES_PER_FRAME} = {t * SAMPLES_PER_FRAME} samples "
                         f"for {t} frames, got shape {audio.shape}: trim or pad it first")
    identity = np.asarray(identity)
    if identity.dtype != np.uint8 or identity.shape != (CROP, CROP, 3):
        raise ShardError(f"identity must be uint8 ({CROP}, {CROP}, 3), got {identity.dtype} {identity.shape}")
    au = np.full((t, N_AU), np.nan, np.float32) if au is None else np.asarray(au, dtype=np.float32)
    if au.shape != (t, N_AU):
        raise ShardError(f"au must be (T, {N_AU}) = ({t}, {N_AU}), got {au.shape}")
    if au_label is None:
        # OpenFace calls an AU present from intensity 1 of 5 on.
        au_label = np.nan_to_num(au, nan=0.0) >= 0.2
    au_label = np.asarray(au_label).astype(np.uint8)
    if au_label.shape != (t, N_AU):
        raise ShardError(f"au_label must be (T, {N_AU}) = ({t}, {N_AU}), got {au_label.shape}")
    return frames, audio, identity, au, au_label


def write_clip(root, speaker: str, utt: str, frames, audio, identity, au=None, au_label=None,
               voice: str | None = None, identity_name: str | None = None,
               extra: dict[str, np.ndarray] | None = None) -> dict:
    """Write one clip to ``ROOT/clips/<speaker>/<utt>.npz`` and record it in ``ROOT/index.json``.

    ``frames`` uint8 (T, 112, 112, 3); ``audio`` float32 (T * 640,) at 16 kHz; ``identity`` uint8
    (112, 112, 3); ``au`` float32 (T, 5) in [0, 1] or None (unknown: NaN); ``au_label`` uint8
    (T, 5) or None (derived from ``au`` >= 0.2). ``voice`` and ``identity_name`` name the voice
    and the face (default: the speaker). ``extra``: more arrays stored beside them (real video:
    landmarks, mouth measures), which readers that do not ask for them never load. Returns the
    index entry. Rewriting a clip replaces it."""
    root = Path(root)
    _check_name("speaker", speaker)
    _check_name("utterance", utt)
    frames, audio, identity, au, au_label = _validate_clip(frames, audio, identity, au, au_label)
    rel = clip_relpath(speaker, utt)
    extra = dict(extra or {})
    clash = set(extra) & {"frames", "audio", "identity", "au", "au_label"}
    if clash:
        raise ShardError(f"extra arrays {sorted(clash)} would replace the clip's own: rename them")
    _atomic_write(root / rel, lambda f: np.savez(f, frames=frames, audio=audio, identity=identity,
                                                 au=au, au_label=au_label, **extra))
    entry = {"path": rel, "speaker": speaker, "voice": voice or speaker,
             "identity": identity_name or speaker, "frames": int(len(frames))}
    with _index_lock(root):
        clips = [c for c in _read_index_file(root) if c["path"] != rel]
        clips.append(entry)
        clips.sort(key=lambda c: c["path"])
        write_json(root / "index.json", {"version": INDEX_VERSION, "clips": clips})
    return entry


def _read_index_file(root: Path) -> list[dict]:
    path = root / "index.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("version") != INDEX_VERSION:
        raise ShardError(f"{path} has version {data.get('version')}, this reader knows {INDEX_VERSION}: re-run prepare")
    return data["clips"]


def read_index(root) -> list[dict]:
    """Index entries of ROOT (sorted by path)."""
    root = Path(root)
    if not (root / "index.json").exists():
        raise ShardError(f"{root} has no index.json: run `avatar-train prepare ... --out {root}` first")
    return _read_index_file(root)


def write_split(root, train: list[str], test: list[str]) -> None:
    overlap = set(train) & set(test)
    if overlap:
        raise ShardError(f"speakers in both train and test: {sorted(overlap)}")
    write_json(Path(root) / "split.json", {"train": sorted(train), "test": sorted(test)})


def read_split(root) -> dict[str, list[str]]:
    path = Path(root) / "split.json"
    if not path.exists():
        raise ShardError(f"{path} is missing: run prepare, or write {{\"train\": [...], \"test\": [...]}} there")
    data = json.loads(path.read_text())
    return {"train": list(data.get("train", [])), "test": list(data.get("test", []))}


def merge_corpora(sources, out) -> dict[str, int]:
    """Make ``out`` one corpus of the clips of ``sources``: ``out/clips/<speaker>`` are relative
    symlinks to the sources' speaker folders; index.json and split.json are the unions. A
    speaker in two sources, or an identity that is a test identity of one source and a
    training identity of another, is refused; a voice heard in training that is a test voice
    elsewhere is only warned about (the AU classifier never hears it)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ShardError(f"{out} exists and is not empty: merge into a new folder")
    clips, split, owner = [], {"train": [], "test": []}, {}
    roles: dict[str, dict[str, set]] = {"identity": {"train": set(), "test": set()},
                                        "voice": {"train": set(), "test": set()}}
    for src in map(Path, sources):
        entries, parts = read_index(src), read_split(src)
        for part in ("train", "test"):
            for speaker in parts[part]:
                if speaker in owner:
                    raise ShardError(f"speaker {speaker} is in both {owner[speaker]} and {src}: merge corpora "
                                     "with distinct speakers")
                owner[speaker] = src
                split[part].append(speaker)
            chosen = set(parts[part])
            for e in entries:
                if e["speaker"] in chosen:
                    roles["identity"][part].add(e["identity"])
                    roles["voice"][part].add(e["voice"])
        clips += [e for e in entries if owner.get(e["speaker"]) == src]
    leaked = roles["identity"]["train"] & roles["identity"]["test"]
    if leaked:
        raise ShardError(f"identities both trained on and held out in the merge: {', '.join(sorted(leaked))}")
    heard = roles["voice"]["train"] & roles["voice"]["test"]
    if heard:
        warnings.warn(f"{len(heard)} test voice(s) of the merged corpus are heard in its training split "
                      f"(e.g. {sorted(heard)[0]}): its Audio2AU figures are not on held-out voices",
                      stacklevel=2)
    (out / "clips").mkdir(parents=True)
    for speaker, src in owner.items():
        target = (src / "clips" / speaker).resolve()
        if target.is_dir():
            os.symlink(os.path.relpath(target, (out / "clips").resolve()), out / "clips" / speaker)
    write_json(out / "index.json", {"version": INDEX_VERSION, "clips": sorted(clips, key=lambda c: c["path"])})
    write_split(out, split["train"], split["test"])
    return {"clips": len(clips), "train": len(split["train"]), "test": len(split["test"])}


def split_entries(root, split: str) -> list[dict]:
    """Index entries of ``split`` ("train", "test" or "all")."""
    entries = read_index(root)
    if split == "all":
        return entries
    if split not in ("train", "test"):
        raise ShardError(f"unknown split {split!r}: use train, test or all")
    speakers = set(read_split(root)[split])
    return [e for e in entries if e["speaker"] in speakers]


def load_clip(root, entry: dict, keys=("frames", "audio", "identity", "au", "au_label")) -> dict:
    """Arrays of one clip (only ``keys`` are read: npz members load lazily)."""
    path = Path(root) / entry["path"]
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError) as e:
        raise ShardError(f"cannot read {path} ({e}): delete it and re-run prepare to rewrite it") from e


def _stored_member(path: Path, name: str) -> tuple[int, tuple, np.dtype] | None:
    """(file offset of the data, shape, dtype) of an uncompressed C-order .npy member of an
    npz, or None where it cannot be read in place (compressed, Fortran order)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + n_name + n_extra)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        return (None if fortran else (f.tell(), shape, dtype))


def load_frames(root, entry: dict, idx) -> np.ndarray:
    """Frames ``idx`` (int array) of one clip, uint8 ``(len(idx), 112, 112, 3)``, read in place
    (np.savez stores members uncompressed, so only the asked rows leave the disk)."""
    path = Path(root) / entry["path"]
    idx = np.asarray(idx, dtype=np.int64)
    try:
        member = _stored_member(path, "frames.npy")
        if member is None:
            return load_clip(root, entry, ("frames",))["frames"][idx]
        offset, shape, dtype = member
        frames = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return np.ascontiguousarray(frames[idx])
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as e:
        raise ShardError(f"cannot read frames of {path} ({e}): delete it and re-run prepare to rewrite it") from e


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
                _atomic_write(path, lambda f: np.save(f, m))
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
