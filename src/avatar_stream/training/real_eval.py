"""``avatar-train eval-real``: how the rendered mouth compares with real people talking.

For every recording of a split of real talking-face video (``avatar-train prepare-real``;
by default the ``dev`` speakers), the recording's first frame is the photo and the
recording's own audio drives it through what users run (the engine's ``Stream`` loop on
exported graphs, full frames at the photo's resolution). dlib landmarks are tracked on the
generated frames exactly as on the real ones (training/landmarks.py), and per recording:

- ``r_open``: Pearson r of generated vs real mouth opening (inner-lip gap / IOD);
- ``amp``: amplitude ratio, std of the generated opening / std of the real one (pooled:
  the median over recordings, ``median_amp``);
- ``r_width``: Pearson r of generated vs real mouth width (corners / IOD);
- ``sharp``: sharpness ratio, variance of the Laplacian in the mouth box of the generated
  frames (the mouth's landmarks + a third of the mouth width around them, at the photo's
  resolution) / the same box of the photo, mean over frames;
- ``r_loud``: the audio-only baseline, Pearson r of the loudness envelope
  (``avreal.frame_loudness``) with the real opening.

Real tracks are moved by the recording's A/V offset where ``prepare-real`` found it clearly
out of sync (``--sync auto``, the default; avreal.estimate_offsets says how), for every method
alike, the baseline included; ``--sync none`` compares the recordings as they are.

Pooled figures: the real and generated tracks are standardised per recording and pooled,
so the pooled r is the frame-weighted mean of the per-recording r; the amplitude ratio pooled
as the median over recordings (and, as ``amp_pooled``, the square root of the frame-weighted
variance ratio). Standard errors: a bootstrap over
speakers (recordings of one speaker move together), ``B`` = 2000, seed 0; the difference
renderer - baseline is paired (the same draws).

Grayscale: each photo made gray (R = G = B) is rendered for ``gray_seconds`` of its audio;
``max_chroma`` = the largest max(R, G, B) - min(R, G, B) of any output pixel (0 for a
renderer that keeps a gray photo gray).

No torch here (engine + dlib only), so any exported model directory can be scored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.gate import DEFAULT_THRESHOLD_DBFS
from avatar_stream.errors import AvatarError
from avatar_stream.training.avreal import frame_loudness, lagged_r
from avatar_stream.training.landmarks import LandmarkTracker, iod, mouth_measures

RENDERERS = ("neural", "warp")
BOOTSTRAP = 2000


class RealEvalError(AvatarError, ValueError):
    """Bad input to eval-real; one line."""


@dataclass(frozen=True)
class RealEvalOptions:
    data: Path  # avatar-train prepare-real output
    split: str = "dev"
    model: Path | None = None  # exported model dir (None: the shipped starter)
    renderers: tuple[str, ...] = RENDERERS
    backend: str = "cpu"
    noise_gate_dbfs: float | None = DEFAULT_THRESHOLD_DBFS
    alive: bool = True  # blinks and head motion as avatar-stream renders them by default
    sync: str = "auto"  # "auto" | "none"
    max_seconds: float | None = None  # score at most this much of each recording
    gray_seconds: float = 2.0
    recordings: tuple[str, ...] = ()  # only these (stems); empty: the whole split
    sheet: Path | None = None  # contact sheet PNG (real vs generated)
    sheet_recordings: tuple[str, ...] = ()  # names; empty: the first four of the split
    sheet_frames: int = 10
    mouth_sheet: Path | None = None  # mouth crops at full size (real vs each renderer)
    extra_engine_kw: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def load_split(data: Path, split: str = "dev", recordings=()) -> list[dict]:
    """``real.json`` entries of ``split`` (``dev`` | ``train`` | ``all``), sorted by name."""
    data = Path(data)
    meta_path = data / "real.json"
    if not meta_path.is_file():
        raise RealEvalError(f"{data} has no real.json: run `avatar-train prepare-real --clips DIR --out {data}` first")
    meta = json.loads(meta_path.read_text())
    if split not in ("dev", "train", "all"):
        raise RealEvalError(f"unknown split {split!r}: use dev, train or all")
    speakers = None if split == "all" else set(meta["split"][split])
    out = []
    clips_dir = Path(meta.get("clips_dir", ""))
    for stem, e in sorted(meta["recordings"].items()):
        if (speakers is None or e["speaker"] in speakers) and (not recordings or stem in recordings):
            video = clips_dir / e.get("file", "")
            out.append({"name": stem, **e, "video": video if video.is_file() else None})
    if recordings and len(out) != len(set(recordings)):
        known = set(meta["recordings"])
        raise RealEvalError(f"recordings not in {data} ({split}): {sorted(set(recordings) - known) or sorted(recordings)}")
    if not out:
        raise RealEvalError(f"no recordings in the {split} split of {data}")
    return out


def load_recording(data: Path, entry: dict, max_seconds: float | None = None) -> dict:
    """photo, audio (trimmed to whole frames), real landmarks and measures of one recording."""
    with np.load(Path(data) / entry["path"], allow_pickle=False) as z:
        rec = {k: z[k] for k in ("photo", "audio", "landmarks", "mouth")}
    n = len(rec["mouth"])
    if max_seconds is not None:
        n = min(n, int(max_seconds * tb.FPS))
    rec["audio"] = rec["audio"][: n * tb.SAMPLES_PER_FRAME]
    rec["landmarks"], rec["mouth"] = rec["landmarks"][:n], rec["mouth"][:n]
    return rec


def sync_lag(entry: dict, mode: str) -> int:
    """Frames by which the real tracks are shifted against the audio (0 = as recorded):
    ``prepare-real``'s A/V offset estimate (avreal.estimate_offsets) with ``auto``."""
    if mode == "none":
        return 0
    if mode != "auto":
        raise RealEvalError(f"--sync {mode!r}: use auto or none")
    return int(entry.get("av_offset", 0))


