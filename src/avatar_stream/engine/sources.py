"""Audio sources: microphone, audio file, raw PCM on stdin (docs/design.md §7).

Every source is iterable and yields float32 16 kHz mono numpy chunks, in order, of any
length (the engine accepts any chunking). The common protocol (:class:`AudioSource`):
``__iter__``, ``close()``, context manager, ``.sample_rate == SAMPLE_RATE``,
``.samples_read`` (16 kHz samples yielded so far) and ``.dropped_samples``.

Capture never waits on compute. The microphone's PortAudio callback only copies bytes
into a :class:`SampleRing` indexed by absolute sample counts; when the consumer stalls
for longer than the ring holds, the oldest audio is overwritten and counted in
``dropped_samples``, never queued without bound. A real-time file source derives each
chunk's due time from the integer sample count since its start, so no float drift
accumulates over hours, and after a stall it yields everything that became due at once,
exactly like a microphone would. Stdin relies on the pipe for buffering: a slow consumer
makes the writer wait (back-pressure), which is what an offline pipe wants.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

from avatar_stream.engine.audio import StreamResampler, load_audio, read_pcm16
from avatar_stream.engine.timebase import SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar_stream.errors import AvatarError

log = logging.getLogger(__name__)

MIC_EXTRA_HINT = "install with pip install 'avatar-stream[mic]'"
LIST_DEVICES_HINT = "list them with avatar-stream --list-devices"
_NS_PER_S = 1_000_000_000


class SourceError(AvatarError, RuntimeError):
    """A source that cannot be opened or read; the message is one line saying what to do."""


class SampleRing:
    """Single-producer single-consumer ring of int16 frames indexed by absolute sample counts.

    The producer (an audio callback thread) never blocks and never waits for the consumer:
    it overwrites the oldest frames. Sample ``i`` (absolute, from the stream start) is held
    while ``written - capacity <= i < written``. No locks: the producer announces the range
    it is about to overwrite (``_reserved``) before copying and publishes ``written`` after,
    so a reader detects frames overwritten during its own copy (a sequence lock; Python int
    stores are atomic, numpy copies may run without the GIL).
    """

    def __init__(self, capacity: int, channels: int = 1) -> None:
        if capacity <= 0 or channels <= 0:
            raise ValueError(f"ring capacity and channels must be positive, got {capacity}, {channels}")
        self.capacity = int(capacity)
        self.channels = int(channels)
        self._buf = np.zeros((self.capacity, self.channels), dtype=np.int16)
        self._reserved = 0
        self.written = 0

    def write(self, frames: np.ndarray) -> None:
        """Append ``(n, channels)`` int16 frames (producer side; never blocks)."""
        n = len(frames)
        w = self.written
        if n > self.capacity:  # only the newest capacity frames can be held
            frames = frames[n - self.capacity :]
        m = len(frames)
        start = w + n - m
        self._reserved = w + n
        i = start % self.capacity
        first = min(m, self.capacity - i)
        self._buf[i : i + first] = frames[:first]
        self._buf[: m - first] = frames[first:]
        self.written = w + n

    def read(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        """Copy frames ``[start, stop)`` (``stop <= written``) that are still held.

        Returns ``(frames, first)``: ``frames`` covers ``[first, stop)``; frames in
        ``[start, first)`` were overwritten before they could be read (lost).
        """
        lo = max(start, self.written - self.capacity)
        if stop <= lo:
            return np.zeros((0, self.channels), dtype=np.int16), stop
        idx = np.arange(lo, stop) % self.capacity
        out = self._buf[idx]
        # Frames the producer reserved during our copy may be torn: drop them.
        valid = max(lo, self._reserved - self.capacity)
        return out[valid - lo :], min(valid, stop)


class AudioSource:
    """Base of all sources: iteration yields float32 16 kHz mono chunks until the input
    ends or ``close()`` is called; ``close()`` is idempotent."""

    sample_rate: int = SAMPLE_RATE

    def __init__(self) -> None:
        self.samples_read = 0
        self._closed = False
        # The audio as it arrived, before the conversion to 16 kHz mono, for sinks that carry
        # the user's own audio (the mp4): collected only once ``keep_raw()`` was called.
        self._raw: list[np.ndarray] | None = None

    @property
    def raw_format(self) -> tuple[int, int]:
        """(sample rate, channels) of the audio as it arrives."""
        return SAMPLE_RATE, 1

    def keep_raw(self) -> None:
        """From now on, keep the arriving audio for ``take_raw``."""
        if self._raw is None:
            self._raw = []

    def take_raw(self) -> np.ndarray | None:
        """``(N, channels)`` float32 at ``raw_format``'s rate that arrived since the last call
        (None unless ``keep_raw()`` was called)."""
        if self._raw is None:
            return None
        ch = self.raw_format[1]
        out = np.concatenate(self._raw) if self._raw else np.zeros((0, ch), np.float32)
        self._raw.clear()
        return out

    def _keep(self, raw: np.ndarray) -> None:
        if self._raw is not None and len(raw):
            self._raw.append(np.asarray(raw, np.float32).reshape(len(raw), -1))

    @property
    def dropped_samples(self) -> int:
        """16 kHz samples lost because the consumer fell behind (0 for lossless sources)."""
        return 0

    def _emit(self, chunk: np.ndarray) -> np.ndarray:
        self.samples_read += len(chunk)
        return chunk

    def close(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        raise NotImplementedError


class FileSource(AudioSource):
    """Any audio/video file, decoded by :func:`load_audio` at construction (errors early).

    ``realtime=False`` yields ``chunk_samples`` chunks as fast as the consumer takes them.
    ``realtime=True`` paces them to the wall clock: sample ``n`` is due ``n / 16000`` s after
    iteration starts (computed from integers); a consumer that stalls receives all the
    audio that became due meanwhile as one chunk.
    """

    def __init__(self, path: str | Path, realtime: bool = False, chunk_samples: int = SAMPLES_PER_FRAME) -> None:
        super().__init__()
        if int(chunk_samples) != chunk_samples or chunk_samples <= 0:
            raise SourceError(f"chunk_samples must be a positive integer, got {chunk_samples!r}")
        self.path = Path(path)
        self.realtime = bool(realtime)
        self.chunk_samples = int(chunk_samples)
        self.audio = load_audio(self.path)
        self._native: tuple[np.ndarray, int] | None = None

    @property
    def raw_format(self) -> tuple[int, int]:
        native = self._native_audio()
        return native[1], native[0].shape[1]

    def _native_audio(self) -> tuple[np.ndarray, int]:
        if self._native is None:
            from avatar_stream.engine.audio import load_audio_native

            self._native = load_audio_native(self.path)
        return self._native

    def keep_raw(self) -> None:
        self._native_audio()  # decode now, not in the middle of the paced loop
        super().keep_raw()

    def __iter__(self):
        n = len(self.audio)
        pos = 0
        t0 = time.monotonic_ns()
        while pos < n and not self._closed:
            stop = min(n, pos + self.chunk_samples)
            if self.realtime:
                arrived = (time.monotonic_ns() - t0) * SAMPLE_RATE // _NS_PER_S
                stop = max(stop, min(n, arrived))
                due_ns = t0 + -(-stop * _NS_PER_S // SAMPLE_RATE)  # ceil: never early
                delay = due_ns - time.monotonic_ns()
                if delay > 0:
                    time.sleep(delay / _NS_PER_S)
            chunk = self.audio[pos:stop].copy()
            if self._raw is not None:  # the same span at the file's own rate (integer bounds)
                native, rate = self._native
                last = stop if stop < n else None  # the last chunk takes what remains
                self._keep(native[pos * rate // SAMPLE_RATE : None if last is None else last * rate // SAMPLE_RATE])
            pos = stop
            yield self._emit(chunk)


class StdinSource(AudioSource):
    """Raw signed 16-bit little-endian PCM from a binary stream (default stdin): ``channels``
    interleaved channels (averaged to mono) at ``sample_rate`` (resampled to 16 kHz).

    Reads whatever the pipe holds (up to ``read_bytes``) and carries a partial sample frame
    to the next read. Ends at EOF. ``realtime``: chunks are released no faster than their
    sample count allows (sample n due n / rate s after the first), so that a file piped in
    plays like a live stream; a live writer is not slowed. The format cannot be read from raw
    bytes: while data arrives from a live writer, ``check_rate`` compares its pace with the
    declared format and warns when it is off by more than half (44.1 kHz stereo read as
    16 kHz mono arrives 5.5 times too fast).
    """

    def __init__(self, stream: BinaryIO | None = None, sample_rate: int = SAMPLE_RATE, read_bytes: int = 8192,
                 channels: int = 1, realtime: bool = False) -> None:
        super().__init__()
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise SourceError(f"--stdin-rate must be a positive integer in Hz, got {sample_rate!r}")
        if int(channels) != channels or not 1 <= channels <= 32:
            raise SourceError(f"--stdin-channels must be an integer from 1 to 32, got {channels!r}")
        self.stream = stream if stream is not None else sys.stdin.buffer
        self.input_rate = int(sample_rate)
        self.channels = int(channels)
        self.realtime = bool(realtime)
        self.read_bytes = int(read_bytes)
        self._resampler = StreamResampler(self.input_rate) if self.input_rate != SAMPLE_RATE else None
        self.frames_in = 0  # sample frames (per channel) read so far
        self.rate_warning: str | None = None

    @property
    def raw_format(self) -> tuple[int, int]:
        return self.input_rate, self.channels

    def _read(self) -> bytes:
        # read1: return what is available now rather than waiting for a full buffer.
        read = getattr(self.stream, "read1", self.stream.read)
        return read(self.read_bytes)

    def check_rate(self, frames: int, seconds: float) -> str | None:
        """A warning when ``frames`` sample frames in ``seconds`` of wall time fit the declared
        rate badly (only a live writer's pace says anything: a file dumped into the pipe
        arrives far faster than any audio rate, and is left alone)."""
        if seconds < 2.0 or frames == 0:
            return None
        pace = frames / seconds / self.input_rate
        if 0.6 <= pace <= 1.6 or pace > 20:
            return None
        return (f"stdin delivers {frames / seconds:,.0f} sample frames/s, {pace:.2g}x the {self.input_rate} Hz "
                f"{self.channels}-channel s16le declared: if the writer is live, its format differs (44.1 kHz "
                "stereo read as 16 kHz mono arrives 5.5x too fast); set --stdin-rate and --stdin-channels")

    def __iter__(self):
        carry = b""
        width = 2 * self.channels
        t0 = None
        while not self._closed:
            data = self._read()
            if not data:
                break
            if t0 is None:
                t0 = time.monotonic_ns()
            data = carry + data
            cut = len(data) - len(data) % width
            data, carry = data[:cut], data[cut:]
            if not data:
                continue
            frames = read_pcm16(data).reshape(-1, self.channels)
            self.frames_in += len(frames)
            seconds = (time.monotonic_ns() - t0) / _NS_PER_S
            if self.rate_warning is None and not self.realtime:
                self.rate_warning = self.check_rate(self.frames_in, seconds)
                if self.rate_warning:
                    log.warning("%s", self.rate_warning)
            if self.realtime:
                due_ns = t0 + -(-self.frames_in * _NS_PER_S // self.input_rate)
                delay = due_ns - time.monotonic_ns()
                if delay > 0:
                    time.sleep(delay / _NS_PER_S)
            self._keep(frames)
            x = frames[:, 0] if self.channels == 1 else frames.mean(axis=1, dtype=np.float32)
            if self._resampler is not None:
                x = self._resampler.process(x)
            if len(x):
                yield self._emit(x)
        if carry:
            log.warning("stdin ended in the middle of a 16-bit sample%s; the last %d byte(s) were ignored",
                        "" if self.channels == 1 else f" frame of {self.channels} channels", len(carry))
        if self._resampler is not None:
            tail = self._resampler.flush()
            if len(tail):
                yield self._emit(tail)


def import_pyaudio(error: type[Exception] = SourceError):
    """The pyaudio module, or a one-line ``error`` saying how to install it."""
    try:
        import pyaudio
    except ImportError as e:
        raise error(f"pyaudio is not installed ({e}); {MIC_EXTRA_HINT}") from e
    return pyaudio


def pyaudio_instance(error: type[Exception] = SourceError):
    """``(pyaudio module, PyAudio())``; the caller must ``terminate()`` the instance."""
    pyaudio = import_pyaudio(error)
    with _quiet_native_stderr():
        return pyaudio, pyaudio.PyAudio()


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what ALSA and JACK print on file descriptor 2 while PortAudio probes devices
    (dozens of 'ALSA lib ... cannot find card' lines on a machine without a sound card): the
    user gets our one-line error instead. AVATAR_STREAM_AUDIO_DEBUG=1 keeps them."""
    if os.environ.get("AVATAR_STREAM_AUDIO_DEBUG") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _devices(pa, direction: str) -> list[dict]:
    key = "maxInputChannels" if direction == "input" else "maxOutputChannels"
    found = []
    for i in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(i)
        if info.get(key, 0) > 0:
            found.append(info)
    return found


