"""The Pipecat service on Pipecat's own classes: ``run_test`` pipelines (its in-process test
helper), a real ``BaseOutputTransport`` downstream, the bundled starter model and speech.

Everything runs on the service's real 25 fps clock, so each pipeline takes about as long
as the speech it plays plus the model's lookahead (``lead_ticks``, 0.48 s)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="needs the [pipecat] extra")

from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    MetricsFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData  # noqa: E402
from pipecat.observers.base_observer import BaseObserver, FramePushed  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat.transports.base_output import BaseOutputTransport  # noqa: E402
from pipecat.transports.base_transport import TransportParams  # noqa: E402

from avatar_stream import DEMO_FACE, DEMO_SPEECH  # noqa: E402
from avatar_stream.engine import timebase as tb  # noqa: E402
from avatar_stream.engine.audio import load_audio, resample  # noqa: E402
from avatar_stream.engine.image_io import read_image  # noqa: E402
from avatar_stream.engine.stream import Engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]




AvatarStreamVideoService = importlib.import_module("avatar_stream.integrations.pipecat").AvatarStreamVideoService
RATE = tb.SAMPLE_RATE  # the pipeline's output rate in these tests: no conversion, exact audio
TICK = RATE // tb.FPS  # samples per 40 ms tick
SIZE = (512, 512)  # the bundled photo's own framing


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="module")
def face(engine):
    return engine.prepare_face(read_image(DEMO_FACE))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The bundled speech, int16 at 16 kHz."""
    return np.clip(np.round(load_audio(DEMO_SPEECH) * 32767.0), -32768, 32767).astype(np.int16)


def tts_frames(pcm: np.ndarray, rate: int = RATE, chunk: int = 333, context_id: str = "c1") -> list:
    """What a TTS service pushes: started, audio in chunks that are no whole number of
    ticks (as services send them), stopped."""
    audio = [TTSAudioRawFrame(pcm[i : i + chunk].tobytes(), rate, 1, context_id=context_id)
             for i in range(0, len(pcm), chunk)]
    return [TTSStartedFrame(context_id=context_id), *audio, TTSStoppedFrame(context_id=context_id)]


def params(**kwargs) -> PipelineParams:
    return PipelineParams(audio_out_sample_rate=RATE, **kwargs)


def index_of(frames: list, predicate) -> list[int]:
    return [i for i, f in enumerate(frames) if predicate(f)]


def pcm_of(frames: list) -> np.ndarray:
    return np.frombuffer(b"".join(f.audio for f in frames), np.int16)


class PushTimes(BaseObserver):
    """When each image left ``source`` (wall clock)."""

    def __init__(self, source) -> None:
        super().__init__()
        self.source, self.times = source, []

    async def on_push_frame(self, data: FramePushed):
        if data.source is self.source and isinstance(data.frame, OutputImageRawFrame):
            self.times.append(time.monotonic())


