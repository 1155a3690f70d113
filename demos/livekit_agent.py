"""A LiveKit voice agent with an avatar-stream face: one photo, lip-synced to the agent's speech.

    pip install 'avatar-stream[livekit]'
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python -m livekit.agents download-files      # the VAD model the session uses

    python demos/livekit_agent.py dev                          # agent and avatar in one process
    AVATAR_MODE=remote python demos/livekit_agent.py dev       # agent; avatar on a dispatched worker
    AVATAR_MODE=worker python demos/livekit_agent.py dev       # an avatar worker (one per machine)

(``python -m livekit.agents start demos/livekit_agent.py --dev`` runs the same ``server``.)
Then open a room in the LiveKit Agents Playground or any LiveKit client: the agent joins,
greets you, and its video track is the avatar.

``AVATAR_FACE``: the photo (default: the bundled one). ``AVATAR_MODEL``: an avatar-export
folder (default: the bundled starter model). Speech recognition, the LLM and the voice are
LiveKit Inference's (through LiveKit Cloud); any LiveKit plugin can replace them.

In ``remote`` mode the agent asks LiveKit to dispatch an ``avatar-stream`` worker to its room
and streams its speech to it (``DataStreamAudioOutput``); LiveKit picks the worker, so more
worker machines serve more rooms. Only the ``worker`` processes load the engine then.
"""

from __future__ import annotations

import asyncio
import logging
import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli

from avatar_stream import DEMO_FACE
from avatar_stream.engine.stream import Engine
from avatar_stream.integrations.livekit import AvatarVideoGenerator, LocalAvatar, RemoteAvatar, avatar_server

logger = logging.getLogger("avatar-agent")

MODE = os.environ.get("AVATAR_MODE", "local")  # local | remote | worker
FACE = os.environ.get("AVATAR_FACE", str(DEMO_FACE))
MODEL = os.environ.get("AVATAR_MODEL") or None

INSTRUCTIONS = ("You are a friendly assistant with a face. Keep your answers short and "
                "conversational; you are speaking, so no lists or markdown.")


def prewarm(proc: JobProcess) -> None:
    """Runs once per job process, before its first job: load the engine (about 1 s)."""
    if MODE == "local":
        proc.userdata["engine"] = Engine(MODEL)


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = AgentSession(
        stt="deepgram/nova-3",
        llm="openai/gpt-4.1-mini",
        tts="cartesia/sonic-3",
        # The avatar's audio output cannot pause, so a false interruption cannot resume.
        turn_handling={"interruption": {"resume_false_interruption": False}},
    )

    if MODE == "remote":
        avatar = RemoteAvatar()
    else:
        engine = ctx.proc.userdata.get("engine") or await asyncio.to_thread(Engine, MODEL)
        generator = await asyncio.to_thread(AvatarVideoGenerator.create, engine, FACE)
        avatar = LocalAvatar(generator)

        async def log_stats() -> None:
            logger.info("avatar stats: %s", generator.stats.summary())

        ctx.add_shutdown_callback(log_stats)

    # Before session.start: the session then sends its speech to the avatar, which plays it
    # in sync with the face, instead of publishing its own audio track.
    await avatar.start(session, ctx.room)
    await session.start(agent=Agent(instructions=INSTRUCTIONS), room=ctx.room)
    session.generate_reply(instructions="Greet the user and offer your help.")


def make_server(mode: str = MODE) -> AgentServer:
    if mode == "worker":
        return avatar_server(faces=FACE, model_dir=MODEL)
    if mode not in ("local", "remote"):
        raise SystemExit(f"AVATAR_MODE={mode!r}: use local, remote or worker")
    agent_server = AgentServer(setup_fnc=prewarm)
    agent_server.rtc_session(entrypoint)
    return agent_server


server = make_server()

if __name__ == "__main__":
    cli.run_app(server)
