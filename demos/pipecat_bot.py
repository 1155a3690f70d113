"""A Pipecat voice bot with a talking head: the avatar sits between TTS and the transport.

Offline, no keys and no network: a speech file goes through the avatar as if a TTS service
had spoken it, and what would reach the transport (video and re-timed audio) goes to an mp4::

    python demos/pipecat_bot.py --offline [--audio talk.wav] [--face me.jpg] [--out bot.mp4]

Live, with Deepgram (speech-to-text), OpenAI (LLM) and Cartesia (text-to-speech) on
Pipecat's development runner (a browser page over WebRTC at http://localhost:7860/client,
or ``-t daily`` for a Daily room)::

    pip install "avatar-stream[pipecat]" "pipecat-ai[webrtc,daily,runner,silero,deepgram,openai,cartesia]"
    export DEEPGRAM_API_KEY=... OPENAI_API_KEY=... CARTESIA_API_KEY=...
    AVATAR_FACE=me.jpg python demos/pipecat_bot.py      # plus the runner's own options (-t daily)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from avatar_stream import DEMO_FACE, DEMO_SPEECH
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.sinks import Mp4Sink
from avatar_stream.engine.stream import Engine
from avatar_stream.integrations.pipecat import AvatarStreamVideoService

VIDEO_SIZE = (512, 512)  # the avatar's output, and the transport's video size


# -- offline: speech file -> avatar -> mp4 ------------------------------------------------------
class Mp4Recorder(FrameProcessor):
    """Stands where the transport would: writes the avatar's pictures and the audio pushed
    with them to an mp4 (one picture per 40 ms tick, audio as it comes), passes all on."""

    def __init__(self, path: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.sink: Mp4Sink | None = None
        self.frames = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            if self.sink is None:
                self.sink = Mp4Sink(self.path, size=frame.size, audio_sample_rate=self._audio_rate)
            image = np.frombuffer(frame.image, np.uint8).reshape(frame.size[1], frame.size[0], 3)
            self.sink.write(image, self.frames * tb.SAMPLES_PER_FRAME)
            self.frames += 1
        elif isinstance(frame, OutputAudioRawFrame) and self.sink is not None:
            pcm = np.frombuffer(frame.audio, np.int16).reshape(-1, frame.num_channels)
            self.sink.write_audio_raw(pcm[:, :1].astype(np.float32) / 32768.0)
        elif isinstance(frame, EndFrame) and self.sink is not None:
            self.sink.close()
        await self.push_frame(frame, direction)

    async def setup(self, setup):
        await super().setup(setup)
        self._audio_rate = setup.audio_out_sample_rate


def tts_frames(audio: np.ndarray, rate: int = tb.SAMPLE_RATE, chunk_ms: int = 20) -> list[Frame]:
    """float32 mono speech as a TTS service pushes it: started, 20 ms chunks, stopped."""
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    step = rate * chunk_ms // 1000
    chunks = [TTSAudioRawFrame(pcm[i : i + step].tobytes(), rate, 1, context_id="demo")
              for i in range(0, len(pcm), step)]
    return [TTSStartedFrame(context_id="demo"), *chunks, TTSStoppedFrame(context_id="demo")]


async def run_offline(audio_path: Path, face: Path, out: Path) -> AvatarStreamVideoService:
    engine = await asyncio.to_thread(Engine)
    # No transport here to say it is ready: the avatar's clock starts with the pipeline.
    avatar = AvatarStreamVideoService(engine=engine, photo=face, output_size=VIDEO_SIZE,
                                      wait_for_transport=False)
    recorder = Mp4Recorder(out)
    worker = PipelineWorker(Pipeline([avatar, recorder]),
                            params=PipelineParams(audio_out_sample_rate=tb.SAMPLE_RATE, enable_metrics=True))
    await worker.queue_frames([*tts_frames(load_audio(audio_path)), EndFrame()])
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    print(f"{recorder.frames} frames -> {out}")
    print(f"avatar: {avatar.stats.summary()}")
    return avatar


# -- live: the development runner's transports ---------------------------------------------------
_engine: Engine | None = None


async def shared_engine() -> Engine:
    """One engine per process, shared by every session (it is immutable)."""
    global _engine
    if _engine is None:
        _engine = await asyncio.to_thread(Engine)
    return _engine


def transport_params() -> dict:
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.daily.transport import DailyParams

    # The avatar paces its own 25 fps: the transport shows each picture as it comes (live).
    video = dict(video_out_enabled=True, video_out_is_live=True, video_out_framerate=tb.FPS,
                 video_out_width=VIDEO_SIZE[0], video_out_height=VIDEO_SIZE[1])
    return {
        "daily": lambda: DailyParams(audio_in_enabled=True, audio_out_enabled=True, **video),
        "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True, **video),
    }


async def bot(runner_args):
    """The development runner's entry point: one call per session."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.frames.frames import LLMRunFrame
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.runner.utils import create_transport
    from pipecat.services.cartesia.tts import CartesiaTTSService
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.services.openai.llm import OpenAILLMService

    transport = await create_transport(runner_args, transport_params())
    stt = DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])
    llm = OpenAILLMService(
        api_key=os.environ["OPENAI_API_KEY"],
        settings=OpenAILLMService.Settings(
            system_instruction="You are a friendly assistant in a video call. Your replies are "
            "spoken aloud: keep them short, and use no emojis or formatting."),
    )
    tts = CartesiaTTSService(
        api_key=os.environ["CARTESIA_API_KEY"],
        settings=CartesiaTTSService.Settings(voice="71a7ad14-091c-4e8e-a314-022ece01c121"),
    )
    avatar = AvatarStreamVideoService(engine=await shared_engine(),
                                      photo=os.environ.get("AVATAR_FACE", DEMO_FACE), output_size=VIDEO_SIZE)
    context = LLMContext()
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()))

    pipeline = Pipeline([
        transport.input(),
        stt,
        user_aggregator,
        llm,
        tts,
        avatar,  # TTS audio in; pictures and the audio that plays with them out
        transport.output(),
        assistant_aggregator,
    ])
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True),
                            idle_timeout_secs=runner_args.pipeline_idle_timeout_secs)

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        context.add_message({"role": "developer", "content": "Greet the user in one sentence."})
        await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()
    print(f"avatar: {avatar.stats.summary()}")


def main() -> None:
    if "--offline" not in sys.argv:
        from pipecat.runner.run import main as runner_main

        runner_main()  # parses its own options and calls bot() once per session
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--offline", action="store_true", required=True)
    p.add_argument("--audio", type=Path, default=DEMO_SPEECH)
    p.add_argument("--face", type=Path, default=DEMO_FACE)
    p.add_argument("--out", type=Path, default=Path("pipecat_bot.mp4"))
    args = p.parse_args()
    asyncio.run(run_offline(args.audio, args.face, args.out))


if __name__ == "__main__":
    main()