def resolve_device(pa, device: int | str | None, direction: str, flag: str, error=SourceError) -> dict:
    """PortAudio device info for ``device`` (None = default, an index, or a name or part of one)
    among the ``direction`` ("input" / "output") devices; one-line ``error`` otherwise."""
    usable = _devices(pa, direction)
    what = "microphone" if direction == "input" else "audio output device"
    if not usable:
        raise error(
            f"no {what} found: PortAudio sees no {direction} device (is one connected, and does "
            f"this user have access to it?); {LIST_DEVICES_HINT}"
        )
    if device is None:
        try:
            return pa.get_default_input_device_info() if direction == "input" else pa.get_default_output_device_info()
        except OSError as e:
            raise error(
                f"no {what} found: there is no default {direction} device ({e}); choose one with {flag}, "
                f"{LIST_DEVICES_HINT}"
            ) from e
    choices = ", ".join(f"{d['index']} {d['name']!r}" for d in usable)
    if isinstance(device, int) or (isinstance(device, str) and device.strip().isdigit()):
        index = int(device)
        for d in usable:
            if d["index"] == index:
                return d
        raise error(f"{flag} {index}: no {direction} device has that index; choose one of: {choices}")
    name = str(device).casefold()
    exact = [d for d in usable if d["name"].casefold() == name]
    partial = [d for d in usable if name in d["name"].casefold()]
    matches = exact or partial
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise error(f"{flag} {device!r}: no {direction} device has that name; choose one of: {choices}")
    names = ", ".join(f"{d['index']} {d['name']!r}" for d in matches)
    raise error(f"{flag} {device!r} matches several {direction} devices ({names}); pass the index instead")


