"""The streaming core: one immutable ``Engine`` and one mutable ``Stream`` per session.

The loop (sherpa-onnx style)::

    stream = engine.create_stream(face_image)
    for chunk in source:
        stream.accept_waveform(chunk, 16000)
        while stream.is_ready():
            frame = stream.step()
    stream.input_finished()
    while stream.is_ready():
        frame = stream.step()

Offline rendering is exactly this loop (``render_offline``); tests prove that any chunking
gives the same frames.

Frame k needs the per-frame features of frames k-R..k+R (R = the TCSAN lookahead from the
model card); feature j needs the PCM window of frame j (``timebase.window_bounds``). So
frame k is ready once sample ``timebase.last_sample_needed(k, R)`` has arrived, or once the
input is finished (the window is then zero-padded, as offline). Features of frames before
0 and after the last frame are edge-replicated, as in training (docs/design.md §3).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.alive import IdleMotion
from avatar_stream.engine.audio import StreamResampler, check_audio
from avatar_stream.engine.face import AlignedFace, FaceAligner, PhotoDetail, paste_back, warp_to_crop
from avatar_stream.engine.gate import DEFAULT_THRESHOLD_DBFS, NoiseGate
from avatar_stream.engine.image_io import is_grayscale, to_gray_rgb
from avatar_stream.engine.model import LoadedModel, load_model


@dataclass(frozen=True)
class Frame:
    """One output frame. ``pts`` is in samples at 16 kHz (``index * 640``): integer time."""

    index: int
    image: np.ndarray  # RGB uint8, full photo (or the 112x112 crop when crop_only)
    crop: np.ndarray  # RGB uint8 112x112, the generated face
    au: np.ndarray  # (5,) Audio2AU probabilities for this frame, AU_NAMES order
    # (4,) the mouth head's measures (engine/mouth.py MEASURES: opening, width, jaw, lip
    # height), changes from silence in inter-ocular distances; None without a mouth head.
    mouth: np.ndarray | None = None

    @property
    def pts(self) -> int:
        return self.index * tb.SAMPLES_PER_FRAME

    @property
    def seconds(self) -> float:
        return self.pts / tb.SAMPLE_RATE


@dataclass
class FaceContext:
    """A face prepared once: aligned crop, its identity features, the photo it pastes into,
    and (renderer ``warp``) the prepared AU-driven warp of the photo."""

    photo: np.ndarray
    aligned: AlignedFace
    f_id: np.ndarray
    skips: dict[str, np.ndarray]
    warp: object | None = None
    # Renderer ``neural`` with idle motion: the photo's mesh, which carries the composed frame
    # through blinks and head sway.
    motion: object | None = None
    gray: bool = False  # a gray photo: generated faces are made gray too
    # Renderer ``neural``: the photo's detail finer than the crop, and the decoder's face for
    # silence (where a frame's face differs little from it, the detail is added back).
    detail: PhotoDetail | None = None
    neutral: np.ndarray | None = None
    framing: object | None = None  # engine/framing.Framing: how the user's photo became ``photo``

    @property
    def seed(self) -> int:
        """A number fixed by the photo (the idle motion's default seed: two photos do not
        blink in step, the same photo always blinks the same way)."""
        import zlib

        return zlib.crc32(np.ascontiguousarray(self.aligned.crop).tobytes())


# The first is the default: the warp renderer with the mouth head follows real speech better
# than the neural generator on the real-media dev speakers and keeps the photo sharp
# (src/avatar_stream/starter/MODEL_CARD.md and docs/experiments.md, "Real media").
RENDERERS = ("warp", "neural")
# Renderer ``neural``: where a decoded face is this many grey levels darker than its silent
# self (blurred over 1.5 px), it gets none of the photo's detail back.
KEEP_LEVELS = 15.0

# Warp intensity at AU probability 1, AU_NAMES order: for AU10/14/20 the strongest target the
# phoneme table (training/au_table.py) gives them ("ee" spreads the lips by AU20 0.75), so a
# certain AU renders as the corpus shows that phoneme; AU25/26 keep the full range.
WARP_DRIVE = np.array([0.60, 0.50, 0.75, 1.0, 1.0], dtype=np.float32)


def smoothed_au(window_au: np.ndarray) -> np.ndarray:
    """AU drive for the warp renderer: the Audio2AU probabilities of frames k-R..k+R
    averaged with a Hann window centred on k, times ``WARP_DRIVE``. Per-frame probabilities
    flicker; the window is the same one the TCSAN sees, so streaming still equals offline
    exactly."""
    w = np.hanning(window_au.shape[0] + 2)[1:-1].astype(np.float32)
    return WARP_DRIVE * (w[:, None] * window_au).sum(0) / w.sum()


@dataclass
class StageTimes:
    """Per-stage wall times in seconds, appended per call (for reports and the bench)."""

    features: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    paste: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)


class Engine:
    """Loaded graphs + model card + backend. Immutable and shareable between streams.

    ``noise_gate_dbfs``: frames whose audio window stays below this level get the features
    of digital silence (engine/gate.py), so room noise does not move the mouth; None = off.
    ``audio_backend``: where the audio graph runs, ``cpu`` (default) or ``same`` as ``backend``
    (engine/model.py says why). ``alive``: idle blinks and a slight head sway
    (engine/alive.py); off, the photo only moves its mouth.

    The warp renderer reads the model's mouth head (``mouth.onnx``: the mouth's shape learned
    from real video) where the model has one, and the Audio2AU probabilities otherwise.
    """

    def __init__(self, model_dir: str | Path | None = None, backend: str = "auto",
                 renderer: str = RENDERERS[0], face_aligner: FaceAligner | None = None,
                 noise_gate_dbfs: float | None = DEFAULT_THRESHOLD_DBFS, audio_backend: str = "cpu",
                 alive: bool = True):
        if renderer not in RENDERERS:
            raise ValueError(f"unknown renderer {renderer!r}: use {' or '.join(map(repr, RENDERERS))}")
        self.model: LoadedModel = load_model(model_dir, backend, audio_backend)
        self.renderer = renderer
        self.alive = bool(alive)
        self._silent_mouth: np.ndarray | None = None
        self.aligner = face_aligner or FaceAligner()
        self.lookahead_frames: int = self.model.lookahead_frames
        self.latency = tb.Latency(self.lookahead_frames)
        self.gate = NoiseGate(noise_gate_dbfs) if noise_gate_dbfs is not None else None
        self._silent: tuple[np.ndarray, np.ndarray] | None = None

    def silent_features(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame features and AU probabilities of an all-zero window (computed once)."""
        if self._silent is None:
            feat, au = self.model.frame_features(np.zeros((1, tb.WINDOW_SAMPLES), dtype=np.float32))
            self._silent = (feat[0], au[0])
        return self._silent

    def warm_up(self, face: FaceContext) -> None:
        """Render a few frames of silence for ``face`` on a throwaway stream: the first calls
        of each graph (memory planning) and of the renderer take several times a normal step,
        which a live session would pay by dropping its first frames."""
        stream = Stream(self, face)
        stream.accept_waveform(np.zeros(4 * tb.SAMPLES_PER_FRAME + tb.WINDOW_SAMPLES, np.float32))
        for _ in range(3):
            if stream.is_ready():
                stream.step()

    @property
    def has_mouth_head(self) -> bool:
        return self.model.mouth is not None

    def mouth_shape(self, feats: np.ndarray) -> np.ndarray | None:
        """(B, 2R+1, D) feature windows -> (B, M) mouth measures as changes from silence
        (the head's output for the features of silence subtracted, so a silent or gated
        window leaves the photo's mouth exactly as it is); None without a mouth head."""
        if self.model.mouth is None:
            return None
        if self._silent_mouth is None:
            silent = np.broadcast_to(self.silent_features()[0], feats.shape[1:])[None]
            self._silent_mouth = self.model.mouth_shape(silent)[0]
        return self.model.mouth_shape(feats) - self._silent_mouth

    def frame_features(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame features + AU probabilities of (N, WINDOW_SAMPLES) PCM windows, gated."""
        feat, au = self.model.frame_features(windows)
        if self.gate is not None:
            feat, au = self.gate.apply(windows, feat, au, *self.silent_features())
        return feat, au

    @property
    def backend(self) -> str:
        return self.model.backend

    # -- per-face work, done once ------------------------------------------------------
    def prepare_face(self, photo: np.ndarray, face_index: int | None = None,
                     output_size: tuple[int, int] | None = None, fit: str = "crop") -> FaceContext:
        """Frame the photo to the output (engine/framing.py: ``output_size`` (W, H), or the
        photo's own aspect at most ``framing.MAX_SIDE`` px), then find and align the face
        and prepare the renderer, all at the output's resolution."""
        framing = self._framing(photo, face_index, output_size, fit)
        photo, face_index = framing[1], framing[2]
        framing = framing[0]
        aligned = self.aligner.align(photo, face_index=face_index)
        f_id, skips = self.model.encode_identity(aligned.crop[None])
        warp = motion = None
        if self.renderer == "warp":
            from avatar_stream.engine.warp import WarpRenderer

            warp = WarpRenderer(photo, aligned, moving_head=self.alive)
        elif self.alive:
            from avatar_stream.engine.warp import FaceWarper

            motion = FaceWarper(photo, aligned.landmarks, moving_head=True, interpolation=cv2.INTER_CUBIC,
                                coarse_maps=True)
        detail = neutral = None
        if self.renderer == "neural":
            detail = PhotoDetail.of(photo, aligned.matrix)
            silent = np.broadcast_to(self.silent_features()[0], (1, 2 * self.lookahead_frames + 1,
                                                                 self.silent_features()[0].shape[0]))
            neutral = self.model.decode(np.ascontiguousarray(silent), f_id, skips)[0]
        return FaceContext(photo=photo, aligned=aligned, f_id=f_id, skips=skips, warp=warp, motion=motion,
                           gray=is_grayscale(photo), detail=detail, neutral=neutral, framing=framing)

    def _framing(self, photo: np.ndarray, face_index: int | None, output_size, fit: str):
        """(Framing, framed photo, the chosen face's index in the framed photo)."""
        from avatar_stream.engine import framing as fr

        _check_photo(photo)
        box = fr.find_face_box(photo, self.aligner, face_index)
        plan = fr.plan(photo.shape, box, output_size, fit)
        framed = plan.apply(photo)
        if face_index is not None and box is not None:
            # Framing may cut other faces off: find the chosen one again by where it went.
            centre = plan.matrix @ np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.0])
            boxes = self.aligner.detect(framed)
            if boxes:
                face_index = int(np.argmin([np.hypot((b[0] + b[2]) / 2 - centre[0], (b[1] + b[3]) / 2 - centre[1])
                                            for b in boxes]))
        return plan, framed, face_index

    def create_stream(self, face: FaceContext | np.ndarray, face_index: int | None = None,
                      output_size: tuple[int, int] | None = None, crop_only: bool = False,
                      seed: int | None = None, fit: str = "crop") -> Stream:
        """``seed``: the idle motion's (default: one fixed by the photo, ``FaceContext.seed``).
        A photo is framed to ``output_size`` once here (``prepare_face``); a face prepared
        for another size is resized every frame (slower: prepare it for this size)."""
        if not isinstance(face, FaceContext):
            face = self.prepare_face(face, face_index, output_size, fit)
        return Stream(self, face, output_size=output_size, crop_only=crop_only, seed=seed)

    def step_many(self, streams: list[Stream]) -> list[Frame | None]:
        """One frame from each ready stream of this engine, the model calls batched (many
        sessions on one GPU); None for streams not ready. See :func:`step_many`."""
        if any(s.engine is not self for s in streams):
            raise ValueError("Engine.step_many: every stream must come from this Engine")
        return step_many(streams)


