"""LiveKit Agents avatar plugin: a live avatar (engine/live.py) as LiveKit's ``VideoGenerator``.

Install with ``pip install 'avatar-stream[livekit]'``. Three ways in, all on LiveKit's own
avatar classes (``livekit.agents.voice.avatar``):

In-process, the agent's own process renders and publishes the avatar::

    gen = AvatarVideoGenerator.create(engine, photo)          # blocking (about 1 s): load first
    avatar = LocalAvatar(gen)
    await avatar.start(session, ctx.room)                     # before session.start(...)
    await session.start(agent=..., room=ctx.room)

Remote workers, scaled across machines by LiveKit's agent dispatch. Each avatar machine runs
``avatar_server()`` (an ``AgentServer`` registered under ``agent_name="avatar-stream"``); the
agent asks LiveKit for one with::

    avatar = RemoteAvatar()                                   # a livekit AvatarSession
    await avatar.start(session, ctx.room)                     # dispatch + DataStreamAudioOutput

and the dispatched worker joins the room, receives the agent's audio over the data-stream
protocol (topic ``lk.audio_stream``, RPCs ``lk.clear_buffer`` / ``lk.playback_finished`` /
``lk.playback_started``) and publishes the avatar's video and audio (``run_avatar_worker``).

Bare: :class:`AvatarVideoGenerator` is a ``VideoGenerator`` for any ``AvatarRunner``.

Timing. The generator emits one tick every 40 ms: an ``rtc.VideoFrame`` (RGB24), then, when
the tick carries pushed speech, the ``rtc.AudioFrame`` that plays with it, then an
``AudioSegmentEnd`` when the utterance's last sample was in that tick. Ticks without speech
(idle: blinks and sway, mouth shut) carry video only, so ``AvatarRunner``'s playback
position and ``playback_started`` count the agent's audio and nothing else. Speech shows up
``LiveAvatar.lead_ticks`` ticks after it is pushed (the model's lookahead), its picture and
sound together. The generator computes a tick only when its consumer asks for the next one
(``AvatarRunner`` asks as fast as its ``AVSynchronizer`` queues take them, about 100 ms
ahead), and with ``realtime=True`` it also never runs more than ``max_ahead_ticks`` ahead of
the wall clock, so it cannot race ahead of playback whoever drives it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit import api, rtc
from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobProcess, JobRequest, get_job_context
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    AvatarSession,
    DataStreamAudioOutput,
    DataStreamAudioReceiver,
    QueueAudioOutput,
    VideoGenerator,
)

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.live import LiveAvatar, LiveFrame
from avatar_stream.engine.stream import Engine, FaceContext
from avatar_stream.integrations.stats import AvatarStats

if TYPE_CHECKING:
    from livekit.agents import AgentSession

logger = logging.getLogger("avatar_stream.livekit")

FPS = tb.FPS
TICK_S = 1.0 / FPS
# The name avatar workers register under for LiveKit's explicit agent dispatch.
DEFAULT_AGENT_NAME = "avatar-stream"
DEFAULT_AUDIO_RATE = 24000  # what most TTS engines produce; LiveKit resamples others


def _video_frame(image: np.ndarray) -> rtc.VideoFrame:
    h, w = image.shape[:2]
    return rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, np.ascontiguousarray(image).tobytes())


def _audio_frame(frame: LiveFrame) -> rtc.AudioFrame:
    n, ch = frame.audio.shape
    return rtc.AudioFrame(frame.audio.tobytes(), frame.audio_rate, ch, n)


def _to_rgb_photo(photo: np.ndarray | str | Path) -> np.ndarray:
    if isinstance(photo, (str, Path)):
        from avatar_stream.engine.image_io import read_image

        return read_image(photo)
    return photo


class AvatarVideoGenerator(VideoGenerator):
    """A :class:`~avatar_stream.engine.live.LiveAvatar` as LiveKit's ``VideoGenerator``.

    ``push_audio`` takes the ``rtc.AudioFrame`` s (int16 PCM, any rate and channel count:
    the avatar converts) and ``AudioSegmentEnd`` markers an ``AudioReceiver`` yields;
    ``clear_buffer`` is barge-in; iterating yields ``rtc.VideoFrame``, ``rtc.AudioFrame`` and
    ``AudioSegmentEnd`` as described in the module docstring, idle frames while nothing is
    pushed, until :meth:`aclose`.

    ``realtime``: pace to the wall clock (at most ``max_ahead_ticks`` ticks early). Behind it
    by more than ``skip_after_s`` (the CPU cannot keep up) the picture of a tick is skipped,
    the previous one sent again and its sound kept, until it has caught up; behind by more
    than ``stall_reset_s`` (its consumer stopped pulling, e.g. while ``AvatarRunner``
    publishes its tracks) it re-anchors its clock instead of catching up. A consumer that
    holds the generator back (a full queue) paces it and never counts as being behind.
    ``realtime=False``: as fast as the consumer pulls, every picture drawn (offline use, tests).

    Ticks run in ``executor`` (None: the event loop's default one), never on the loop.
    """

    def __init__(self, live: LiveAvatar, *, realtime: bool = True, max_ahead_ticks: int = 4,
                 skip_after_s: float = 0.12, stall_reset_s: float = 1.0, executor=None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_ahead_ticks < 0:
            raise ValueError("max_ahead_ticks must be >= 0")
        self.live = live
        self.realtime = realtime
        self.max_ahead_ticks = int(max_ahead_ticks)
        self.skip_after_s = float(skip_after_s)
        self.stall_reset_s = float(stall_reset_s)
        self._executor = executor
        self._clock = clock
        self._stats = AvatarStats(lead_ticks=live.lead_ticks)
        self._av_sync: rtc.AVSynchronizer | None = None
        self._clears = 0  # clear_buffer calls so far: a tick computed across one is discarded
        self._closed = False
        self._iterating = False
        self._last_video: rtc.VideoFrame | None = None

    @classmethod
    def create(cls, engine: Engine | None = None, photo: np.ndarray | str | Path | FaceContext | None = None, *,
               audio_rate: int = DEFAULT_AUDIO_RATE, channels: int = 1,
               output_size: tuple[int, int] | None = None, max_queue_seconds: float | None = None,
               **kwargs: Any) -> AvatarVideoGenerator:
        """Engine (None: the bundled starter model) + photo (array, path or prepared face;
        None: the bundled photo) -> a warmed-up generator. Blocking (about 1.5 s with the engine,
        0.2 s without, for a 512 px photo): from async code, call it through ``asyncio.to_thread``."""
        if engine is None:
            engine = Engine()
        if photo is None:
            from avatar_stream import DEMO_FACE

            photo = DEMO_FACE
        face = photo if isinstance(photo, FaceContext) else engine.prepare_face(
            _to_rgb_photo(photo), output_size=output_size)
        engine.warm_up(face)
        live = LiveAvatar(engine, face, audio_rate=audio_rate, channels=channels, output_size=output_size,
                          max_queue_seconds=max_queue_seconds)
        return cls(live, **kwargs)

    # -- what AvatarRunner needs ------------------------------------------------------------
    @property
    def options(self) -> AvatarOptions:
        """The ``AvatarOptions`` matching this generator's frames."""
        w, h = self.live.size
        return AvatarOptions(video_width=int(w), video_height=int(h), video_fps=float(FPS),
                             audio_sample_rate=self.live.audio_rate, audio_channels=self.live.channels)

    def set_av_sync(self, av_sync: rtc.AVSynchronizer | None) -> None:
        """Give the runner's synchroniser (``runner.av_sync``): ``clear_buffer`` then also
        drops the audio and video already queued there (up to about 100 ms)."""
        self._av_sync = av_sync

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self.live.end_segment()
            return
        pcm = np.frombuffer(frame.data, dtype=np.int16)
        self.live.push_audio(pcm, frame.sample_rate, frame.num_channels)

    async def clear_buffer(self) -> None:
        """Barge-in: the queued speech is dropped and the speech already in the pipeline
        silenced (sound and mouth), from the next tick on. No ``AudioSegmentEnd`` follows for
        the cut utterance: ``AvatarRunner`` reports it itself as ``playback_finished`` with
        ``interrupted=True`` when it calls this, and a late marker would end the next one."""
        self._clears += 1
        had_speech = self.live.speaking
        self.live.clear()
        if had_speech:
            self._stats.interruptions += 1
        if self._av_sync is not None:
            await self._av_sync.clear_queue()

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._run()

    async def aclose(self) -> None:
        """End the iteration (after the tick in progress)."""
        self._closed = True

    # -- statistics ----------------------------------------------------------------------------
    @property
    def stats(self) -> AvatarStats:
        return self._stats

    @property
    def lead_ticks(self) -> int:
        return self.live.lead_ticks

    # -- the tick loop --------------------------------------------------------------------------
    def _step(self, render: bool) -> tuple[LiveFrame, rtc.VideoFrame | None, float]:
        t0 = time.perf_counter()
        frame = self.live.next_frame(render=render)
        video = None if frame.image is None else _video_frame(frame.image)
        return frame, video, time.perf_counter() - t0

    async def _run(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        if self._iterating:  # two loops would tick one timeline twice as fast
            raise RuntimeError("AvatarVideoGenerator is already being iterated")
        self._iterating = True
        try:
            async for item in self._ticks():
                yield item
        finally:
            self._iterating = False

    async def _ticks(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        loop = asyncio.get_running_loop()
        clock, st = self._clock, self._stats
        due: float | None = None  # when the next tick is due on the wall clock
        was_speaking = False
        while not self._closed:
            now = clock()
            due = now if due is None else due
            render = True
            if self.realtime:
                early = due - self.max_ahead_ticks * TICK_S - now
                if early > 0:
                    await asyncio.sleep(early)
                    now = clock()
                if now - due > self.stall_reset_s:
                    st.stalls += 1
                    due = now
                render = now - due <= self.skip_after_s
            render = render or self._last_video is None
            clears = self._clears
            frame, video, step_s = await loop.run_in_executor(self._executor, self._step, render)
            st.step_s.append(step_s)
            st.frames += 1
            if video is None:
                st.skipped += 1
                video = self._last_video
            else:
                st.rendered += 1
                self._last_video = video
            yield_start = clock()
            yield video
            # A clear_buffer since the tick began: the runner has already reported the
            # utterance interrupted, so nothing of it may play or end after that.
            if frame.speaking and clears == self._clears:
                st.speaking_frames += 1
                if frame.latency_s is not None:
                    latency = frame.latency_s + (clock() - yield_start)
                    st.latency_s.append(latency)
                    if not was_speaking:
                        st.onset_latency_s.append(latency)
                was_speaking = True
                yield _audio_frame(frame)
            else:
                was_speaking = False
            if frame.segment_end and not frame.interrupted and clears == self._clears:
                st.segments += 1
                yield AudioSegmentEnd()
            resumed = clock()
            # Held back by the consumer (its queue was full): it paces us, we are on time.
            held = resumed - yield_start > 0.005
            due = max(due + TICK_S, resumed) if held else due + TICK_S


class LocalAvatar:
    """The avatar in the agent's own process: ``QueueAudioOutput`` -> ``AvatarRunner`` ->
    this package's generator -> the agent's room (published by the agent's participant).

    Call :meth:`start` after ``ctx.connect()`` and before ``session.start(...)``, so the
    session sends its speech here instead of publishing its own audio track."""

    def __init__(self, generator: AvatarVideoGenerator) -> None:
        self.generator = generator
        self.audio_output: QueueAudioOutput | None = None
        self.runner: AvatarRunner | None = None

    async def start(self, agent_session: AgentSession, room: rtc.Room) -> None:
        gen = self.generator
        self.audio_output = QueueAudioOutput(sample_rate=gen.live.audio_rate)
        self.runner = AvatarRunner(room, audio_recv=self.audio_output, video_gen=gen, options=gen.options)
        gen.set_av_sync(self.runner.av_sync)
        await self.runner.start()
        if agent_session.output.audio is None:
            agent_session.output.audio = self.audio_output
        else:  # already started: swap the sink under the session's wrappers
            agent_session.output.replace_audio_tail(self.audio_output)
        job = get_job_context(required=False)
        if job is not None:
            job.add_shutdown_callback(self.aclose)

    async def aclose(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.aclose()
        await self.generator.aclose()


async def run_avatar_worker(room: rtc.Room, generator: AvatarVideoGenerator, *,
                            sender_identity: str | None = None, frame_size_ms: int = 40) -> None:
    """What a remote avatar worker runs once it is in the room: ``DataStreamAudioReceiver``
    (the agent's audio on topic ``lk.audio_stream``, ``lk.clear_buffer`` RPC in,
    ``lk.playback_started`` / ``lk.playback_finished`` RPCs out) -> ``generator`` ->
    ``AvatarRunner`` (publishes the avatar's video and audio). ``sender_identity``: the
    agent's participant (None: the first agent participant). Returns when that participant
    leaves, the room disconnects or the runner stops."""
    receiver = DataStreamAudioReceiver(room, sender_identity=sender_identity, frame_size_ms=frame_size_ms)
    runner = AvatarRunner(room, audio_recv=receiver, video_gen=generator, options=generator.options)
    generator.set_av_sync(runner.av_sync)
    stop = asyncio.Event()

    def on_participant_disconnected(p: rtc.RemoteParticipant) -> None:
        if p.identity == sender_identity or (
                sender_identity is None and p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT):
            logger.info("agent %s left, stopping the avatar", p.identity)
            stop.set()

    def on_disconnected(*_: Any) -> None:
        stop.set()

    room.on("participant_disconnected", on_participant_disconnected)
    room.on("disconnected", on_disconnected)
    tasks: list[asyncio.Task] = []
    started = False
    try:
        await runner.start()  # waits for the agent to be in the room
        started = True
        tasks = [asyncio.create_task(runner.wait_for_complete()), asyncio.create_task(stop.wait())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        room.off("participant_disconnected", on_participant_disconnected)
        room.off("disconnected", on_disconnected)
        if started:
            await runner.aclose()
        else:  # AvatarRunner.aclose needs a started runner: close what it made
            await receiver.aclose()
            await runner.av_sync.aclose()
        await generator.aclose()
        logger.info("avatar stats: %s", generator.stats.summary())


# -- remote workers on LiveKit's agent dispatch -----------------------------------------------
def dispatch_metadata(agent_identity: str, avatar_identity: str, face: str | None = None) -> str:
    """The job metadata an agent sends with its dispatch request (JSON)."""
    meta = {"agent_identity": agent_identity, "avatar_identity": avatar_identity}
    if face is not None:
        meta["face"] = face
    return json.dumps(meta)


def parse_dispatch_metadata(metadata: str) -> dict[str, str]:
    try:
        meta = json.loads(metadata or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"avatar dispatch metadata is not JSON: {metadata!r}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("agent_identity"), str):
        raise ValueError(f"avatar dispatch metadata needs an agent_identity: {metadata!r}")
    return meta


class RemoteAvatar(AvatarSession):
    """Agent side of a remote avatar: asks LiveKit to dispatch an ``avatar_server`` worker
    (``agent_name``) to this room and sends the session's speech to it with
    ``DataStreamAudioOutput``. LiveKit picks the worker (any machine running one, by load),
    so avatars scale with the number of worker machines.

    Call :meth:`start` after ``ctx.connect()`` and before ``session.start(...)``. ``face``:
    the name of one of the worker's faces (``avatar_server(faces=...)``), None: its default.
    ``lkapi``: the LiveKit API client (None: the job's, ``get_job_context().api``)."""

    def __init__(self, *, agent_name: str = DEFAULT_AGENT_NAME, avatar_identity: str | None = None,
                 face: str | None = None, audio_rate: int = DEFAULT_AUDIO_RATE, wait_for_video: bool = True,
                 lkapi: api.LiveKitAPI | None = None) -> None:
        super().__init__()
        self.agent_name = agent_name
        self.face = face
        self.audio_rate = audio_rate
        self.wait_for_video = wait_for_video
        self._avatar_identity = avatar_identity
        self._lkapi = lkapi
        self.audio_output: DataStreamAudioOutput | None = None
        self.dispatch: api.AgentDispatch | None = None

    @property
    def avatar_identity(self) -> str:
        return self._avatar_identity or ""

    @property
    def provider(self) -> str:
        return "avatar-stream"

    async def start(self, agent_session: AgentSession, room: rtc.Room) -> None:
        agent_identity = room.local_participant.identity
        if not self._avatar_identity:
            self._avatar_identity = f"avatar-{agent_identity}"
        await super().start(agent_session, room)
        lkapi = self._lkapi or get_job_context().api
        self.dispatch = await lkapi.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name=self.agent_name, room=room.name,
            metadata=dispatch_metadata(agent_identity, self.avatar_identity, self.face)))
        self.audio_output = DataStreamAudioOutput(
            room, destination_identity=self.avatar_identity, sample_rate=self.audio_rate,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO if self.wait_for_video else None,
            # AvatarRunner reports lk.playback_started when the first sample really plays.
            wait_playback_start=True)
        if agent_session.output.audio is None:
            agent_session.output.audio = self.audio_output
        else:
            agent_session.output.replace_audio_tail(self.audio_output)


def _faces_map(faces: Mapping[str, str | Path] | str | Path | None) -> dict[str, str]:
    if faces is None:
        from avatar_stream import DEMO_FACE

        faces = DEMO_FACE
    if isinstance(faces, (str, Path)):
        return {"default": str(faces)}
    if not faces:
        raise ValueError("faces: give at least one photo")
    return {str(k): str(v) for k, v in faces.items()}


def _load_engine(proc: JobProcess, *, model_dir: str | None, renderer: str) -> None:
    proc.userdata["avatar_engine"] = Engine(model_dir, renderer=renderer)


async def _accept_avatar_job(req: JobRequest) -> None:
    try:
        meta = parse_dispatch_metadata(req.job.metadata)
    except ValueError as e:
        logger.warning("rejecting avatar job %s: %s", req.id, e)
        await req.reject()
        return
    await req.accept(identity=meta.get("avatar_identity") or f"avatar-{meta['agent_identity']}", name="avatar",
                     attributes={ATTRIBUTE_PUBLISH_ON_BEHALF: meta["agent_identity"]})


async def avatar_job(ctx: JobContext, *, faces: Mapping[str, str] | None = None, model_dir: str | None = None,
                     renderer: str = "warp", audio_rate: int = DEFAULT_AUDIO_RATE,
                     output_size: tuple[int, int] | None = None) -> None:
    """Entrypoint of one dispatched avatar job: load the face named in the job's metadata
    (one of ``faces``; a name only, never a path from the caller), join the room and run
    :func:`run_avatar_worker` for the agent that asked, then end the job."""
    meta = parse_dispatch_metadata(ctx.job.metadata)
    faces = _faces_map(faces)
    name = meta.get("face") or next(iter(faces))
    if name not in faces:
        raise ValueError(f"unknown face {name!r}: this worker has {sorted(faces)}")
    engine = ctx.proc.userdata.get("avatar_engine")
    if engine is None:
        engine = await asyncio.to_thread(Engine, model_dir, renderer=renderer)
        ctx.proc.userdata["avatar_engine"] = engine
    gen = await asyncio.to_thread(AvatarVideoGenerator.create, engine, faces[name], audio_rate=audio_rate,
                                  output_size=output_size)
    # The avatar needs nobody's media: the agent's audio comes as a data stream.
    await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)
    await run_avatar_worker(ctx.room, gen, sender_identity=meta["agent_identity"])
    ctx.shutdown("agent left")


def avatar_server(*, faces: Mapping[str, str | Path] | str | Path | None = None, model_dir: str | Path | None = None,
                  renderer: str = "warp", agent_name: str = DEFAULT_AGENT_NAME, audio_rate: int = DEFAULT_AUDIO_RATE,
                  output_size: tuple[int, int] | None = None, **server_kwargs: Any) -> AgentServer:
    """An ``AgentServer`` that runs avatars for agents that dispatch ``agent_name``: run one
    per machine (``cli.run_app(avatar_server(...))`` or ``python -m livekit.agents start``).
    Each job process loads the engine once, before its first job. ``faces``: one photo, or
    names -> photos the agents choose from (the first is the default). ``server_kwargs`` go
    to ``AgentServer`` (``load_threshold``, ``num_idle_processes``, ...)."""
    faces_map = _faces_map(faces)
    model = None if model_dir is None else str(model_dir)
    server = AgentServer(setup_fnc=functools.partial(_load_engine, model_dir=model, renderer=renderer),
                         **server_kwargs)
    entry = functools.partial(avatar_job, faces=faces_map, model_dir=model, renderer=renderer,
                              audio_rate=audio_rate, output_size=output_size)
    server.rtc_session(entry, agent_name=agent_name, on_request=_accept_avatar_job)
    return server


__all__ = [
    "AvatarStats",
    "AvatarVideoGenerator",
    "DEFAULT_AGENT_NAME",
    "LocalAvatar",
    "RemoteAvatar",
    "avatar_job",
    "avatar_server",
    "dispatch_metadata",
    "parse_dispatch_metadata",
    "run_avatar_worker",
]
