"""``avatar-train prepare grid|tcd-timit``: videos -> dataset shards (training/shards.py).

Per clip: frames resampled to 25 fps, aligned 112x112 crops from the engine's face front-end
(``FaceAligner.align_video``: HOG detection on every frame, 68 landmarks, a similarity fitted
on eyes and nose), 16 kHz audio on the video's timeline trimmed / zero-padded to exactly
T * 640 samples, identity image = the first frame's crop, AU labels from OpenFace CSVs when
given. Speakers are split train / test as in the paper (GRID 27 / 6, TCD-TIMIT 49 / 10,
scaled to the speakers present).

Accepted layouts (speaker = the folder named below; utterance = the file stem):

- GRID: ``ROOT/<speaker>/*.mpg``, ``ROOT/<speaker>/video/**/*.mpg`` (any depth under the
  speaker folder), or a flat folder ``ROOT/*.mpg`` whose speaker is ROOT's own name.
  Audio is the .mpg's own track.
- TCD-TIMIT: ``ROOT/{volunteers,lipspeakers}/<speaker>/**/straightcam/*.mp4`` (also
  ``ROOT/<speaker>/**/straightcam/*.mp4``); the 30-degree camera is ignored. Audio is the
  video's track, or else ``<stem>.wav`` anywhere under the speaker folder.
- OpenFace CSVs (``--openface DIR``): ``DIR/<speaker>/<stem>.csv``, ``DIR/<speaker>_<stem>.csv``
  or ``DIR/<stem>.csv`` (first found), one row per *source* video frame.

The run is resumable: clips already in the index are skipped, clips that failed before
(``OUT/skipped.json``) are skipped unless ``retry_skipped``; every clip is written atomically.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import av
import cv2
import numpy as np
from tqdm import tqdm

from avatar_stream.engine.audio import AudioError, load_audio
from avatar_stream.engine.face import FaceAligner, FaceError
from avatar_stream.engine.timebase import FPS, SAMPLES_PER_FRAME
from avatar_stream.training.metrics import read_openface_csv
from avatar_stream.training.shards import ShardError, read_index, write_clip, write_json, write_split

# Paper split sizes (train speakers, test speakers).
PAPER_SPLITS = {"grid": (27, 6), "tcd-timit": (49, 10)}
MAX_SIDE = 640  # frames larger than this are downscaled before alignment (speed; the crop is 112 px)
MIN_FRAMES = 2


@dataclass(frozen=True)
class VideoItem:
    path: Path
    speaker: str
    utt: str
    audio: Path | None = None  # separate audio file; None: the video's own track


@dataclass
class PrepareReport:
    written: int = 0
    existing: int = 0
    skipped: list[dict] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
        parts = [f"wrote {self.written} clips", f"{self.existing} already there",
                 f"skipped {len(self.skipped)}"]
        if reasons:
            parts[-1] += " (" + ", ".join(f"{n} {r}" for r, n in reasons.most_common()) + ")"
        split = f"; split {len(self.split.get('train', []))} train / {len(self.split.get('test', []))} test speakers"
        return ", ".join(parts) + split


class SkipClip(Exception):
    """A clip that cannot be used (corrupt, faceless, too short); ``str`` is the reason."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip("._-") or "unnamed"


# ----------------------------------------------------------------------------- layouts


