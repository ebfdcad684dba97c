"""Flow control arithmetic and rate limits, kept free of any connection state so they can be tested alone."""

from __future__ import annotations

import attrs

from .limits import RateLimit

__all__ = ["TokenBucket", "next_window"]


@attrs.define
class TokenBucket:
    """A token bucket over caller-supplied time: :meth:`take` fails once a peer exceeds ``burst`` at ``rate``/s."""

    limit: RateLimit
    tokens: float = attrs.field(init=False)
    stamp: float = attrs.field(default=0.0, init=False)

    def __attrs_post_init__(self) -> None:
        self.tokens = float(self.limit.burst)

    def take(self, now: float) -> bool:
        if now > self.stamp:
            self.tokens = min(float(self.limit.burst), self.tokens + (now - self.stamp) * self.limit.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


SHRINK_FACTOR = 8
"""The window halves after an epoch that took ``SHRINK_FACTOR / 4`` times as long as growth allows (see
:func:`next_window`): between the two the window holds, so it does not flap."""


def next_window(
    *,
    window: int,
    max_window: int,
    budget_left: int,
    consumed_in_epoch: int,
    epoch_seconds: float | None,
    srtt: float | None,
    min_window: int = 0,
) -> int:
    """The receive window to use from now on (auto-tuning, after quic-go's ``maybeAdjustWindowSize``).

    The window doubles when the application consumed more than half of it in an epoch that lasted less than
    ``4 * srtt * consumed / window``: the reader keeps up and the window, not the reader, limits throughput. The
    threshold scales with the fraction consumed (a fixed ``4 * srtt`` left go-yamux stuck, go-yamux#136). It never
    grows without an RTT sample, and never beyond ``max_window`` or the connection's budget.

    Unlike quic-go's, it also halves (never below ``min_window``) after an epoch that lasted ``SHRINK_FACTOR *
    srtt * consumed / window`` or longer: the window is then several times what the reader's pace needs. A window
    grows on bursts (a local socket's kernel buffers absorb megabytes at once), and every byte of window a steady
    bulk stream keeps beyond its pace sits in the link's queues, ahead of any other stream's next frame on the same
    link: a 2 MiB window on a 170 MiB/s link is 12 ms of delay for an interactive stream beside it. When the window
    does limit throughput, consuming half of it takes about half an RTT, far below the shrink threshold.
    """
    if srtt is None or epoch_seconds is None or consumed_in_epoch <= window // 2:
        return window
    if epoch_seconds >= 4 * srtt * consumed_in_epoch / window:
        if window > min_window and epoch_seconds >= SHRINK_FACTOR * srtt * consumed_in_epoch / window:
            return max(window // 2, min_window)
        return window
    grown = min(window * 2, max_window, window + max(budget_left, 0))
    return max(grown, window)
