"""``avatar-train synth``: a GRID-shaped corpus made here, with AU labels known by construction
(docs/design.md §5). Same shards as ``prepare grid`` (``shards.write_clip``), so every stage runs on it.

Per utterance: a face photo (identity) and a speech source,
- espeak-ng speaking a GRID-grammar sentence or a free sentence with a random voice, rate
  and pitch (``speech.synthesize``: phoneme timings from espeak itself), or
- a real recording from ``--real-speech`` folders, phone timings from pocketsphinx
  (``align.align_with_fallback``: forced alignment when a transcript is known, from a
  ``MANIFEST.tsv`` ``transcript`` column, an LJSpeech ``transcripts.txt`` or a GRID file name;
  otherwise forced alignment of the words pocketsphinx recognises, the phone loop as the
  last resort), cached under ``OUT/cache/align``;
then AU intensities per video frame (``au_table.au_tracks``), frames rendered by the AU warp
of the photo (engine/warp.py) with random blinks, and the identity image = the neutral
(all-AU-zero) crop.

Geometry: the photo is cut once to a canvas at twice the canonical crop's scale (plus a
margin) with its alignment matrix; the warp runs on that canvas, and each frame is cut from
it and box-filtered 2:1 to 112 px. Head motion is a global similarity of the picture, and
aligning each frame with the photo's matrix moved by that motion cancels it exactly; what a
real pipeline keeps is the alignment's error. So each frame is cut with the matrix moved by a
small smooth random similarity, sized from dlib alignments of the GRID clips in shared/data:
the crop-space drift of a fixed scene point had a slow part of 0.3-1.1 px, 0.6-2.3 % scale,
0.2-0.3 degrees and a frame-to-frame part of 0.08 px, 0.3-0.8 %, 0.2 degrees.

Split by identity and by voice: ``--test-identities`` photos and ``--test-voices`` espeak
voices (and ``--test-real-speakers``, by default as many, real speakers when real speech is
given) are held out; test clips pair
a held-out photo with a held-out voice, train clips use neither. A clip's speaker is
``<identity>-<voice>``; split.json lists speakers as ``prepare`` does and adds ``detail``.

Deterministic: clip i depends only on (seed, i) and the inputs; espeak output is bit-exact,
so the arrays of a corpus are identical for a seed whatever ``--workers`` is. Resumable:
clips already in the index are not rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar_stream.engine.audio import AudioError, load_audio
from avatar_stream.engine.face import FaceAligner, FaceError, apply_transform, read_image, warp_to_crop
from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.engine.warp import FaceWarper
from avatar_stream.training.shards import ShardError, read_index, write_clip, write_json

CROP = 112
SCALE = 2  # the canvas is cut at twice the crop's scale and box-filtered down per frame
PAD = 24  # canvas margin (canvas px) so that the jittered crop never samples past the canvas
FACE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".mpg", ".mp4")
# Alignment-error model (see the module docstring): std of the slow and the per-frame part.
JITTER_SHIFT_PX = (0.4, 0.08)  # crop px
JITTER_SCALE = (0.01, 0.004)  # relative
JITTER_ANGLE_DEG = (0.3, 0.15)
JITTER_SLOW_FRAMES = 12.0  # Gaussian smoothing (frames) of the slow part
BLINK_PROFILE = (0.4, 0.9, 1.0, 0.7, 0.3)  # 200 ms: eyes close fast and open slower
BLINK_GAP_FRAMES = (25, 90)  # shortest gap, then mean of the exponential part (~4.6 s apart)


@dataclass(frozen=True)
class SynthOptions:
    faces: Path
    out: Path
    utterances: int
    seed: int = 0
    real_speech: tuple[Path, ...] = ()
    test_identities: int = 1
    test_voices: int = 1
    test_real_speakers: int | None = None  # None: as many as test_voices (older corpora)
    workers: int = 1
    real_share: float = 0.3  # of utterances taken from real speech when any is given
    grid_share: float = 0.7  # of espeak utterances in the GRID grammar (the rest free text)
    max_seconds: float = 8.0  # longer real recordings are cut to a random window this long
    progress: bool = True


@dataclass(frozen=True)
class Identity:
    name: str
    path: str
    landmarks: tuple[tuple[float, float], ...]  # 68 points, photo pixels
    matrix: tuple[tuple[float, ...], ...]  # (2, 3) photo -> canonical crop


@dataclass(frozen=True)
class RealFile:
    path: str
    speaker: str
    transcript: str | None


@dataclass(frozen=True)
class ClipJob:
    seed: int
    index: int
    split: str
    speaker: str
    utt: str
    identity: Identity
    voice: str  # the voice tag recorded in the index ("es_<espeak voice>" or "rs_<speaker>")
    text: str | None = None  # espeak: what to say (espeak input)
    espeak: tuple[str, int, int] | None = None  # (voice, rate, pitch)
    real: RealFile | None = None


@dataclass
class SynthReport:
    clips: int = 0
    frames: int = 0
    skipped_existing: int = 0
    seconds: float = 0.0
    identities: int = 0
    bad_faces: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.clips / self.seconds if self.seconds else 0.0
        s = (f"{self.clips} clips ({self.frames} frames) in {self.seconds:.1f} s = {rate:.2f} clips/s, "
             f"{self.frames / max(self.seconds, 1e-9):.0f} frames/s; {self.identities} identities")
        if self.skipped_existing:
            s += f"; {self.skipped_existing} already present"
        if self.bad_faces:
            s += f"; {len(self.bad_faces)} photos without a usable face skipped"
        return s


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).strip("_.") or "x"


# ----------------------------------------------------------------------------- inputs


def find_identities(faces: Path, cache: Path, aligner: FaceAligner | None = None) -> tuple[list[Identity], list[str]]:
    """Photos of ``faces`` with a detectable face, aligned once (cached by file hash)."""
    paths = sorted(p for p in Path(faces).iterdir() if p.suffix.lower() in FACE_EXTS)
    if not paths:
        raise FileNotFoundError(f"no face photos ({', '.join(FACE_EXTS)}) in {faces}: pass --faces DIR of portraits")
    cache_file = cache / "faces.json"
    known = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    out, bad, changed = [], [], False
    for p in paths:
        digest = hashlib.sha1(p.read_bytes()).hexdigest()
        if digest not in known:
            aligner = aligner or FaceAligner()
            try:
                a = aligner.align(read_image(p), name=str(p))
                known[digest] = {"landmarks": a.landmarks.tolist(), "matrix": a.matrix.tolist()}
            except FaceError as e:
                known[digest] = {"error": str(e)}
            changed = True
        entry = known[digest]
        if "error" in entry:
            bad.append(f"{p.name}: {entry['error']}")
            continue
        out.append(Identity(name="f" + _safe(p.stem), path=str(p), landmarks=tuple(map(tuple, entry["landmarks"])),
                            matrix=tuple(map(tuple, entry["matrix"]))))
    if changed:
        write_json(cache_file, known)
    return out, bad


def _transcripts(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(file name -> transcript, file name -> speaker) from MANIFEST.tsv / transcripts.txt."""
    text, speaker = {}, {}
    manifest = folder / "MANIFEST.tsv"
    if manifest.exists():
        lines = manifest.read_text(encoding="utf-8").splitlines()
        head = lines[0].split("\t")
        for line in lines[1:]:
            row = dict(zip(head, line.split("\t"), strict=False))
            if row.get("transcript", "").strip():
                text[row["file"]] = row["transcript"].strip()
            if row.get("speaker_id_guess", "").strip():
                speaker[row["file"]] = row["speaker_id_guess"].strip()
    ljs = folder / "transcripts.txt"
    if ljs.exists():  # LJSpeech metadata: id|text|normalised text
        for line in ljs.read_text(encoding="utf-8").splitlines():
            parts = line.split("|")
            if len(parts) >= 2:
                text.setdefault(parts[0] + ".wav", parts[-1].strip())
    return text, speaker


