"""An always-on avatar: audio pushed whenever it comes, one frame and its audio every 40 ms.

A voice agent, a browser or any other live caller talks to :class:`LiveAvatar`::

    live = LiveAvatar(engine, photo, audio_rate=24000)
    live.push_audio(pcm16, 24000)        # whenever text-to-speech or a microphone has some
    live.end_segment()                   # the utterance is complete
    frame = live.next_frame()            # call 25 times a second (the caller paces)
    frame.image, frame.audio             # RGB uint8 and the int16 audio it shows
    live.clear()                         # barge-in: the avatar stops talking now

Time. The avatar keeps one continuous timeline at ``audio_rate``. Every tick takes the next
40 ms of pushed audio, or silence when none is waiting, and appends it to the session's
:class:`~avatar_stream.engine.stream.Stream`; the frame that comes out of the same tick is
the one whose audio was appended ``lead_ticks`` ticks earlier (the model's lookahead), and
that earlier audio is what the tick returns with it. Picture and sound are therefore in sync
by construction, the avatar idles (blinks, sways, mouth shut) whenever no speech is
waiting, and a frame's latency is its audio's wait in the queue plus ``lead_ticks`` ticks.

Barge-in (:meth:`LiveAvatar.clear`) drops the queue and replaces the audio already in the
pipeline with silence, in the stream too: the mouth closes with the sound instead of
mouthing the ``lead_ticks`` frames of speech the user cut off. The cut is recorded at once
and applied by the next tick, so a barge-in never edits a stream while it renders.

Jitter. Pushed audio rarely arrives in whole ticks (a browser sends 20 ms, a network frame
is what it is). A tick that finds less than 40 ms of an unfinished utterance waits one tick
for the rest (it plays silence, counted as an underrun) rather than playing the part with a
gap in it; if the rest has still not come, it plays what there is. An utterance's last
partial tick plays at once once ``end_segment`` says nothing more is coming.

Many sessions on one engine: :func:`render_ticks` advances each one tick with the model
calls batched (``step_many``). Nothing here sleeps or starts threads: pacing is the
caller's (aiortc's tracks, LiveKit's AV synchroniser, Pipecat's transport).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import AudioError, StreamResampler
from avatar_stream.engine.stream import Engine, FaceContext, Stream, step_many


@dataclass(frozen=True)
class LiveFrame:
    """One tick of a live avatar. ``audio``: int16 ``(audio_rate // 25, channels)``, the
    sound to play with ``image``. ``image`` is None for a tick rendered with
    ``render=False`` (the caller shows its previous frame again; the audio still plays)."""

    index: int
    image: np.ndarray | None
    audio: np.ndarray
    audio_rate: int
    speaking: bool  # the tick carries pushed audio (not padding silence)
    latency_s: float | None  # its first pushed sample's arrival -> this frame, None if silent
    segment_end: bool = False  # the last sample of an utterance plays in this tick
    interrupted: bool = False  # that utterance was cut off by clear()

    @property
    def pts(self) -> int:
        """Presentation time in samples at ``audio_rate``."""
        return self.index * self.audio.shape[0]

    @property
    def seconds(self) -> float:
        return self.index / tb.FPS


@dataclass
class _Chunk:
    """One tick's audio on its way from the queue to the speaker."""

    audio: np.ndarray  # float32 (n, channels)
    arrival: float | None  # arrival time of its first pushed sample
    speaking: bool
    segment_end: bool = False
    interrupted: bool = False


@dataclass
class LiveStats:
    frames: int = 0
    speaking_frames: int = 0
    rendered: int = 0
    skipped: int = 0  # ticks whose image was not rendered (the caller fell behind)
    segments: int = 0
    interruptions: int = 0
    underruns: int = 0  # ticks short of queued speech before its segment ended
    dropped_samples: int = 0  # queue overflow (max_queue_seconds)
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))


_END = object()  # segment marker in the queue