def find_grid(root) -> list[VideoItem]:
    """GRID videos under ROOT (see module docstring); speaker = first folder under ROOT."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the GRID root (with s1/, s2/, ... or .mpg files)")
    items = {}
    for p in sorted(root.rglob("*.mpg")):
        rel = p.relative_to(root)
        speaker = rel.parts[0] if len(rel.parts) > 1 else root.resolve().name
        key = (_safe(speaker), _safe(p.stem))
        if key in items:
            warnings.warn(f"{p} duplicates {items[key].path} (same speaker and name); keeping the first", stacklevel=2)
            continue
        items[key] = VideoItem(p, *key)
    if not items:
        raise FileNotFoundError(f"no .mpg files under {root}: expected ROOT/s1/*.mpg (GRID as distributed)")
    return list(items.values())


def find_tcd_timit(root) -> list[VideoItem]:
    """TCD-TIMIT straight-camera videos under ROOT (see module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the TCD-TIMIT root (with volunteers/)")
    items = {}
    for p in sorted(root.rglob("*.mp4")):
        rel = p.relative_to(root)
        if "straightcam" not in [s.lower() for s in rel.parts[:-1]]:
            continue
        parts = list(rel.parts)
        if parts[0].lower() in ("volunteers", "lipspeakers") and len(parts) > 2:
            speaker_dir = root / parts[0] / parts[1]
        else:
            speaker_dir = root / parts[0]
        wavs = [w for w in speaker_dir.rglob(f"{p.stem}.wav")]
        key = (_safe(speaker_dir.name), _safe(p.stem))
        if key not in items:
            items[key] = VideoItem(p, *key, audio=wavs[0] if wavs else None)
    if not items:
        raise FileNotFoundError(f"no straightcam/*.mp4 under {root}: expected ROOT/volunteers/<id>/.../straightcam/*.mp4")
    return list(items.values())


LAYOUTS = {"grid": find_grid, "tcd-timit": find_tcd_timit}


def openface_csv(openface_dir: Path | None, item: VideoItem) -> Path | None:
    if openface_dir is None:
        return None
    for cand in (openface_dir / item.speaker / f"{item.utt}.csv",
                 openface_dir / f"{item.speaker}_{item.utt}.csv",
                 openface_dir / f"{item.path.stem}.csv"):
        if cand.is_file():
            return cand
    return None


# ----------------------------------------------------------------------------- one clip


def read_video_25fps(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """RGB frames resampled to 25 fps, and for each the index of the source frame used
    (the one showing at the middle of the 25 fps frame's interval)."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise SkipClip("no video stream")
            stream = c.streams.video[0]
            frames, times = [], []
            for f in c.decode(stream):
                frames.append(f.to_ndarray(format="rgb24"))
                times.append(float(f.time) if f.time is not None else len(times) / float(stream.average_rate or FPS))
    except (av.error.FFmpegError, OSError) as e:
        raise SkipClip(f"corrupt video: {e}") from e
    if not frames:
        raise SkipClip("corrupt video: no frames decoded")
    times = np.asarray(times) - times[0]
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / FPS
    n_out = int(np.floor((times[-1] + step) * FPS + 1e-6))
    mid = (np.arange(n_out) + 0.5) / FPS
    src = np.clip(np.searchsorted(times, mid, side="right") - 1, 0, len(frames) - 1)
    return [frames[i] for i in src], src


def _downscale(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    s = MAX_SIDE / max(h, w)
    if s >= 1.0:
        return frame
    return cv2.resize(frame, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)


def process_clip(item: VideoItem, aligner: FaceAligner, openface_dir: Path | None = None) -> dict:
    """Arrays for ``write_clip`` (frames, audio, identity, au, au_label); raises ``SkipClip``."""
    frames, src = read_video_25fps(item.path)
    t = len(frames)
    if t < MIN_FRAMES:
        raise SkipClip(f"too short: {t} frame(s)")
    try:
        audio = load_audio(item.audio or item.path)
    except AudioError as e:
        raise SkipClip(f"bad audio: {e}") from e
    need = t * SAMPLES_PER_FRAME
    audio = np.pad(audio[:need], (0, max(0, need - len(audio)))).astype(np.float32)
    try:
        aligned = aligner.align_video([_downscale(f) for f in frames], name=str(item.path))
    except FaceError as e:
        raise SkipClip(f"no face: {e}") from e
    crops = np.stack([a.crop for a in aligned])
    au = au_label = None
    csv = openface_csv(openface_dir, item)
    if csv is not None:
        try:
            of = read_openface_csv(csv)
        except (ValueError, OSError) as e:
            raise SkipClip(f"bad OpenFace CSV {csv}: {e}") from e
        au_src, lab_src = of.for_frames(int(src.max()) + 1)
        au, au_label = au_src[src], lab_src[src]
    return {"frames": crops, "audio": audio, "identity": crops[0], "au": au, "au_label": au_label}


# ----------------------------------------------------------------------------- split


def _natural(s: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def speaker_split(speakers, corpus: str, seed: int = 0) -> dict[str, list[str]]:
    """Split speakers as the paper's proportions for ``corpus`` (at least one test speaker
    when there are two or more). Deterministic: a seeded shuffle of the naturally sorted list."""
    speakers = sorted(set(speakers), key=_natural)
    n_train, n_test = PAPER_SPLITS[corpus]
    n = len(speakers)
    k = round(n * n_test / (n_train + n_test))
    if n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = 0
    order = list(speakers)
    random.Random(seed).shuffle(order)
    test = sorted(order[:k], key=_natural)
    return {"train": [s for s in speakers if s not in test], "test": test}


def resolve_split(out: Path, speakers: list[str], corpus: str, split_file: Path | None) -> dict[str, list[str]]:
    if split_file is not None:
        data = json.loads(Path(split_file).read_text())
        listed = set(data.get("train", [])) | set(data.get("test", []))
        missing = sorted(set(speakers) - listed, key=_natural)
        if missing:
            raise ShardError(f"speakers {missing} are in neither list of {split_file}: add them to train or test")
        return {k: [s for s in data.get(k, []) if s in speakers] for k in ("train", "test")}
    old = out / "split.json"
    if old.exists():
        data = json.loads(old.read_text())
        if set(data.get("train", [])) | set(data.get("test", [])) == set(speakers):
            return {"train": data["train"], "test": data["test"]}
        warnings.warn(f"the speakers of {out} changed since split.json was written; recomputing the split", stacklevel=2)
    return speaker_split(speakers, corpus)


# ----------------------------------------------------------------------------- driver

_ALIGNER: FaceAligner | None = None


def _worker_init() -> None:
    global _ALIGNER
    _ALIGNER = FaceAligner()


def _work(item: VideoItem, out: Path, openface_dir: Path | None) -> tuple[VideoItem, str | None]:
    assert _ALIGNER is not None
    try:
        arrays = process_clip(item, _ALIGNER, openface_dir)
    except SkipClip as e:
        return item, str(e)
    write_clip(out, item.speaker, item.utt, **arrays)
    return item, None


def prepare(corpus: str, root, out, openface=None, split_file=None, workers: int = 1,
            retry_skipped: bool = False, progress: bool = True, speakers=None) -> PrepareReport:
    """Prepare every clip of ``corpus`` under ``root`` (only ``speakers`` if given) into shards
    at ``out`` (resumable)."""
    items = LAYOUTS[corpus](root)
    if speakers:
        found = {i.speaker for i in items}
        missing = sorted(set(speakers) - found, key=_natural)
        if missing:
            raise FileNotFoundError(f"speakers {missing} have no videos under {root} (found {sorted(found, key=_natural)})")
        items = [i for i in items if i.speaker in set(speakers)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    openface_dir = Path(openface) if openface else None
    if openface_dir is not None and not openface_dir.is_dir():
        raise FileNotFoundError(f"--openface {openface_dir} is not a folder of OpenFace CSVs")
    done = {e["path"] for e in read_index(out)} if (out / "index.json").exists() else set()
    skipped_path = out / "skipped.json"
    old_skips = json.loads(skipped_path.read_text())["clips"] if skipped_path.exists() else []
    report = PrepareReport()
    if not retry_skipped:
        report.skipped = [s for s in old_skips if any(s["video"] == str(i.path) for i in items)]
    skip_videos = {s["video"] for s in report.skipped}
    todo = []
    for it in items:
        if f"clips/{it.speaker}/{it.utt}.npz" in done:
            report.existing += 1
        elif str(it.path) not in skip_videos:
            todo.append(it)

    def record(item: VideoItem, reason: str | None) -> None:
        if reason is None:
            report.written += 1
        else:
            report.skipped.append({"video": str(item.path), "speaker": item.speaker, "utt": item.utt, "reason": reason})
            write_json(skipped_path, {"clips": report.skipped})

    bar = tqdm(total=len(todo), desc=f"prepare {corpus}", unit="clip", disable=not progress)
    if workers <= 1:
        _worker_init()
        for it in todo:
            record(*_work(it, out, openface_dir))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as ex:
            for res in ex.map(_work, todo, [out] * len(todo), [openface_dir] * len(todo)):
                record(*res)
                bar.update()
    bar.close()
    write_json(skipped_path, {"clips": report.skipped})
    speakers = sorted({e["speaker"] for e in read_index(out)}) if (out / "index.json").exists() else []
    if not speakers:
        raise ShardError(f"no clip of {root} could be prepared: see {skipped_path}")
    report.split = resolve_split(out, speakers, corpus, Path(split_file) if split_file else None)
    write_split(out, report.split["train"], report.split["test"])
    write_json(out / "prepare.json", {"corpus": corpus, "source": str(Path(root).resolve()),
                                      "openface": str(openface_dir) if openface_dir else None})
    return report
