"""Frame sinks: mp4 file, virtual webcam, preview window, delayed audio out, fan-out (docs/design.md §7).

A sink is a context manager (pyvirtualcam style): ``write(frame, pts_samples)`` takes an
RGB uint8 ``(H, W, 3)`` frame whose display time is ``pts_samples`` (integer 16 kHz
samples, strictly increasing; frame k of the engine has ``k * SAMPLES_PER_FRAME``);
``write_audio(samples)`` takes the input audio (float32 16 kHz mono, in order) for sinks
that carry sound and is ignored by the others; ``close()`` runs exactly once and is
idempotent; ``frames_written`` counts frames delivered. Frames are validated here, at the
boundary (dtype, shape, constant size), with messages that say what to fix.

Interrupts: the CLI's SIGINT/SIGTERM handlers may call ``close()`` while the main thread is
inside ``write()``; the close is then deferred to the end of that call, so a file is never
finalised half-way through muxing a packet. While a sink writes or closes (on the main
thread), SIGINT and SIGTERM are held back and delivered right after, so neither a Ctrl-C
(KeyboardInterrupt) between encoding and muxing nor a second Ctrl-C while an mp4 is being
finalised can corrupt it.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import threading
import time
from contextlib import contextmanager
from fractions import Fraction
from numbers import Integral
from pathlib import Path

import numpy as np

from avatar_stream.engine.audio import StreamResampler, check_audio
from avatar_stream.engine.sources import SampleRing, pyaudio_instance, resolve_device
from avatar_stream.engine.timebase import FPS, SAMPLE_RATE
from avatar_stream.errors import AvatarError

log = logging.getLogger(__name__)

VIRTUAL_CAM_DOC = "see docs/virtual-camera.md"


class SinkError(AvatarError, RuntimeError):
    """A sink that cannot be opened or written; the message is one line saying what to do."""


@contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM for the duration of the block, then deliver them to the handlers
    that were installed. Python runs signal handlers on the main thread whichever thread
    the OS picked (an encoder thread, often), so masking signals is not enough: the
    Python-level handlers are swapped for a recorder instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler not in (None, signal.SIG_IGN):  # None: installed outside Python, leave it
            previous[sig] = handler
            signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)


class Sink:
    """Base class: validation, ``frames_written``, close-once and interrupt-safe closing.

    Subclasses implement ``_write_frame(frame, pts_samples)``, optionally
    ``_write_audio(samples)``, and ``_close()``. ``size`` is ``(width, height)``; None takes
    it from the first frame. Single-threaded: call from one thread (signal handlers run on
    the main thread and are safe).
    """

    name = "sink"

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        self.frames_written = 0
        self._shape = None if size is None else (int(size[1]), int(size[0]), 3)
        self._last_pts: int | None = None
        self._closed = False
        self._busy = False
        self._close_pending = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed or self._close_pending:
            raise SinkError(f"{self.name}: write after close(); the sink is finished, open a new one")

    def check_frame(self, frame: np.ndarray) -> np.ndarray:
        """Validate one frame: numpy uint8 ``(H, W, 3)`` RGB, the same size as the first one."""
        if not isinstance(frame, np.ndarray):
            raise SinkError(f"{self.name}: frame must be a numpy array, got {type(frame).__name__}")
        if frame.dtype != np.uint8:
            raise SinkError(
                f"{self.name}: frame dtype is {frame.dtype}, expected uint8 RGB; "
                "convert with np.clip(x * 255, 0, 255).astype(np.uint8)"
            )
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise SinkError(f"{self.name}: frame shape is {frame.shape}, expected (height, width, 3) RGB")
        if self._shape is None:
            self._shape = frame.shape
        elif frame.shape != self._shape:
            h, w = self._shape[:2]
            raise SinkError(
                f"{self.name}: frame is {frame.shape[1]}x{frame.shape[0]} but this sink was opened for "
                f"{w}x{h}; the size must stay constant (resize before writing)"
            )
        return np.ascontiguousarray(frame)

    def _check_pts(self, pts_samples) -> int:
        if isinstance(pts_samples, bool) or not isinstance(pts_samples, Integral):
            raise SinkError(f"{self.name}: pts_samples must be an integer sample count, got {pts_samples!r}")
        pts = int(pts_samples)
        if pts < 0 or (self._last_pts is not None and pts <= self._last_pts):
            raise SinkError(
                f"{self.name}: pts_samples must be >= 0 and increase, got {pts} after {self._last_pts}"
            )
        return pts

    @contextmanager
    def _guard(self):
        # SIGINT/SIGTERM wait until the frame is fully encoded and muxed: a KeyboardInterrupt
        # between encode() and mux() would lose a reference frame and corrupt the stream.
        self._busy = True
        try:
            with _signals_deferred():
                yield
        finally:
            self._busy = False
            if self._close_pending:
                self._close_pending = False
                self.close()

    def write(self, frame: np.ndarray, pts_samples: int) -> None:
        """Deliver one frame shown at ``pts_samples`` (16 kHz samples since the stream start)."""
        self._check_open()
        frame = self.check_frame(frame)
        pts = self._check_pts(pts_samples)
        with self._guard():
            self._write_frame(frame, pts)
            self._last_pts = pts
            self.frames_written += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """The input audio (float32 16 kHz mono), in order; ignored by sinks without sound."""
        self._check_open()
        if len(samples) == 0:
            return
        x = check_audio(samples, SAMPLE_RATE, allow_silence=True, min_samples=0, source=f"{self.name} audio")
        with self._guard():
            self._write_audio(x)

    def close(self) -> None:
        """Finish the sink; runs once, later calls do nothing. Safe from a signal handler."""
        if self._closed:
            return
        if self._busy:  # re-entered from a signal handler during write(): finish that first
            self._close_pending = True
            return
        self._closed = True
        with _signals_deferred():
            self._close()

    def _write_frame(self, frame: np.ndarray, pts_samples: int) -> None:
        raise NotImplementedError

    def _write_audio(self, samples: np.ndarray) -> None:
        pass

    def _close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise SinkError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


class Mp4Sink(Sink):
    """H.264 (libx264, yuv420p) mp4 with the input audio muxed in as AAC (PyAV).

    ``size`` is ``(width, height)`` of the frames written. yuv420p needs even dimensions:
    odd ones are padded by one edge-replicated pixel (logged). Video pts = frame index at
    ``fps`` (from ``pts_samples``), audio pts = samples at ``audio_sample_rate`` (None: no
    audio track); both start at 0, so the offset between them is 0. The audio track has
    ``audio_channels`` channels (1 or 2; more are mixed down to mono). ``write_audio_raw``
    takes the user's audio as it arrived, ``(N, audio_channels)`` at ``audio_sample_rate``
    (the session passes it when the source keeps it: the file carries the input's own rate
    and channels); ``write_audio`` takes the engine's 16 kHz mono and converts it. The file
    is finalised on close.
    """

    takes_raw_audio = True

    name = "mp4"

    def __init__(
        self,
        path: str | Path,
        fps: int = FPS,
        *,
        size: tuple[int, int],
        audio_sample_rate: int | None = SAMPLE_RATE,
        audio_channels: int = 1,
        crf: int = 20,
        preset: str = "veryfast",
    ) -> None:
        import av

        super().__init__(size=size)
        self.path = Path(path)
        self.fps = _positive_int(fps, "mp4 fps")
        width, height = _positive_int(size[0], "mp4 width"), _positive_int(size[1], "mp4 height")
        self._pad = (height % 2, width % 2)
        if any(self._pad):
            log.warning(
                "mp4: %dx%d has an odd side, H.264 yuv420p needs even ones: padding to %dx%d",
                width, height, width + self._pad[1], height + self._pad[0],
            )
        try:
            # PyAV opens the file only when the header is written: check it now, at the boundary.
            with open(self.path, "wb"):
                pass
            self._container = av.open(str(self.path), mode="w", format="mp4")
        except (OSError, av.FFmpegError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise SinkError(f"cannot write {self.path}: {reason}; choose a writable file path") from e
        try:
            self._video = self._container.add_stream("libx264", rate=self.fps)
            self._video.width, self._video.height = width + self._pad[1], height + self._pad[0]
            self._video.pix_fmt = "yuv420p"
            self._video.codec_context.time_base = Fraction(1, self.fps)
            self._video.options = {"preset": preset, "crf": str(int(crf))}
            self._audio = None
            self._resampler = None
            self.audio_sample_rate = audio_sample_rate
            self.in_channels = _positive_int(audio_channels, "mp4 audio_channels")
            self.channels = 2 if self.in_channels == 2 else 1
            if audio_sample_rate is not None:
                rate = _positive_int(audio_sample_rate, "mp4 audio_sample_rate")
                self._audio = self._container.add_stream("aac", rate=rate, layout=self._layout)
                if rate != SAMPLE_RATE:
                    self._resampler = StreamResampler(SAMPLE_RATE, rate)
        except BaseException:
            self._container.close()
            raise
        self._last_index = -1
        self.audio_samples_written = 0  # at audio_sample_rate

    def _write_frame(self, frame: np.ndarray, pts_samples: int) -> None:
        import av

        # Nearest frame index of the display time: integer arithmetic, no drift.
        index = (2 * pts_samples * self.fps + SAMPLE_RATE) // (2 * SAMPLE_RATE)
        if index <= self._last_index:
            raise SinkError(
                f"mp4: frame at sample {pts_samples} falls on mp4 frame {index}, already written; "
                f"frames must be at least 1/{self.fps} s apart"
            )
        if any(self._pad):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts = index
        vf.time_base = Fraction(1, self.fps)
        self._container.mux(self._video.encode(vf))
        self._last_index = index

    @property
    def _layout(self) -> str:
        return "stereo" if self.channels == 2 else "mono"

    def _encode_audio(self, x: np.ndarray) -> None:
        """``x`` (N,) mono or (N, channels) at the track's rate."""
        import av

        if len(x) == 0:
            return
        planes = np.ascontiguousarray(np.asarray(x, np.float32).reshape(len(x), -1).T)
        if planes.shape[0] != self.channels:  # mono into a stereo track
            planes = np.repeat(planes[:1], self.channels, axis=0)
        af = av.AudioFrame.from_ndarray(planes, format="fltp", layout=self._layout)
        af.sample_rate = self._audio.rate
        af.pts = self.audio_samples_written
        af.time_base = Fraction(1, self._audio.rate)
        self._container.mux(self._audio.encode(af))
        self.audio_samples_written += len(x)

    def _write_audio(self, samples: np.ndarray) -> None:
        if self._audio is None:
            return
        self._encode_audio(self._resampler.process(samples) if self._resampler is not None else samples)

    def write_audio_raw(self, samples: np.ndarray) -> None:
        """The user's audio as it arrived: ``(N, audio_channels)`` float32 at the track's rate."""
        self._check_open()
        if self._audio is None or len(samples) == 0:
            return
        x = np.asarray(samples, np.float32).reshape(len(samples), -1)
        if x.shape[1] != self.in_channels:
            raise SinkError(f"mp4: raw audio has {x.shape[1]} channel(s), the track was opened for {self.in_channels}")
        if not np.all(np.isfinite(x)):
            raise SinkError("mp4: raw audio holds NaN or infinite samples")
        if self.in_channels > 2:
            x = x.mean(axis=1, keepdims=True)
        with self._guard():
            self._encode_audio(x)

    def _close(self) -> None:
        try:
            if self._audio is not None:
                if self._resampler is not None:
                    self._encode_audio(self._resampler.flush())
                self._container.mux(self._audio.encode(None))
            self._container.mux(self._video.encode(None))
        finally:
            self._container.close()  # writes the moov atom: the file is playable from here


