"""The LiveKit Agents plugin (integrations/livekit.py) against the real livekit-agents classes.

What runs here without a LiveKit server: the generator driven directly; LiveKit's own
``AvatarRunner`` with its ``AVSynchronizer``, ``AudioSource`` and ``VideoSource`` fed by its
``QueueAudioOutput``; a real ``AgentSession`` (no models, no room) speaking through the
in-process avatar; the dispatch handshake on a real ``JobRequest``; the worker's
``AgentServer``; the example agent's import. What does not: publishing tracks, the data-stream
transport (``DataStreamAudioOutput`` / ``DataStreamAudioReceiver``) and the dispatch itself
all need a connected room, so the runner's track publication is skipped below (it waits for a
connection that never comes) and the worker path is checked up to the room connection.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import math
import os
import pickle
import py_compile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="needs the [livekit] extra")

from livekit import rtc  # noqa: E402
from livekit.agents import Agent, AgentServer, AgentSession, JobRequest  # noqa: E402
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF  # noqa: E402
from livekit.agents.voice.avatar import (  # noqa: E402
    AudioSegmentEnd,
    AvatarRunner,
    AvatarSession,
    QueueAudioOutput,
    VideoGenerator,
)
from livekit.protocol import agent as agent_proto  # noqa: E402

from avatar_stream import DEMO_FACE, DEMO_SPEECH  # noqa: E402
from avatar_stream.engine.audio import load_audio  # noqa: E402
from avatar_stream.engine.image_io import read_image  # noqa: E402
from avatar_stream.engine.stream import Engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TICK = 1 / 25




lk = importlib.import_module("avatar_stream.integrations.livekit")


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="module")
def face(engine):
    f = engine.prepare_face(read_image(DEMO_FACE))
    engine.warm_up(f)
    return f


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The bundled speech, int16 16 kHz mono."""
    return (np.clip(load_audio(DEMO_SPEECH), -1.0, 1.0) * 32767).astype(np.int16)


def audio_frames(pcm: np.ndarray, rate: int, ms: int = 20) -> list[rtc.AudioFrame]:
    """int16 mono -> LiveKit frames the way a TTS or DataStreamAudioReceiver sends them."""
    n = rate * ms // 1000
    return [rtc.AudioFrame(pcm[i : i + n].tobytes(), rate, 1, len(pcm[i : i + n])) for i in range(0, len(pcm), n)]


async def push(gen, pcm: np.ndarray, rate: int = 16000, end: bool = True) -> None:
    for f in audio_frames(pcm, rate):
        await gen.push_audio(f)
    if end:
        await gen.push_audio(AudioSegmentEnd())


async def take(it, n_video: int, *, until_end: bool = False, stamps: list | None = None) -> list:
    """Items from the generator until ``n_video`` video frames (or an AudioSegmentEnd)."""
    out, videos = [], 0
    while videos < n_video:
        item = await it.__anext__()
        out.append(item)
        if isinstance(item, rtc.VideoFrame):
            videos += 1
            if stamps is not None:
                stamps.append(time.monotonic())
        if until_end and isinstance(item, AudioSegmentEnd):
            break
    return out


def pcm_of(items) -> np.ndarray:
    frames = [x for x in items if isinstance(x, rtc.AudioFrame)]
    if not frames:
        return np.zeros((0, 1), np.int16)
    return np.concatenate([np.frombuffer(f.data, np.int16).reshape(-1, f.num_channels) for f in frames])


def kinds(items) -> str:
    return "".join({rtc.VideoFrame: "V", rtc.AudioFrame: "A", AudioSegmentEnd: "E"}[type(x)] for x in items)


def make(face, engine, **kw):
    kw.setdefault("audio_rate", 16000)
    kw.setdefault("realtime", False)
    return lk.AvatarVideoGenerator.create(engine, face, **kw)