def test_speech_becomes_paced_video_with_the_same_audio_in_order(engine, face, speech):
    pcm = speech[: 40 * TICK]  # 1.6 s
    svc = AvatarStreamVideoService(engine=engine, photo=face, wait_for_transport=False)
    times = PushTimes(svc)
    after = TextFrame("after the speech")
    t0 = time.monotonic()
    down, _ = asyncio.run(run_test(
        svc, frames_to_send=[*tts_frames(pcm), after, EndFrame()], send_end_frame=False,
        pipeline_params=params(enable_metrics=True), observers=[times]))
    elapsed = time.monotonic() - t0

    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    audio = [f for f in down if isinstance(f, OutputAudioRawFrame)]
    assert images and len(images) == len(audio)  # one picture and its 40 ms of sound per tick
    assert {(f.size, f.format, len(f.image)) for f in images} == {(SIZE, "RGB", SIZE[0] * SIZE[1] * 3)}
    assert {(f.sample_rate, f.num_channels, f.num_frames) for f in audio} == {(RATE, 1, TICK)}

    # Speech comes out as TTS audio, contiguous and complete (the avatar's int16 round trip
    # is within 1 LSB); idle ticks are silence, as plain output audio.
    speaking = index_of(down, lambda f: isinstance(f, TTSAudioRawFrame))
    assert len(speaking) == math.ceil(len(pcm) / TICK) == svc.stats.speaking_frames
    tick_positions = index_of(down, lambda f: isinstance(f, OutputAudioRawFrame))
    first = tick_positions.index(speaking[0])
    assert tick_positions[first : first + len(speaking)] == speaking
    out = pcm_of(down[i] for i in speaking)
    assert np.abs(out[: len(pcm)].astype(np.int32) - pcm).max() <= 1
    assert not out[len(pcm) :].any()
    assert not pcm_of(f for f in audio if not isinstance(f, TTSAudioRawFrame)).any()
    assert {down[i].context_id for i in speaking} == {"c1"}

    # Every other frame keeps its place relative to the audio.
    started = index_of(down, lambda f: isinstance(f, TTSStartedFrame))
    stopped = index_of(down, lambda f: isinstance(f, TTSStoppedFrame))
    assert len(started) == len(stopped) == 1
    assert started[0] < speaking[0]
    assert stopped[0] == speaking[-1] + 1  # right after the tick with the last sample
    assert down.index(after) == stopped[0] + 1
    assert isinstance(down[-1], EndFrame)  # flushed: EndFrame waited for all of the speech

    # Real time: 25 pictures a second once past the start-up burst (ahead_ticks).
    gaps = np.diff(times.times[5:])
    assert 0.038 < gaps.mean() < 0.042, gaps.mean()
    assert elapsed > len(pcm) / RATE  # played, not rendered as fast as possible

    # Latency: the first speaking tick left lead_ticks ticks (plus at most one tick of phase
    # and the compute) after its audio arrived; it is reported as a TTFB metric too.
    st = svc.stats
    assert st.segments == 1 and st.interruptions == 0
    lead_s = svc.live.lead_ticks / tb.FPS
    assert len(st.onset_latency_s) == 1
    assert lead_s - 2 / tb.FPS <= st.onset_latency_s[0] < lead_s + 0.15  # ticks catch up when late
    ttfb = [d.value for f in down if isinstance(f, MetricsFrame) for d in f.data
            if isinstance(d, TTFBMetricsData) and d.processor == svc.name]
    assert ttfb == [0.0, pytest.approx(st.onset_latency_s[0], abs=0.01)]  # Pipecat's initial empty one first


def test_interruption_stops_the_speech_and_goes_downstream(engine, face, speech):
    pcm = speech[: 50 * TICK]  # 2 s, pushed at once: still playing when the user barges in
    svc = AvatarStreamVideoService(engine=engine, photo=face, wait_for_transport=False)
    kept = TextFrame("uninterruptible")
    kept.interruptible = False
    later = TextFrame("after the interruption")
    interruption = InterruptionFrame()
    down, up = asyncio.run(run_test(
        svc, frames_to_send=[*tts_frames(pcm), kept, SleepFrame(1.0), interruption, SleepFrame(0.3), later],
        pipeline_params=params()))
    assert not any(isinstance(f, ErrorFrame) for f in up)

    cut = down.index(interruption)
    speaking = index_of(down, lambda f: isinstance(f, TTSAudioRawFrame))
    assert speaking and speaking[-1] < cut  # no speech after the interruption...
    assert 0 < len(speaking) < math.ceil(len(pcm) / TICK)
    assert not pcm_of(f for f in down[cut:] if isinstance(f, OutputAudioRawFrame)).any()  # ...only silence
    assert len(index_of(down[cut:], lambda f: isinstance(f, OutputImageRawFrame))) > 3  # the avatar idles on
    out = pcm_of(down[i] for i in speaking)
    assert np.abs(out.astype(np.int32) - pcm[: len(out)]).max() <= 1  # what did play was the speech
    # Held frames: the interruptible TTSStoppedFrame is dropped, as Pipecat drops queued
    # frames; the uninterruptible one goes right after the interruption.
    assert not any(isinstance(f, TTSStoppedFrame) for f in down)
    assert down.index(kept) == cut + 1
    assert down.index(later) > cut
    assert svc.stats.interruptions == 1


