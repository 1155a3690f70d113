"""``avatar-serve``: the avatar in a browser over WebRTC, and a JSON API for sessions.

    avatar-serve                      # http://127.0.0.1:8080: the page, the bundled face
    avatar-serve --max-sessions 2 --port 9000 --renderer neural

One :class:`~avatar_stream.engine.stream.Engine` serves every session; each session is a
:class:`~avatar_stream.engine.live.LiveAvatar` with its own WebRTC peer connection
(aiortc). The browser's microphone comes in, the avatar's face and that same sound, delayed
by the model's lookahead so that they match, go back. One clock task ticks every 40 ms and
renders the frame of every connected session in one batched call (``render_ticks``); when
a tick is late the next one keeps the sound going and skips the picture (a dropped frame).

API (JSON; errors are ``{"error": "..."}`` with a 4xx/5xx status):

- ``POST /sessions``: a photo (multipart field ``photo``, or the raw image as the body;
  optional ``size=WxH`` and ``face_index``) -> ``{"id", "width", "height", "warnings"}``.
  Without a photo the bundled face is used. 503 beyond ``--max-sessions``.
- ``POST /sessions/{id}/offer``: ``{"sdp", "type"}`` WebRTC offer -> the answer.
- ``GET /sessions/{id}``: that session's live figures; ``DELETE /sessions/{id}``.
- ``GET /health``; ``GET /metrics`` (Prometheus text format).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources

from avatar_stream import DEMO_FACE, __version__
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.image_io import FaceError, read_image
from avatar_stream.engine.live import LiveAvatar, LiveFrame, render_ticks
from avatar_stream.engine.stream import RENDERERS, Engine
from avatar_stream.errors import AvatarError

log = logging.getLogger("avatar_stream.serve")

AUDIO_RATE = 48_000  # WebRTC's Opus rate: no resampling on the way out
TICK = 1.0 / tb.FPS
VIDEO_CLOCK = 90_000
MAX_SIDE = 1280
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.1, 0.2)
LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 5.0)
MIC_QUEUE_SECONDS = 0.5  # a microphone's clock a little fast must not add latency forever


class ServeError(AvatarError):
    """A request the server refuses: ``status`` and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- metrics ---------------------------------------------------------------------------------
@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        self.n += 1
        self.total += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


@dataclass
class Metrics:
    frames: int = 0
    dropped: int = 0
    sessions_created: int = 0
    sessions_rejected: int = 0
    uploads_rejected: int = 0
    step: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    def text(self, active: int, connected: int) -> str:
        def counter(name: str, help_text: str, v: float) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {v}"]

        def gauge(name: str, help_text: str, v: float) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {v}"]

        lines = (counter("avatar_frames_total", "Frames rendered and sent, all sessions.", self.frames)
                 + counter("avatar_frames_dropped_total", "Frames skipped because a tick was late.", self.dropped)
                 + counter("avatar_sessions_created_total", "Sessions created.", self.sessions_created)
                 + counter("avatar_sessions_rejected_total", "Sessions refused at --max-sessions.",
                           self.sessions_rejected)
                 + counter("avatar_uploads_rejected_total", "Uploads refused (size, format, no face).",
                           self.uploads_rejected)
                 + gauge("avatar_sessions_active", "Sessions that exist.", active)
                 + gauge("avatar_sessions_connected", "Sessions with a connected peer, rendering.", connected)
                 + self.step.lines("avatar_step_seconds", "Wall time of one tick: every connected session's "
                                                          "frame, batched.")
                 + self.latency.lines("avatar_latency_seconds", "An audio sample's arrival at the server to "
                                                                "the frame that shows it leaving for the encoder."))
        return "\n".join(lines) + "\n"


# -- sessions --------------------------------------------------------------------------------
class _QueueTrack:
    """The part of an aiortc track that hands out queued frames; the media classes mix it in."""

    def _init_queue(self, maxsize: int) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)

    def offer(self, item) -> None:
        while self.queue.full():  # a consumer that fell behind gets the newest
            self.queue.get_nowait()
        self.queue.put_nowait(item)


