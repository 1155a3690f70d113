"""Dataset shards (docs/interfaces.md): the one on-disk format every corpus is written in.

Layout::

    ROOT/clips/<speaker>/<utterance>.npz   frames, audio, identity, au, au_label (no pickles)
    ROOT/index.json                        {"version": 1, "clips": [{path, speaker, voice, identity, frames}]}
    ROOT/split.json                        {"train": [speaker...], "test": [speaker...]}
    ROOT/cache/mfcc-<fingerprint>/...      MFCC windows per clip (derived; safe to delete)

``write_clip`` is the one writer: every clip is written to a temporary file and renamed into
place, and index.json is updated under a file lock, so several processes may write to one ROOT
and an interrupted run leaves only whole clips behind. Reading: ``read_index``, ``read_split``,
``split_entries``, ``load_clip``, ``load_frames`` (a few frames without decompressing the rest).
The torch datasets built on them are in training/datasets.py.

Label convention: ``au`` is NaN where the AU intensity of a frame is unknown (no OpenFace
track); such frames are excluded from AU losses and metrics, whatever their ``au_label``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from avatar_stream.engine.timebase import AU_NAMES, SAMPLES_PER_FRAME
from avatar_stream.errors import AvatarError

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


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through a temporary file renamed into place: readers never see half a file."""
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
    atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


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
    atomic_write(root / rel, lambda f: np.savez(f, frames=frames, audio=audio, identity=identity,
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