def test_end_frame_flushes_a_tail_shorter_than_a_tick(engine, face, speech):
    # No TTSStoppedFrame: EndFrame alone ends the speech. The first part has played out
    # (the service was idle) when a last chunk shorter than a tick comes, then EndFrame.
    head, tail = speech[: 6 * TICK], speech[6 * TICK : 6 * TICK + 100]
    svc = AvatarStreamVideoService(engine=engine, photo=face, wait_for_transport=False)
    frames = [*tts_frames(head)[1:-1], SleepFrame(1.0), TTSAudioRawFrame(tail.tobytes(), RATE, 1),
              SleepFrame(0.2)]
    down, _ = asyncio.run(run_test(svc, frames_to_send=frames, pipeline_params=params()))
    out = pcm_of(f for f in down if isinstance(f, TTSAudioRawFrame))
    assert len(out) == 7 * TICK
    expected = np.concatenate([head, tail, np.zeros(TICK - len(tail), np.int16)])
    assert np.abs(out.astype(np.int32) - expected).max() <= 1


def test_uninterruptible_speech_plays_through_an_interruption(engine, face, speech):
    pcm = speech[: 30 * TICK]
    svc = AvatarStreamVideoService(engine=engine, photo=face, wait_for_transport=False)
    frames = tts_frames(pcm)
    for f in frames:
        f.interruptible = False  # what a TTS service does for an uninterruptible context
    interruption = InterruptionFrame()
    down, up = asyncio.run(run_test(svc, frames_to_send=[*frames, SleepFrame(0.8), interruption],
                                    pipeline_params=params()))
    assert not any(isinstance(f, ErrorFrame) for f in up)
    speaking = index_of(down, lambda f: isinstance(f, TTSAudioRawFrame))
    assert speaking[0] < down.index(interruption) < speaking[-1]
    assert all(not down[i].interruptible for i in speaking)
    out = pcm_of(down[i] for i in speaking)
    assert len(out) == len(pcm) and np.abs(out.astype(np.int32) - pcm).max() <= 1
    assert down.index(next(f for f in down if isinstance(f, TTSStoppedFrame))) == speaking[-1] + 1
    assert svc.stats.interruptions == 0


def test_other_frames_pass_through(engine, face, speech):
    svc = AvatarStreamVideoService(engine=engine, photo=face, wait_for_transport=False, idle_audio=False)
    system = UserStartedSpeakingFrame()
    text = TextFrame("after the audio")
    down, _ = asyncio.run(run_test(svc, frames_to_send=[*tts_frames(speech[: 10 * TICK]), system, text],
                                   pipeline_params=params()))
    speaking = index_of(down, lambda f: isinstance(f, TTSAudioRawFrame))
    assert down.index(system) < speaking[0]  # system frames do not wait for the audio
    assert down.index(text) > speaking[-1]  # other frames do
    # idle_audio=False: idle ticks send their picture only.
    assert all(isinstance(f, TTSAudioRawFrame) for f in down if isinstance(f, OutputAudioRawFrame))
    assert len(index_of(down, lambda f: isinstance(f, OutputImageRawFrame))) > len(speaking)

    up_frame = TextFrame("upstream")
    _, up = asyncio.run(run_test(AvatarStreamVideoService(engine=engine, photo=face), frames_to_send=[up_frame],
                                 frames_to_send_direction=FrameDirection.UPSTREAM, pipeline_params=params()))
    assert up == [up_frame]


def test_tts_audio_at_another_rate_is_converted(engine, face, speech):
    pcm16 = speech[: 25 * TICK]
    pcm24 = np.clip(np.round(resample(pcm16 / 32768.0, RATE, 24000) * 32767), -32768, 32767).astype(np.int16)
    svc = AvatarStreamVideoService(engine=engine, photo=face, wait_for_transport=False)
    down, _ = asyncio.run(run_test(svc, frames_to_send=tts_frames(pcm24, rate=24000, chunk=480),
                                   pipeline_params=params()))
    speaking = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert {f.sample_rate for f in speaking} == {RATE}
    assert abs(len(speaking) - 25) <= 1
    out = pcm_of(speaking)[: len(pcm16)].astype(np.float64)
    assert np.corrcoef(out, pcm16)[0, 1] > 0.99