def find_real_speech(folders) -> list[RealFile]:
    """Recordings in ``folders`` (recursively), each with its speaker and transcript if known.
    Speaker: the MANIFEST.tsv ``speaker_id_guess``, else the folder holding the file (GRID's
    ``s1/*.mpg`` layout). Transcript: MANIFEST, transcripts.txt, or a GRID file name."""
    from avatar_stream.training.sentences import grid_sentence_from_id

    out = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"--real-speech {folder} is not a folder of recordings")
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() not in AUDIO_EXTS:
                continue
            text, speaker = _transcripts(p.parent)
            transcript = text.get(p.name)
            if transcript is None and len(p.stem) == 6:
                try:
                    transcript = grid_sentence_from_id(p.stem)
                except ValueError:
                    transcript = None
            out.append(RealFile(str(p), _safe(speaker.get(p.name, p.parent.name)), transcript))
    return out


# ----------------------------------------------------------------------------- planning


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def plan(opts: SynthOptions, identities: list[Identity], voices: tuple[str, ...], real: list[RealFile]):
    """``(jobs, split)``: what each clip is made of, and split.json's content."""
    rng = np.random.default_rng([opts.seed, 0x5917])
    k, v = opts.test_identities, opts.test_voices
    if not 0 <= k < len(identities):
        raise ValueError(f"--test-identities {k} must be 0..{len(identities) - 1} ({len(identities)} usable photos)")
    if not 0 <= v < len(voices):
        raise ValueError(f"--test-voices {v} must be 0..{len(voices) - 1} ({len(voices)} espeak voices)")
    speakers = sorted({r.speaker for r in real})
    ids = [identities[i] for i in rng.permutation(len(identities))]
    es = [voices[i] for i in rng.permutation(len(voices))]
    rs = [speakers[i] for i in rng.permutation(len(speakers))]
    wanted = v if opts.test_real_speakers is None else opts.test_real_speakers
    if wanted < 0:
        raise ValueError(f"--test-real-speakers {wanted} must be >= 0")
    v_real = min(wanted, max(len(rs) - 1, 0))  # keep at least one real speaker for training
    pools = {
        "test": (ids[:k], es[:v], [r for r in real if r.speaker in set(rs[:v_real])]),
        "train": (ids[k:], es[v:], [r for r in real if r.speaker not in set(rs[:v_real])]),
    }
    n_test = max(1, round(opts.utterances * k / len(identities))) if k and v and opts.utterances > 1 else 0
    test_idx = set(rng.choice(opts.utterances, size=n_test, replace=False).tolist()) if n_test else set()
    jobs = [_job(opts, i, "test" if i in test_idx else "train", pools) for i in range(opts.utterances)]
    detail = {
        "test_identities": sorted(i.name for i in ids[:k]), "train_identities": sorted(i.name for i in ids[k:]),
        "test_voices": sorted(["es_" + x for x in es[:v]] + ["rs_" + x for x in rs[:v_real]]),
        "train_voices": sorted(["es_" + x for x in es[v:]] + ["rs_" + x for x in rs[v_real:]]),
    }
    split = {s: sorted({j.speaker for j in jobs if j.split == s}) for s in ("train", "test")}
    return jobs, {**split, "detail": detail}


