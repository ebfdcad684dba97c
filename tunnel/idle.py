"""A TCP service's visitor idle timeout: a connection that moved no byte either way for ``idle`` seconds is closed.

One anonymous host could otherwise hold a service's connection slots for ever by opening connections and sending
nothing (``max_connections_per_ip`` bounds how many; this bounds for how long). Optional and off by default: a
service whose connections are legitimately quiet for long (SSH, database pools) must not lose them.

No polling and no deadline moved per read: the splice stores the time of its last chunk
(:attr:`~trio_tunnel.relay.Splice.active_at`, one float per chunk), and one timer per connection sleeps until
``last + idle``; when it wakes and there was activity meanwhile, it sleeps again until the new ``last + idle``, so it
wakes at most once per idle period however busy the connection is (the technique of :mod:`trio_tunnel.udp`).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import attrs
import trio

from .relay import Ending, Splice, SpliceResult

__all__ = ["run_splice"]


def run_splice(splicer: Splice, idle: float | None) -> Coroutine[Any, Any, SpliceResult]:
    """Run ``splicer`` (await the result); with ``idle``, stop it once no byte moved either way for ``idle`` seconds.

    An idle connection is closed abortively at both ends (as a cancelled splice is: the visitor and the service see
    a reset), and the directions still open report ``"idle"``. (A plain function: without a timeout it hands back
    the splice's own coroutine, one frame fewer held by every connection.)
    """
    if idle is None:
        return splicer.run()
    return _run_watched(splicer, idle)


async def _run_watched(splicer: Splice, idle: float) -> SpliceResult:
    timed_out = False
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal timed_out
                started = trio.current_time()
                while (due := max(splicer.active_at, started) + idle) > trio.current_time():  # noqa: ASYNC110 (a timer re-armed at most once per idle period)
                    await trio.sleep_until(due)
                timed_out = True
                scope.cancel(reason=f"idle for {idle:g} s")

            nursery.start_soon(watch)
            result = await splicer.run()
            nursery.cancel_scope.cancel()
            return result
    assert timed_out  # (only the watcher cancels this scope; an outer cancellation propagates past it)
    result = splicer.snapshot()
    return attrs.evolve(result, a_to_b=_idle(result.a_to_b), b_to_a=_idle(result.b_to_a))


def _idle(end: Ending) -> Ending:
    return "idle" if end == "cancelled" else end