def shift(track: np.ndarray, lag: int) -> np.ndarray:
    """``out[k] = track[k - lag]`` (NaN where that falls outside): the real face moved onto
    the audio's timeline when the sound comes ``lag`` frames late."""
    out = np.full_like(np.asarray(track, np.float64), np.nan)
    n = len(track)
    if lag >= 0:
        out[lag:] = track[: n - lag] if lag else track
    else:
        out[: n + lag] = track[-lag:]
    return out


# --------------------------------------------------------------------------- measures


def mouth_box(landmarks: np.ndarray, shape) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the mouth (points 48-67) plus a third of the mouth width around."""
    m = np.asarray(landmarks, np.float64)[48:68]
    pad = (m[:, 0].max() - m[:, 0].min()) / 3.0
    x0, y0 = np.floor(m.min(0) - pad).astype(int)
    x1, y1 = np.ceil(m.max(0) + pad).astype(int)
    h, w = shape[:2]
    return max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)


def sharpness(image: np.ndarray, box) -> float:
    """Variance of the Laplacian of the luminance inside ``box``."""
    x0, y0, x1, y1 = box
    if x1 - x0 < 3 or y1 - y0 < 3:
        return float("nan")
    g = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(g.astype(np.float64), cv2.CV_64F).var())


def max_chroma(image: np.ndarray) -> int:
    """Largest max(R, G, B) - min(R, G, B) of any pixel."""
    img = image.astype(np.int16)
    return int((img.max(2) - img.min(2)).max())


def pearson(a, b) -> float:
    return lagged_r(a, b, 0)


def _z(x: np.ndarray, ok: np.ndarray) -> np.ndarray:
    v = x[ok]
    sd = v.std()
    return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)


def pooled_r(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Pearson r of tracks standardised per recording and pooled (frame-weighted mean r)."""
    num, n = 0.0, 0
    for a, b in pairs:
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 10:
            continue
        num += float((_z(a, ok) * _z(b, ok)).sum())
        n += int(ok.sum())
    return num / n if n else float("nan")


