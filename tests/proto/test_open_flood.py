"""A peer that keeps opening streams past the open rate limit for open_flood_grace seconds is disconnected with a
readable reason; a burst past the limit only has its excess refused."""

from __future__ import annotations

from proto_helpers import ConnectionPair, only, terminated
from trio_tunnel.proto import ErrorCode, Limits, RateLimit
from trio_tunnel.proto.events import ConnectionTerminated, StreamOpened, StreamRejected

LIMITS = Limits(open_rate=RateLimit(burst=10, rate=10.0), open_flood_grace=5.0)


def _open_at(pair: ConnectionPair, now: float, count: int) -> tuple[int, list[object]]:
    """``count`` opens from the client at ``now``; the server answers every open it lets through at once.
    Returns how many the rate limit refused, and the server's events."""
    for _ in range(count):
        pair.client.open_stream("svc", now=now)
    server_events = pair.transfer(pair.client, now=now)
    for opened in only(server_events, StreamOpened) if pair.server.is_open else []:
        pair.server.reject_stream(opened.stream_id, ErrorCode.REFUSED, "test")
    client_events = pair.transfer(pair.server, now=now)
    calm = [e for e in only(client_events, StreamRejected) if e.code == ErrorCode.ENHANCE_YOUR_CALM]
    return len(calm), list(server_events)


def test_a_burst_past_the_rate_limit_is_refused_in_part_and_the_session_lives() -> None:
    pair = ConnectionPair(server_limits=LIMITS, now=0.0)
    refused, events = _open_at(pair, 1.0, 30)
    assert refused == 20 and not only(events, ConnectionTerminated)
    for second in range(2, 12):  # then a steady rate within the limit: never cut off
        refused, events = _open_at(pair, float(second), 5)
        assert refused == 0 and not only(events, ConnectionTerminated)
    assert pair.server.is_open


def test_a_sustained_flood_is_disconnected_after_the_grace_period() -> None:
    pair = ConnectionPair(server_limits=LIMITS, now=0.0)
    now, ended = 1.0, None
    while ended is None and now < 20:
        _, events = _open_at(pair, now, 10)  # 100 opens/s against 10/s allowed
        ended = next(iter(only(events, ConnectionTerminated)), None)
        now += 0.1
    assert ended is not None
    assert 6.0 <= now <= 6.3  # five seconds of refusals after the burst ran out
    assert ended.code == ErrorCode.ENHANCE_YOUR_CALM
    assert "stream opens refused past the rate limit (10/s) in 5 s: disconnecting a flood" in ended.reason
    client_end = terminated(pair.client.receive_data(b""))
    assert client_end.code == ErrorCode.ENHANCE_YOUR_CALM and "flood" in client_end.reason
