"""``avatar-train eval-mouth``: does an exported model move the mouth with *real* speech?

For each talking-face video (e.g. GRID clips): the clip's first frame is driven by the clip's
own audio through what users run (the engine's ``Stream`` loop of ``render_offline`` on the exported
graphs, full frame, ``crop_only=False``), once per renderer (``neural``: the decoder's crop pasted
back; ``warp``: the photo warped by the Audio2AU probabilities). Mouth opening per frame =
inner-lip gap (mean of the dlib landmark pairs 61-67, 62-66, 63-65) / face height (nose
bridge 27 to chin 8), landmarks at quarter-pixel resolution (``LANDMARK_SUBPIXEL``), on the
real frames and on the generated ones; the score is their Pearson r per clip (frames where
dlib finds no face on either side are left out) and the mean over clips.

Why sub-pixel and three pairs: dlib's landmarks are whole pixels, and at
GRID's size one pixel of lip gap is 1% of the face height. A closed mouth held still on hiss
then measured as a gap flipping between 0 and 1 px, and that rounding, not the mouth, made
most of the quiet-input ratio (a third-corpus model: 0.19 at whole pixels and one pair, 0.06
at quarter pixels and three pairs; the shipped starter 0.15 and 0.12, on the first GRID clip).
Figures scored before that date used whole pixels and the one pair 62-66.

Quiet input: the first clip's first frame driven by ``silence_seconds`` of zeros and of
white noise at ``noise_dbfs`` (RMS re full scale). The mouth should stay as in the photo:
reported as the std of the opening under that input divided by the mean std on the clips'
speech (target < 0.1), and the mean offset from the photo's own opening. Everything runs with
the engine's noise gate at ``noise_gate_dbfs`` (engine/gate.py; the default is what
``avatar-stream`` uses); when the gate is on, the quiet inputs are scored once more with it
off (``quiet_ungated``): that is what the model itself does with the noise.

No torch here (engine + dlib only), so any exported model directory can be scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.face import FaceAligner, FaceError
from avatar_stream.engine.gate import DEFAULT_THRESHOLD_DBFS, parse_gate

VIDEO_EXTS = (".mpg", ".mp4", ".avi", ".mov", ".mkv", ".webm")
RENDERERS = ("neural", "warp")
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))  # (upper, lower) inner-lip landmarks
NOSE_BRIDGE, CHIN = 27, 8
LANDMARK_SUBPIXEL = 4  # landmarks fitted on the face upscaled 4x: 1/4 px resolution


@dataclass(frozen=True)
class MouthEvalOptions:
    clips: tuple[Path, ...]  # video files or folders of them
    model: Path | None = None  # exported model dir (None: the shipped starter)
    renderers: tuple[str, ...] = RENDERERS
    backend: str = "cpu"
    silence_seconds: float = 3.0
    noise_dbfs: float = -50.0
    seed: int = 0  # the quiet-input noise
    noise_gate_dbfs: float | None = DEFAULT_THRESHOLD_DBFS  # the engine's gate; None = off
    alive: bool = True  # idle blinks and sway, as avatar-stream renders by default


def mouth_opening(landmarks: np.ndarray) -> float:
    """Inner-lip gap (mean over ``INNER_LIP_PAIRS``) over face height for one (68, 2)
    landmark set (scale-free)."""
    gap = np.mean([np.linalg.norm(landmarks[lo] - landmarks[up]) for up, lo in INNER_LIP_PAIRS])
    height = np.linalg.norm(landmarks[CHIN] - landmarks[NOSE_BRIDGE])
    return float(gap / height) if height > 0 else float("nan")


def opening_track(aligner: FaceAligner, frames) -> np.ndarray:
    """Mouth opening of every frame (float64, NaN where dlib finds no face)."""
    out = []
    for f in frames:
        try:
            out.append(mouth_opening(aligner.landmarks(f, subpixel=LANDMARK_SUBPIXEL)))
        except FaceError:
            out.append(float("nan"))
    return np.asarray(out, dtype=np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the frames finite in both; NaN when fewer than 3 or one side is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def find_clips(paths) -> list[Path]:
    """Video files given directly or found (sorted, non-recursive) in given folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_EXTS)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"--clips {p}: no such file or folder")
    if not out:
        raise ValueError(f"no video files ({', '.join(VIDEO_EXTS)}) in {[str(p) for p in paths]}")
    return out