def _prefetch_features(engine: Engine, streams: list[Stream]) -> None:
    """The features every stream's next frame still needs, all streams in one audio-graph
    call (the graph is per-window, so batching does not change what a stream gets)."""
    plans = [(s, s._missing_features(max(s._window_frames(s.next_frame)))) for s in streams]
    plans = [(s, todo) for s, todo in plans if todo]
    if not plans:
        return
    t0 = time.perf_counter()
    feat, au = engine.frame_features(np.stack([s._window(j) for s, todo in plans for j in todo]))
    seconds = time.perf_counter() - t0
    n = 0
    for s, todo in plans:
        s._store_features(todo, feat[n : n + len(todo)], au[n : n + len(todo)], seconds)
        n += len(todo)


def step_many(streams: list[Stream]) -> list[Frame | None]:
    """One frame from each ready stream, the audio graphs and the decoders each batched into
    one call (many sessions on one GPU). All streams must share one Engine. Returns None for
    streams not ready."""
    if not streams:
        return []
    engine = streams[0].engine
    if any(s.engine is not engine for s in streams):
        raise ValueError("step_many: all streams must come from the same Engine")
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("step_many: a stream appears twice in the list; pass each once")
    t0 = time.perf_counter()
    ready = [i for i, s in enumerate(streams) if s.is_ready()]
    _prefetch_features(engine, [streams[i] for i in ready])
    begun = {i: streams[i]._begin_step() for i in ready}
    mouths: dict[int, np.ndarray] = {}
    if ready and engine.has_mouth_head:
        for i, m in zip(ready, engine.mouth_shape(np.stack([begun[i][1] for i in ready])), strict=True):
            mouths[i] = m
    t1 = time.perf_counter()
    crops: dict[int, np.ndarray] = {}
    neural = [i for i in ready if streams[i].face.warp is None]
    if neural:
        feats = np.stack([begun[i][1] for i in neural])
        f_id = np.concatenate([streams[i].face.f_id for i in neural])
        skips = {name: np.concatenate([streams[i].face.skips[name] for i in neural])
                 for name in streams[neural[0]].face.skips}
        for i, crop in zip(neural, engine.model.decode(feats, f_id, skips), strict=True):
            crops[i] = crop
    out: list[Frame | None] = [None] * len(streams)

    def finish(i: int) -> Frame:
        k, _, window_au = begun[i]
        return streams[i]._finish_step(k, crops.get(i), window_au, t0, t1, mouths.get(i))

    # Paste-back at the photo's size is per stream (about 0.4 ms at 512x512) and OpenCV
    # releases the GIL: with many streams it runs on threads. Each stream's state is touched by
    # one thread only; warp renderers may share a face, so they stay on this thread.
    threaded = len(ready) > 1 and len(crops) == len(ready)
    for i, frame in zip(ready, _paste_pool().map(finish, ready) if threaded else map(finish, ready), strict=True):
        out[i] = frame
    return out


