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


def next_window(
    *,
    window: int,
    max_window: int,
    budget_left: int,
    consumed_in_epoch: int,
    epoch_seconds: float | None,
    srtt: float | None,
) -> int:
    """The receive window to use from now on (auto-tuning, after quic-go's ``maybeAdjustWindowSize``).

    The window doubles when the application consumed more than half of it in an epoch that lasted less than
    ``4 * srtt * consumed / window``: the reader keeps up and the window, not the reader, limits throughput. The
    threshold scales with the fraction consumed (a fixed ``4 * srtt`` left go-yamux stuck, go-yamux#136). It never
    shrinks, never grows without an RTT sample, and never beyond ``max_window`` or the connection's budget.
    """
    if srtt is None or epoch_seconds is None or consumed_in_epoch <= window // 2:
        return window
    if epoch_seconds >= 4 * srtt * consumed_in_epoch / window:
        return window
    grown = min(window * 2, max_window, window + max(budget_left, 0))
    return max(grown, window)
