"""``avatar-bench``: speed and memory of an exported model on this machine (not a test).

    avatar-bench [--model DIR] [--backend auto|cpu|cuda|tensorrt] [--batch 1,8,32] [--json out.json]

Prints a table and writes JSON:
- per-graph latency (median and p99 over ``--repeat`` runs after warm-up) at each batch size,
  i.e. what one call of identity.onnx / audio.onnx / tcsan_decoder.onnx costs;
- the streaming step (features + decoder + paste-back at the photo's resolution) measured by
  running the real Stream over ``--seconds`` of the bundled speech, with its real-time factor;
- peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from avatar_stream import DEMO_FACE, DEMO_SPEECH, __version__
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.framing import FITS
from avatar_stream.engine.model import AUDIO_BACKENDS
from avatar_stream.engine.stream import RENDERERS


def _feeds(model, batch: int) -> dict[str, dict[str, np.ndarray]]:
    """Inputs of each graph at ``batch``, with shapes from the model card."""
    rng = np.random.default_rng(0)
    feeds = {}
    for graph, card in model.cards.items():
        feeds[graph] = {
            name: rng.random([batch if d == "B" else int(d) for d in dims], dtype=np.float32)
            for name, dims in card.inputs.items()
        }
    return feeds


def _time(fn, repeat: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    a = np.asarray(ts) * 1000.0
    return float(np.median(a)), float(np.percentile(a, 99))


def bench_graphs(model, batches: list[int], repeat: int) -> list[dict]:
    runners = {"identity": model.identity, "audio": model.audio, "tcsan_decoder": model.decoder}
    if model.mouth is not None:
        runners["mouth"] = model.mouth
    rows = []
    for b in batches:
        feeds = _feeds(model, b)
        for graph, runner in runners.items():
            p50, p99 = _time(lambda r=runner, f=feeds[graph]: r.run(f), repeat)
            rows.append({"graph": graph, "batch": b, "ms_p50": p50, "ms_p99": p99,
                         "ms_per_item": p50 / b})
    return rows


def bench_stream(engine, seconds: float, photo=None, size: tuple[int, int] | None = None,
                 fit: str = "crop") -> dict:
    """The real streaming loop over ``seconds`` of the bundled speech (looped), pushed one
    video frame of audio at a time as fast as possible; every step timed. ``photo``: an
    image path (default: the bundled photo), framed to ``size`` as ``avatar-stream`` does."""
    from avatar_stream.engine.audio import load_audio
    from avatar_stream.engine.face import read_image

    n = int(seconds * tb.SAMPLE_RATE)
    audio = np.resize(load_audio(DEMO_SPEECH), n)
    image = read_image(photo or DEMO_FACE)
    t = time.perf_counter()
    face = engine.prepare_face(image, output_size=size, fit=fit)
    prepare_s = time.perf_counter() - t
    stream = engine.create_stream(face)
    step_ms = []
    t0 = time.perf_counter()
    for i in range(0, n, tb.SAMPLES_PER_FRAME):
        stream.accept_waveform(audio[i : i + tb.SAMPLES_PER_FRAME])
        if i + tb.SAMPLES_PER_FRAME >= n:
            stream.input_finished()
        while stream.is_ready():
            t = time.perf_counter()
            stream.step()
            step_ms.append((time.perf_counter() - t) * 1000.0)
    wall = time.perf_counter() - t0
    frames = len(step_ms)
    return {
        "frames": frames, "audio_seconds": n / tb.SAMPLE_RATE, "wall_seconds": wall,
        "fps": frames / wall, "realtime_factor": (n / tb.SAMPLE_RATE) / wall,
        "step_ms_p50": float(np.median(step_ms)), "step_ms_p99": float(np.percentile(step_ms, 99)),
        "output_size": list(face.photo.shape[:2]), "photo_size": list(image.shape[:2]),
        "prepare_seconds": prepare_s,
    }


def bench_many(engine, n_streams: int, seconds: float) -> dict:
    """``n_streams`` sessions stepped together (``step_many``: one batched decoder call per
    round): aggregate frames per second, i.e. how many real-time streams one process serves."""
    from avatar_stream.engine.audio import load_audio
    from avatar_stream.engine.face import read_image
    from avatar_stream.engine.stream import step_many

    n = int(seconds * tb.SAMPLE_RATE)
    audio = np.resize(load_audio(DEMO_SPEECH), n)
    face = engine.prepare_face(read_image(DEMO_FACE))
    streams = [engine.create_stream(face) for _ in range(n_streams)]
    frames = 0
    t0 = time.perf_counter()
    for i in range(0, n, tb.SAMPLES_PER_FRAME):
        for s in streams:
            s.accept_waveform(audio[i : i + tb.SAMPLES_PER_FRAME])
            if i + tb.SAMPLES_PER_FRAME >= n:
                s.input_finished()
        while any(s.is_ready() for s in streams):
            frames += sum(f is not None for f in step_many(streams))
    wall = time.perf_counter() - t0
    fps = frames / wall
    return {"streams": n_streams, "frames": frames, "wall_seconds": wall, "fps": fps,
            "realtime_streams": fps / tb.FPS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avatar-bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="exported model dir (default: the starter)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    p.add_argument("--audio-backend", default="cpu", choices=AUDIO_BACKENDS,
                   help="where the audio graph runs: cpu (default) or the same as --backend")
    p.add_argument("--renderer", default=RENDERERS[0], choices=RENDERERS)
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes for the per-graph table")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--seconds", type=float, default=10.0, help="audio length for the streaming run")
    p.add_argument("--streams", type=int, default=0,
                   help="also run N sessions batched together (step_many) and report aggregate fps")
    p.add_argument("--photo", type=Path, default=None, help="face photo for the streaming runs (default: bundled)")
    p.add_argument("--size", default=None, metavar="WxH", help="output size, as avatar-stream --size")
    p.add_argument("--fit", default="crop", choices=FITS)
    p.add_argument("--serve", default=None, metavar="N[,N...]",
                   help="instead: sessions held by avatar-serve with N loopback WebRTC peers each (drops, "
                        "latency), for each N; --seconds per run")
    p.add_argument("--json", type=Path, default=Path("bench.json"))
    args = p.parse_args(argv)
    if args.serve is not None:
        return _serve(args)
    from avatar_stream.engine.stream import Engine

    try:
        batches = [int(b) for b in args.batch.split(",")]
        if min(batches) < 1 or args.repeat < 1 or not args.seconds * tb.SAMPLE_RATE >= tb.SAMPLES_PER_FRAME:
            raise ValueError("--batch sizes and --repeat must be at least 1, --seconds at least one "
                             f"frame ({1 / tb.FPS} s)")
        size = None
        if args.size is not None:
            try:
                size = tuple(int(v) for v in args.size.lower().split("x"))
                assert len(size) == 2 and min(size) > 0
            except (ValueError, AssertionError):
                raise ValueError(f"--size {args.size!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
        engine = Engine(args.model, backend=args.backend, renderer=args.renderer, audio_backend=args.audio_backend)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"avatar-bench: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    graphs = bench_graphs(engine.model, batches, args.repeat)
    try:
        stream = bench_stream(engine, args.seconds, args.photo, size, args.fit)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"avatar-bench: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    many = bench_many(engine, args.streams, args.seconds) if args.streams > 0 else None
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result = {
        "version": __version__, "model": str(engine.model.model_dir), "backend": engine.backend,
        "providers": list(engine.model.providers), "audio_providers": list(engine.model.audio.providers),
        "precision": engine.model.card.precision,
        "renderer": args.renderer, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "latency_ms_algorithmic": engine.latency.ms,
        "graphs": graphs, "stream": stream, "many_streams": many, "peak_rss_mb": peak_mb,
    }
    print(f"model {result['model']}  backend {result['backend']} (audio graph: "
          f"{result['audio_providers'][0]})  precision {result['precision']}")
    print(f"{'graph':<15}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}{'ms/item':>10}")
    for r in graphs:
        print(f"{r['graph']:<15}{r['batch']:>6}{r['ms_p50']:>10.2f}{r['ms_p99']:>10.2f}{r['ms_per_item']:>10.2f}")
    s = stream
    print(f"stream ({args.renderer}, {s['photo_size'][1]}x{s['photo_size'][0]} photo, "
          f"{s['output_size'][1]}x{s['output_size'][0]} output, prepared in {s['prepare_seconds']:.2f} s): "
          f"{s['frames']} frames in {s['wall_seconds']:.2f} s = {s['fps']:.1f} fps, "
          f"{s['realtime_factor']:.2f}x real time; step p50 {s['step_ms_p50']:.1f} ms, "
          f"p99 {s['step_ms_p99']:.1f} ms (budget {1000 / tb.FPS:.0f} ms)")
    if many is not None:
        print(f"{many['streams']} streams batched: {many['fps']:.1f} frames/s in total = "
              f"{many['realtime_streams']:.1f} real-time streams")
    print(f"algorithmic latency {engine.latency.ms:.1f} ms; peak RSS {peak_mb:.0f} MB")
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


def _serve(args) -> int:
    from avatar_stream.engine import bench_serve

    try:
        counts = [int(n) for n in args.serve.split(",")]
        if min(counts) < 1:
            raise ValueError
    except ValueError:
        print(f"avatar-bench: error: --serve {args.serve!r}: pass session counts, e.g. 1,2,3", file=sys.stderr)
        return 2
    extra = ["--renderer", args.renderer, "--backend", args.backend]
    if args.model is not None:
        extra += ["--model", str(args.model)]
    try:
        rows = bench_serve.run(counts, args.seconds, extra)
    except (RuntimeError, OSError) as e:
        print(f"avatar-bench: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    bench_serve.report(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