class LiveAvatar:
    """One live session: a face, a queue of pushed audio and the timeline described above.

    ``audio_rate`` and ``channels`` are those of the audio that comes back with each frame;
    pushed audio at any other rate or channel count is converted. ``audio_rate`` must be a
    multiple of 25 (16, 24, 44.1 and 48 kHz all are). ``max_queue_seconds`` bounds the
    queue for live input (a microphone whose clock runs a little fast would otherwise
    add latency forever): the oldest audio beyond it is dropped. None keeps everything
    (text-to-speech pushes whole sentences at once). ``clock`` is read for latencies.

    ``push_audio``, ``end_segment`` and ``clear`` may be called from any thread; ticks
    (``next_frame`` / ``render_ticks``) from one thread at a time.
    """

    def __init__(self, engine: Engine, face: FaceContext | np.ndarray, *, audio_rate: int = tb.SAMPLE_RATE,
                 channels: int = 1, output_size: tuple[int, int] | None = None,
                 max_queue_seconds: float | None = None, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if int(audio_rate) != audio_rate or audio_rate <= 0 or audio_rate % tb.FPS:
            raise AudioError(f"audio_rate {audio_rate} Hz: use a rate divisible by {tb.FPS} (16000, 24000, 48000)")
        if channels not in (1, 2):
            raise AudioError(f"channels {channels}: use 1 or 2")
        self.engine = engine
        self.audio_rate = int(audio_rate)
        self.channels = int(channels)
        self.tick_samples = self.audio_rate // tb.FPS
        self.max_queue_samples = None if max_queue_seconds is None else int(max_queue_seconds * self.audio_rate)
        self.clock = clock
        self.stream: Stream = engine.create_stream(face, output_size=output_size, seed=seed)
        self.stats = LiveStats()
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()  # (float32 (n, ch), arrival) or _END
        self._queued = 0  # samples in the queue
        self._resamplers: dict[int, list[StreamResampler]] = {}  # input rate -> one per channel
        self._in_segment = False  # pushed audio since the last segment end
        self._interrupted = False
        self._cut_pending = False  # clear() was called: silence the pipeline at the next tick
        self._held_ticks = 0  # consecutive ticks that waited for the rest of a partial tick
        self._pipeline: collections.deque[_Chunk] = collections.deque()  # appended, not yet shown
        self._index = 0
        self._last_image: np.ndarray | None = None
        while not self.stream.is_ready():  # fill the model's lookahead with silence
            self._append(_Chunk(np.zeros((self.tick_samples, self.channels), np.float32), None, False))
        self.lead_ticks = len(self._pipeline)

    # -- input (any thread) ------------------------------------------------------------------
    def push_audio(self, samples: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        """Queue speech: int16 (full scale 32768) or float (full scale 1.0) samples, either
        ``(n,)`` interleaved or ``(n, channels)``."""
        x = np.asarray(samples)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        elif x.dtype.kind == "f":
            x = x.astype(np.float32, copy=False)
        else:
            raise AudioError(f"push_audio: samples of type {x.dtype}; pass int16 PCM or float32")
        if x.ndim == 1:
            if x.size % channels:
                raise AudioError(f"push_audio: {x.size} interleaved samples is not a whole number of "
                                 f"{channels}-channel frames")
            x = x.reshape(-1, channels)
        elif x.ndim != 2 or x.shape[1] != channels:
            raise AudioError(f"push_audio: shape {x.shape} does not match channels={channels}")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise AudioError(f"push_audio: sample rate {sample_rate!r}; pass a positive integer in Hz")
        now = self.clock()
        with self._lock:
            x = self._convert(x, int(sample_rate))
            self._in_segment = True  # even if the converter holds all of it for now
            if not x.shape[0]:
                return
            self._queue.append((x, now))
            self._queued += x.shape[0]
            if self.max_queue_samples is not None:
                self._trim_queue()

    def end_segment(self) -> None:
        """The utterance pushed so far is complete: the frame that plays its last sample
        comes back with ``segment_end`` set (LiveKit's playback_finished, for instance).
        Audio still inside a rate converter (its last few milliseconds) is queued first."""
        with self._lock:
            self._flush_resamplers()
            if self._in_segment:
                self._queue.append(_END)
                self._in_segment = False

    def clear(self) -> None:
        """Barge-in: forget the queue, silence what is already in the pipeline (sound and
        mouth) from the next tick on, and end the current utterance as interrupted."""
        with self._lock:
            had_speech = self._queued > 0 or any(c.speaking for c in self._pipeline)
            open_segment = self._in_segment or any(item is _END for item in self._queue)
            self._queue.clear()
            self._queued = 0
            self._in_segment = False
            self._held_ticks = 0
            for rs in self._resamplers.values():
                rs.reset()
            self._resamplers.clear()
            self._cut_pending = True
            if had_speech or open_segment:
                self.stats.interruptions += 1
                self._interrupted = True

    def _apply_cut(self) -> None:
        """The tick thread's half of ``clear()``: silence the pipeline and the stream."""
        with self._lock:
            if not self._cut_pending:
                return
            self._cut_pending = False
            for c in self._pipeline:
                c.audio[:] = 0.0
                c.speaking = False
                c.arrival = None
                c.segment_end = False
        self.stream.silence_from(self.stream.next_frame * tb.SAMPLES_PER_FRAME)

    @property
    def queued_seconds(self) -> float:
        """Pushed audio not yet appended to the timeline."""
        return self._queued / self.audio_rate

    @property
    def buffered_seconds(self) -> float:
        """Pushed audio not yet played: the queue plus the speech in the pipeline."""
        with self._lock:
            inflight = 0 if self._cut_pending else sum(c.audio.shape[0] for c in self._pipeline if c.speaking)
            return (self._queued + inflight) / self.audio_rate

    @property
    def speaking(self) -> bool:
        with self._lock:
            return self._queued > 0 or (not self._cut_pending and any(c.speaking for c in self._pipeline))

    @property
    def size(self) -> tuple[int, int]:
        """Output (width, height)."""
        if self.stream.output_size is not None:
            return tuple(self.stream.output_size)
        h, w = self.stream.face.photo.shape[:2]
        return w, h

    def _convert(self, x: np.ndarray, rate: int) -> np.ndarray:
        if x.shape[1] != self.channels:
            mono = x.mean(axis=1, keepdims=True)
            x = np.repeat(mono, self.channels, axis=1)
        if self._resamplers and rate not in self._resamplers:
            self._flush_resamplers()  # the rate changed: the old signal ends here
        if rate == self.audio_rate:
            return np.ascontiguousarray(x)
        rss = self._resamplers.setdefault(
            rate, [StreamResampler(rate, self.audio_rate) for _ in range(self.channels)])
        return np.stack([rs.process(x[:, c]) for c, rs in enumerate(rss)], axis=1)

    def _flush_resamplers(self) -> None:
        """Queue what the rate converters still hold (lock held) and start them afresh."""
        for rss in self._resamplers.values():
            tail = np.stack([rs.flush() for rs in rss], axis=1)
            if tail.shape[0]:
                self._queue.append((tail, self.clock()))
                self._queued += tail.shape[0]
        self._resamplers.clear()

    def _trim_queue(self) -> None:
        while self._queued > self.max_queue_samples and self._queue:
            item = self._queue[0]
            if item is _END:
                self._queue.popleft()
                continue
            x, t = item
            drop = min(x.shape[0], self._queued - self.max_queue_samples)
            self.stats.dropped_samples += drop
            self._queued -= drop
            if drop == x.shape[0]:
                self._queue.popleft()
            else:
                self._queue[0] = (x[drop:], t)

    # -- ticks (one thread) -------------------------------------------------------------------
    def _take_tick(self) -> _Chunk:
        """The next 40 ms of the timeline: queued speech up to a segment end, else silence."""
        n = self.tick_samples
        out = np.zeros((n, self.channels), np.float32)
        got, arrival, ended = 0, None, False
        with self._lock:
            if 0 < self._queued < n and self._held_ticks < 1 and not any(i is _END for i in self._queue):
                self._held_ticks += 1  # wait one tick for the rest of this one
                self.stats.underruns += 1
                return _Chunk(out, None, False)
            self._held_ticks = 0
            while got < n and self._queue:
                item = self._queue[0]
                if item is _END:
                    self._queue.popleft()
                    ended = True
                    break
                x, t = item
                take = min(n - got, x.shape[0])
                out[got : got + take] = x[:take]
                arrival = t if arrival is None else arrival
                got += take
                self._queued -= take
                if take == x.shape[0]:
                    self._queue.popleft()
                else:
                    self._queue[0] = (x[take:], t)
            if not ended and self._queue and self._queue[0] is _END:
                self._queue.popleft()
                ended = True
            chunk = _Chunk(out, arrival, got > 0, segment_end=ended)
            if ended and not got and self._pipeline:
                # The segment's last sample is already in the pipeline: mark that tick.
                self._pipeline[-1].segment_end = True
                chunk.segment_end = False
            if ended:
                self.stats.segments += 1
        return chunk

    def _append(self, chunk: _Chunk) -> None:
        with self._lock:
            self._pipeline.append(chunk)
        self.stream.accept_waveform(chunk.audio.mean(axis=1), self.audio_rate)

    def _advance(self) -> None:
        self._apply_cut()
        self._append(self._take_tick())

    def _emit(self, image: np.ndarray | None) -> LiveFrame:
        with self._lock:
            chunk = self._pipeline.popleft()
            interrupted = False
            if self._interrupted and not any(c.speaking for c in self._pipeline):
                interrupted, self._interrupted = True, False
        latency = None if chunk.arrival is None else self.clock() - chunk.arrival
        st = self.stats
        st.frames += 1
        if image is None:
            st.skipped += 1
        else:
            st.rendered += 1
            self._last_image = image
        if chunk.speaking:
            st.speaking_frames += 1
            st.latencies.append(latency)
        # The inverse of push_audio's x / 32768: int16 audio comes back bit for bit.
        pcm = np.clip(np.round(chunk.audio * 32768.0), -32768, 32767).astype(np.int16)
        frame = LiveFrame(index=self._index, image=image, audio=pcm, audio_rate=self.audio_rate,
                          speaking=chunk.speaking, latency_s=latency,
                          segment_end=chunk.segment_end or interrupted, interrupted=interrupted)
        self._index += 1
        return frame

    def next_frame(self, render: bool = True) -> LiveFrame:
        """Advance one tick. ``render=False``: keep the timeline and the sound going but do
        not draw the picture (the caller is behind real time and shows its last image)."""
        self._advance()
        if render:
            return self._emit(self.stream.step().image)
        self.stream.skip(1)
        return self._emit(None)

    @property
    def last_image(self) -> np.ndarray:
        """The latest rendered picture (the photo itself before the first)."""
        return self._last_image if self._last_image is not None else self.stream.face.photo


def render_ticks(lives: list[LiveAvatar], render: list[bool] | None = None) -> list[LiveFrame]:
    """Advance every session one tick, the model calls of those rendered batched into one
    (``step_many``; all sessions must share one Engine)."""
    render = [True] * len(lives) if render is None else list(render)
    for live in lives:
        live._advance()
    drawn = [live for live, r in zip(lives, render, strict=True) if r]
    frames = dict(zip(map(id, drawn), step_many([live.stream for live in drawn]), strict=True))
    out = []
    for live, r in zip(lives, render, strict=True):
        if r:
            out.append(live._emit(frames[id(live)].image))
        else:
            live.stream.skip(1)
            out.append(live._emit(None))
    return out
