"""Adapters that put a live avatar (engine/live.py) into other frameworks' pipelines.

Each module imports its framework and needs its extra: ``livekit`` (LiveKit Agents) and
``pipecat`` (Pipecat). The engine itself never imports them.
"""