class RecordingOutputTransport(BaseOutputTransport):
    """Pipecat's output transport, writing nowhere but at the pace a real one plays: each
    audio write returns when the previous audio has played. Records what it writes."""

    def __init__(self, params: TransportParams, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.audio: list[tuple[float, OutputAudioRawFrame]] = []
        self.video: list[tuple[float, OutputImageRawFrame]] = []
        self._plays_at = 0.0

    async def start(self, frame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        self._plays_at = max(self._plays_at, time.monotonic())
        await asyncio.sleep(self._plays_at - time.monotonic())
        self.audio.append((time.monotonic(), frame))
        self._plays_at += frame.num_frames / frame.sample_rate
        return True

    async def write_video_frame(self, frame: OutputImageRawFrame) -> bool:
        self.video.append((time.monotonic(), frame))
        return True


def test_through_pipecat_output_transport(engine, face, speech):
    pcm = speech[: 30 * TICK]
    svc = AvatarStreamVideoService(engine=engine, photo=face)  # starts when the transport is ready
    transport = RecordingOutputTransport(TransportParams(
        audio_out_enabled=True, audio_out_sample_rate=RATE, audio_out_end_silence_secs=0,
        video_out_enabled=True, video_out_is_live=True, video_out_framerate=tb.FPS,
        video_out_width=SIZE[0], video_out_height=SIZE[1]))
    down, up = asyncio.run(run_test(Pipeline([svc, transport]), frames_to_send=tts_frames(pcm),
                                    pipeline_params=params()))

    # The transport plays the speech whole, between its own bot-speaking frames.
    written = [f for _, f in transport.audio]
    speaking = index_of(written, lambda f: isinstance(f, TTSAudioRawFrame))
    assert speaking == list(range(speaking[0], speaking[0] + math.ceil(len(pcm) / TICK)))
    out = pcm_of(written[i] for i in speaking)
    assert np.abs(out[: len(pcm)].astype(np.int32) - pcm).max() <= 1
    names = [type(f) for f in down if isinstance(f, (BotStartedSpeakingFrame, BotStoppedSpeakingFrame,
                                                     TTSStartedFrame, TTSStoppedFrame))]
    assert names == [TTSStartedFrame, BotStartedSpeakingFrame, BotStoppedSpeakingFrame, TTSStoppedFrame]
    assert any(isinstance(f, BotStoppedSpeakingFrame) for f in up)

    # Pictures and sound at 25 a second each; the live video path draws each picture one
    # tick after its sound starts (the transport's own pacing of live video).
    t_video = np.array([t for t, _ in transport.video])
    t_audio = np.array([t for t, _ in transport.audio])
    assert {f.size for _, f in transport.video} == {SIZE}
    assert 0.038 < np.diff(t_video[5:]).mean() < 0.042
    assert 0.038 < np.diff(t_audio[5:]).mean() < 0.042
    n = min(len(t_video), len(t_audio))
    offset = np.median(t_video[:n] - t_audio[:n])
    assert 0.0 <= offset <= 0.06, offset


def test_demo_runs_offline(tmp_path, speech):
    import wave

    import av

    wav = tmp_path / "short.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(speech[: 20 * TICK].tobytes())
    spec = importlib.util.spec_from_file_location("pipecat_bot", REPO / "demos" / "pipecat_bot.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "bot.mp4"
    avatar = asyncio.run(demo.run_offline(wav, DEMO_FACE, out))
    assert avatar.stats.speaking_frames == 20
    with av.open(str(out)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        assert (video.width, video.height) == demo.VIDEO_SIZE
        assert video.frames == avatar.stats.frames
        assert float(audio.duration * audio.time_base) == pytest.approx(video.frames / tb.FPS, abs=0.05)
