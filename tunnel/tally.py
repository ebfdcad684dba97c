"""Log lines for events that a hostile peer can repeat at will (refused handshakes, stream opens past the rate
limit): the first one from a source in full, then one summary line per source and window instead of a flood.

Why: under attack, a line per event is itself the attack: 2,000 idle connections made 4,000 lines, a stream-open
flood 280 WARNING lines a second, burying what the operator needs and filling the disk. With a :class:`Tally` a
source costs at most one full line, then one line per :attr:`Tally.window` while it keeps going::

    refused a client from 203.0.113.9:40112: no handshake within 10 s
    refused 1,398 more handshakes from 203.0.113.9 in the last 10 s

Memory is bounded: past :data:`MAX_SOURCES` distinct sources in one window, further sources are counted together.
"""

from __future__ import annotations

import logging
from typing import Final

import attrs
import trio

__all__ = ["Tally"]

MAX_SOURCES: Final = 1024
OTHERS: Final = "other sources"


@attrs.define(eq=False)
class Tally:
    """Counts one kind of event per source; :meth:`run` (a task of the owner's nursery) writes the summaries.

    ``what`` names the events in the summary: ``refused {count} more {what} from {source} in the last {window} s``.
    """

    logger: logging.Logger
    what: str
    window: float = 10.0
    counts: dict[str, int] = attrs.field(factory=dict)
    """Source -> events counted (not logged) in this window; a source with 0 had its full line in this window."""
    levels: dict[str, int] = attrs.field(factory=dict)
    """Source -> the highest level among its counted events (the summary's level)."""
    _wake: trio.Event = attrs.field(factory=trio.Event)
    total: int = 0

    def note(self, source: str, level: int, message: str, *args: object) -> None:
        """One event from ``source``: logged in full (``message % args`` at ``level``) if it is the source's first
        in this window, else counted for the summary."""
        self.total += 1
        counts = self.counts
        if source not in counts and len(counts) >= MAX_SOURCES:
            source = OTHERS
        seen = counts.get(source)
        if seen is None:
            counts[source] = 0
            self.logger.log(level, message, *args)
            self._wake.set()
        else:
            counts[source] = seen + 1
            self.levels[source] = max(level, self.levels.get(source, logging.NOTSET))

    async def run(self) -> None:
        """Write the summaries, one window after the first event of a quiet period, then every window while events
        keep coming; sleeps (on an event) while nothing happens."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(self.window)
            self.flush()

    def flush(self) -> None:
        counts, levels = self.counts, self.levels
        self.counts, self.levels = {}, {}
        for source, count in counts.items():
            if count:
                self.logger.log(
                    levels[source],
                    "refused %s more %s from %s in the last %g s",
                    f"{count:,}",
                    self.what,
                    source,
                    self.window,
                )
                self.counts[source] = 0  # still going: its next event is counted, not logged in full
        if self.counts:
            self._wake.set()