# -- the generator on its own ------------------------------------------------------------------
def test_audio_out_equals_audio_in_with_video_per_tick(engine, face, speech):
    gen = make(face, engine)
    assert isinstance(gen, VideoGenerator)
    lead = gen.lead_ticks
    pcm = speech[: 16000 + 3 * 640 + 200]  # 1.13 s: ends inside a tick
    n_ticks = math.ceil(len(pcm) / 640)

    async def main():
        it = gen.__aiter__()
        idle = await take(it, 5)
        await push(gen, pcm)
        talk = await take(it, 200, until_end=True)
        after = await take(it, 5)
        return idle, talk, after

    idle, talk, after = asyncio.run(main())
    # Idle and after the utterance: pictures only (the runner's playback position counts speech).
    assert kinds(idle) == "V" * 5 and kinds(after) == "V" * 5
    # The model's lookahead, then picture + sound per tick, then the segment end at once.
    assert kinds(talk) == "V" * lead + "VA" * n_ticks + "E"
    w, h = gen.live.size
    opts = gen.options
    assert (opts.video_width, opts.video_height, opts.video_fps, opts.audio_sample_rate) == (w, h, 25.0, 16000)
    for v in (x for x in idle + talk if isinstance(x, rtc.VideoFrame)):
        assert (v.width, v.height, v.type) == (w, h, rtc.VideoBufferType.RGB24)
        assert len(v.data) == w * h * 3
    for a in (x for x in talk if isinstance(x, rtc.AudioFrame)):
        assert (a.sample_rate, a.num_channels, a.samples_per_channel) == (16000, 1, 640)
    out = pcm_of(talk)[:, 0]
    assert len(out) == n_ticks * 640
    # In order, nothing lost or repeated, bit for bit.
    assert np.array_equal(out[: len(pcm)], pcm)
    assert not out[len(pcm):].any()  # the last tick is padded with silence
    # The face moves: the speaking frames are not all the idle picture.
    still = np.frombuffer(idle[-1].data, np.uint8)
    moved = [np.abs(np.frombuffer(v.data, np.uint8).astype(np.int16) - still).mean()
             for v in talk if isinstance(v, rtc.VideoFrame)]
    assert max(moved) > 0.5
    st = gen.stats
    assert (st.frames, st.speaking_frames, st.segments, st.skipped) == (
        5 + lead + n_ticks + 5, n_ticks, 1, 0)


def test_any_input_rate_to_stereo_48k(engine, face, speech):
    gen = make(face, engine, audio_rate=48000, channels=2)
    pcm = speech[:16000]

    async def main():
        it = gen.__aiter__()
        await push(gen, pcm, rate=16000)
        return await take(it, 200, until_end=True)

    talk = asyncio.run(main())
    audio = [x for x in talk if isinstance(x, rtc.AudioFrame)]
    assert len(audio) == 25  # 1 s at 25 fps
    assert all((a.sample_rate, a.num_channels, a.samples_per_channel) == (48000, 2, 1920) for a in audio)
    out = pcm_of(talk)
    assert np.array_equal(out[:, 0], out[:, 1])
    ref = np.interp(np.arange(47000) / 3.0, np.arange(len(pcm)), pcm.astype(np.float64))
    assert np.corrcoef(ref, out[:47000, 0])[0, 1] > 0.99
    assert kinds(talk).endswith("AE")


def test_clear_buffer_stops_speech_at_the_next_tick(engine, face, speech):
    gen = make(face, engine)
    first, second = speech[:32000], speech[40000:48000]

    async def main():
        it = gen.__aiter__()
        await push(gen, first)
        before = await take(it, gen.lead_ticks + 10)
        with pytest.raises(RuntimeError, match="already"):  # one timeline, one consumer
            await gen.__aiter__().__anext__()
        await gen.clear_buffer()
        cut = await take(it, gen.lead_ticks + 10)
        await push(gen, second)
        nxt = await take(it, 200, until_end=True)
        return before, cut, nxt

    before, cut, nxt = asyncio.run(main())
    # Ten speaking pictures out; the tenth tick's sound, still inside the generator when the
    # clear came, is dropped with the rest.
    assert kinds(before) == "V" * gen.lead_ticks + "VA" * 9 + "V"
    # Nothing of the cut utterance plays or ends: AvatarRunner reports it interrupted itself.
    assert kinds(cut) == "V" * (gen.lead_ticks + 10)
    assert gen.stats.interruptions == 1 and gen.live.stats.interruptions == 1
    # The next utterance comes out whole, and none of the first one is left over.
    out = pcm_of(nxt)[:, 0]
    assert len(out) == math.ceil(len(second) / 640) * 640
    assert np.array_equal(out[: len(second)], second)
    assert kinds(nxt).endswith("AE") and kinds(nxt).count("E") == 1


