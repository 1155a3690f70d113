"""What a paced front-end (the LiveKit generator, the Pipecat service) did, tick by tick.

Needs no framework: both integrations fill one ``AvatarStats``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avatar_stream.engine import timebase as tb


def _window() -> collections.deque:
    return collections.deque(maxlen=2000)


@dataclass
class AvatarStats:
    """Counts and timings of one live avatar. ``latency_s``: for each tick that carried
    speech, the time from the arrival of its first sample to its frame leaving (the queue
    wait, plus ``lead_ticks`` ticks of model lookahead, plus compute). ``onset_latency_s``:
    the same for the first tick of each stretch of speech, where nothing was queued before it:
    what a listener waits for the avatar to start talking (text-to-speech that pushes a
    sentence at once makes the later ticks of ``latency_s`` include the sentence's own queue).
    The framework's playback (LiveKit's synchroniser, Pipecat's transport) adds its buffering
    and the network on top."""

    lead_ticks: int = 0
    frames: int = 0  # ticks emitted (one picture and its audio each)
    speaking_frames: int = 0  # ticks that carried pushed speech
    rendered: int = 0
    skipped: int = 0  # ticks whose picture was not drawn (behind real time: last image again)
    stalls: int = 0  # times the pacing fell far behind and re-anchored its clock
    segments: int = 0  # utterances whose last sample has left
    interruptions: int = 0  # barge-ins that cut speech off
    step_s: collections.deque = field(default_factory=_window)
    latency_s: collections.deque = field(default_factory=_window)
    onset_latency_s: collections.deque = field(default_factory=_window)

    def summary(self) -> dict[str, Any]:
        """Counts plus p50 / p95 / max of the step time and the latencies, in milliseconds."""

        def ms(values: collections.deque) -> dict[str, float | None]:
            if not values:
                return {"p50": None, "p95": None, "max": None}
            a = np.asarray(values, np.float64) * 1e3
            return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
                    "max": float(a.max())}

        return {"frames": self.frames, "speaking_frames": self.speaking_frames, "rendered": self.rendered,
                "skipped": self.skipped, "stalls": self.stalls, "segments": self.segments,
                "interruptions": self.interruptions, "lead_ticks": self.lead_ticks,
                "lead_ms": self.lead_ticks * 1e3 / tb.FPS, "step_ms": ms(self.step_s),
                "latency_ms": ms(self.latency_s), "onset_latency_ms": ms(self.onset_latency_s)}
