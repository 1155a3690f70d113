"""Real talking-face video with its own audio: the manifest, the speaker split, and
``avatar-train prepare-real`` (per-frame landmarks, mouth measures, A/V offsets, shards).

A folder of such recordings (``CLIPS/*.mp4`` etc.) comes with a ``MANIFEST.tsv`` whose
``file`` column names each recording and whose ``speaker_note`` column carries a speaker key
``[spk=...]`` (two recordings of one person share it). Everything that learns from these
recordings or is measured on them is split by that key, never by recording.

The split (``speaker_split``) is a pure function of the manifest: speakers are grouped by
the repository their recordings came from (one source = one kind of footage: VoxCeleb crops,
BBC footage, MEAD actors, addresses, phone videos), and from each group a third of the
speakers (rounded, by a seeded draw) goes to ``dev``; sources with a single speaker are
pooled into one group first. Speakers with more than ``LONG_SECONDS`` of recordings stay in
``train``: they hold most of the minutes a mouth model can learn from.

``prepare-real`` writes, per recording, a shard in the training format (training/shards.py:
aligned 112x112 crops, 16 kHz audio on the video's timeline, the first frame's crop as the
identity, AUs unknown) plus the arrays ``landmarks`` (T, 68, 2) in source pixels (NaN where
no face), ``mouth`` (T, 4) (``landmarks.MEASURES``), ``matrix`` (T, 2, 3) (source -> crop) and
``photo`` (the first frame at full resolution: the photo the evaluation animates). The index
entry also holds the recording's A/V offset estimate (``av_offset``).
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.face import (
    ALIGN_POINTS,
    CANONICAL_LANDMARKS_112,
    similarity_transform,
    warp_to_crop,
)
from avatar_stream.errors import AvatarError
from avatar_stream.training.landmarks import LandmarkTracker, frames_25fps, mouth_measures, track

LONG_SECONDS = 30.0
DEV_FRACTION = 1.0 / 3.0
SPLIT_SEED = 18
MAX_LAG = 8  # frames searched either side for the A/V offset
_SPK = re.compile(r"\[spk=([^\]]+)\]")


class RealDataError(AvatarError, ValueError):
    """A manifest or folder of real recordings that cannot be used; one line."""


@dataclass(frozen=True)
class RealClip:
    file: str  # file name in the clips folder
    speaker: str  # the [spk=...] key
    source: str  # where it came from (the manifest's repo column): one kind of footage
    seconds: float
    fps: float
    width: int
    height: int

    @property
    def stem(self) -> str:
        return Path(self.file).stem


def read_manifest(path) -> list[RealClip]:
    """Recordings listed in ``MANIFEST.tsv`` (columns ``file``, ``repo``, ``duration_s``, ``fps``,
    ``width``, ``height``, ``speaker_note`` with ``[spk=...]``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "MANIFEST.tsv"
    if not path.is_file():
        raise RealDataError(f"{path}: no manifest; give the MANIFEST.tsv of the recordings (or its folder)")
    out = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            m = _SPK.search(row.get("speaker_note") or "")
            if not row.get("file") or m is None:
                raise RealDataError(f"{path}:{i}: needs a file name and a [spk=...] key in speaker_note")
            out.append(RealClip(file=row["file"], speaker=m.group(1), source=row.get("repo") or "unknown",
                                seconds=float(row.get("duration_s") or 0), fps=float(row.get("fps") or 0),
                                width=int(row.get("width") or 0), height=int(row.get("height") or 0)))
    if not out:
        raise RealDataError(f"{path}: lists no recordings")
    return out


def speaker_split(clips: list[RealClip], dev_fraction: float = DEV_FRACTION, seed: int = SPLIT_SEED,
                  long_seconds: float = LONG_SECONDS) -> dict[str, list[str]]:
    """``{"train": [speaker...], "dev": [speaker...]}`` (see the module doc)."""
    seconds: dict[str, float] = {}
    source: dict[str, str] = {}
    for c in clips:
        seconds[c.speaker] = seconds.get(c.speaker, 0.0) + c.seconds
        source.setdefault(c.speaker, c.source)  # a speaker in two sources counts in the first
    groups: dict[str, list[str]] = {}
    for spk, src in source.items():
        groups.setdefault(src, []).append(spk)
    singles = sorted(s for g in groups.values() if len(g) == 1 for s in g)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if singles:
        groups["(single-speaker sources)"] = singles
    rng = random.Random(seed)
    dev = []
    for name in sorted(groups):
        pool = sorted(s for s in groups[name] if seconds[s] <= long_seconds)
        n = min(len(pool), int(round(len(groups[name]) * dev_fraction)))
        dev += rng.sample(pool, n)
    dev_set = set(dev)
    return {"train": sorted(s for s in source if s not in dev_set), "dev": sorted(dev_set)}


def frame_loudness(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """Loudness envelope: RMS level in dB of each video frame's own 40 ms of audio, floored
    60 dB below the clip's loudest frame (the audio-only baseline of the real-media figures)."""
    x = np.zeros(n_frames * tb.SAMPLES_PER_FRAME, np.float64)
    a = np.asarray(audio, np.float64)[: len(x)]
    x[: len(a)] = a
    ms = (x.reshape(n_frames, tb.SAMPLES_PER_FRAME) ** 2).mean(1)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(ms)
    top = np.max(db[np.isfinite(db)], initial=-200.0)
    return np.maximum(np.nan_to_num(db, nan=-200.0, neginf=-200.0), top - 60.0)


def lagged_r(a: np.ndarray, b: np.ndarray, lag: int) -> float:
    """Pearson r of ``a[k]`` with ``b[k + lag]`` over the frames finite in both."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if lag >= 0:
        a, b = a[: len(a) - lag], b[lag:]
    else:
        a, b = a[-lag:], b[: len(b) + lag]
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 10 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def av_offset(opening: np.ndarray, loudness: np.ndarray, max_lag: int = MAX_LAG) -> tuple[int, list[float]]:
    """Lag (frames) at which the loudness envelope best matches the mouth opening:
    ``opening[k]`` goes with ``loudness[k + lag]``; positive = the sound comes late. Returns
    (lag, r at each lag -max_lag..max_lag). Speech itself puts the peak at 0 to +1 (the mouth
    opens a little before the sound it makes): a recording whose peak sits well away from
    that is out of sync."""
    rs = [lagged_r(opening, loudness, lag) for lag in range(-max_lag, max_lag + 1)]
    finite = [r if np.isfinite(r) else -np.inf for r in rs]
    return int(np.argmax(finite)) - max_lag, rs


def _windows(x: np.ndarray, radius: int) -> np.ndarray:
    """(T, ...) -> (T, 2 radius + 1, ...): frames k-radius..k+radius, edge-replicated (as the
    engine's feature windows)."""
    t = len(x)
    return x[np.clip(np.arange(t)[:, None] + np.arange(-radius, radius + 1)[None], 0, t - 1)]


def estimate_offsets(feats: dict[str, np.ndarray], opening: dict[str, np.ndarray], speakers: dict[str, str],
                     radius: int = 7, folds: int = 6, ridge: float = 100.0, max_lag: int = MAX_LAG,
                     min_shift: int = 2, min_gain: float = 0.1, seed: int = SPLIT_SEED,
                     draws: int = 3) -> dict[str, dict]:
    """A/V offset of each recording, from a reference predictor of the mouth opening.

    The loudness envelope follows the opening too loosely on continuous speech (r about 0.1 on
    these recordings) to place a peak; a predictor does better. Here it is a ridge map from
    the audio features of frames k-radius..k+radius (an exported model's audio graph) to the
    opening at k, fitted on the other speakers (``folds`` folds by speaker), so no recording
    is judged by a map that saw it. Each recording's lag curve ``r(opening[k], pred[k + lag])``
    peaks at ``best_lag``; most peak at the same lag ``L0`` (the predictor's own timing),
    and a recording is called out of sync, ``offset = best_lag - L0``, only where the peak
    is ``min_shift`` frames or more from L0, higher than r at L0 by ``min_gain`` and inside the
    search (a curve still rising at +-``max_lag`` has no peak to trust: ``unclear``, offset 0).
    Shifting the real tracks by ``offset`` (``shift(track, offset)``) puts the face back on
    the audio's timeline."""
    names = sorted(feats)
    groups = sorted({speakers[n] for n in names})
    x = {n: _windows(np.asarray(feats[n], np.float64), radius).reshape(len(feats[n]), -1) for n in names}
    y = {n: np.asarray(opening[n], np.float64) for n in names}
    pred = {n: np.zeros(len(y[n])) for n in names}
    for draw in range(draws):  # several fold draws, predictions averaged: a steadier curve
        order = random.Random(seed + draw).sample(groups, len(groups))
        fold_of = {s: i % folds for i, s in enumerate(order)}
        for f in range(folds):
            train = [n for n in names if fold_of[speakers[n]] != f]
            test = [n for n in names if fold_of[speakers[n]] == f]
            if not test or not train:
                continue
            a, b = np.concatenate([x[n] for n in train]), np.concatenate([y[n] for n in train])
            ok = np.isfinite(b)
            mu, sd = a[ok].mean(0), a[ok].std(0) + 1e-6
            az = (a[ok] - mu) / sd
            w = np.linalg.solve(az.T @ az + ridge * np.eye(az.shape[1]), az.T @ (b[ok] - b[ok].mean()))
            for n in test:
                pred[n] += ((x[n] - mu) / sd) @ w
    out = {}
    for n in names:
        curve = [lagged_r(y[n], pred[n], lag) for lag in range(-max_lag, max_lag + 1)]
        best = int(np.nanargmax(np.where(np.isfinite(curve), curve, -np.inf))) - max_lag
        out[n] = {"best_lag": best, "curve": [round(float(c), 4) for c in curve]}
    l0 = int(np.median([o["best_lag"] for o in out.values()]))
    for o in out.values():
        c = o["curve"]
        gain = c[o["best_lag"] + max_lag] - c[l0 + max_lag]
        o["reference_lag"] = l0
        inside = abs(o["best_lag"]) <= max_lag - 2  # a peak at the end of the search is no peak
        clear = abs(o["best_lag"] - l0) >= min_shift and gain >= min_gain
        o["offset"] = o["best_lag"] - l0 if clear and inside else 0
        o["unclear"] = bool(clear and not inside)
    return out


def smooth_points(lm: np.ndarray, radius: int = 2) -> np.ndarray:
    """Centred moving average of (T, K, 2) points over +-radius frames, NaN-aware (frames
    with no face are left out of the average and stay NaN themselves)."""
    t = len(lm)
    ok = np.isfinite(lm[:, 0, 0])
    filled = np.where(ok[:, None, None], lm, 0.0)
    cs = np.concatenate([np.zeros((1,) + lm.shape[1:]), np.cumsum(filled, 0)])
    cn = np.concatenate([[0], np.cumsum(ok)])
    lo = np.clip(np.arange(t) - radius, 0, t)
    hi = np.clip(np.arange(t) + radius + 1, 0, t)
    n = (cn[hi] - cn[lo]).astype(np.float64)
    out = (cs[hi] - cs[lo]) / np.maximum(n, 1)[:, None, None]
    out[~ok] = np.nan
    return out


def crop_matrices(landmarks: np.ndarray) -> np.ndarray:
    """(T, 2, 3) source -> canonical-crop similarities from the eyes and nose
    (``ALIGN_POINTS``), smoothed over +-2 frames so that the crop does not shake with the
    landmarks' jitter. Frames with no face take the nearest frame's matrix."""
    idx = list(ALIGN_POINTS)
    pts = smooth_points(np.asarray(landmarks, np.float64)[:, idx])
    ok = np.flatnonzero(np.isfinite(pts[:, 0, 0]))
    if not len(ok):
        raise RealDataError("no face found in any frame")
    out = np.empty((len(pts), 2, 3))
    for i in range(len(pts)):
        j = i if np.isfinite(pts[i, 0, 0]) else ok[np.argmin(np.abs(ok - i))]
        out[i] = similarity_transform(pts[j], CANONICAL_LANDMARKS_112[idx])
    return out


def read_audio_on_timeline(path: Path, n_frames: int) -> np.ndarray:
    """The recording's audio at 16 kHz, trimmed or zero-padded to ``n_frames * 640`` samples."""
    audio = load_audio(path)
    n = n_frames * tb.SAMPLES_PER_FRAME
    return np.pad(audio[:n], (0, max(0, n - len(audio)))).astype(np.float32)


def process_recording(path: Path, tracker: LandmarkTracker | None = None) -> dict:
    """Everything ``prepare-real`` stores for one recording (see the module doc)."""
    tracker = tracker or LandmarkTracker()
    tracker.reset()
    lms, crops, photo = [], [], None
    frames = []
    for f in frames_25fps(path):
        if photo is None:
            photo = f
        lm = tracker.update(f)
        lms.append(np.full((68, 2), np.nan) if lm is None else lm)
        frames.append(f if max(f.shape[:2]) <= 640 else None)  # small ones kept for the crops
    if photo is None:
        raise RealDataError(f"{path}: no video frames")
    landmarks = np.asarray(lms, np.float64)
    mats = crop_matrices(landmarks)
    if any(f is None for f in frames):  # large video: decode again rather than hold it all
        frames = frames_25fps(path)
    for f, m in zip(frames, mats, strict=False):
        crops.append(warp_to_crop(f, m))
    n = len(landmarks)
    audio = read_audio_on_timeline(path, n)
    mouth = mouth_measures(landmarks)
    _, rs = av_offset(mouth[:, 0], frame_loudness(audio, n))
    return {"frames": np.asarray(crops, np.uint8), "audio": audio, "identity": crops[0],
            "landmarks": landmarks.astype(np.float32), "mouth": mouth.astype(np.float32),
            "matrix": mats.astype(np.float32), "photo": photo, "av_offset_r": rs,
            "face_found": float(np.isfinite(landmarks[:, 0, 0]).mean())}


def _job(args):
    path, root, speaker, utt = args
    from avatar_stream.training.shards import write_clip

    res = process_recording(path)
    extra = {k: res[k] for k in ("landmarks", "mouth", "matrix", "photo")}
    entry = write_clip(root, speaker, utt, res["frames"], res["audio"], res["identity"], extra=extra)
    return utt, {**entry, "loudness_lag_r": [round(r, 4) for r in res["av_offset_r"]],
                 "face_found": round(res["face_found"], 4)}


def recording_features(root: Path, entry: dict, engine) -> np.ndarray:
    """(T, D) per-frame audio features of one prepared recording through ``engine``'s frame
    graph and noise gate: what the engine computes for these frames when it serves them."""
    with np.load(Path(root) / entry["path"], allow_pickle=False) as z:
        audio, n = z["audio"], len(z["mouth"])
    feat, _ = engine.frame_features(tb.frame_windows(audio, n))
    return feat


def sync_recordings(root: Path, meta: dict, model=None, progress: bool = True) -> dict:
    """``estimate_offsets`` for every recording of ``meta``, with the features of ``model``
    (an exported model directory; None: the shipped starter)."""
    from avatar_stream.engine.stream import Engine

    engine = Engine(model, backend="cpu")
    feats, opening, speakers = {}, {}, {}
    for name, e in meta["recordings"].items():
        feats[name] = recording_features(root, e, engine)
        with np.load(Path(root) / e["path"], allow_pickle=False) as z:
            opening[name] = z["mouth"][:, 0]
        speakers[name] = e["speaker"]
    res = estimate_offsets(feats, opening, speakers)
    if progress:
        moved = {n: o["offset"] for n, o in res.items() if o["offset"]}
        print(f"[prepare-real] A/V offsets (frames) of {len(moved)} of {len(res)} recordings: {moved}")
    return {"model": str(model) if model else "starter", "recordings": res}


def prepare_real(clips_dir, out, manifest=None, workers: int = 2, only: list[str] | None = None,
                 progress: bool = True, model=None) -> dict:
    """Shards of every recording listed in the manifest (see the module doc); resumable:
    recordings already in ``OUT/real.json`` are skipped. ``model``: the exported model whose
    audio features estimate the A/V offsets (None: the shipped starter; False: skip).
    Returns the ``real.json`` contents."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm import tqdm

    from avatar_stream.training.shards import write_json, write_split

    clips_dir, out = Path(clips_dir), Path(out)
    if not clips_dir.is_dir():
        raise RealDataError(f"--clips {clips_dir}: no such folder")
    if manifest is None:
        manifest = clips_dir / "MANIFEST.tsv"
        if not manifest.exists():
            manifest = clips_dir.parent / "MANIFEST.tsv"
    clips = read_manifest(manifest)
    missing = [c.file for c in clips if not (clips_dir / c.file).is_file()]
    if missing:
        raise RealDataError(f"{len(missing)} recording(s) of the manifest are not in {clips_dir}: {missing[:3]}")
    split = speaker_split(clips)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "real.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"recordings": {}}
    todo = [c for c in clips if c.stem not in meta["recordings"] and (not only or c.stem in only)]
    jobs = [(clips_dir / c.file, out, c.speaker, c.stem) for c in todo]
    info = {c.stem: c for c in clips}
    if jobs:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max(1, workers), mp_context=ctx) as pool:
            for utt, entry in tqdm(pool.map(_job, jobs), total=len(jobs), desc="prepare-real", disable=not progress):
                c = info[utt]
                meta["recordings"][utt] = {**entry, "file": c.file, "source": c.source, "seconds": c.seconds,
                                           "fps": c.fps, "width": c.width, "height": c.height}
                write_json(meta_path, meta)
    meta["split"] = split
    meta["clips_dir"] = str(clips_dir.resolve())
    if model is not False and (jobs or "sync" not in meta):
        meta["sync"] = sync_recordings(out, meta, model, progress=progress)
        for name, o in meta["sync"]["recordings"].items():
            meta["recordings"][name]["av_offset"] = o["offset"]
    write_json(meta_path, meta)
    write_split(out, split["train"], split["dev"])
    return meta


__all__ = ["RealClip", "RealDataError", "av_offset", "crop_matrices", "estimate_offsets", "frame_loudness",
           "lagged_r", "prepare_real", "process_recording", "read_manifest", "recording_features", "speaker_split",
           "sync_recordings", "track"]


INTERIOR_RATIOS = (0.04, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.35, 0.42, 0.5)


def build_interior(data, recording: str, out, ratios=INTERIOR_RATIOS, size: tuple[int, int] = (80, 160),
                   candidates: int = 6):
    """``avatar-train mouth-interior``: the warp renderer's bank of real mouth interiors
    (engine/interior.py) from one prepared recording: for each opening ratio, of the
    ``candidates`` frames closest to it (and within 0.03 of it) the sharpest (variance of
    the Laplacian of its texture), cut at ``size`` = (height, width)."""
    import cv2

    from avatar_stream.engine.interior import MouthInterior, cut_interior, opening_ratio, skin_colour
    from avatar_stream.training.landmarks import frames_25fps

    data = Path(data)
    meta = json.loads((data / "real.json").read_text())
    if recording not in meta["recordings"]:
        raise RealDataError(f"{recording} is not a recording of {data}")
    e = meta["recordings"][recording]
    with np.load(data / e["path"], allow_pickle=False) as z:
        lm = z["landmarks"].astype(np.float64)
    ratio = np.array([opening_ratio(x) if np.isfinite(x).all() else np.nan for x in lm])
    want: dict[float, list[int]] = {}
    for r in ratios:
        dist = np.abs(ratio - r)
        near = [int(i) for i in np.argsort(np.nan_to_num(dist, nan=9.0))[:candidates] if dist[i] <= 0.03]
        if near:
            want[r] = near
    needed = {i for v in want.values() for i in v} | {0}
    frames = {k: f for k, f in enumerate(frames_25fps(Path(meta["clips_dir"]) / e["file"])) if k in needed}
    textures, got = [], []
    for near in want.values():
        cut = [(cut_interior(frames[i], lm[i], *size), i) for i in near]
        sharp = [cv2.Laplacian(cv2.cvtColor(t, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for t, _ in cut]
        t, i = cut[int(np.argmax(sharp))]
        textures.append(t)
        got.append(float(ratio[i]))
    if not textures:
        raise RealDataError(f"{recording}: no frame near any of the ratios {list(ratios)}")
    bank = MouthInterior(np.stack(textures), np.array(got), skin_colour(frames[0], lm[0]),
                         source=f"{e['file']} ({e['speaker']})")
    bank.save(out)
    return bank