def test_realtime_pace_and_latency(engine, face, speech):
    gen = make(face, engine, realtime=True)
    lead_s = gen.lead_ticks * TICK
    pcm = speech[:16000]

    async def main():
        it = gen.__aiter__()
        stamps: list[float] = []
        t0 = time.monotonic()
        await take(it, 10, stamps=stamps)  # idle, 0.4 s minus the run-ahead
        pushed_at = time.monotonic()
        await push(gen, pcm)
        talk = await take(it, 200, until_end=True, stamps=stamps)
        return t0, pushed_at, stamps, talk

    t0, pushed_at, stamps, talk = asyncio.run(main())
    st = gen.stats
    # Never more than max_ahead_ticks ahead of the clock, and no slower than 25 fps.
    elapsed = stamps[-1] - t0
    assert len(stamps) <= elapsed / TICK + gen.max_ahead_ticks + 2
    steady = np.diff(stamps[gen.max_ahead_ticks + 2:])
    assert abs(1 / steady.mean() - 25) < 1.5
    assert kinds(talk).count("A") == 25 and st.skipped <= 2
    # The first sample is seen lead_ticks later (the model's lookahead) plus compute.
    onset = st.onset_latency_s[0]
    assert lead_s - 0.02 <= onset <= lead_s + 0.1
    first_audio = next(i for i, x in enumerate(talk) if isinstance(x, rtc.AudioFrame))
    assert first_audio == gen.lead_ticks + 1  # lead pictures, then picture + sound
    assert abs(stamps[10 + gen.lead_ticks] - pushed_at - lead_s) < 0.1
    s = st.summary()
    assert s["lead_ms"] == pytest.approx(lead_s * 1e3) and s["step_ms"]["p50"] < TICK * 1e3
    assert s["latency_ms"]["max"] >= s["onset_latency_ms"]["p50"]


def test_realtime_skips_pictures_not_sound_when_the_cpu_is_slow(engine, face, speech):
    gen = make(face, engine, realtime=True)
    step = gen.live.next_frame

    def slow(render=True):  # a renderer that takes 70 ms (a CPU that cannot keep 25 fps)
        if render:
            time.sleep(0.07)
        return step(render=render)

    gen.live.next_frame = slow
    pcm = speech[:24000]

    async def main():
        it = gen.__aiter__()
        stamps: list[float] = []
        t0 = time.monotonic()
        await push(gen, pcm)
        items = await take(it, 200, until_end=True, stamps=stamps)
        return time.monotonic() - t0, items

    elapsed, items = asyncio.run(main())
    st = gen.stats
    assert st.skipped > 5 and st.rendered > 5
    # Still 25 ticks a second, and every sample played.
    assert st.frames >= (elapsed - 0.2) / TICK
    assert kinds(items).count("A") == math.ceil(len(pcm) / 640)
    videos = [x for x in items if isinstance(x, rtc.VideoFrame)]
    assert len({id(v) for v in videos}) == st.rendered  # a skipped tick repeats its picture


def test_resampled_utterance_keeps_its_tail(engine, face):
    gen = make(face, engine, audio_rate=24000)
    tone = (np.sin(np.arange(3200) * 2 * np.pi * 440 / 16000) * 8000).astype(np.int16)  # 0.2 s

    async def main():
        it = gen.__aiter__()
        outs = []
        for _ in range(2):
            await push(gen, tone)
            outs.append(pcm_of(await take(it, 200, until_end=True))[:, 0])
        return outs

    first, second = asyncio.run(main())
    assert np.abs(first[4760:]).max() > 1000  # the tone runs to the utterance's end...
    assert abs(int(second[0])) < 1000  # ...and the next one starts at the sine's zero


def test_int16_audio_round_trips_bit_exact(engine, face):
    gen = make(face, engine)
    pcm = np.array([0, 1, -1, 16383, 16384, -16385, 32767, -32768] * 80, np.int16)  # one tick

    async def main():
        it = gen.__aiter__()
        await push(gen, pcm)
        return pcm_of(await take(it, 200, until_end=True))[:, 0]

    assert np.array_equal(asyncio.run(main()), pcm)