def pooled_amp(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """sqrt(frame-weighted variance of generated / of real); pairs are (real, generated)."""
    vg = vr = 0.0
    for real, gen in pairs:
        ok = np.isfinite(real) & np.isfinite(gen)
        if ok.sum() < 10:
            continue
        vr += ok.sum() * real[ok].var()
        vg += ok.sum() * gen[ok].var()
    return float(np.sqrt(vg / vr)) if vr > 0 else float("nan")


def median_amp(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Median over recordings of each one's amplitude ratio (``pooled_amp`` of the one pair):
    how much the typical generated mouth moves against its real one. (The frame-pooled
    ratio is reported too; one recording whose audio drives the mouth far out, music under
    the speech say, would dominate it.)"""
    return float(np.nanmedian([pooled_amp([p]) for p in pairs])) if pairs else float("nan")


def bootstrap(speakers: list[str], stat, b: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """``stat(indices)`` over ``b`` draws of speakers with replacement; ``indices`` are the
    recordings of the drawn speakers (a speaker drawn twice counts twice)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(speakers))
    by = {s: [i for i, x in enumerate(speakers) if x == s] for s in names}
    out = []
    for _ in range(b):
        pick = rng.integers(0, len(names), len(names))
        out.append(stat([i for p in pick for i in by[names[p]]]))
    return np.asarray(out, np.float64)


# --------------------------------------------------------------------------- rendering


def _frames(engine, photo: np.ndarray, audio: np.ndarray):
    """Generated full frames of ``photo`` driven by ``audio``, one at a time."""
    stream = engine.create_stream(photo, crop_only=False)
    stream.accept_waveform(audio)
    stream.input_finished()
    while stream.is_ready():
        yield stream.step().image


def score_recording(engine, tracker: LandmarkTracker, rec: dict, lag: int, keep: set[int] = frozenset()) -> dict:
    """Generated tracks and per-recording figures of one renderer; ``keep``: frame indices
    whose generated images are returned too (contact sheets)."""
    photo = rec["photo"]
    photo_box = mouth_box(rec["landmarks"][0], photo.shape) if np.isfinite(rec["landmarks"][0]).all() else None
    tracker.reset()
    gen_lm, sharp, kept = [], [], {}
    for k, img in enumerate(_frames(engine, photo, rec["audio"])):
        lm = tracker.update(img)
        gen_lm.append(np.full((68, 2), np.nan) if lm is None else lm)
        box = mouth_box(lm, img.shape) if lm is not None else photo_box
        if box is not None:
            sharp.append(sharpness(img, box))
        if k in keep:
            kept[k] = img
    gen = mouth_measures(np.asarray(gen_lm))
    real = np.stack([shift(rec["mouth"][:, i], lag) for i in range(rec["mouth"].shape[1])], 1)
    photo_sharp = sharpness(photo, photo_box) if photo_box is not None else float("nan")
    real_open, gen_open = real[:, 0], gen[: len(real), 0]
    ok = np.isfinite(real_open) & np.isfinite(gen_open)
    sd_real = float(np.std(real_open[ok])) if ok.any() else float("nan")
    return {"gen": gen, "real": real, "images": kept,
            "fig": {"r_open": pearson(real_open, gen_open), "r_width": pearson(real[:, 1], gen[: len(real), 1]),
                    "amp": float(np.std(gen_open[ok]) / sd_real) if ok.sum() > 1 and sd_real > 0 else float("nan"),
                    "sharp": float(np.nanmean(sharp) / photo_sharp) if sharp and photo_sharp > 0 else float("nan"),
                    "frames": int(ok.sum()), "gen_face_found": float(np.isfinite(gen[:, 0]).mean())}}


def gray_check(engine, rec: dict, seconds: float) -> int:
    """Max chroma of the output for the photo made gray, ``seconds`` of its audio."""
    gray = cv2.cvtColor(cv2.cvtColor(rec["photo"], cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    audio = rec["audio"][: int(seconds * tb.SAMPLE_RATE)]
    return max((max_chroma(img) for img in _frames(engine, gray, audio)), default=0)


def make_engine(opts: RealEvalOptions, renderer: str, aligner):
    from avatar_stream.engine.stream import Engine

    kw = dict(backend=opts.backend, renderer=renderer, face_aligner=aligner,
              noise_gate_dbfs=opts.noise_gate_dbfs, **opts.extra_engine_kw)
    if not opts.alive:
        kw["alive"] = False
    return Engine(opts.model, **kw)


# --------------------------------------------------------------------------- evaluation


def evaluate_real(opts: RealEvalOptions, progress=print) -> dict:
    """Per-recording and pooled figures per renderer (see the module doc); JSON-ready."""
    t0 = time.perf_counter()
    entries = load_split(opts.data, opts.split, opts.recordings)
    tracker = LandmarkTracker()
    recs, lags = [], []
    for e in entries:
        recs.append(load_recording(opts.data, e, opts.max_seconds))
        lags.append(sync_lag(e, opts.sync))
    speakers = [e["speaker"] for e in entries]
    loud = [frame_loudness(r["audio"], len(r["mouth"])) for r in recs]
    real_open = [shift(r["mouth"][:, 0], lag) for r, lag in zip(recs, lags, strict=True)]
    base_pairs = [(o, ld) for o, ld in zip(real_open, loud, strict=True)]
    res: dict = {"data": str(opts.data), "split": opts.split, "model": str(opts.model) if opts.model else "starter",
                 "sync": opts.sync, "alive": opts.alive, "noise_gate_dbfs": opts.noise_gate_dbfs,
                 "max_seconds": opts.max_seconds,
                 "recordings": {e["name"]: {"speaker": e["speaker"], "lag": lag, "av_offset": e.get("av_offset"),
                                            "frames": len(r["mouth"]), "r_loud": pearson(o, ld)}
                                for e, r, lag, (o, ld) in zip(entries, recs, lags, base_pairs, strict=True)},
                 "speakers": sorted(set(speakers))}
    base = bootstrap(speakers, lambda idx: pooled_r([base_pairs[i] for i in idx]))
    res["loudness"] = {"pooled_r": pooled_r(base_pairs), "se": float(base.std())}
    sheet_names = (list(opts.sheet_recordings) or [e["name"] for e in entries][:4]) if (opts.sheet or opts.mouth_sheet) else []
    keep = {name: set(np.linspace(0, len(r["mouth"]) - 1, opts.sheet_frames).round().astype(int).tolist())
            for name, r in zip([e["name"] for e in entries], recs, strict=True) if name in sheet_names}
    images: dict[str, dict] = {}
    res["renderers"] = {}
    for renderer in opts.renderers:
        engine = make_engine(opts, renderer, tracker.aligner)
        per, pairs, wpairs = {}, [], []
        for e, r, lag in zip(entries, recs, lags, strict=True):
            s = score_recording(engine, tracker, r, lag, keep.get(e["name"], set()))
            s["fig"]["max_chroma_gray"] = gray_check(engine, r, opts.gray_seconds) if opts.gray_seconds > 0 else None
            per[e["name"]] = s["fig"]
            pairs.append((s["real"][:, 0], s["gen"][: len(s["real"]), 0]))
            wpairs.append((s["real"][:, 1], s["gen"][: len(s["real"]), 1]))
            if s["images"]:
                images.setdefault(e["name"], {})[renderer] = s["images"]
            if progress:
                f = s["fig"]
                progress(f"[eval-real] {renderer} {e['name']}: r {f['r_open']:.3f} (loudness "
                         f"{res['recordings'][e['name']]['r_loud']:.3f}) amp {f['amp']:.2f} sharp {f['sharp']:.2f}")
        boot = bootstrap(speakers, lambda idx, p=pairs: pooled_r([p[i] for i in idx]))
        diff = boot - base
        amp_boot = bootstrap(speakers, lambda idx, p=pairs: median_amp([p[i] for i in idx]))
        sharp = [per[e["name"]]["sharp"] for e in entries]
        chroma = [per[e["name"]]["max_chroma_gray"] for e in entries if per[e["name"]]["max_chroma_gray"] is not None]
        res["renderers"][renderer] = {
            "recordings": per,
            "pooled_r": pooled_r(pairs), "se": float(boot.std()),
            "minus_loudness": pooled_r(pairs) - res["loudness"]["pooled_r"], "minus_loudness_se": float(diff.std()),
            "amp": median_amp(pairs), "amp_se": float(amp_boot.std()), "amp_pooled": pooled_amp(pairs),
            "r_width": pooled_r(wpairs),
            "sharp_median": float(np.nanmedian(sharp)), "sharp_min": float(np.nanmin(sharp)),
            "max_chroma_gray": max(chroma) if chroma else None}
        if progress:
            progress(f"[eval-real] {renderer}: pooled r {res['renderers'][renderer]['pooled_r']:.3f} "
                     f"(SE {res['renderers'][renderer]['se']:.3f}); loudness {res['loudness']['pooled_r']:.3f}")
    if opts.sheet and images:
        write_contact_sheet(opts.sheet, entries, recs, lags, images, opts.renderers)
        res["sheet"] = str(opts.sheet)
    if opts.mouth_sheet and images:
        write_mouth_sheet(opts.mouth_sheet, entries, recs, lags, images, opts.renderers)
        res["mouth_sheet"] = str(opts.mouth_sheet)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# --------------------------------------------------------------------------- sheets


def _face_box(landmarks: np.ndarray, shape, scale: float = 1.5) -> tuple[int, int, int, int]:
    lm = np.asarray(landmarks, np.float64)
    c = (lm[36:48].mean(0) + lm[48:68].mean(0)) / 2
    half = scale * float(iod(lm)) * 1.1
    x0, y0 = int(round(c[0] - half)), int(round(c[1] - half))
    return x0, y0, x0 + int(round(2 * half)), y0 + int(round(2 * half))


def _cut(img: np.ndarray, box, size: int | None) -> np.ndarray:
    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
    out = img[y0:y1, x0:x1]
    return out if size is None else cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.putText(out, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _real_index(k: int, lag: int, n: int) -> int:
    """The real frame shown beside generated frame ``k``: ``k - lag`` (real_eval.shift), kept
    inside the recording."""
    return int(min(max(k - lag, 0), n - 1))


def _real_frames(data_entry: dict, indices: list[int]) -> dict[int, np.ndarray]:
    """Real frames ``indices`` (25 fps) of a recording, decoded from its video file."""
    from avatar_stream.training.landmarks import frames_25fps

    want, out = set(indices), {}
    for k, f in enumerate(frames_25fps(data_entry["video"])):
        if k in want:
            out[k] = f
        if len(out) == len(want):
            break
    return out


def write_contact_sheet(path: Path, entries, recs, lags, images, renderers, cell: int = 128) -> None:
    """Rows: per recording, the real frames then each renderer's; 10 frames across."""
    rows = []
    for e, r, lag in zip(entries, recs, lags, strict=True):
        if e["name"] not in images:
            continue
        idx = sorted(next(iter(images[e["name"]].values())))
        box = _face_box(r["landmarks"][0], r["photo"].shape)
        n = len(r["mouth"])
        real = _real_frames(e, [_real_index(k, lag, n) for k in idx]) if e.get("video") else {}
        line = [_label(_cut(real[_real_index(k, lag, n)], box, cell), f"real {k}") if real
                else np.zeros((cell, cell, 3), np.uint8) for k in idx]
        rows.append(np.hstack(line))
        for renderer in renderers:
            gen = images[e["name"]].get(renderer, {})
            rows.append(np.hstack([_label(_cut(gen[k], box, cell), f"{renderer} {k}") for k in idx]))
        rows.append(np.full((6, rows[-1].shape[1], 3), 255, np.uint8))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))


def write_mouth_sheet(path: Path, entries, recs, lags, images, renderers) -> None:
    """Mouth crops at the photo's own resolution (no scaling): real, then each renderer."""
    blocks = []
    for e, r, lag in zip(entries, recs, lags, strict=True):
        if e["name"] not in images:
            continue
        idx = sorted(next(iter(images[e["name"]].values())))[2:8]
        box = mouth_box(r["landmarks"][0], r["photo"].shape)
        x0, y0, x1, y1 = box
        y0, y1 = y0 - (y1 - y0) // 4, y1 + (y1 - y0) // 4
        box = (x0, y0, x1, y1)
        n = len(r["mouth"])
        real = _real_frames(e, [_real_index(k, lag, n) for k in idx]) if e.get("video") else {}
        rows = [np.hstack([_cut(real[_real_index(k, lag, n)], box, None) for k in idx])] if real else []
        for renderer in renderers:
            gen = images[e["name"]].get(renderer, {})
            rows.append(np.hstack([_cut(gen[k], box, None) for k in idx]))
        block = np.vstack(rows)
        blocks.append(block)
    width = max(b.shape[1] for b in blocks)
    blocks = [cv2.copyMakeBorder(b, 0, 8, 0, width - b.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255))
              for b in blocks]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.vstack(blocks), cv2.COLOR_RGB2BGR))