def read_clip(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """RGB frames at 25 fps and the audio on the video's timeline, exactly ``T * 640`` samples."""
    from avatar_stream.training.prepare import read_video_25fps

    frames, _ = read_video_25fps(path)
    audio = load_audio(path)
    n = len(frames) * tb.SAMPLES_PER_FRAME
    audio = np.pad(audio[:n], (0, max(0, n - len(audio))))
    return frames, audio.astype(np.float32)


def _render(engine, photo: np.ndarray, audio: np.ndarray) -> list[np.ndarray]:
    """Full frames of ``photo`` driven by ``audio``: ``render_offline``'s loop, written out
    because ``render_offline`` refuses silent files, and silence is one of the inputs here
    (a microphone delivers it too)."""
    stream = engine.create_stream(photo, crop_only=False)
    stream.accept_waveform(audio)
    stream.input_finished()
    out = []
    while stream.is_ready():
        out.append(stream.step().image)
    return out


def quiet_inputs(seconds: float, noise_dbfs: float, seed: int) -> dict[str, np.ndarray]:
    """Zeros and white noise whose RMS is ``noise_dbfs`` re full scale."""
    n = int(round(seconds * tb.SAMPLE_RATE))
    noise = np.random.default_rng(seed).standard_normal(n) * 10.0 ** (noise_dbfs / 20.0)
    return {"silence": np.zeros(n, np.float32), f"noise{noise_dbfs:g}dBFS": noise.astype(np.float32)}


def _score_quiet(engine, aligner: FaceAligner, photo: np.ndarray, photo_open: float,
                 quiet: dict[str, np.ndarray], speech_std: float) -> dict:
    out = {}
    for qname, audio in quiet.items():
        gen = opening_track(aligner, _render(engine, photo, audio))
        std = float(np.nanstd(gen))
        out[qname] = {"std": std, "ratio_to_speech_std": std / speech_std if speech_std > 0 else float("nan"),
                      "mean_offset_from_photo": float(np.nanmean(gen) - photo_open)}
    return out


def _score_renderer(engine, aligner: FaceAligner, clips: list[tuple[str, list, np.ndarray, np.ndarray]],
                    quiet: dict[str, np.ndarray], ungated_engine=None) -> dict:
    per_clip = {}
    for name, frames, audio, real in clips:
        gen = opening_track(aligner, _render(engine, frames[0], audio))
        per_clip[name] = {"r": pearson(real, gen), "frames": int(np.sum(np.isfinite(real) & np.isfinite(gen))),
                          "gen_std": float(np.nanstd(gen)), "real_std": float(np.nanstd(real))}
    rs = [c["r"] for c in per_clip.values()]
    speech_std = float(np.nanmean([c["gen_std"] for c in per_clip.values()]))
    photo = clips[0][1][0]
    photo_open = opening_track(aligner, [photo])[0]
    res = {"clips": per_clip, "mean_r": float(np.nanmean(rs)) if np.isfinite(rs).any() else float("nan"),
           "speech_gen_std": speech_std,
           "quiet": _score_quiet(engine, aligner, photo, photo_open, quiet, speech_std)}
    if ungated_engine is not None:
        res["quiet_ungated"] = _score_quiet(ungated_engine, aligner, photo, photo_open, quiet, speech_std)
    return res


def evaluate_mouth(opts: MouthEvalOptions, progress=print) -> dict:
    """Scores per renderer (see the module docstring); JSON-ready dict."""
    from avatar_stream.engine.stream import Engine

    t0 = time.perf_counter()
    aligner = FaceAligner()
    clips = []
    for path in find_clips(opts.clips):
        frames, audio = read_clip(path)
        clips.append((path.stem, frames, audio, opening_track(aligner, frames)))
    quiet = quiet_inputs(opts.silence_seconds, opts.noise_dbfs, opts.seed)
    res: dict = {"model": str(opts.model) if opts.model else "starter", "clips": [c[0] for c in clips],
                 "noise_gate_dbfs": opts.noise_gate_dbfs, "renderers": {}}
    for renderer in opts.renderers:
        kw = dict(backend=opts.backend, renderer=renderer, face_aligner=aligner, alive=opts.alive)
        engine = Engine(opts.model, noise_gate_dbfs=opts.noise_gate_dbfs, **kw)
        ungated = Engine(opts.model, noise_gate_dbfs=None, **kw) if opts.noise_gate_dbfs is not None else None
        res["renderers"][renderer] = _score_renderer(engine, aligner, clips, quiet, ungated)
        if progress:
            progress(f"[eval-mouth] {renderer}: mean r {res['renderers'][renderer]['mean_r']:.3f}")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def format_table(res: dict) -> str:
    clips = res["clips"]
    gate = res.get("noise_gate_dbfs")
    head = f"quiet std / speech std (noise gate {gate:g} dBFS; ungated)" if gate is not None else \
        "quiet std / speech std (noise gate off)"
    lines = ["renderer | " + " | ".join(clips) + f" | mean r | {head}"]
    for name, r in res["renderers"].items():
        ung = r.get("quiet_ungated", {})
        quiet = ", ".join(f"{q} {v['ratio_to_speech_std']:.3f}"
                          + (f" ({ung[q]['ratio_to_speech_std']:.3f})" if q in ung else "")
                          for q, v in r["quiet"].items())
        lines.append(f"{name} | " + " | ".join(f"{r['clips'][c]['r']:.3f}" for c in clips)
                     + f" | {r['mean_r']:.3f} | {quiet}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    """The ``eval-mouth`` subcommand's flags (called by training/cli.py)."""
    p.add_argument("--model", type=Path, help="exported model dir (avatar-export --out; default: the starter)")
    p.add_argument("--clips", type=Path, nargs="+", required=True, help="talking-face videos or folders of them")
    p.add_argument("--renderer", choices=(*RENDERERS, "both"), default="both")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--silence-seconds", type=float, default=3.0)
    p.add_argument("--noise-dbfs", type=float, default=-50.0, help="RMS of the quiet white noise re full scale")
    p.add_argument("--noise-gate", default=str(DEFAULT_THRESHOLD_DBFS), metavar="DBFS|off",
                   help="the engine's noise gate (default %(default)s, as avatar-stream); 'off' to score the bare model")
    p.add_argument("--still", action="store_true", help="no idle blinks or head sway (they move the measured "
                   "mouth a little on quiet input too)")
    p.add_argument("--json", type=Path, help="write the results here")


def main_eval_mouth(args) -> int:
    from avatar_stream.training.shards import write_json

    renderers = RENDERERS if args.renderer == "both" else (args.renderer,)
    res = evaluate_mouth(MouthEvalOptions(clips=tuple(args.clips), model=args.model, renderers=renderers,
                                          backend=args.backend, silence_seconds=args.silence_seconds,
                                          noise_dbfs=args.noise_dbfs,
                                          noise_gate_dbfs=parse_gate(args.noise_gate), alive=not args.still))
    print(format_table(res))
    if args.json:
        write_json(args.json, res)
        print(f"metrics written to {args.json}")
    return 0


__all__ = ["MouthEvalOptions", "evaluate_mouth", "find_clips", "format_table", "mouth_opening", "opening_track",
           "pearson", "quiet_inputs", "read_clip"]