# -- LiveKit's AvatarRunner and AgentSession, in-process ----------------------------------------
class UnpublishedRunner(AvatarRunner):
    """LiveKit's runner with track publication skipped: publishing needs a connected room
    (a LiveKit server). Everything else is the real one: its AVSynchronizer, AudioSource
    and VideoSource pace and take the frames."""

    publish_calls = 0

    async def _publish_track(self) -> None:
        UnpublishedRunner.publish_calls += 1
        self._video_publication = True


def test_avatar_runner_plays_segments_and_reports_interruptions(engine, face, speech):
    gen = make(face, engine, audio_rate=24000, realtime=True)
    pcm24 = np.interp(np.arange(24000) / 1.5, np.arange(16000), speech[:16000].astype(np.float64)).astype(np.int16)

    async def main():
        audio = QueueAudioOutput(sample_rate=24000)
        finished = []
        audio.on("playback_finished", finished.append)
        runner = UnpublishedRunner(rtc.Room(), audio_recv=audio, video_gen=gen, options=gen.options)
        gen.set_av_sync(runner.av_sync)
        await runner.start()
        await asyncio.sleep(0.3)  # idle frames
        t0 = time.monotonic()
        for f in audio_frames(pcm24, 24000, ms=100):
            await audio.capture_frame(f)
        audio.flush()
        ev1 = await asyncio.wait_for(audio.wait_for_playout(), 5)
        played_in = time.monotonic() - t0
        fps = runner.av_sync.actual_fps
        first = gen.stats.speaking_frames
        for f in audio_frames(pcm24, 24000, ms=100):
            await audio.capture_frame(f)
        audio.flush()
        await asyncio.sleep(0.8)
        spoken_at_clear = gen.stats.speaking_frames - first
        audio.clear_buffer()  # barge-in
        ev2 = await asyncio.wait_for(audio.wait_for_playout(), 5)
        await asyncio.sleep(0.1)
        spoken = gen.stats.speaking_frames
        await asyncio.sleep(0.6)
        spoken_later = gen.stats.speaking_frames
        await runner.aclose()
        return ev1, played_in, fps, ev2, spoken_at_clear, spoken, spoken_later, finished

    ev1, played_in, fps, ev2, spoken_at_clear, spoken, spoken_later, finished = asyncio.run(main())
    lead_s = gen.lead_ticks * TICK
    assert not ev1.interrupted and ev1.playback_position == pytest.approx(1.0, abs=1e-6)
    # Reported when the last frame enters the synchroniser: up to max_ahead_ticks before it sounds.
    early = (gen.max_ahead_ticks + 1) * TICK
    assert 1.0 + lead_s - early <= played_in <= 1.0 + lead_s + 0.5
    assert abs(fps - 25) < 2
    # The position reported is the speech that left the generator before the cut, less what
    # the synchroniser still held (about 100 ms): tied to the frames, not to the wall clock,
    # which a loaded machine stretches.
    assert ev2.interrupted and 0 < ev2.playback_position
    assert spoken_at_clear * TICK - 0.25 <= ev2.playback_position <= spoken_at_clear * TICK + 0.05, (
        ev2.playback_position, spoken_at_clear)
    assert spoken_later == spoken  # nothing of the cut utterance after the clear
    assert [e.interrupted for e in finished] == [False, True]
    assert UnpublishedRunner.publish_calls >= 1


