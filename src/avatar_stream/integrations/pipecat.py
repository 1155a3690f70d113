"""Pipecat service: a live avatar (engine/live.py) between text-to-speech and the transport.

Install with ``pip install 'avatar-stream[pipecat]'``. The service goes right after the TTS
service and before ``transport.output()``::

    avatar = AvatarStreamVideoService(photo="me.jpg", output_size=(512, 512))
    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts, avatar,
                         transport.output(), assistant_aggregator])

with the transport's video on, live, at 25 fps and the avatar's size
(``video_out_enabled=True, video_out_is_live=True, video_out_framerate=25,
video_out_width=512, video_out_height=512``).

What flows. ``TTSAudioRawFrame`` s are swallowed: their audio goes into the avatar's queue.
Every 40 ms the service pushes one ``OutputImageRawFrame`` (RGB) and the 40 ms of audio that
plays with it: a ``TTSAudioRawFrame`` when the tick carries speech (so the transport's
bot-speaking logic works as without an avatar), a plain ``OutputAudioRawFrame`` of silence
when the avatar idles (blinks, sways, mouth shut). Speech leaves ``lead_ticks`` ticks (the
model's lookahead) after it arrives, picture and sound together.

Order. Every other downstream frame that is not a system frame (``TTSStartedFrame``,
``TTSTextFrame``, ``TTSStoppedFrame``, ...) is held until the audio that arrived before it
has left, then pushed right after the tick that carries that audio's last sample, so the
transport sees the same sequence as without an avatar. ``TTSStoppedFrame`` also ends the
avatar's utterance. System frames and upstream frames pass straight through.

Barge-in. ``InterruptionFrame`` drops the queued speech and silences what is already in the
model's pipeline (sound and mouth) before it goes downstream; held frames that are
interruptible are dropped with it, as Pipecat drops queued frames. Speech from an
uninterruptible TTS context keeps playing.

Pacing. The service owns a 25 fps clock, ``ahead_ticks`` ticks ahead of the wall clock: that
much audio and video waits in the transport, a cushion against a late tick. It starts when
the output transport says it is ready (``OutputTransportReadyFrame``), or at ``StartFrame``
with ``wait_for_transport=False`` (no transport, e.g. a recorder). ``EndFrame`` waits until
all pushed speech has left. Ticks run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    OutputTransportReadyFrame,
    StartFrame,
    SystemFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import AudioError, StreamResampler
from avatar_stream.engine.live import LiveAvatar, LiveFrame
from avatar_stream.engine.stream import Engine, FaceContext
from avatar_stream.integrations.stats import AvatarStats

FPS = tb.FPS
TICK_S = 1.0 / FPS
# Behind the clock by more than this, a tick skips its picture (the previous one goes out
# again, the sound is kept) until the clock has caught up.
SKIP_AFTER_S = TICK_S
# Behind by more than this, the transport has already run dry: catching up would only queue
# the gap as extra latency, so the clock re-anchors (with ``ahead_ticks`` again) instead.
STALL_RESET_S = 3 * TICK_S


@dataclass
class _Held:
    """A downstream frame waiting for the audio pushed before it (``mark`` samples in all) to
    leave; ``due``: the tick count at which that audio's last sample has left, once known. A
    ``frame`` of None marks the end of uninterruptible speech and pushes nothing."""

    frame: Frame | None
    mark: int
    due: int | None = None


class AvatarStreamVideoService(AIService):
    """Talking-head video for a Pipecat bot: TTS audio in, RGB video and re-timed audio out.

    ``engine``: a shared :class:`~avatar_stream.engine.stream.Engine` (None: the bundled
    starter model, loaded in ``setup``). ``photo``: a path, an RGB uint8 array or a face the
    engine prepared (None: the bundled photo). ``output_size``: (width, height) of the video
    (None: the photo's own framing; read :attr:`size` after setup). ``audio_rate`` /
    ``audio_channels``: of the audio pushed downstream (None: the pipeline's output rate);
    TTS audio at any other rate or channel count is converted. ``idle_audio``: push silence
    with the idle ticks (keeps the transport's audio cushion between utterances); False sends
    idle pictures only. ``ahead_ticks`` and ``wait_for_transport``: see the module docstring.
    """

    def __init__(self, *, engine: Engine | None = None,
                 photo: str | Path | np.ndarray | FaceContext | None = None,
                 output_size: tuple[int, int] | None = None, audio_rate: int | None = None,
                 audio_channels: int = 1, idle_audio: bool = True, ahead_ticks: int = 2,
                 wait_for_transport: bool = True, **kwargs: Any) -> None:
        super().__init__(settings=ServiceSettings(model="avatar-stream"), **kwargs)
        if isinstance(photo, FaceContext) and engine is None:
            raise ValueError("a prepared FaceContext belongs to its engine: pass engine= too")
        if int(ahead_ticks) != ahead_ticks or ahead_ticks < 0:
            raise ValueError(f"ahead_ticks={ahead_ticks!r}: use a whole number of ticks >= 0")
        if isinstance(photo, (str, Path)) or photo is None:
            from avatar_stream import DEMO_FACE
            from avatar_stream.engine.image_io import read_image

            photo = read_image(DEMO_FACE if photo is None else photo)  # a bad path fails here
        self._engine = engine
        self._photo = photo
        self._output_size = output_size
        self._audio_rate = audio_rate
        self._audio_channels = audio_channels
        self._idle_audio = bool(idle_audio)
        self._ahead_ticks = int(ahead_ticks)
        self._wait_for_transport = bool(wait_for_transport)
        self._live: LiveAvatar | None = None
        self._stats = AvatarStats()
        # Whoever pushes downstream (a tick's frames, held frames, an interruption) does it
        # under this lock, so frames leave in the order decided. Rendering runs outside it.
        self._lock = asyncio.Lock()
        # Held while a tick renders: a barge-in lands between two ticks, so the tick rendered
        # across it is known (``_clears``) and silenced as a whole.
        self._render_lock = asyncio.Lock()
        self._clears = 0  # interruptions so far: a tick rendered across one is silenced
        self._clock_task: asyncio.Task | None = None
        self._failed = False
        self._drained = asyncio.Event()  # nothing held and no speech left to push
        self._pushed = 0  # samples (at the output rate) ever queued in the avatar
        self._taken = 0  # of those, taken into the model's pipeline by a tick
        self._emitted = 0  # ticks pushed downstream
        self._last_due = 0  # the tick count at which the last sample taken so far has left
        self._held: collections.deque[_Held] = collections.deque()
        # TTS audio short of a whole tick, held back until more comes or the utterance ends:
        # the avatar pads a tick it cannot fill with silence, which would cut a gap into
        # speech whose next chunk is just a few milliseconds away.
        self._partial = np.zeros((0, audio_channels), np.float32)
        self._in_rate: int | None = None  # of the TTS audio now coming in
        self._resamplers: list[StreamResampler] = []  # one per channel, when that rate differs
        self._image: OutputImageRawFrame | None = None
        self._context_id: str | None = None  # of the TTS context now playing
        self._destination: str | None = None  # the TTS audio's transport destination
        self._was_speaking = False

    # -- public ------------------------------------------------------------------------------
    @property
    def live(self) -> LiveAvatar | None:
        """The session (None before setup)."""
        return self._live

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) of the video: known after setup, or given as ``output_size``."""
        return self._live.size if self._live is not None else self._output_size

    @property
    def stats(self) -> AvatarStats:
        return self._stats

    def can_generate_metrics(self) -> bool:
        """TTFB metrics: each utterance's first audio in -> its first frame out."""
        return True

    # -- lifecycle ---------------------------------------------------------------------------
    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        if self._live is None:
            rate = self._audio_rate or setup.audio_out_sample_rate
            self._live = await asyncio.to_thread(self._create_live, rate)
            self._stats.lead_ticks = self._live.lead_ticks

    def _create_live(self, rate: int) -> LiveAvatar:
        engine = self._engine if self._engine is not None else Engine()
        face = self._photo if isinstance(self._photo, FaceContext) else engine.prepare_face(
            self._photo, output_size=self._output_size)
        engine.warm_up(face)
        return LiveAvatar(engine, face, audio_rate=rate, channels=self._audio_channels,
                          output_size=self._output_size)

    async def stop(self, frame: EndFrame):
        """Flush: the speech pushed so far leaves before ``EndFrame`` goes downstream."""
        await super().stop(frame)
        if self._live is not None and not self._failed:
            self._end_utterance()
            if self._live.speaking or self._held:  # a tick may have found it drained before
                self._drained.clear()
        if self._clock_task is not None:
            await self._drained.wait()
        await self._stop_clock()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        self._held.clear()
        await self._stop_clock()

    async def cleanup(self):
        await super().cleanup()
        await self._stop_clock()

    def _start_clock(self) -> None:
        if self._clock_task is None and self._live is not None and not self._failed:
            self._clock_task = self.create_task(self._run_clock(), name="avatar_clock")

    async def _stop_clock(self) -> None:
        self._drained.set()
        if self._clock_task is not None:
            task, self._clock_task = self._clock_task, None
            await self.cancel_task(task)

    # -- frames ------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            if not self._wait_for_transport:
                self._start_clock()
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self.push_frame(frame, direction)
        elif direction == FrameDirection.UPSTREAM:
            if isinstance(frame, OutputTransportReadyFrame):
                self._start_clock()
            await self.push_frame(frame, direction)
        elif self._live is None or self._failed:
            await self.push_frame(frame, direction)  # no avatar: the bot still talks
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt(frame)
        elif isinstance(frame, TTSAudioRawFrame):
            await self._push_audio(frame)
        elif isinstance(frame, SystemFrame):
            await self.push_frame(frame, direction)
        else:
            if isinstance(frame, TTSStoppedFrame):
                self._end_utterance()
            await self._push_in_order(frame)

    async def _push_audio(self, frame: TTSAudioRawFrame) -> None:
        # No lock: the bookkeeping here has no await in it, so a tick (which reads it on the
        # event loop too) sees it all or none of it; TTS audio never waits for a render.
        self._destination = frame.transport_destination
        try:
            self._convert(frame)
        except AudioError as e:
            await self.push_error(error_msg=f"{self}: TTS audio not taken: {e}", exception=e)
            return
        self._feed(flush=False)
        if not frame.interruptible:
            # Track where uninterruptible speech ends: one marker, moved along.
            if self._held and self._held[-1].frame is None:
                self._held[-1].mark, self._held[-1].due = self._mark(), None
            else:
                self._held.append(_Held(None, self._mark()))
        self._drained.clear()

    def _end_utterance(self) -> None:
        self._flush_resamplers()
        self._feed(flush=True)
        self._live.end_segment()

    def _convert(self, frame: TTSAudioRawFrame) -> None:
        """TTS audio -> float32 at the avatar's rate and channel count, appended to the audio
        held back. The rate is converted here rather than in the avatar so that the samples
        are counted exactly and the resampler's tail can be flushed when the utterance ends."""
        live, rate, channels = self._live, frame.sample_rate, frame.num_channels
        pcm = np.frombuffer(frame.audio, dtype=np.int16)
        if channels < 1 or pcm.size % channels or rate <= 0:
            raise AudioError(f"{len(frame.audio)} bytes is no whole number of {channels}-channel "
                             f"16-bit frames at {rate} Hz")
        x = pcm.reshape(-1, channels).astype(np.float32) / 32768.0
        if channels != live.channels:
            x = np.repeat(x.mean(axis=1, keepdims=True), live.channels, axis=1)
        if rate != self._in_rate:
            self._flush_resamplers()
            self._in_rate = rate
            if rate != live.audio_rate:
                self._resamplers = [StreamResampler(rate, live.audio_rate) for _ in range(live.channels)]
        if self._resamplers:
            x = np.stack([rs.process(x[:, c]) for c, rs in enumerate(self._resamplers)], axis=1)
        self._partial = np.concatenate([self._partial, x])

    def _flush_resamplers(self) -> None:
        if self._resamplers:
            tail = np.stack([rs.flush() for rs in self._resamplers], axis=1)
            self._partial = np.concatenate([self._partial, tail])
        self._resamplers, self._in_rate = [], None

    def _feed(self, flush: bool) -> None:
        """Queue the held-back audio in the avatar: its whole ticks, or all of it."""
        live = self._live
        n = len(self._partial) if flush else len(self._partial) // live.tick_samples * live.tick_samples
        if n:
            live.push_audio(self._partial[:n], live.audio_rate, live.channels)
            self._partial = self._partial[n:]
            self._pushed += n

    def _mark(self) -> int:
        """Samples (at the output rate) pushed so far, the held-back ones included."""
        return self._pushed + len(self._partial)

    async def _push_in_order(self, frame: Frame) -> None:
        async with self._lock:
            self._held.append(_Held(frame, self._mark()))
            self._resolve_dues()
            await self._release_due()
            if self._held:
                self._drained.clear()

    async def _interrupt(self, frame: InterruptionFrame) -> None:
        async with self._lock:
            self._held = collections.deque(
                h for h in self._held if h.frame is None or not h.frame.interruptible)
            # Uninterruptible speech still to play keeps playing, and so does its avatar;
            # otherwise nothing is left to wait for.
            if not any(h.frame is None for h in self._held):
                if self._live.speaking or len(self._partial):
                    self._stats.interruptions += 1
                self._partial = self._partial[:0]
                self._resamplers, self._in_rate = [], None
                async with self._render_lock:
                    self._live.clear()
                self._clears += 1
                self._taken, self._last_due = self._pushed, self._emitted
                for h in self._held:
                    h.due = self._emitted
            await self.push_frame(frame)
            await self._release_due()

    def _resolve_dues(self) -> None:
        """Held frames whose audio has all been taken leave with the tick that took its last
        sample (``lead_ticks`` after it was taken)."""
        for h in self._held:
            if h.due is None and h.mark <= self._taken:
                h.due = self._last_due

    async def _release_due(self) -> None:
        while self._held and self._held[0].due is not None and self._held[0].due <= self._emitted:
            h = self._held.popleft()
            if isinstance(h.frame, TTSStartedFrame):
                self._context_id = h.frame.context_id
            if h.frame is not None:
                await self.push_frame(h.frame)

    # -- the clock ---------------------------------------------------------------------------
    async def _run_clock(self) -> None:
        anchor, k = time.monotonic(), 0  # tick k is due on the wall clock at anchor + k * TICK_S
        try:
            while True:
                lead = anchor + k * TICK_S - time.monotonic()  # > 0: early
                if lead > self._ahead_ticks * TICK_S:
                    await asyncio.sleep(lead - self._ahead_ticks * TICK_S)
                elif lead < -STALL_RESET_S:
                    self._stats.stalls += 1
                    anchor, k, lead = time.monotonic(), 0, 0.0
                await self._tick(render=lead >= -SKIP_AFTER_S or self._image is None)
                k += 1
        except Exception as e:  # a broken tick must not end the pipeline: the bot keeps its voice
            self._failed = True
            await self.push_error(error_msg=f"{self}: the avatar stopped: {e}", exception=e)
            async with self._lock:
                held, self._held = self._held, collections.deque()
                for h in held:
                    if h.frame is not None:
                        await self.push_frame(h.frame)
            self._drained.set()

    def _step(self, render: bool) -> tuple[LiveFrame, float, float]:
        """One tick (worker thread): the frame, when it left the avatar, its compute time."""
        t0 = time.monotonic()
        frame = self._live.next_frame(render=render)
        t1 = time.monotonic()
        return frame, t1, t1 - t0

    async def _tick(self, render: bool) -> None:
        clears = self._clears
        async with self._render_lock:
            frame, t_out, step_s = await asyncio.to_thread(self._step, render)
        async with self._lock:
            if clears != self._clears:  # interrupted while rendering: none of its speech plays
                frame = dataclasses.replace(frame, audio=np.zeros_like(frame.audio), speaking=False,
                                            latency_s=None, segment_end=False)
            await self._account(frame, t_out, step_s)

    async def _account(self, frame: LiveFrame, t_out: float, step_s: float) -> None:
        """Push a tick's frames, then whatever was waiting for them; count it."""
        live, st = self._live, self._stats
        # Only ticks consume the queue, and none runs now: what left it was taken by them.
        taken = self._pushed - round(live.queued_seconds * live.audio_rate)
        if taken > self._taken:  # this tick took new samples: they leave lead_ticks from now
            self._taken, self._last_due = taken, self._emitted + 1 + live.lead_ticks
        uninterruptible = any(h.frame is None for h in self._held)
        await self._push_tick(frame, uninterruptible)
        self._emitted += 1
        st.frames += 1
        st.step_s.append(step_s)
        if frame.image is None:
            st.skipped += 1
        else:
            st.rendered += 1
        if frame.speaking:
            latency = frame.latency_s + (time.monotonic() - t_out)
            st.speaking_frames += 1
            st.latency_s.append(latency)
            if not self._was_speaking:
                st.onset_latency_s.append(latency)
                end = time.time()
                await self.start_ttfb_metrics(start_time=end - latency)
                await self.stop_ttfb_metrics(end_time=end)
            if frame.segment_end and not frame.interrupted:
                st.segments += 1
        self._was_speaking = frame.speaking and not frame.segment_end
        self._resolve_dues()
        await self._release_due()
        if not self._held and not live.speaking:
            self._drained.set()

    async def _push_tick(self, frame: LiveFrame, uninterruptible: bool) -> None:
        if frame.image is not None:
            h, w = frame.image.shape[:2]
            image = OutputImageRawFrame(image=frame.image.tobytes(), size=(w, h), format="RGB")
        else:  # behind the clock: the previous picture again
            image = OutputImageRawFrame(image=self._image.image, size=self._image.size, format="RGB")
        self._image = image
        image.transport_destination = self._destination
        image.interruptible = not uninterruptible
        await self.push_frame(image)
        if not (frame.speaking or self._idle_audio):
            return
        pcm, (_, channels) = frame.audio.tobytes(), frame.audio.shape
        if frame.speaking:
            audio = TTSAudioRawFrame(pcm, frame.audio_rate, channels, context_id=self._context_id)
        else:
            audio = OutputAudioRawFrame(pcm, frame.audio_rate, channels)
        audio.transport_destination = self._destination
        audio.interruptible = not uninterruptible
        await self.push_frame(audio)