def _virtual_cam_hint() -> str:
    system = platform.system()
    if system == "Linux":
        return (
            "load the v4l2loopback kernel module: sudo modprobe v4l2loopback devices=1 exclusive_caps=1 "
            "card_label=avatar-stream"
        )
    return "install OBS Studio and start its Virtual Camera once (Tools > Start Virtual Camera), then stop it"


class VirtualCamSink(Sink):
    """Frames to a virtual webcam through pyvirtualcam (v4l2loopback on Linux, OBS elsewhere).

    RGB frames of exactly ``width`` x ``height``. The audio clock paces the engine, so
    ``sleep_until_next_frame`` is not used: each frame goes out when it is written.
    """

    name = "virtual camera"

    def __init__(self, width: int, height: int, fps: int = FPS, backend: str | None = None, device: str | None = None):
        super().__init__(size=(width, height))
        try:
            import pyvirtualcam
        except ImportError as e:
            raise SinkError(
                f"pyvirtualcam is not installed ({e}); install with pip install 'avatar-stream[webcam]'"
            ) from e
        available = sorted(pyvirtualcam.camera.BACKENDS)
        if backend is not None and backend not in available:
            raise SinkError(
                f"unknown virtual camera backend {backend!r}; available here: {', '.join(available) or 'none'}"
            )
        try:
            self._cam = pyvirtualcam.Camera(
                width=int(width), height=int(height), fps=fps,
                fmt=pyvirtualcam.PixelFormat.RGB, device=device, backend=backend,
            )
        except (RuntimeError, ValueError, OSError) as e:
            detail = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise SinkError(
                f"no virtual camera available ({detail or 'no backend on this platform'}); "
                f"{_virtual_cam_hint()}; {VIRTUAL_CAM_DOC}"
            ) from e
        self.backend = self._cam.backend
        self.device = self._cam.device
        log.info("virtual camera: %s via %s", self.device, self.backend)

    def _write_frame(self, frame: np.ndarray, pts_samples: int) -> None:
        self._cam.send(frame)

    def _close(self) -> None:
        self._cam.close()