@functools.cache
def _paste_pool() -> ThreadPoolExecutor:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(max_workers=min(8, cores), thread_name_prefix="avatar-paste")


# A forked child inherits the pool object but not its threads: it would queue work forever.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_paste_pool.cache_clear)


class Stream:
    """All mutable per-session state: audio ring buffer indexed by absolute sample counts,
    the per-frame feature cache, the frame cursor and counters."""

    def __init__(self, engine: Engine, face: FaceContext,
                 output_size: tuple[int, int] | None = None, crop_only: bool = False, seed: int | None = None):
        self.engine = engine
        self.face = face
        self.output_size = output_size
        self.crop_only = crop_only
        self.times = StageTimes()
        self.idle = IdleMotion(face.seed if seed is None else int(seed)) if engine.alive else None
        self.reset()

    # -- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all audio and frames; the face and its identity features are kept."""
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0  # absolute sample index of _buf[0]
        self._received = 0  # absolute count of 16 kHz samples accepted
        self._finished = False
        self._feats: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # frame -> (feat, au_prob)
        self._next_out = 0  # frame cursor
        self._resamplers: dict[int, StreamResampler] = {}
        self._rate: int | None = None  # the input rate of this stream (fixed by the first call)
        self.frames_out = 0
        self.frames_dropped = 0
        self.times = StageTimes()

    @property
    def samples_received(self) -> int:
        return self._received

    @property
    def next_frame(self) -> int:
        return self._next_out

    @property
    def total_frames(self) -> int | None:
        """Number of frames of the whole input once it is finished, else None."""
        return tb.num_frames(self._received) if self._finished else None

    # -- input ---------------------------------------------------------------------------
    def accept_waveform(self, samples: np.ndarray, sample_rate: int = tb.SAMPLE_RATE) -> None:
        """Append mono float32 samples at ``sample_rate`` (resampled to 16 kHz here)."""
        if self._finished:
            raise RuntimeError("accept_waveform after input_finished(): call reset() first")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._rate is None:
            self._rate = sample_rate
        elif sample_rate != self._rate:
            raise ValueError("the sample rate changed within one stream: reset() first")
        if sample_rate != tb.SAMPLE_RATE:
            rs = self._resamplers.get(sample_rate)
            if rs is None:
                rs = self._resamplers[sample_rate] = StreamResampler(sample_rate)
            samples = rs.process(samples)
        if samples.size:
            self._buf = np.concatenate([self._buf, samples])
            self._received += samples.size

    def silence_from(self, sample: int) -> None:
        """Replace the audio from absolute 16 kHz sample ``sample`` on with digital silence
        (barge-in: the speech the user interrupted must stop moving the mouth). Features of
        frames whose windows reach past ``sample`` are recomputed when next needed; frames
        already produced stay as they were. Audio not yet through the resampler is silenced
        too (``sample`` is at or before the end of what was received: a cut-off in the past)."""
        if sample > self._received:
            raise ValueError(f"silence_from({sample}): only {self._received} samples received so far")
        for rs in self._resamplers.values():
            rs.silence_history()
        lo = max(int(sample), self._buf_start)
        if lo < self._received:
            self._buf[lo - self._buf_start :] = 0.0
        stale = [j for j in self._feats if tb.window_bounds(j)[1] > sample]
        for j in stale:
            del self._feats[j]

    def input_finished(self) -> None:
        """No more audio: flush the resampler; the tail frames become ready (zero padded)."""
        for rs in self._resamplers.values():
            tail = rs.flush()
            if tail.size:
                self._buf = np.concatenate([self._buf, tail])
                self._received += tail.size
        self._finished = True

    # -- readiness -------------------------------------------------------------------------
    def _feature_available(self, j: int) -> bool:
        return self._finished or tb.window_bounds(j)[1] <= self._received

    def is_ready(self) -> bool:
        k = self._next_out
        if self._finished:
            return k < tb.num_frames(self._received)
        return self._feature_available(k + self.engine.lookahead_frames)

    def ready_count(self) -> int:
        """How many frames are ready now (the backlog a slow consumer has)."""
        r = self.engine.lookahead_frames
        if self._finished:
            return max(0, tb.num_frames(self._received) - self._next_out)
        # last k with window_bounds(k + R)[1] <= received
        last = (self._received - tb.WINDOW_OFFSET - tb.WINDOW_SAMPLES) // tb.SAMPLES_PER_FRAME - r
        return max(0, last - self._next_out + 1)

    # -- features --------------------------------------------------------------------------
    def _window(self, j: int) -> np.ndarray:
        start, stop = tb.window_bounds(j)
        out = np.zeros(tb.WINDOW_SAMPLES, dtype=np.float32)
        lo, hi = max(start, self._buf_start), min(stop, self._received)
        if hi > lo:
            out[lo - start : hi - start] = self._buf[lo - self._buf_start : hi - self._buf_start]
        return out

    def _missing_features(self, upto: int) -> list[int]:
        """Frames <= ``upto`` whose features are not cached yet (and can still be needed)."""
        first = max(self._feats.keys(), default=-1) + 1
        first = max(first, self._next_out - self.engine.lookahead_frames, 0)
        return [j for j in range(first, upto + 1) if j not in self._feats]

    def _store_features(self, todo: list[int], feat: np.ndarray, au: np.ndarray, seconds: float) -> None:
        for i, j in enumerate(todo):
            self._feats[j] = (feat[i], au[i])
        self.times.features.append(seconds)

    def _ensure_features(self, upto: int) -> None:
        """Compute (once) the features of every frame <= ``upto`` not yet cached, batched."""
        todo = self._missing_features(upto)
        if not todo:
            return
        t0 = time.perf_counter()
        feat, au = self.engine.frame_features(np.stack([self._window(j) for j in todo]))
        self._store_features(todo, feat, au, time.perf_counter() - t0)

    def _window_frames(self, k: int) -> list[int]:
        """Frames k-R..k+R, edge-replicated at both ends of the utterance."""
        r = self.engine.lookahead_frames
        last = tb.num_frames(self._received) - 1 if self._finished else None
        idx = [max(j, 0) for j in range(k - r, k + r + 1)]
        return idx if last is None else [min(j, last) for j in idx]

    def _feature_window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and AU probabilities of frames k-R..k+R, edge-replicated at both ends."""
        idx = self._window_frames(k)
        self._ensure_features(max(idx))
        return np.stack([self._feats[j][0] for j in idx]), np.stack([self._feats[j][1] for j in idx])

    def _forget_before(self, k: int) -> None:
        """Drop audio and features no future frame can need (bounded memory)."""
        r = self.engine.lookahead_frames
        keep_from = k - r
        for j in [j for j in self._feats if j < keep_from]:
            del self._feats[j]
        # (Feature 0 survives while keep_from <= 0: frames k < R edge-replicate it.)
        # Audio is kept for every feature a future frame can need, computed or not, so that
        # silence_from() can recompute the ones it invalidates.
        cut = tb.window_bounds(max(keep_from, 0))[0]
        if cut > self._buf_start:
            drop = min(cut - self._buf_start, self._buf.size)
            self._buf = self._buf[drop:]
            self._buf_start += drop

    # -- output --------------------------------------------------------------------------
    def step(self) -> Frame:
        """Produce the next frame. Call only while ``is_ready()``."""
        if not self.is_ready():
            raise RuntimeError("step() called while not is_ready()")
        t0 = time.perf_counter()
        k, feats, window_au = self._begin_step()
        mouth = self.engine.mouth_shape(feats[None])
        t1 = time.perf_counter()
        crop = None
        if self.face.warp is None:
            crop = self.engine.model.decode(feats[None], self.face.f_id, self.face.skips)[0]
        return self._finish_step(k, crop, window_au, t0, t1, None if mouth is None else mouth[0])

    def _begin_step(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Frame index, its (2R+1, D) feature window and the window's AU probabilities."""
        k = self._next_out
        feats, window_au = self._feature_window(k)
        return k, feats, window_au

    def _finish_step(self, k: int, crop: np.ndarray | None, window_au: np.ndarray,
                     t0: float, t1: float, mouth: np.ndarray | None = None) -> Frame:
        """Compose frame ``k`` from its decoded crop (renderer ``neural``) or by warping the
        photo (renderer ``warp``, ``crop`` None) to the mouth head's shape (or, without one,
        the smoothed AUs); blinks and head sway on top; advance the cursor."""
        au = self._feats[k][1]
        blink, pose = self._idle(k)
        if crop is not None:
            t2 = time.perf_counter()
            image = crop if self.crop_only else self._compose(crop, blink, pose)
        else:
            drive = self.face.warp.warper.au_for_mouth(mouth) if mouth is not None else smoothed_au(window_au)
            full = self.face.warp.render(drive, blink, pose=pose)
            t2 = time.perf_counter()
            crop = warp_to_crop(full, self.face.aligned.matrix)
            image = crop if self.crop_only else self._resize(full)
        t3 = time.perf_counter()
        self.times.decode.append(t2 - t1)
        self.times.paste.append(t3 - t2)
        self.times.step.append(t3 - t0)
        self._next_out += 1
        self.frames_out += 1
        self._forget_before(self._next_out)
        return Frame(index=k, image=image, crop=crop, au=au, mouth=mouth)

    def _keep(self, crop: np.ndarray) -> np.ndarray | None:
        """Where the photo's fine detail goes back onto the decoded face: 1 where the face is
        as the decoder makes it for silence, falling to 0 where it is ``KEEP_LEVELS`` grey
        levels darker or more (an open mouth: the photo's closed lips must not show through)."""
        if self.face.neutral is None:
            return None
        # Only darkening counts: the inside of an opening mouth is darker than the lips it
        # replaces, while a decoded face also shifts in brightness a little everywhere.
        luma = np.array([0.299, 0.587, 0.114], np.float32)
        d = np.maximum(self.face.neutral.astype(np.float32) @ luma - crop.astype(np.float32) @ luma, 0.0)
        d = cv2.GaussianBlur(d, (0, 0), 1.5)
        return np.clip(1.0 - d / KEEP_LEVELS, 0.0, 1.0)

    def _idle(self, k: int) -> tuple[float, tuple[float, float, float] | None]:
        """Blink and head pose of frame ``k`` (0 and None when the engine is not ``alive``)."""
        if self.idle is None:
            return 0.0, None
        h = self.face.warp.warper.face_height if self.face.warp is not None else \
            (self.face.motion.face_height if self.face.motion is not None else 0.0)
        return self.idle.blink(k), self.idle.pose(k, h)

    def skip(self, n: int = 1) -> int:
        """Drop the next ``n`` ready frames without rendering them (compute fell behind).
        Their features are still computed when later frames need them as context."""
        dropped = 0
        while dropped < n and self.is_ready():
            self._next_out += 1
            dropped += 1
        self.frames_dropped += dropped
        self._forget_before(self._next_out)
        return dropped

    def _compose(self, crop: np.ndarray, blink: float = 0.0, pose=None) -> np.ndarray:
        if self.face.gray:  # the decoder has only seen colour faces: it colours gray ones
            crop = to_gray_rgb(crop)
        image = paste_back(self.face.photo, crop, self.face.aligned.matrix, detail=self.face.detail,
                           keep=self._keep(crop))
        motion = self.face.motion
        if motion is not None and (blink or pose is not None):
            image = motion.warp_image(image, motion.points(np.zeros(5), blink, pose))
        return self._resize(image)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if self.output_size is None or tuple(self.output_size) == (image.shape[1], image.shape[0]):
            return image
        import cv2

        return cv2.resize(image, self.output_size, interpolation=cv2.INTER_AREA)


def _check_photo(photo) -> None:
    from avatar_stream.engine.face import FaceError

    if not isinstance(photo, np.ndarray) or photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        got = f"{photo.dtype} {photo.shape}" if isinstance(photo, np.ndarray) else type(photo).__name__
        raise FaceError(f"the photo must be an RGB uint8 (H, W, 3) array, got {got}: load it with read_image()")


def render_offline(engine: Engine, face: FaceContext | np.ndarray, audio: np.ndarray,
                   chunks: Iterable[int] | None = None, **stream_kw) -> list[Frame]:
    """Render a whole clip through the streaming loop. ``chunks`` gives chunk sizes (cycled);
    None pushes the audio in one piece."""
    check_audio(audio, tb.SAMPLE_RATE)
    stream = engine.create_stream(face, **stream_kw)
    frames: list[Frame] = []
    pos = 0
    sizes = list(chunks) if chunks is not None else [len(audio)]
    i = 0
    while pos < len(audio):
        n = sizes[i % len(sizes)]
        stream.accept_waveform(audio[pos : pos + n])
        pos += n
        i += 1
        while stream.is_ready():
            frames.append(stream.step())
    stream.input_finished()
    while stream.is_ready():
        frames.append(stream.step())
    return frames
