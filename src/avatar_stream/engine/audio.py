"""Audio front-end: decode any media file to 16 kHz mono float32, resample streams, validate.

Everything that enters the project as sound passes through here (docs/design.md §3: 16 kHz
mono float32 inside; resample anything else on entry). There is ONE resampler,
:class:`StreamResampler`, a polyphase Kaiser-windowed-sinc FIR with carried state; file
decoding uses it too (:func:`resample`), so a file and a microphone delivering the same
samples at the same rate produce the same 16 kHz signal, bit for bit.

numpy + PyAV only: the runtime engine must not import torch.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from avatar_stream.engine.timebase import SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar_stream.errors import AvatarError

SILENCE_THRESHOLD = 1e-4  # peak |x| below this is treated as silence (a muted or dead input)

# Resampler design. The anti-aliasing low-pass is centred at ROLLOFF x the lower Nyquist
# frequency; ZERO_CROSSINGS sinc lobes each side with a Kaiser window (beta 8, about 80 dB
# stop-band) put the transition band (about 6.5 - 7.9 kHz for a 16 kHz output) entirely
# below the output Nyquist frequency, so nothing aliases into the speech band.
ROLLOFF = 0.9
ZERO_CROSSINGS = 24
KAISER_BETA = 8.0
_BLOCK = 8192  # outputs computed per vectorised step (bounds temporary memory)


class AudioError(AvatarError, ValueError):
    """An input that cannot be used as audio; the message is one line saying what to do."""


def _seconds_ms(n_samples: int, sample_rate: int) -> str:
    return f"{1000.0 * n_samples / sample_rate:.1f} ms"


def check_audio(
    samples: np.ndarray,
    sample_rate: int,
    *,
    allow_silence: bool = False,
    min_samples: int = SAMPLES_PER_FRAME,
    source: str = "audio",
) -> np.ndarray:
    """Validate a signal at an input boundary and return it as contiguous float32 ``(N,)``.

    Checks, in order: 1-D floating-point samples, ``sample_rate == SAMPLE_RATE``, not empty,
    at least ``min_samples`` long (default one video frame; pass 0 for stream chunks), all
    finite, and (unless ``allow_silence``) not silent (peak below ``SILENCE_THRESHOLD``).
    ``source`` names the input in messages (a path, "microphone", "stdin").
    """
    x = np.asarray(samples)
    if x.ndim != 1:
        raise AudioError(f"{source}: expected mono samples of shape (N,), got {x.shape}; downmix first")
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioError(
            f"{source}: expected float samples in [-1, 1], got {x.dtype}; convert 16-bit PCM with read_pcm16()"
        )
    if sample_rate != SAMPLE_RATE:
        raise AudioError(
            f"{source}: sample rate is {sample_rate} Hz but {SAMPLE_RATE} Hz is required; "
            "resample it with avatar_stream.engine.audio.resample() or StreamResampler"
        )
    if len(x) == 0:
        raise AudioError(f"{source}: audio is empty (0 samples); pass a recording that contains sound")
    if len(x) < min_samples:
        raise AudioError(
            f"{source}: audio is {_seconds_ms(len(x), sample_rate)} long, shorter than one video frame; "
            f"at least {_seconds_ms(min_samples, sample_rate)} ({min_samples} samples) is needed"
        )
    finite = np.isfinite(x)
    if not finite.all():
        first = int(np.argmin(finite))
        raise AudioError(
            f"{source}: {int((~finite).sum())} samples are NaN or infinite (first at "
            f"{first / sample_rate:.3f} s); the file or the upstream processing is corrupt"
        )
    if not allow_silence and float(np.max(np.abs(x))) < SILENCE_THRESHOLD:
        raise AudioError(
            f"{source}: audio is silent (peak below {SILENCE_THRESHOLD:g}); check the recording "
            "level or that the right input device / file was chosen"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def read_pcm16(data: bytes) -> np.ndarray:
    """Raw signed 16-bit little-endian mono PCM bytes -> float32 samples in ``[-1, 1)``.

    A stream reader that can split a sample across reads must carry the odd byte itself;
    this function takes whole samples only.
    """
    if len(data) % 2:
        raise AudioError(
            f"raw PCM has an odd number of bytes ({len(data)}); expected 16-bit little-endian mono samples"
        )
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768.0)


@functools.lru_cache(maxsize=8)
def _kernel_table(up: int, down: int) -> tuple[np.ndarray, int]:
    """Polyphase weights ``(up, 2 * half)`` for output time ``i0 + p / up`` (in input samples).

    Row ``p`` weights input samples ``i0 - half + 1 .. i0 + half``. Each row is normalised
    to sum to 1 so a constant signal passes unchanged whatever the phase. Cached and
    read-only: resamplers for the same rates share one table.
    """
    # Cut-off in cycles per input sample: the lower of the two Nyquist rates, times ROLLOFF.
    fc = 0.5 * ROLLOFF * min(1.0, up / down)
    half_width = ZERO_CROSSINGS / (2.0 * fc)  # kernel half-length in input samples
    half = int(math.ceil(half_width))
    p = np.arange(up, dtype=np.float64)[:, None] / up
    j = np.arange(-half + 1, half + 1, dtype=np.float64)[None, :]
    t = p - j
    inside = np.abs(t) < half_width
    arg = np.sqrt(np.clip(1.0 - (t / half_width) ** 2, 0.0, None))
    w = np.where(inside, np.i0(KAISER_BETA * arg) / np.i0(KAISER_BETA), 0.0)
    table = 2.0 * fc * np.sinc(2.0 * fc * t) * w
    table = np.ascontiguousarray(table / table.sum(axis=1, keepdims=True))
    table.flags.writeable = False
    return table, half


class StreamResampler:
    """Streaming polyphase resampler, ``in_rate -> out_rate``, exact rational ratio.

    Output sample ``n`` is the band-limited value of the input at time ``n * in_rate / out_rate``
    (no delay: output and input timelines coincide; the stream is zero before its start
    and after ``flush()``). Contract: for any split of a signal into chunks, the
    concatenation of ``process()`` outputs and ``flush()`` is bit-identical to one
    ``process(signal)`` + ``flush()``, and has ``ceil(len(signal) * out_rate / in_rate)``
    samples. Outputs appear once the ``half`` input samples after them (the lookahead,
    ``lookahead_samples``) have arrived.
    """

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE) -> None:
        if int(in_rate) != in_rate or int(out_rate) != out_rate or in_rate <= 0 or out_rate <= 0:
            raise AudioError(f"sample rates must be positive integers in Hz, got {in_rate} -> {out_rate}")
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        g = math.gcd(self.in_rate, self.out_rate)
        self._up, self._down = self.out_rate // g, self.in_rate // g
        self._passthrough = self._up == self._down
        if self._passthrough:
            self._table, self._half = np.ones((1, 1)), 0
        else:
            self._table, self._half = _kernel_table(self._up, self._down)
        self._taps = np.arange(-self._half + 1, self._half + 1, dtype=np.int64)
        self.reset()

    @property
    def lookahead_samples(self) -> int:
        """Input samples needed past an output's time before it can be produced."""
        return self._half

    def reset(self) -> None:
        """Forget the stream: the next ``process`` starts a new signal at time 0."""
        # _buf holds input samples from absolute index _buf_start; indices < 0 are the
        # zeros before the stream start, stored so that early outputs need no special case.
        self._buf = np.zeros(self._half, dtype=np.float64)
        self._buf_start = -self._half
        self._n_in = 0
        self._n_out = 0

    def silence_history(self) -> None:
        """Take every input received so far as zeros for the outputs still to come (their
        count and timing are unchanged): the signal is cut off where the emitted output ends."""
        self._buf[:] = 0.0

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Append input samples (1-D float); return the float32 outputs that became ready."""
        x = np.asarray(chunk)
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
            raise AudioError(
                f"resampler input must be 1-D float samples, got {x.dtype} {x.shape}; "
                "downmix to mono and convert 16-bit PCM with read_pcm16()"
            )
        if self._passthrough:
            self._n_in += len(x)
            self._n_out += len(x)
            return x.astype(np.float32, copy=True)
        self._buf = np.concatenate([self._buf, x.astype(np.float64)])
        self._n_in += len(x)
        # Output n is ready when input (n * down) // up + half has arrived.
        n_end = max(self._n_out, -((self._half - self._n_in) * self._up // self._down))
        return self._emit(n_end)

    def flush(self) -> np.ndarray:
        """End the stream: return the remaining outputs (input taken as zeros past its end)
        and reset, so the object can start a new signal."""
        if self._passthrough:
            self.reset()
            return np.zeros(0, dtype=np.float32)
        n_total = -(-self._n_in * self._up // self._down)
        self._buf = np.concatenate([self._buf, np.zeros(self._half + 1, dtype=np.float64)])
        out = self._emit(n_total)
        self.reset()
        return out

    def _emit(self, n_end: int) -> np.ndarray:
        parts = []
        for n0 in range(self._n_out, n_end, _BLOCK):
            n = np.arange(n0, min(n0 + _BLOCK, n_end), dtype=np.int64)
            u = n * self._down
            i0, phase = u // self._up, u % self._up
            idx = (i0 - self._buf_start)[:, None] + self._taps[None, :]
            # Row-wise multiply and sum: each output's arithmetic depends only on its own
            # row, never on how many outputs share the call -> chunking-invariant bits.
            parts.append((self._table[phase] * self._buf[idx]).sum(axis=1).astype(np.float32))
        self._n_out = max(self._n_out, n_end)
        # Drop input no future output can reach.
        keep_from = (self._n_out * self._down) // self._up - self._half + 1
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start :]
            self._buf_start = keep_from
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def resample(x: np.ndarray, in_rate: int, out_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One-shot resampling of a whole signal with :class:`StreamResampler` (same bits)."""
    r = StreamResampler(in_rate, out_rate)
    return np.concatenate([r.process(x), r.flush()])


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise AudioError(f"audio file not found: {path}; check the path")
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file; pass a wav/flac/mp3/mp4 file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise AudioError(
            f"{path} is not a readable media file ({e.__class__.__name__}); "
            "pass a wav/flac/mp3/mp4 file or convert it with ffmpeg"
        ) from e