def _window_problem() -> str | None:
    """Why an OpenCV window cannot open here, or None."""
    reasons = []
    try:
        import cv2
    except ImportError:
        return "OpenCV is not installed"
    framework = cv2.currentUIFramework() if hasattr(cv2, "currentUIFramework") else None
    if framework == "" or "GUI:                           NONE" in cv2.getBuildInformation():
        reasons.append("this OpenCV build has no GUI (opencv-python-headless)")
    if platform.system() == "Linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        reasons.append("no DISPLAY or WAYLAND_DISPLAY (no desktop session)")
    return " and ".join(reasons) or None


class WindowSink(Sink):
    """A preview window (OpenCV ``imshow``). ``quit_requested`` turns True when the user
    presses q or Esc or closes the window; the caller decides to stop."""

    name = "window"

    def __init__(self, title: str = "avatar-stream") -> None:
        super().__init__()
        problem = _window_problem()
        if problem is not None:
            raise SinkError(
                f"--window needs a desktop session and the opencv-python (GUI) build: {problem}; on a desktop run "
                "pip uninstall -y opencv-python-headless && pip install opencv-python, or use --virtual-cam / --out"
            )
        import cv2

        self._cv2 = cv2
        self.title = title
        self.quit_requested = False
        cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)

    def _write_frame(self, frame: np.ndarray, pts_samples: int) -> None:
        cv2 = self._cv2
        cv2.imshow(self.title, frame[:, :, ::-1])  # BGR only at the OpenCV boundary
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27) or cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.quit_requested = True

    def _close(self) -> None:
        self._cv2.destroyWindow(self.title)
        self._cv2.waitKey(1)  # let the GUI loop process the close