def _track_classes():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError
    from av import AudioFrame, VideoFrame

    class AvatarVideoTrack(MediaStreamTrack, _QueueTrack):
        kind = "video"

        def __init__(self, session: Session) -> None:
            super().__init__()
            self._init_queue(4)
            self.session = session

        async def recv(self):
            item = await self.queue.get()
            if item is None:
                self.stop()
                raise MediaStreamError
            frame, t_emit = item
            vf = VideoFrame.from_ndarray(frame.image, format="rgb24")
            vf.pts = frame.index * (VIDEO_CLOCK // tb.FPS)
            vf.time_base = Fraction(1, VIDEO_CLOCK)
            self.session.sent(frame, time.monotonic() - t_emit)
            return vf

    class AvatarAudioTrack(MediaStreamTrack, _QueueTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._init_queue(16)

        async def recv(self):
            item = await self.queue.get()
            if item is None:
                self.stop()
                raise MediaStreamError
            pcm, pts = item
            af = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            af.sample_rate = AUDIO_RATE
            af.pts = pts
            af.time_base = Fraction(1, AUDIO_RATE)
            return af

    return AvatarVideoTrack, AvatarAudioTrack


@dataclass
class Session:
    id: str
    live: LiveAvatar
    server: AvatarServer
    created: float = field(default_factory=time.monotonic)
    pc: object | None = None
    video: object | None = None
    audio: object | None = None
    connected: bool = False
    sent_frames: int = 0
    dropped: int = 0
    mic_samples: int = 0
    latencies: list[float] = field(default_factory=list)
    _fps_marks: list[float] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)

    def deliver(self, frame: LiveFrame) -> None:
        """One tick's output to the tracks (the picture only when it was rendered)."""
        if self.audio is not None:
            # 20 ms frames: aiortc packs one audio frame into Opus packets that share one RTP
            # timestamp, and a receiver joins packets with one timestamp into one, so a 40 ms
            # frame would lose half of its sound.
            n = AUDIO_RATE // 50
            for k in range(0, frame.audio.shape[0], n):
                self.audio.offer((frame.audio[k : k + n], frame.pts + k))
        if frame.image is None:
            self.dropped += 1
            self.server.metrics.dropped += 1
        elif self.video is not None:
            self.video.offer((frame, time.monotonic()))

    def sent(self, frame: LiveFrame, queued_s: float) -> None:
        now = time.monotonic()
        self.sent_frames += 1
        self.server.metrics.frames += 1
        self._fps_marks.append(now)
        if len(self._fps_marks) > 50:
            del self._fps_marks[:-50]
        if frame.latency_s is not None:
            latency = frame.latency_s + queued_s
            self.latencies.append(latency)
            if len(self.latencies) > 500:
                del self.latencies[:-500]
            self.server.metrics.latency.observe(latency)

    def figures(self) -> dict:
        marks = [t for t in self._fps_marks if t > time.monotonic() - 2.0]
        fps = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 2 and marks[-1] > marks[0] else 0.0
        lat = sorted(self.latencies[-100:])
        w, h = self.live.size
        return {"id": self.id, "width": w, "height": h, "connected": self.connected,
                "frames_sent": self.sent_frames, "frames_dropped": self.dropped, "fps": round(fps, 2),
                "speaking": self.live.speaking, "mic_seconds": round(self.mic_samples / AUDIO_RATE, 2),
                "latency_ms_p50": round(1000 * lat[len(lat) // 2], 1) if lat else None,
                "pipeline_ms": round(1000 * self.live.lead_ticks * TICK, 1),
                "age_s": round(time.monotonic() - self.created, 1)}


class AvatarServer:
    """Sessions, the clock task and the model, behind the HTTP handlers."""

    def __init__(self, engine: Engine, max_sessions: int = 2, max_upload_bytes: int = 10 << 20) -> None:
        self.engine = engine
        self.max_sessions = int(max_sessions)
        self.max_upload_bytes = int(max_upload_bytes)
        self.sessions: dict[str, Session] = {}
        self.metrics = Metrics()
        self._render = ThreadPoolExecutor(1, thread_name_prefix="avatar-render")
        self._prepare = ThreadPoolExecutor(1, thread_name_prefix="avatar-prepare")
        self._clock: asyncio.Task | None = None
        self._pending = 0  # sessions being prepared: they count against the limit

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._clock = asyncio.get_running_loop().create_task(self._run_clock())

    async def stop(self) -> None:
        for sid in list(self.sessions):
            await self.close_session(sid)
        if self._clock is not None:
            self._clock.cancel()
            try:
                await self._clock
            except asyncio.CancelledError:
                pass
        self._render.shutdown(wait=True)
        self._prepare.shutdown(wait=True)

    # -- sessions ----------------------------------------------------------------------------
    async def create_session(self, photo: bytes | None, size: tuple[int, int] | None = None,
                             face_index: int | None = None) -> tuple[Session, list[str]]:
        if len(self.sessions) + self._pending >= self.max_sessions:
            self.metrics.sessions_rejected += 1
            raise ServeError(503, f"{self.max_sessions} session(s) already running (--max-sessions): "
                                  "close one (DELETE /sessions/ID) or try again later")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            live, notes = await loop.run_in_executor(self._prepare, self._prepare_live, photo, size, face_index)
        finally:
            self._pending -= 1
        sid = secrets.token_urlsafe(9)
        session = Session(sid, live, self)
        self.sessions[sid] = session
        self.metrics.sessions_created += 1
        log.info("session %s: %dx%d%s", sid, *live.size, f" ({'; '.join(notes)})" if notes else "")
        return session, notes

    def _prepare_live(self, photo: bytes | None, size, face_index) -> tuple[LiveAvatar, list[str]]:
        try:
            image = read_image(photo if photo is not None else DEMO_FACE)
        except FaceError as e:
            self.metrics.uploads_rejected += 1
            raise ServeError(415, f"photo upload: {e}") from e
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                face = self.engine.prepare_face(image, face_index=face_index, output_size=size)
            except (FaceError, ValueError) as e:
                self.metrics.uploads_rejected += 1
                raise ServeError(422, str(e).replace("--face-index", "face_index")) from e
        live = LiveAvatar(self.engine, face, audio_rate=AUDIO_RATE, channels=1, output_size=size,
                          max_queue_seconds=MIC_QUEUE_SECONDS)
        return live, [str(w.message).replace("--face-index", "face_index") for w in caught]

    def get(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            raise ServeError(404, f"no session {sid!r}: create one with POST /sessions")
        return s

    async def close_session(self, sid: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is None:
            raise ServeError(404, f"no session {sid!r}")
        s.connected = False
        for t in (s.video, s.audio):
            if t is not None:
                t.offer(None)
        for task in s.tasks:
            task.cancel()
        if s.pc is not None:
            await s.pc.close()
        log.info("session %s closed after %.1f s, %d frames, %d dropped", sid, time.monotonic() - s.created,
                 s.sent_frames, s.dropped)

    async def answer(self, s: Session, sdp: str, kind: str) -> dict:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        if s.pc is not None:
            raise ServeError(409, f"session {s.id} already has a connection: create a new session")
        video_cls, audio_cls = _track_classes()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # loopback / LAN: no STUN
        s.pc, s.video, s.audio = pc, video_cls(s), audio_cls()

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                s.tasks.append(asyncio.ensure_future(self._read_mic(s, track)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: connection %s", s.id, pc.connectionState)
            s.connected = pc.connectionState == "connected"
            if pc.connectionState in ("failed", "closed") and s.id in self.sessions:
                await self.close_session(s.id)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        except ValueError as e:
            raise ServeError(400, f"the WebRTC offer could not be used ({e}): send the browser's createOffer() "
                                  "result") from e
        # addTrack reuses the offer's transceivers (the browser's recvonly video, sendrecv audio).
        pc.addTrack(s.video)
        pc.addTrack(s.audio)
        await pc.setLocalDescription(await pc.createAnswer())
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}

    async def _read_mic(self, s: Session, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray()
                channels = len(frame.layout.channels)
                if frame.format.is_planar:
                    pcm = pcm.T
                s.live.push_audio(pcm.reshape(-1), frame.sample_rate, channels)
                s.mic_samples += frame.samples * AUDIO_RATE // frame.sample_rate
        except MediaStreamError:
            return

    # -- the clock -------------------------------------------------------------------------------
    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            active = [s for s in self.sessions.values() if s.connected]
            if not active:
                await asyncio.sleep(TICK)
                next_t = loop.time()
                continue
            late = loop.time() - next_t > TICK  # a whole tick late: keep the sound, skip the picture
            render = [not late] * len(active)
            t0 = time.perf_counter()
            try:
                frames = await loop.run_in_executor(self._render, render_ticks, [s.live for s in active], render)
            except Exception:
                log.exception("rendering failed; closing the sessions of this tick")
                for s in active:
                    if s.id in self.sessions:
                        await self.close_session(s.id)
                continue
            if not late:
                self.metrics.step.observe(time.perf_counter() - t0)
            for s, f in zip(active, frames, strict=True):
                s.deliver(f)
            next_t += TICK
            await asyncio.sleep(max(0.0, next_t - loop.time()))


# -- HTTP --------------------------------------------------------------------------------------
def _json(data, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status)


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ServeError(400, f"size {text!r}: use WxH, for example 640x480") from None
    if not (64 <= w <= MAX_SIDE and 64 <= h <= MAX_SIDE):
        raise ServeError(400, f"size {text!r}: each side must be 64 to {MAX_SIDE} px")
    return w + w % 2, h + h % 2


def _parse_face_index(text: str | None) -> int | None:
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise ServeError(400, f"face_index {text!r}: pass a whole number (0 = the largest face)") from None


def make_app(server: AvatarServer):
    from aiohttp import web

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except ServeError as e:
            return _json({"error": str(e)}, e.status)
        except web.HTTPRequestEntityTooLarge:
            server.metrics.uploads_rejected += 1
            return _json({"error": f"the upload is larger than {server.max_upload_bytes >> 20} MB "
                                   "(--max-upload-mb): send a smaller photo"}, 413)

    async def page(_request):
        html = resources.files("avatar_stream.assets").joinpath("serve.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html")

    async def create(request):
        photo, size, face_index = None, request.query.get("size"), request.query.get("face_index")
        if request.content_length and request.content_length > server.max_upload_bytes:
            server.metrics.uploads_rejected += 1
            raise ServeError(413, f"the upload is {request.content_length >> 10} KB, more than "
                                  f"{server.max_upload_bytes >> 20} MB (--max-upload-mb): send a smaller photo")
        ctype = request.content_type
        if ctype.startswith("multipart/"):
            form = await request.post()
            field_ = form.get("photo")
            if field_ is not None and not isinstance(field_, str):
                photo = field_.file.read()
            size = form.get("size") or size
            face_index = form.get("face_index") or face_index
        elif request.can_read_body:
            photo = await request.read()
            if ctype == "application/json" or not photo:
                photo = None  # no image: the bundled face
        if photo is not None and not photo:
            server.metrics.uploads_rejected += 1
            raise ServeError(400, "the photo upload is empty: send the image's bytes")
        session, notes = await server.create_session(photo, _parse_size(size), _parse_face_index(face_index))
        w, h = session.live.size
        return _json({"id": session.id, "width": w, "height": h, "warnings": notes}, 201)

    async def offer(request):
        s = server.get(request.match_info["id"])
        try:
            body = await request.json()
            sdp, kind = body["sdp"], body.get("type", "offer")
        except (ValueError, KeyError, TypeError):
            raise ServeError(400, 'send {"sdp": ..., "type": "offer"} as JSON (the browser\'s createOffer())') from None
        if kind != "offer":
            raise ServeError(400, f'type {kind!r}: send an "offer"')
        return _json(await server.answer(s, sdp, kind))

    async def info(request):
        return _json(server.get(request.match_info["id"]).figures())

    async def delete(request):
        await server.close_session(request.match_info["id"])
        return web.Response(status=204)

    async def health(_request):
        return _json({"status": "ok", "version": __version__, "sessions": len(server.sessions),
                      "max_sessions": server.max_sessions, "backend": server.engine.backend,
                      "renderer": server.engine.renderer})

    async def metrics(_request):
        connected = sum(s.connected for s in server.sessions.values())
        return web.Response(text=server.metrics.text(len(server.sessions), connected),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def on_startup(_app):
        await server.start()

    async def on_cleanup(_app):
        await server.stop()

    app = web.Application(middlewares=[errors], client_max_size=server.max_upload_bytes + (64 << 10))
    app.add_routes([web.get("/", page), web.post("/sessions", create), web.get("/sessions/{id}", info),
                    web.delete("/sessions/{id}", delete), web.post("/sessions/{id}/offer", offer),
                    web.get("/health", health), web.get("/metrics", metrics)])
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatar-serve", description="The avatar in a browser over WebRTC, with a "
                                "JSON API for sessions (POST /sessions, /health, /metrics).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; there is no authentication)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-sessions", type=int, default=2,
                   help="sessions at once; more are answered 503 (default 2: what a 2-core CPU holds at 0 drops, "
                        "see the README)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest photo upload (default 10 MB)")
    p.add_argument("--model", default=None, help="exported model directory (default: the shipped starter)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    p.add_argument("--renderer", default=RENDERERS[0], choices=RENDERERS)
    p.add_argument("--still", action="store_true", help="no idle blinks or head sway")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="avatar-serve: %(message)s")
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        from aiohttp import web
    except ImportError:
        print("avatar-serve: aiohttp and aiortc are missing: pip install 'avatar-stream[serve]'")
        return 2
    if args.max_sessions < 1:
        print("avatar-serve: --max-sessions must be 1 or more")
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach port %d can start sessions (there is no "
                    "authentication); put it behind a proxy that checks who calls", args.host, args.port)
    try:
        engine = Engine(args.model, backend=args.backend, renderer=args.renderer, alive=not args.still)
        engine.warm_up(engine.prepare_face(read_image(DEMO_FACE)))
    except Exception as e:  # a missing model, no GPU for --backend tensorrt, ...: one line
        print(f"avatar-serve: {e}")
        return 2
    server = AvatarServer(engine, args.max_sessions, int(args.max_upload_mb * (1 << 20)))
    log.info("serving on http://%s:%d (%s, renderer %s, at most %d session(s))", args.host, args.port,
             engine.backend, engine.renderer, args.max_sessions)
    web.run_app(make_app(server), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
