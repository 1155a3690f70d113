"""``avatar-stream``: a face photo + live speech -> lip-synced face video, frame by frame.

    avatar-stream --face me.jpg --mic --window
    avatar-stream --face me.jpg --audio talk.wav --out talk.mp4
    arecord -f S16_LE -r 16000 -c 1 | avatar-stream --face me.jpg --stdin --virtual-cam

Every bad input ends in one line on stderr and a non-zero exit (2 for usage/input errors).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path

from avatar_stream import __version__
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.framing import FITS, MAX_SIDE
from avatar_stream.engine.gate import DEFAULT_THRESHOLD_DBFS, parse_gate
from avatar_stream.engine.model import AUDIO_BACKENDS
from avatar_stream.engine.stream import RENDERERS
from avatar_stream.errors import AvatarError

log = logging.getLogger("avatar_stream")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avatar-stream",
        description="Real-time talking head: one face photo + speech -> lip-synced video.",
    )
    p.add_argument("--face", type=Path, help="face photo (jpg/png/...); default: the bundled demo face")
    p.add_argument("--face-index", type=int, default=None,
                   help="which face to use when the photo has several (0 = largest)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mic", action="store_true", help="live input from the default (or --mic-device) microphone")
    src.add_argument("--audio", type=Path, help="audio or video file (wav/flac/mp3/mp4/mpg)")
    src.add_argument("--stdin", action="store_true",
                     help="raw signed 16-bit little-endian PCM on stdin (--stdin-rate, --stdin-channels)")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--mic-device", default=None, help="microphone index or name (see --list-devices)")
    p.add_argument("--mic-rate", type=int, default=None,
                   help="microphone capture rate in Hz (default: the device's own; resampled to 16 kHz)")
    p.add_argument("--stdin-rate", type=int, default=tb.SAMPLE_RATE, help="sample rate of --stdin PCM (Hz)")
    p.add_argument("--stdin-channels", type=int, default=1,
                   help="interleaved channels of --stdin PCM (default 1; averaged to mono for the model)")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="stop after this much input audio (any source)")
    p.add_argument("--realtime", action="store_true",
                   help="pace --audio (or --stdin) to the wall clock, as a microphone would deliver it; frames "
                        "are dropped when compute falls behind")
    p.add_argument("--out", type=Path, help="write an mp4 (H.264 + AAC, input audio muxed in sync)")
    p.add_argument("--virtual-cam", action="store_true", help="send frames to a virtual webcam (pyvirtualcam)")
    p.add_argument("--window", action="store_true", help="show a preview window (OpenCV)")
    p.add_argument("--audio-out", default=None, metavar="DEVICE",
                   help="play the input audio on DEVICE delayed by the engine's latency (A/V sync for calls)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    p.add_argument("--audio-backend", default="cpu", choices=AUDIO_BACKENDS,
                   help="where the audio graph (MFCC + Audio2AU LSTMs) runs: cpu (default; faster than a GPU "
                        "for it, see docs/export.md) or the same as --backend")
    p.add_argument("--model", type=Path, default=None,
                   help="exported model directory (avatar-export --out); default: the shipped starter")
    p.add_argument("--renderer", default=RENDERERS[0], choices=RENDERERS,
                   help="warp (default): the photo itself, its mouth moved to the shape the model's mouth "
                        "head predicts, with a real mouth's inside; neural: the TCSAN generator's face")
    p.add_argument("--still", action="store_true",
                   help="no idle blinks or head sway: only the mouth moves")
    p.add_argument("--noise-gate", default=str(DEFAULT_THRESHOLD_DBFS), metavar="DBFS|off",
                   help="frames whose audio stays below this level (loudest 20 ms, dBFS) keep the photo's "
                        "mouth, so room noise does not move it (default %(default)s; lower it for a very "
                        "quiet microphone, 'off' to disable)")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="output size; the photo is scaled and framed to it once, at load, so the work per frame "
                        "depends on this size, not the photo's (default: the photo's own aspect, at most "
                        f"{MAX_SIDE} px on its long side)")
    p.add_argument("--fit", default="crop", choices=FITS,
                   help="with --size: crop (fill the frame, centred on the face; default) or letterbox (the whole "
                        "photo, black bars)")
    p.add_argument("--crop-only", action="store_true", help="output the 112x112 generated crop only")
    p.add_argument("--max-backlog", type=int, default=2,
                   help="live mode: ready frames allowed to wait before the oldest are dropped")
    p.add_argument("--report-json", type=Path, default=None, help="write the end-of-run report as JSON")
    p.add_argument("--quiet", action="store_true", help="only errors")
    p.add_argument("--version", action="version", version=f"avatar-stream {__version__}")
    return p


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--size {text!r} is not WIDTHxHEIGHT with positive integers, e.g. 640x640") from None
    return w, h


class UsageError(AvatarError, ValueError):
    pass


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def _open_source(args):
    from avatar_stream.engine.sources import FileSource, MicSource, StdinSource

    if args.mic:
        return MicSource(device=_device_arg(args.mic_device), sample_rate=args.mic_rate), True
    if args.stdin:
        log.info("reading raw PCM from stdin: signed 16-bit little-endian, %d channel(s), %d Hz "
                 "(--stdin-channels, --stdin-rate)%s", args.stdin_channels, args.stdin_rate,
                 "; paced to the wall clock (--realtime)" if args.realtime else "")
        return StdinSource(sample_rate=args.stdin_rate, channels=args.stdin_channels,
                           realtime=args.realtime), bool(args.realtime)
    from avatar_stream import DEMO_SPEECH

    path = args.audio if args.audio is not None else DEMO_SPEECH
    return FileSource(path, realtime=args.realtime), bool(args.realtime)


def _duration_samples(seconds: float) -> int:
    if not 0 < seconds < float("inf"):
        raise UsageError(f"--duration must be a positive number of seconds, got {seconds}")
    return round(seconds * tb.SAMPLE_RATE)


def _device_arg(value: str | None):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def _open_sinks(args, stack: ExitStack, size: tuple[int, int], latency_samples: int, source=None,
                live: bool = False):
    from avatar_stream.engine import sinks as S

    video, audio = [], []
    w, h = size
    if args.out is not None:
        # The mp4 carries the user's own audio, at its own rate and channels.
        rate, channels = source.raw_format if source is not None else (tb.SAMPLE_RATE, 1)
        if source is not None:
            source.keep_raw()
        # Live, the encoder shares the frame's 40 ms with the model: x264's "superfast" costs
        # about two thirds of "veryfast" (11 against 17 ms at 1280x1280 here, and far fewer
        # 80 ms spikes) for a larger file.
        mp4 = stack.enter_context(S.Mp4Sink(args.out, fps=tb.FPS, size=(w, h), audio_sample_rate=rate,
                                            audio_channels=channels, preset="superfast" if live else "veryfast"))
        video.append(mp4)
        audio.append(mp4)
    if args.virtual_cam:
        video.append(stack.enter_context(S.VirtualCamSink(w, h, tb.FPS)))
    if args.window:
        video.append(stack.enter_context(S.WindowSink("avatar-stream")))
    if args.audio_out is not None:
        audio.append(stack.enter_context(S.AudioOutSink(_device_arg(args.audio_out), latency_samples)))
    return video, audio


def run(args) -> int:
    from avatar_stream.engine.face import read_image
    from avatar_stream.engine.session import SessionOptions, limit_samples, run_session
    from avatar_stream.engine.stream import Engine

    if args.list_devices:
        from avatar_stream.engine.sources import list_devices

        devices = list_devices()
        for index, name, inputs, rate in devices:
            print(f"{index:3d}  {name}  (inputs: {inputs}, default rate {rate} Hz)")
        if not devices:
            print("no audio input devices found (is a microphone connected, and may this user use it?)")
        return 0
    if not (args.out or args.virtual_cam or args.window):
        raise UsageError("no output chosen: add --out FILE.mp4, --virtual-cam and/or --window")
    size = _parse_size(args.size)
    limit = None if args.duration is None else _duration_samples(args.duration)
    if args.max_backlog < 1:
        raise UsageError(f"--max-backlog must be at least 1, got {args.max_backlog}")
    try:
        gate = parse_gate(args.noise_gate)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from avatar_stream import DEMO_FACE

    face_path = args.face if args.face is not None else DEMO_FACE
    photo = read_image(face_path)
    engine = Engine(args.model, backend=args.backend, renderer=args.renderer, noise_gate_dbfs=gate,
                    audio_backend=args.audio_backend, alive=not args.still)
    card = engine.model.card
    log.info("model: %s (checkpoint %s, %s)", engine.model.model_dir, card.checkpoint_sha256[:12], card.precision)
    how = ("TCSAN decoder" if engine.renderer == "neural" else
           "mouth head learned from real video" if engine.has_mouth_head else "Audio2AU drive: the model has no mouth.onnx")
    log.info("renderer: %s (%s%s)", engine.renderer, how, "" if engine.alive else "; still: no blinks or sway")
    log.info("backend: %s (providers: %s; audio graph on %s)", engine.backend, ", ".join(engine.model.providers),
             engine.model.audio.providers[0])
    log.info("noise gate: %s", f"{gate:g} dBFS (--noise-gate)" if gate is not None else "off")
    log.info("algorithmic latency: %.1f ms from a frame's first audio sample to its earliest display "
             "(frame %.0f ms + MFCC window lookahead %.1f ms + TCSAN lookahead %d frames = %.0f ms)",
             engine.latency.ms, 1000 / tb.FPS, 1000 * tb.AUDIO_LOOKAHEAD_SAMPLES / tb.SAMPLE_RATE,
             engine.lookahead_frames, 1000 * engine.lookahead_frames / tb.FPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = engine.create_stream(photo, face_index=args.face_index, output_size=size,
                                      crop_only=args.crop_only, fit=args.fit)
    for w in caught:
        log.warning("%s", w.message)
    out_h, out_w = (112, 112) if args.crop_only else stream.face.photo.shape[:2]
    fr = stream.face.framing
    if not args.crop_only and (fr.scale != 1.0 or (out_w, out_h) != (photo.shape[1], photo.shape[0])):
        log.info("photo %dx%d -> output %dx%d (scaled %.3g, %s%s)", photo.shape[1], photo.shape[0], out_w, out_h,
                 fr.scale, fr.fit, "" if size else "; --size WxH for another size")
    engine.warm_up(stream.face)
    with ExitStack() as stack:
        source, live = _open_source(args)
        stack.callback(source.close)
        video, audio = _open_sinks(args, stack, (out_w, out_h), engine.latency.samples, source, live)
        chunks = source if limit is None else limit_samples(source, limit)
        report = run_session(stream, chunks, video, audio,
                             SessionOptions(live=live, max_backlog=args.max_backlog, warn=log.warning),
                             raw_audio=source.take_raw)
    if report.frames == 0 and not report.interrupted:
        if args.out is not None:
            args.out.unlink(missing_ok=True)  # a video without a frame does not play
        what = "stdin delivered no audio (it was empty or closed at once)" if args.stdin else \
            "the input ended before the first frame"
        raise UsageError(f"{what}: nothing was written; give at least {tb.SAMPLES_PER_FRAME} samples "
                         f"({1000 // tb.FPS} ms) of audio")
    for line in report.lines():
        log.info("%s", line)
    if args.report_json is not None:
        import json

        args.report_json.write_text(json.dumps(report.to_dict(), indent=2))
    if args.out is not None:
        log.info("wrote %s", args.out)
    return 130 if report.interrupted else 0


def _setup_logging(quiet: bool) -> None:
    """Our messages go to the current stderr as 'avatar-stream: ...' lines (set per call, so
    repeated in-process calls do not stack handlers)."""
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("avatar-stream: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.ERROR if quiet else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        # Our own errors are one actionable line; anything else shows its type too.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"avatar-stream: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:  # None: not set from Python; nothing to put back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
