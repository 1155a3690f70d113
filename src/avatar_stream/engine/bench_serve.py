"""``avatar-bench --serve 1,2,3``: how many sessions ``avatar-serve`` holds at 0 drops.

For each count N: start ``avatar-serve --max-sessions N`` in its own process, open N real
WebRTC peers on loopback (aiortc, in this process) that each send the bundled speech as
their microphone and decode the avatar's video, run ``seconds``, then read every session's
figures from the server (frames sent and dropped, latency) and the tick time from
``/metrics``. The peers share the machine with the server: on a small machine their
VP8 decoding is part of the load (a real deployment has its viewers elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from avatar_stream import DEMO_SPEECH


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _start_server(n: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "avatar_stream.engine.serve", "--port", str(port),
                             "--max-sessions", str(n), "-q", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            _get(url + "/health")
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"avatar-serve did not start: {proc.stderr.read().strip()}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("avatar-serve did not answer /health within 90 s") from None
            time.sleep(0.3)


async def _peer(url: str, sid: str, wav: Path):
    """Connect one peer; returns (its figures so far, a coroutine that closes it)."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaPlayer

    pc = RTCPeerConnection()
    player = MediaPlayer(str(wav), loop=True)
    pc.addTrack(player.audio)
    pc.addTransceiver("video", direction="recvonly")
    got = {"video_frames": 0, "audio_samples": 0, "first": None}
    tasks = []

    async def read(track):
        while True:
            try:
                f = await track.recv()
            except Exception:
                return
            if track.kind == "video":
                got["video_frames"] += 1
                got["first"] = got["first"] or time.monotonic()
            else:
                got["audio_samples"] += f.samples

    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(read(t))))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        r = await http.post(f"{url}/sessions/{sid}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
        answer = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(**answer))

    def figures() -> dict:
        elapsed = time.monotonic() - got["first"] if got["first"] else 0.0
        return {"video_frames": got["video_frames"], "received_fps": got["video_frames"] / max(elapsed, 1e-6),
                "audio_seconds": got["audio_samples"] / 48_000}

    async def close() -> None:
        await pc.close()
        player.audio.stop()
        for t in tasks:
            t.cancel()

    return figures, close


def _step_quantiles(metrics: str) -> dict:
    buckets, count = [], 0
    for line in metrics.splitlines():
        if line.startswith('avatar_step_seconds_bucket{le="') and "+Inf" not in line:
            le = float(line.split('"')[1])
            buckets.append((le, float(line.rsplit(" ", 1)[1])))
        elif line.startswith("avatar_step_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])

    def q(p: float):
        for le, c in buckets:
            if count and c >= p * count:
                return le * 1000
        return None

    return {"tick_ms_p50_le": q(0.5), "tick_ms_p99_le": q(0.99), "ticks": count}


async def _run_count(url: str, n: int, seconds: float, warmup: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        ids = []
        for _ in range(n):
            r = await http.post(f"{url}/sessions")
            ids.append((await r.json())["id"])
    peers = await asyncio.gather(*(_peer(url, sid, DEMO_SPEECH) for sid in ids))
    await asyncio.sleep(seconds + warmup)
    # Read before closing: a closed peer's session is closed by the server.
    figures = [json.loads(_get(f"{url}/sessions/{sid}")) for sid in ids]
    received = [f() for f, _ in peers]
    metrics = _get(url + "/metrics")
    await asyncio.gather(*(close() for _, close in peers))
    return {"sessions": n, "peers": received, "server": figures, **_step_quantiles(metrics)}


def run(counts: list[int], seconds: float, extra: list[str]) -> list[dict]:
    rows = []
    for n in counts:
        proc, url = _start_server(n, extra)
        try:
            rows.append(asyncio.run(_run_count(url, n, seconds, warmup=1.0)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return rows


def report(rows: list[dict], out: Path) -> None:
    print(f"{'sessions':>8}{'dropped':>9}{'sent fps':>10}{'recv fps':>10}{'latency p50':>13}{'tick p50<=':>12}"
          f"{'tick p99<=':>12}{'sound/video':>13}")
    for r in rows:
        dropped = sum(s["frames_dropped"] for s in r["server"])
        sent = sum(s["frames_sent"] for s in r["server"])
        fps = min(s["fps"] for s in r["server"])
        recv = min(p["received_fps"] for p in r["peers"])
        # Seconds of sound received per second of video: 1.0 when every frame had its sound.
        cover = min(p["audio_seconds"] / max(p["video_frames"] / 25, 1e-6) for p in r["peers"])
        r["sound_per_video_s"] = cover
        lat = [s["latency_ms_p50"] for s in r["server"] if s["latency_ms_p50"] is not None]
        r["dropped_total"], r["sent_total"] = dropped, sent
        def ms(v):
            return f"{v:.0f} ms" if v else "-"

        print(f"{r['sessions']:>8}{dropped:>9}{fps:>10.1f}{recv:>10.1f}{ms(max(lat) if lat else None):>13}"
              f"{ms(r['tick_ms_p50_le']):>12}{ms(r['tick_ms_p99_le']):>12}{cover:>13.2f}")
    out.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")
