"""One live session: audio source -> Stream -> sinks, paced by the audio clock.

The audio clock is the master. The source delivers audio as it is captured (a microphone
callback thread, or a file paced in real time); this loop never makes capture wait. When
compute falls behind, frames pile up as "ready" in the stream; in live mode the loop keeps
at most ``max_backlog`` of them and drops the oldest (counted), so latency stays bounded
and there is no drift: frame k always carries pts = k * 640 samples and shows the face for
exactly that audio, whatever was dropped before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from avatar_stream.engine import timebase as tb
from avatar_stream.engine.stream import Stream

WARN_EVERY_S = 5.0


@dataclass(frozen=True)
class SessionOptions:
    live: bool = False  # drop frames when behind (microphone, --realtime); offline: never drop
    max_backlog: int = 2  # ready frames allowed to wait before the oldest are dropped
    # Called with a one-line message when live compute falls behind (at most every
    # WARN_EVERY_S seconds); None: silent (the report still counts the drops).
    warn: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.max_backlog < 1:  # 0 would drop every frame in live mode
            raise ValueError(f"max_backlog must be at least 1, got {self.max_backlog}")


@dataclass(frozen=True)
class SessionReport:
    frames: int
    dropped: int
    audio_seconds: float
    wall_seconds: float
    fps: float
    step_ms_p50: float
    step_ms_p99: float
    features_ms_p50: float
    decode_ms_p50: float
    paste_ms_p50: float
    max_backlog_seen: int
    interrupted: bool
    quit: bool = False  # a sink asked to stop (q / Esc / closed preview window)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"frames {self.frames}, dropped {self.dropped}, audio {self.audio_seconds:.2f} s, "
            f"wall {self.wall_seconds:.2f} s, {self.fps:.1f} fps",
            f"step time p50 {self.step_ms_p50:.1f} ms, p99 {self.step_ms_p99:.1f} ms "
            f"(features p50 {self.features_ms_p50:.1f} ms, decode p50 {self.decode_ms_p50:.1f} ms, "
            f"paste-back p50 {self.paste_ms_p50:.1f} ms; budget {1000 / tb.FPS:.0f} ms)",
        ]


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if len(values) else 0.0


def run_session(stream: Stream, source: Iterable[np.ndarray], sinks: Sequence = (),
                audio_sinks: Sequence = (), options: SessionOptions = SessionOptions(),
                raw_audio: Callable[[], np.ndarray | None] | None = None) -> SessionReport:
    """Drive ``stream`` from ``source`` until the source ends, a sink asks to quit, or
    KeyboardInterrupt (SIGINT, or SIGTERM turned into one by the CLI). Sinks are written but
    not closed: the caller owns them (``with`` blocks), so an interrupted mp4 is still
    finalised. ``raw_audio`` (e.g. ``AudioSource.take_raw``): the audio as it arrived since
    the last call, given to the audio sinks that take it (``takes_raw_audio``: the mp4 keeps
    the user's own rate and channels); the others get the engine's 16 kHz mono."""
    t0 = time.perf_counter()
    interrupted = quit_ = False
    max_backlog_seen = 0
    warned_at = -WARN_EVERY_S

    def behind() -> None:
        nonlocal warned_at
        now = time.perf_counter()
        if options.warn is None or now - warned_at < WARN_EVERY_S:
            return
        warned_at = now
        options.warn(f"compute is behind real time: {stream.frames_dropped} frame(s) dropped so far (step p50 "
                     f"{_pct(stream.times.step[-50:], 50):.1f} ms, budget {1000 / tb.FPS:.0f} ms): try a smaller "
                     "--size, --still, --renderer warp or a GPU backend")

    def drain(finished: bool = False) -> bool:
        """Render what is ready; True when a sink asks to stop."""
        nonlocal max_backlog_seen
        while stream.is_ready():
            # After the input ends, the last R frames become ready at once by design (their
            # lookahead is padding, not late audio): they are rendered, never dropped.
            if options.live and not finished:
                backlog = stream.ready_count()
                max_backlog_seen = max(max_backlog_seen, backlog)
                if backlog > options.max_backlog:
                    stream.skip(backlog - options.max_backlog)
                    behind()
                    continue
            frame = stream.step()
            for s in sinks:
                s.write(frame.image, frame.pts)
            if any(getattr(s, "quit_requested", False) for s in sinks):
                return True
        return False

    try:
        for chunk in source:
            stream.accept_waveform(chunk, tb.SAMPLE_RATE)
            raw = raw_audio() if raw_audio is not None else None
            for s in audio_sinks:
                if raw is not None and getattr(s, "takes_raw_audio", False):
                    s.write_audio_raw(raw)
                else:
                    s.write_audio(chunk)
            if drain():
                quit_ = True
                break
        else:
            stream.input_finished()
            quit_ = drain(finished=True)
    except KeyboardInterrupt:
        interrupted = True
    wall = time.perf_counter() - t0
    t = stream.times
    return SessionReport(
        frames=stream.frames_out, dropped=stream.frames_dropped,
        audio_seconds=stream.samples_received / tb.SAMPLE_RATE, wall_seconds=wall,
        fps=stream.frames_out / wall if wall > 0 else 0.0,
        step_ms_p50=_pct(t.step, 50), step_ms_p99=_pct(t.step, 99),
        features_ms_p50=_pct(t.features, 50), decode_ms_p50=_pct(t.decode, 50),
        paste_ms_p50=_pct(t.paste, 50), max_backlog_seen=max_backlog_seen, interrupted=interrupted, quit=quit_,
    )


def limit_samples(source: Iterable[np.ndarray], n: int) -> Iterator[np.ndarray]:
    """The first ``n`` samples of ``source`` (the last chunk cut), then stop."""
    left = n
    for chunk in source:
        if left <= 0:
            break
        yield chunk[:left]
        left -= len(chunk)
        if left <= 0:
            return
