"""The streaming API in twenty lines: a photo + an audio file -> frames, pushed the way a
microphone would push them (one 10 ms chunk at a time), written to an mp4 with the audio.

    python demos/stream_api.py --face me.jpg --audio talk.wav --out talk.mp4 [--model DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avatar_stream import DEMO_FACE, DEMO_SPEECH
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.face import read_image
from avatar_stream.engine.sinks import Mp4Sink
from avatar_stream.engine.stream import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--face", type=Path, default=DEMO_FACE)
    p.add_argument("--audio", type=Path, default=DEMO_SPEECH)
    p.add_argument("--out", type=Path, default=Path("stream_api.mp4"))
    p.add_argument("--model", type=Path, default=None, help="avatar-export dir (default: starter)")
    args = p.parse_args()

    engine = Engine(args.model, backend="auto")  # immutable: share it between sessions
    photo = read_image(args.face)
    stream = engine.create_stream(photo)  # all per-session state lives here
    audio = load_audio(args.audio)
    print(f"backend {engine.backend}, algorithmic latency {engine.latency.ms:.1f} ms")
    h, w = photo.shape[:2]
    with Mp4Sink(args.out, fps=25, size=(w, h)) as mp4:
        for i in range(0, len(audio), 160):  # 10 ms chunks, like a microphone callback
            chunk = audio[i : i + 160]
            stream.accept_waveform(chunk, 16000)
            mp4.write_audio(chunk)
            while stream.is_ready():
                frame = stream.step()  # frame.pts is in samples: frame.index * 640
                mp4.write(frame.image, frame.pts)
        stream.input_finished()  # flush the last frames (their lookahead is zero padding)
        while stream.is_ready():
            frame = stream.step()
            mp4.write(frame.image, frame.pts)
    print(f"{stream.frames_out} frames -> {args.out}")


if __name__ == "__main__":
    main()
