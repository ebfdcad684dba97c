"""trio_tunnel.metrics without a network: bounded label sets, one registry per process object, result labels, and
the flow-control stall count of a session over memory streams."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from mux_helpers import session_pair
from prometheus_client.parser import text_string_to_metric_families
from trio_tunnel.config import ClientConfig, HostPort, ServerConfig
from trio_tunnel.errors import ConfigError
from trio_tunnel.metrics import MAX_CLIENT_SERIES, RESULTS, Metrics, open_result
from trio_tunnel.proto import ErrorCode
from trio_tunnel.usage import build_parser


def _series(metrics: Metrics, name: str) -> list[dict[str, str]]:
    text = metrics.respond("GET", "/metrics").body.decode()
    return [s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_each_metrics_object_has_its_own_registry() -> None:
    one, two = Metrics("server"), Metrics("server")
    one.service("home", "web", kind="expose").failed("refused", "no")
    assert _series(one, "trio_tunnel_streams_opened_total") == [
        {"client": "home", "service": "web", "result": "refused"}
    ]
    assert _series(two, "trio_tunnel_streams_opened_total") == []


def test_the_client_label_set_is_bounded() -> None:
    metrics = Metrics("server")
    for n in range(MAX_CLIENT_SERIES + 50):
        stats = metrics.service(f"client-{n}", "web", kind="expose")
        stats.failed("timeout", "slow")
        stats.active = False  # its link has ended
    clients = {labels["client"] for labels in _series(metrics, "trio_tunnel_streams_opened_total")}
    assert len(clients) == MAX_CLIENT_SERIES
    assert "client-0" not in clients and f"client-{MAX_CLIENT_SERIES + 49}" in clients


def test_open_results() -> None:
    assert open_result(ErrorCode.CONNECT_FAILED) == "local-connect-failed"
    assert open_result(ErrorCode.CONNECT_TIMEOUT) == "timeout"
    assert open_result(ErrorCode.STREAM_LIMIT) == "limit"
    assert open_result(ErrorCode.PROHIBITED) == "refused"
    assert open_result(4711) == "refused"
    assert {open_result(code) for code in ErrorCode} | {"ok"} == set(RESULTS)


def test_the_udp_drop_counter_has_its_place() -> None:
    metrics = Metrics("client", "home")
    metrics.udp_datagrams_dropped[("home", "dns")] = 3
    text = metrics.respond("GET", "/metrics").body.decode()
    assert 'trio_tunnel_udp_datagrams_dropped_total{client="home",service="dns"} 3.0' in text
    assert "trio_tunnel_reconnects_total 0.0" in text


async def test_a_send_that_waits_for_credit_counts_a_stall() -> None:
    size = 1024 * 1024  # four times the initial window
    with trio.fail_after(20):
        async with session_pair() as (server, client), trio.open_nursery() as nursery:
            stream = await client.open_stream("r", wait_accepted=False)
            await stream.send_all(b"x" * 1024)  # within the window: no wait
            assert client.statistics().send_stalls == 0
            nursery.start_soon(stream.send_all, b"x" * size)
            peer = await server.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            stalled = client.statistics().send_stalls
            assert stalled >= 1  # the sender waits for credit the peer has not returned
            got = 0
            while got < size + 1024:
                got += len(await peer.receive_some(65536))
            assert client.statistics().send_stalls >= stalled


def test_the_metrics_key_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.toml"
    path.write_text(
        '[server]\ntoken = "metrics-test-token-0123456789"\nmetrics = 9465\n'
        '[client]\nserver = "192.0.2.1:7835"\nmetrics = "[::1]:9466"\n'
        '[client.expose.web]\nlocal = "127.0.0.1:80"\nremote_port = 0\n'
    )
    assert ServerConfig.from_toml(path).metrics == HostPort(host="127.0.0.1", port=9465)  # loopback by default
    assert ClientConfig.from_toml(path).metrics == HostPort(host="::1", port=9466)
    given = HostPort(host="0.0.0.0", port=9000)
    assert ServerConfig.from_sources(config_file=path, metrics=given).metrics == given  # the flag wins
    path.write_text('[server]\ntoken = "metrics-test-token-0123456789"\nmetrics = "localhost"\n')
    with pytest.raises(ConfigError, match="metrics"):
        ServerConfig.from_toml(path)
    args = build_parser().parse_args(["client", "--metrics", "9467"])
    assert args.metrics == "9467"
