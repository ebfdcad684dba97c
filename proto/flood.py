"""Refusals past a rate limit that go on and on: the peer is not a burst of legitimate traffic but a flood.

Why: a rate limit refuses the excess and keeps the session, so that a burst of real connections does not cut every
other one. A peer that keeps exceeding it for seconds on end gains nothing from the session it is abusing and costs
a frame in each direction per attempt: past ``grace`` seconds of continuous refusals it is disconnected with a
readable reason (ENHANCE_YOUR_CALM).
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["FloodWatch"]

QUIET: Final = 1.0
"""Seconds without a refusal that end a flood (the next refusal starts a new one)."""


@attrs.define
class FloodWatch:
    """Times a run of refusals: :meth:`refused` is True once the run has lasted ``grace`` seconds."""

    grace: float
    since: float | None = None
    last: float = 0.0
    count: int = 0
    """Refusals in the current run."""

    def refused(self, now: float) -> bool:
        if self.since is None or now - self.last > QUIET:
            self.since = now
            self.count = 0
        self.last = now
        self.count += 1
        return now - self.since >= self.grace