def test_agent_session_speaks_through_the_in_process_avatar(engine, face, speech):
    gen = make(face, engine, audio_rate=24000, realtime=True)
    pcm24 = np.interp(np.arange(24000) / 1.5, np.arange(16000), speech[:16000].astype(np.float64)).astype(np.int16)

    async def tts():
        for f in audio_frames(pcm24, 24000, ms=50):
            yield f

    async def main():
        session = AgentSession(vad=None, turn_handling={"interruption": {"resume_false_interruption": False}})
        avatar = lk.LocalAvatar(gen)
        await avatar.start(session, rtc.Room())
        # As UnpublishedRunner: publishing needs a server. Set before the runner's first frame.
        avatar.runner._video_publication = True
        assert session.output.audio is avatar.audio_output
        await session.start(agent=Agent(instructions="test"), record=False)
        t0 = time.monotonic()
        h1 = session.say("hello there", audio=tts())
        await asyncio.wait_for(h1.wait_for_playout(), 5)
        played_in = time.monotonic() - t0
        h2 = session.say("hello again", audio=tts())
        await asyncio.sleep(0.8)
        h2.interrupt()
        await asyncio.wait_for(h2.wait_for_playout(), 5)
        messages = [(m.content, m.interrupted) for m in session.history.items if m.type == "message"]
        await session.aclose()
        await avatar.aclose()
        return h1.interrupted, played_in, h2.interrupted, messages

    i1, played_in, i2, messages = asyncio.run(main())
    assert not i1 and i2
    # The session waited for the avatar to play it (see the runner test for the margin).
    assert played_in >= 1.0 + (gen.lead_ticks - gen.max_ahead_ticks - 1) * TICK
    assert messages == [(["hello there"], False), (["hello again"], True)]
    assert gen.stats.segments == 1 and gen.stats.interruptions == 1


# -- the remote worker ---------------------------------------------------------------------------
def test_worker_needs_a_connected_room_and_cleans_up(engine, face):
    gen = make(face, engine)

    async def main():
        with pytest.raises(RuntimeError, match="not connected"):
            await lk.run_avatar_worker(rtc.Room(), gen, sender_identity="agent-1")
        return [x async for x in gen]  # closed: iteration ends at once

    assert asyncio.run(main()) == []


def test_dispatch_request_is_accepted_as_the_agents_avatar():
    meta = lk.dispatch_metadata("agent-7", "avatar-agent-7", face="default")
    answers = []

    async def on_accept(args):
        answers.append(("accept", args))

    async def on_reject(terminate):
        answers.append(("reject", terminate))

    async def main():
        good = JobRequest(job=agent_proto.Job(id="AJ_1", metadata=meta), on_reject=on_reject, on_accept=on_accept)
        await lk._accept_avatar_job(good)
        bad = JobRequest(job=agent_proto.Job(id="AJ_2", metadata="not json"), on_reject=on_reject,
                         on_accept=on_accept)
        await lk._accept_avatar_job(bad)

    asyncio.run(main())
    (kind, args), (kind2, _) = answers
    assert (kind, kind2) == ("accept", "reject")
    assert args.identity == "avatar-agent-7"
    assert args.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-7"}
    assert lk.parse_dispatch_metadata(meta)["face"] == "default"
    with pytest.raises(ValueError):
        lk.parse_dispatch_metadata('{"face": "x"}')
    remote = lk.RemoteAvatar(avatar_identity="avatar-agent-7")
    assert isinstance(remote, AvatarSession) and remote.avatar_identity == "avatar-agent-7"


def test_avatar_server_registers_for_explicit_dispatch():
    server = lk.avatar_server(faces={"default": DEMO_FACE, "other": DEMO_FACE})
    assert isinstance(server, AgentServer)
    assert server._agent_name == lk.DEFAULT_AGENT_NAME  # explicit dispatch only
    # Job processes are started with forkserver / spawn: what they run must pickle.
    entry = pickle.loads(pickle.dumps(server._entrypoint_fnc))
    assert entry.keywords["faces"] == {"default": str(DEMO_FACE), "other": str(DEMO_FACE)}
    pickle.loads(pickle.dumps(server.setup_fnc))


@pytest.mark.parametrize("mode", ["local", "remote", "worker"])
def test_example_agent_imports(mode, monkeypatch):
    path = REPO / "demos" / "livekit_agent.py"
    py_compile.compile(str(path), doraise=True)
    monkeypatch.setenv("AVATAR_MODE", mode)
    spec = importlib.util.spec_from_file_location(f"livekit_agent_{mode}", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # builds its AgentServer; runs nothing
    assert isinstance(demo.server, AgentServer)
    assert demo.server._agent_name == (lk.DEFAULT_AGENT_NAME if mode == "worker" else "")
    with pytest.raises(SystemExit):
        demo.make_server("nonsense")
    assert os.environ["AVATAR_MODE"] == mode