def list_devices() -> list[tuple[int, str, int, int]]:
    """Input devices PortAudio sees: ``(index, name, max_input_channels, default_rate)``."""
    _, pa = pyaudio_instance()
    try:
        return [
            (int(d["index"]), str(d["name"]), int(d["maxInputChannels"]), int(d["defaultSampleRate"]))
            for d in _devices(pa, "input")
        ]
    finally:
        pa.terminate()


class MicSource(AudioSource):
    """A PortAudio input device (pyaudio, callback mode), resampled to 16 kHz mono.

    ``device``: None (the default input), an index or a (part of a) name.
    ``sample_rate``: capture rate; None takes the device's default rate (44.1 / 48 kHz
    usually), resampled with :class:`StreamResampler`. ``max_buffer_seconds``: how long the
    consumer may stall before the oldest audio is dropped; ``dropped_samples`` counts it.
    Iteration runs until ``close()`` (from any thread); it then drains what was captured.
    """

    def __init__(
        self,
        device: int | str | None = None,
        sample_rate: int | None = None,
        frames_per_buffer: int = 1024,
        max_buffer_seconds: float = 10.0,
        poll_seconds: float = 0.005,
    ) -> None:
        super().__init__()
        self._pyaudio, self._pa = pyaudio_instance()
        self._stream = None
        try:
            self._open(device, sample_rate, int(frames_per_buffer), float(max_buffer_seconds))
        except BaseException:
            self._pa.terminate()
            raise
        self._poll_s = float(poll_seconds)
        self._read_pos = 0  # absolute device-rate frame index of the next frame to read
        self._dropped_in = 0  # device-rate frames overwritten before they were read
        self.input_overflows = 0  # callbacks where PortAudio itself reported lost input
        self.input_underflows = 0  # callbacks PortAudio padded with silence (not captured)

    def _open(self, device, sample_rate, frames_per_buffer: int, max_buffer_seconds: float) -> None:
        pa, pyaudio = self._pa, self._pyaudio
        info = resolve_device(pa, device, "input", "--mic-device")
        self.device_index, self.device_name = int(info["index"]), str(info["name"])
        rate = int(sample_rate) if sample_rate is not None else int(info["defaultSampleRate"])
        if rate <= 0:
            raise SourceError(f"microphone sample rate must be positive, got {sample_rate!r}")
        self.input_rate = rate
        self.channels = 1
        try:
            pa.is_format_supported(rate, input_device=self.device_index, input_channels=1, input_format=pyaudio.paInt16)
        except ValueError:
            # Some hardware devices only capture stereo; take two channels and average them.
            self.channels = min(2, int(info["maxInputChannels"]))
        self._ring = SampleRing(max(frames_per_buffer, int(max_buffer_seconds * rate)), self.channels)
        # A backlog (after a stall) is handed out in pieces of at most 100 ms, so the
        # consumer interleaves its work with reading instead of resampling seconds at once.
        self._max_take = max(frames_per_buffer, rate // 10)
        self._resampler = StreamResampler(rate) if rate != SAMPLE_RATE else None
        try:
            self._stream = pa.open(
                rate=rate,
                channels=self.channels,
                format=pyaudio.paInt16,
                input=True,
                input_device_index=self.device_index,
                frames_per_buffer=frames_per_buffer,
                stream_callback=self._callback,
            )
        except (OSError, ValueError) as e:
            raise SourceError(
                f"cannot open microphone {self.device_index} {self.device_name!r} at {rate} Hz ({e}); "
                f"pick another device with --mic-device or rate, {LIST_DEVICES_HINT}"
            ) from e

    def _callback(self, in_data, frame_count, time_info, status):
        # PortAudio's thread: copy and return, nothing else (no locks, no allocation beyond a view).
        if status & self._pyaudio.paInputOverflow:
            self.input_overflows += 1
        if status & self._pyaudio.paInputUnderflow:
            # PortAudio padded this buffer with silence: input it did not capture.
            self.input_underflows += 1
        self._ring.write(np.frombuffer(in_data, dtype="<i2").reshape(-1, self.channels))
        return None, self._pyaudio.paContinue

    @property
    def dropped_samples(self) -> int:
        """16 kHz samples dropped because the consumer stalled past ``max_buffer_seconds``."""
        return self._dropped_in * SAMPLE_RATE // self.input_rate

    def _drop(self, n: int) -> None:
        if n > 0:
            if self._dropped_in == 0:  # once; the total is in dropped_samples for reports
                log.warning("microphone: the consumer fell %.1f s behind; oldest audio dropped",
                            self._ring.capacity / self.input_rate)
            self._dropped_in += n

    def _take(self) -> np.ndarray | None:
        """Next piece of captured audio at 16 kHz (maybe empty while the resampler fills),
        or None when nothing new was captured."""
        written = self._ring.written
        self._drop(written - self._ring.capacity - self._read_pos)  # overwritten while stalled
        self._read_pos = max(self._read_pos, written - self._ring.capacity)
        w = min(written, self._read_pos + self._max_take)
        if w <= self._read_pos:
            return None
        frames, first = self._ring.read(self._read_pos, w)
        self._drop(first - self._read_pos)  # overwritten during the copy
        self._read_pos = w
        self._keep(frames.astype(np.float32) / np.float32(32768.0))
        x = frames.astype(np.float32).mean(axis=1) if self.channels > 1 else frames[:, 0].astype(np.float32)
        x /= np.float32(32768.0)
        return self._resampler.process(x) if self._resampler is not None else x

    @property
    def raw_format(self) -> tuple[int, int]:
        return self.input_rate, self.channels

    def __iter__(self):
        while True:
            closed = self._closed  # read before draining: frames written before close are kept
            x = self._take()
            if x is None:
                if closed:
                    break
                time.sleep(self._poll_s)
            elif len(x):
                yield self._emit(x)
        if self._resampler is not None:
            tail = self._resampler.flush()
            if len(tail):
                yield self._emit(tail)

    def close(self) -> None:
        """Stop capture (idempotent); an iterator in progress drains what was captured and ends."""
        if self._closed:
            return
        try:
            if self._stream is not None:
                self._stream.stop_stream()
                self._stream.close()
        finally:
            self._pa.terminate()
            self._closed = True