def _job(opts: SynthOptions, i: int, split: str, pools) -> ClipJob:
    from avatar_stream.training.sentences import free_sentence, grid_sentence, grid_speakable
    from avatar_stream.training.speech import PITCH_RANGE, RATE_RANGE

    rng = np.random.default_rng([opts.seed, i])
    ids, es, real = pools[split]
    identity = _pick(rng, ids)
    if real and rng.random() < opts.real_share:
        r = _pick(rng, real)
        return ClipJob(opts.seed, i, split, f"{identity.name}-rs_{r.speaker}", f"u{i:06d}", identity, "rs_" + r.speaker, real=r)
    voice = _pick(rng, es)
    text = grid_speakable(grid_sentence(rng)) if rng.random() < opts.grid_share else free_sentence(rng)
    rate = int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1))
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    return ClipJob(opts.seed, i, split, f"{identity.name}-es_{voice}", f"u{i:06d}", identity, "es_" + voice, text=text,
                   espeak=(voice, rate, pitch))


# ----------------------------------------------------------------------------- speech


def _alignment(real: RealFile, audio: np.ndarray, cache: Path) -> tuple[list[tuple[str, int, int]], str]:
    """Phones of a real recording, from ``cache`` or pocketsphinx (seconds per file)."""
    from avatar_stream.training.align import align_with_fallback

    # The version tag keeps alignments made by an older fallback chain (phone loop straight
    # after the transcript, before recognised words) from being reused.
    key = hashlib.sha1(audio.tobytes() + (real.transcript or "").encode() + b"|align-v2").hexdigest()
    path = cache / "align" / f"{key}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return [tuple(p) for p in data["phones"]], data["method"]
    phones, method = align_with_fallback(audio, real.transcript)
    write_json(path, {"file": real.path, "transcript": real.transcript, "method": method,
                      "phones": [list(p) for p in phones]})
    return [tuple(p) for p in phones], method