# --------------------------------------------------------------------------- report


def format_table(res: dict) -> str:
    names = list(res["recordings"])
    lines = ["recording | speaker | lag | loudness r | " + " | ".join(
        f"{r} r / amp / width r / sharp" for r in res["renderers"])]
    for n in names:
        rec = res["recordings"][n]
        cells = [f"{n} | {rec['speaker']} | {rec['lag']} | {rec['r_loud']:.3f}"]
        for r in res["renderers"].values():
            f = r["recordings"][n]
            cells.append(f"{f['r_open']:.3f} / {f['amp']:.2f} / {f['r_width']:.3f} / {f['sharp']:.2f}")
        lines.append(" | ".join(cells))
    lo = res["loudness"]
    lines.append(f"pooled ({len(res['speakers'])} speakers, {len(names)} recordings): loudness r "
                 f"{lo['pooled_r']:.3f} (SE {lo['se']:.3f})")
    for name, r in res["renderers"].items():
        chroma = "-" if r["max_chroma_gray"] is None else str(r["max_chroma_gray"])
        lines.append(f"  {name}: r {r['pooled_r']:.3f} (SE {r['se']:.3f}), minus loudness "
                     f"{r['minus_loudness']:+.3f} (SE {r['minus_loudness_se']:.3f}), amp {r['amp']:.2f} "
                     f"(SE {r['amp_se']:.2f}; frame-pooled {r['amp_pooled']:.2f}), width r {r['r_width']:.3f}, sharpness median {r['sharp_median']:.2f} "
                     f"(min {r['sharp_min']:.2f}), gray photo max chroma {chroma}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    """The ``eval-real`` subcommand's flags (called by training/cli.py)."""
    p.add_argument("--data", type=Path, required=True, help="avatar-train prepare-real output")
    p.add_argument("--split", default="dev", choices=("dev", "train", "all"))
    p.add_argument("--model", type=Path, help="exported model dir (avatar-export --out; default: the starter)")
    p.add_argument("--renderer", choices=(*RENDERERS, "both"), default="both")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--noise-gate", default=str(DEFAULT_THRESHOLD_DBFS), metavar="DBFS|off")
    p.add_argument("--still", action="store_true", help="score without idle blinks and head motion")
    p.add_argument("--sync", default="auto", choices=("auto", "none"),
                   help="correct recordings whose A/V offset is clearly off (default), or not")
    p.add_argument("--max-seconds", type=float, help="score at most this much of each recording")
    p.add_argument("--gray-seconds", type=float, default=2.0, help="seconds of the gray-photo colour check (0: skip)")
    p.add_argument("--recording", action="append", default=[], metavar="NAME", help="only this recording (repeatable)")
    p.add_argument("--sheet", type=Path, help="write a contact sheet PNG (real vs generated)")
    p.add_argument("--mouth-sheet", type=Path, help="write mouth crops at full size (PNG)")
    p.add_argument("--sheet-recording", action="append", default=[], metavar="NAME",
                   help="a recording shown in the sheets (repeatable; default: the first four)")
    p.add_argument("--json", type=Path, help="write the results here")


def main_eval_real(args) -> int:
    from avatar_stream.engine.gate import parse_gate
    from avatar_stream.training.shards import write_json

    opts = RealEvalOptions(data=args.data, split=args.split, model=args.model,
                           renderers=RENDERERS if args.renderer == "both" else (args.renderer,),
                           backend=args.backend, noise_gate_dbfs=parse_gate(args.noise_gate), alive=not args.still,
                           sync=args.sync, max_seconds=args.max_seconds, gray_seconds=args.gray_seconds,
                           recordings=tuple(args.recording), sheet=args.sheet, mouth_sheet=args.mouth_sheet,
                           sheet_recordings=tuple(args.sheet_recording))
    res = evaluate_real(opts)
    print(format_table(res))
    if args.json:
        write_json(args.json, res)
        print(f"metrics written to {args.json}")
    return 0


__all__ = ["RealEvalError", "RealEvalOptions", "bootstrap", "evaluate_real", "format_table", "load_split",
           "max_chroma", "mouth_box", "pooled_amp", "pooled_r", "sharpness", "shift", "sync_lag"]