class _VideoSpan:
    """Time span of a video stream from its packet timestamps (seconds, exact fractions)."""

    def __init__(self, video) -> None:
        self.stream = video
        self.time_base = video.time_base
        rate = video.average_rate
        # mpeg-ps leaves some packet durations at 0: fall back to one frame at the average rate.
        self.default_duration = round(1 / (rate * video.time_base)) if rate else 0
        self.start = self.end = None

    def add(self, packet) -> None:
        if packet.pts is None:
            return
        stop = packet.pts + (packet.duration or self.default_duration)
        self.start = packet.pts if self.start is None else min(self.start, packet.pts)
        self.end = stop if self.end is None else max(self.end, stop)

    def seconds(self) -> tuple[Fraction, Fraction] | None:
        if self.start is None or self.end <= self.start:
            return None
        return self.start * self.time_base, self.end * self.time_base


def _decode(
    path: Path, container, stream, span: _VideoSpan | None, keep_channels: bool = False
) -> tuple[np.ndarray, int, Fraction | None]:
    """One demux pass: all samples of ``stream`` averaged to mono float32 (or, with
    ``keep_channels``, ``(N, C)``), its rate and start time; video packets (if ``span``) only
    update the span."""
    to_float = av.AudioResampler(format="fltp")  # sample-format conversion only
    chunks, rate, start = [], None, None
    streams = [stream] if span is None else [stream, span.stream]
    try:
        for packet in container.demux(streams):
            if packet.stream.type == "video":
                span.add(packet)
                continue
            for frame in packet.decode():
                if rate is None:
                    rate = frame.sample_rate
                    if frame.pts is not None and frame.time_base is not None:
                        start = frame.pts * frame.time_base
                elif frame.sample_rate != rate:
                    raise AudioError(
                        f"{path}: sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz); "
                        "re-encode it with ffmpeg -ar 16000"
                    )
                for f in to_float.resample(frame):
                    a = f.to_ndarray()
                    chunks.append(a.T.astype(np.float32) if keep_channels else a.mean(axis=0, dtype=np.float32))
    except av.FFmpegError as e:
        raise AudioError(
            f"{path}: audio stream cannot be decoded ({e.__class__.__name__}: {e}); "
            "the file is corrupt or truncated, re-encode or replace it"
        ) from e
    empty = np.zeros((0, stream.channels or 1) if keep_channels else 0, dtype=np.float32)
    x = np.concatenate(chunks) if chunks else empty
    return x, rate or stream.rate or SAMPLE_RATE, start