def clip_speech(job: ClipJob, rng: np.random.Generator, cache: Path, max_frames: int):
    """``(audio (T*640,), au (T, 5), au_label (T, 5))`` for a job."""
    from avatar_stream.training.au_table import au_tracks, occurrence
    from avatar_stream.training.speech import synthesize

    if job.real is None:
        utt = synthesize(job.text, *job.espeak)
        audio, phones, alphabet, start = utt.audio, utt.phonemes, "espeak", 0
        n = len(audio) // SAMPLES_PER_FRAME
    else:
        audio = load_audio(job.real.path, align_to_video=False)
        phones, _ = _alignment(job.real, audio, cache)
        alphabet = "arpabet"
        total = len(audio) // SAMPLES_PER_FRAME
        n = min(total, max_frames)
        start = int(rng.integers(0, total - n + 1))
    if n < 1:
        raise AudioError(f"{job.real.path if job.real else repr(job.text)} is shorter than one video frame")
    au = au_tracks(phones, start + n, alphabet=alphabet)[start:]
    clip_audio = np.ascontiguousarray(audio[start * SAMPLES_PER_FRAME : (start + n) * SAMPLES_PER_FRAME], np.float32)
    return clip_audio, au, occurrence(au)


# ----------------------------------------------------------------------------- frames