class AudioOutSink(Sink):
    """Plays the input audio on an output device, delayed by exactly ``delay_samples``
    (16 kHz samples; the engine's latency) so that a call app receiving both this audio and
    the video sees them in sync. Frames written to it are ignored.

    Timeline: output sample ``p`` (16 kHz) is input sample ``p - delay_samples`` (zeros
    before the input starts), on the output device's clock, which starts at the first
    ``write_audio``. Input that arrives after its play time is replaced by silence and
    skipped, so the delay never grows (``late_samples``); input more than
    ``max_buffer_seconds`` ahead of playback overwrites the oldest (``dropped_samples``).
    Devices that do not accept 16 kHz (or an explicit ``sample_rate``) are fed through
    :class:`StreamResampler`; the zeros are prepended before resampling, so the delay is
    exact in time. The device adds its own output latency on top (PortAudio primes its
    buffer with silence at start; ``output_latency_samples`` is PortAudio's estimate).
    """

    name = "audio out"

    def __init__(
        self,
        device: int | str | None = None,
        delay_samples: int = 0,
        max_buffer_seconds: float = 10.0,
        frames_per_buffer: int = 512,
        sample_rate: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(delay_samples, bool) or not isinstance(delay_samples, Integral) or delay_samples < 0:
            raise SinkError(f"audio out: delay_samples must be an integer >= 0, got {delay_samples!r}")
        self.delay_samples = int(delay_samples)
        self._pyaudio, self._pa = pyaudio_instance(SinkError)
        try:
            self._open(device, frames_per_buffer, max_buffer_seconds, sample_rate)
        except BaseException:
            self._pa.terminate()
            raise
        self.output_latency_samples = round(self._stream.get_output_latency() * SAMPLE_RATE)
        self._started = False
        self._finishing = False
        self._play_pos = 0  # absolute output-rate sample index of the next sample to play
        self.late_samples = 0
        self.dropped_samples = 0

    def _open(self, device, frames_per_buffer: int, max_buffer_seconds: float, sample_rate) -> None:
        pa, pyaudio = self._pa, self._pyaudio
        info = resolve_device(pa, device, "output", "--audio-out", SinkError)
        self.device_index, self.device_name = int(info["index"]), str(info["name"])
        if sample_rate is not None:
            rate = _positive_int(sample_rate, "audio out sample_rate")
        else:
            rate = SAMPLE_RATE
            try:
                pa.is_format_supported(rate, output_device=self.device_index, output_channels=1,
                                       output_format=pyaudio.paInt16)
            except ValueError:
                rate = int(info["defaultSampleRate"])
        self.output_rate = rate
        self._resampler = StreamResampler(SAMPLE_RATE, rate) if rate != SAMPLE_RATE else None
        capacity = int(max_buffer_seconds * rate) + frames_per_buffer
        capacity += -(-self.delay_samples * rate // SAMPLE_RATE)
        self._ring = SampleRing(capacity)
        try:
            self._stream = pa.open(
                rate=rate, channels=1, format=pyaudio.paInt16, output=True,
                output_device_index=self.device_index, frames_per_buffer=frames_per_buffer,
                stream_callback=self._callback, start=False,
            )
        except (OSError, ValueError) as e:
            raise SinkError(
                f"cannot open audio output {self.device_index} {self.device_name!r} at {rate} Hz ({e}); "
                "pick another device with --audio-out"
            ) from e

    def _callback(self, in_data, frame_count, time_info, status):
        # PortAudio's thread: read what is due from the ring, silence for the rest; never wait.
        p, w = self._play_pos, self._ring.written
        out = np.zeros(frame_count, dtype=np.int16)
        stop = min(p + frame_count, w)
        if stop > p:
            frames, first = self._ring.read(p, stop)
            out[first - p : stop - p] = frames[:, 0]
            self.dropped_samples += first - p
        if not self._finishing:
            self.late_samples += frame_count - max(stop - p, 0)
        self._play_pos = p + frame_count
        return out.tobytes(), self._pyaudio.paContinue

    def _push_pcm(self, x: np.ndarray) -> None:
        pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
        self._ring.write(pcm.reshape(-1, 1))

    def _push(self, x: np.ndarray) -> None:
        self._push_pcm(self._resampler.process(x) if self._resampler is not None else x)

    def _write_audio(self, samples: np.ndarray) -> None:
        if not self._started:
            # The data must be in the ring before the device clock starts.
            self._push(np.zeros(self.delay_samples, dtype=np.float32))
            self._push(samples)
            self._stream.start_stream()
            self._started = True
            return
        self._push(samples)

    def write(self, frame: np.ndarray, pts_samples: int) -> None:
        """Frames are not this sink's business; accepted so it can sit in a :class:`MultiSink`."""
        self._check_open()

    def _close(self) -> None:
        try:
            if self._started:
                if self._resampler is not None:
                    self._push_pcm(self._resampler.flush())
                self._finishing = True
                # Let what was written play out (bounded: the ring holds max_buffer_seconds).
                deadline = time.monotonic() + (self._ring.written - self._play_pos) / self.output_rate + 1.0
                while self._play_pos < self._ring.written and time.monotonic() < deadline:
                    time.sleep(0.01)
                self._stream.stop_stream()
            self._stream.close()
        finally:
            self._pa.terminate()


class MultiSink(Sink):
    """Fan-out: every frame and every audio chunk goes to each sink, in order; ``close()``
    closes all of them even if one fails, then raises the first error."""

    name = "multi"

    def __init__(self, sinks: list[Sink]) -> None:
        super().__init__()
        self.sinks = list(sinks)

    def _write_frame(self, frame: np.ndarray, pts_samples: int) -> None:
        for s in self.sinks:
            s.write(frame, pts_samples)

    def _write_audio(self, samples: np.ndarray) -> None:
        for s in self.sinks:
            s.write_audio(samples)

    def _close(self) -> None:
        errors = []
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # close the others first, report after
                errors.append(e)
        if errors:
            raise errors[0]