def load_audio(path: str | Path, *, allow_silence: bool = False, align_to_video: bool = True) -> np.ndarray:
    """Decode the first audio stream of a media file to 16 kHz mono float32 ``(N,)``.

    Channels are averaged; any rate other than 16 kHz goes through :func:`resample`, so the
    length is ``ceil(n_decoded * 16000 / rate)``. If the file also has a video stream and
    ``align_to_video``, the audio is placed on the video's timeline: sample ``k * 640`` is
    the start of video frame ``k`` and the length is the video's duration (gaps zero-filled,
    audio past the last frame cut), which is what frame-aligned datasets need. Raises
    :class:`AudioError` (one line, saying what to do) for missing, unreadable, audio-less,
    empty, too short, non-finite or (unless ``allow_silence``) silent input.
    """
    path = Path(path)
    source = str(path)
    with _open(path) as container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise AudioError(
                f"{source} has no audio stream (it contains: {', '.join(kinds)}); "
                "pass a recording with sound, e.g. a wav/flac/mp3 or a video with an audio track"
            )
        # Cover art in mp3/m4a files is a one-picture "video" stream: not a timeline.
        videos = [
            v for v in container.streams.video if not v.disposition & av.stream.Disposition.attached_pic
        ]
        span = _VideoSpan(videos[0]) if align_to_video and videos else None
        x, rate, audio_start = _decode(path, container, container.streams.audio[0], span)
    if len(x) == 0:
        raise AudioError(f"{source}: audio stream is empty (0 samples); pass a recording that contains sound")
    if rate != SAMPLE_RATE:
        x = resample(x, rate)
    seconds = span.seconds() if span is not None else None
    if seconds is not None:
        x = _place_on_timeline(x, audio_start or Fraction(0), seconds)
    return check_audio(x, SAMPLE_RATE, allow_silence=allow_silence, source=source)