def cut_canvas(identity: Identity, scale: int = SCALE, pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """``(canvas, landmarks on it)``: the photo cut with its alignment matrix at ``scale`` x the
    canonical crop's scale, with a margin of ``pad`` canvas px (``scale * CROP + 2 * pad`` square)."""
    to_canvas = np.array(identity.matrix, np.float64) * scale
    to_canvas[:, 2] += pad
    canvas = warp_to_crop(read_image(identity.path), to_canvas, scale * CROP + 2 * pad)
    return canvas, apply_transform(to_canvas, np.array(identity.landmarks))


class CanvasFace:
    """A photo cut to a canvas at ``SCALE`` x the canonical crop's scale (margin ``PAD``) and
    prepared for the warp; ``crop(au, blink, jitter)`` renders one 112x112 frame."""

    def __init__(self, identity: Identity):
        self.canvas, landmarks = cut_canvas(identity)
        self.warper = FaceWarper(self.canvas, landmarks)

    def crop(self, au, blink: float = 0.0, jitter: np.ndarray | None = None) -> np.ndarray:
        img = self.warper.render(au, blink)
        m = np.array([[1.0, 0.0, -PAD], [0.0, 1.0, -PAD]])
        if jitter is not None:
            m = jitter @ np.vstack([m, [0.0, 0.0, 1.0]])
        big = cv2.warpAffine(img, m, (SCALE * CROP, SCALE * CROP), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        return cv2.resize(big, (CROP, CROP), interpolation=cv2.INTER_AREA)


def _smooth_noise(rng: np.random.Generator, n: int, slow: float, fast: float) -> np.ndarray:
    sigma = JITTER_SLOW_FRAMES
    k = np.exp(-0.5 * (np.arange(-3 * sigma, 3 * sigma + 1) / sigma) ** 2)
    k /= np.sqrt((k**2).sum())  # unit-variance output from unit-variance input
    x = np.convolve(rng.standard_normal(n + len(k) - 1), k, mode="valid")
    return slow * x + fast * rng.standard_normal(n)


def head_jitter(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2, 3) similarities in the SCALE x crop's pixels about its centre: the alignment
    error each frame is cut with (module docstring)."""
    tx, ty = (SCALE * _smooth_noise(rng, n, *JITTER_SHIFT_PX) for _ in range(2))
    s = np.exp(_smooth_noise(rng, n, *JITTER_SCALE))
    a = np.radians(_smooth_noise(rng, n, *JITTER_ANGLE_DEG))
    c = (SCALE * CROP - 1) / 2.0
    out = np.zeros((n, 2, 3))
    out[:, 0, 0] = out[:, 1, 1] = s * np.cos(a)
    out[:, 0, 1], out[:, 1, 0] = -s * np.sin(a), s * np.sin(a)
    out[:, :, 2] = c - np.einsum("nij,j->ni", out[:, :, :2], [c, c]) + np.stack([tx, ty], 1)
    return out


def blink_track(rng: np.random.Generator, n: int) -> np.ndarray:
    """Eyelid closure per frame in [0, 1]: blinks at random, ~4.6 s apart."""
    out = np.zeros(n, np.float32)
    t = int(rng.integers(0, BLINK_GAP_FRAMES[1]))
    while t < n:
        seg = BLINK_PROFILE[: n - t]
        out[t : t + len(seg)] = seg
        t += BLINK_GAP_FRAMES[0] + int(rng.exponential(BLINK_GAP_FRAMES[1] - BLINK_GAP_FRAMES[0]))
    return out


# ----------------------------------------------------------------------------- one clip


@functools.lru_cache(maxsize=64)
def _canvas(identity: Identity) -> CanvasFace:
    return CanvasFace(identity)


def make_clip(job: ClipJob, out: Path, max_frames: int) -> dict:
    """Build and write one clip; returns its index entry."""
    rng = np.random.default_rng([job.seed, job.index, 0xC11B])
    audio, au, au_label = clip_speech(job, rng, out / "cache", max_frames)
    face = _canvas(job.identity)
    n = len(au)
    jitter, blink = head_jitter(rng, n), blink_track(rng, n)
    frames = np.stack([face.crop(au[t], float(blink[t]), jitter[t]) for t in range(n)])
    identity = face.crop(np.zeros(5))
    return write_clip(out, job.speaker, job.utt, frames, audio, identity, au=au, au_label=au_label,
                      voice=job.voice, identity_name=job.identity.name)


def _work(args) -> tuple[int, dict | None, str | None]:
    job, out, max_frames = args
    try:
        return job.index, make_clip(job, Path(out), max_frames), None
    except (AudioError, FaceError, ShardError, ValueError, RuntimeError) as e:
        return job.index, None, f"{job.utt} ({job.real.path if job.real else job.text!r}): {e}"


# ----------------------------------------------------------------------------- the corpus


def build_corpus(opts: SynthOptions) -> SynthReport:
    """Write ``opts.utterances`` clips, index.json and split.json under ``opts.out``."""
    from avatar_stream.training.speech import english_voices

    if opts.utterances < 1:
        raise ValueError(f"--utterances must be >= 1, got {opts.utterances}")
    if opts.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {opts.workers}")
    out = Path(opts.out)
    cache = out / "cache"
    report = SynthReport()
    identities, report.bad_faces = find_identities(opts.faces, cache)
    report.identities = len(identities)
    if len(identities) < 2 and opts.test_identities:
        raise ValueError(f"{opts.faces} has {len(identities)} usable photo(s); a split needs >= 2 "
                         "(or pass --test-identities 0)")
    jobs, split = plan(opts, identities, english_voices(), find_real_speech(opts.real_speech))
    have = {e["path"] for e in read_index(out)} if (out / "index.json").exists() else set()
    todo = [j for j in jobs if f"clips/{j.speaker}/{j.utt}.npz" not in have]
    report.skipped_existing = len(jobs) - len(todo)
    max_frames = int(opts.max_seconds * 25)
    failed = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="synth", unit="clip", disable=not opts.progress)
    args = [(j, str(out), max_frames) for j in todo]
    if opts.workers == 1:
        results = map(_work, args)
        pool = None
    else:
        # spawn, not fork: the espeak-ng helper process behind speech.synthesize is a pipe
        # that forked children would share.
        pool = get_context("spawn").Pool(opts.workers)
        results = pool.imap_unordered(_work, args)
    try:
        for _, entry, err in results:
            if err:
                failed.append(err)
            else:
                report.clips += 1
                report.frames += entry["frames"]
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    report.seconds = time.perf_counter() - t0
    if failed:
        write_json(out / "skipped.json", sorted(failed))
    present = {e["speaker"] for e in read_index(out)} if (out / "index.json").exists() else set()
    if not present:
        raise ShardError(f"no clip could be made ({len(failed)} failed): see {out / 'skipped.json'}")
    write_json(out / "split.json", {"train": [s for s in split["train"] if s in present],
                                    "test": [s for s in split["test"] if s in present],
                                    "detail": {**split["detail"], "seed": opts.seed}})
    return report


def main_synth(args) -> int:
    """``avatar-train synth`` entry point (argv parsed in training/cli.py)."""
    opts = SynthOptions(faces=Path(args.faces), out=Path(args.out), utterances=args.utterances, seed=args.seed,
                        real_speech=tuple(Path(p) for p in args.real_speech or ()),
                        test_identities=args.test_identities, test_voices=args.test_voices,
                        test_real_speakers=args.test_real_speakers,
                        workers=args.workers, real_share=args.real_share, grid_share=args.grid_share,
                        max_seconds=args.max_seconds, progress=not args.no_progress)
    report = build_corpus(opts)
    print(f"{opts.out}: {report.summary()}")
    if report.bad_faces:
        print("photos skipped: " + "; ".join(report.bad_faces))
    if (opts.out / "skipped.json").exists():
        print(f"clips that failed, with reasons: {opts.out / 'skipped.json'}")
    return 0


def add_arguments(p) -> None:
    """The ``synth`` subcommand's flags (called by training/cli.py)."""
    p.add_argument("--faces", type=Path, required=True, help="folder of face photos (one identity each)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    p.add_argument("--utterances", type=int, required=True, help="clips to make")
    p.add_argument("--seed", type=int, default=0, help="same seed, same corpus")
    p.add_argument("--real-speech", type=Path, action="append", metavar="DIR",
                   help="folder of real recordings (MANIFEST.tsv / transcripts.txt / GRID names; repeatable)")
    p.add_argument("--test-identities", type=int, default=1, help="photos held out for the test split")
    p.add_argument("--test-voices", type=int, default=1,
                   help="espeak voices (and as many real speakers, unless --test-real-speakers) held out for the test split")
    p.add_argument("--test-real-speakers", type=int,
                   help="real speakers held out for the test split (default: as many as --test-voices); "
                        "every recording of a held-out speaker is test speech")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--real-share", type=float, default=0.3, help="share of clips from real speech (default 0.3)")
    p.add_argument("--grid-share", type=float, default=0.7, help="share of espeak clips in the GRID grammar")
    p.add_argument("--max-seconds", type=float, default=8.0, help="longer real recordings are cut to this")
    p.add_argument("--no-progress", action="store_true")