def load_audio_native(path: str | Path, align_to_video: bool = True) -> tuple[np.ndarray, int]:
    """The first audio stream at its own rate and channels: ``((N, C) float32, rate)``, placed
    on the video's timeline as :func:`load_audio` places it (so sample ``n * rate / 16000``
    here is sample ``n`` there). For carrying the user's own audio into an output file; the
    engine reads :func:`load_audio`. Errors as there."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise AudioError(f"{path} has no audio stream; pass a recording with sound")
        videos = [v for v in container.streams.video if not v.disposition & av.stream.Disposition.attached_pic]
        span = _VideoSpan(videos[0]) if align_to_video and videos else None
        x, rate, audio_start = _decode(path, container, container.streams.audio[0], span, keep_channels=True)
    seconds = span.seconds() if span is not None else None
    if seconds is not None:
        x = _place_on_timeline(x, audio_start or Fraction(0), seconds, rate)
    return x, int(rate)


def _place_on_timeline(x: np.ndarray, audio_start: Fraction, span: tuple[Fraction, Fraction],
                       rate: int = SAMPLE_RATE) -> np.ndarray:
    """Shift and pad/cut audio at ``rate`` (1-D, or (N, C)) so that index 0 is the video's
    start and the length is the video's duration."""
    v_start, v_end = span
    offset = round((Fraction(audio_start) - v_start) * rate)
    length = round((v_end - v_start) * rate)
    out = np.zeros((length, *x.shape[1:]), dtype=np.float32)
    lo, hi = max(offset, 0), min(offset + len(x), length)
    if hi > lo:
        out[lo:hi] = x[lo - offset : hi - offset]
    return out
