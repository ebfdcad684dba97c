"""``/metrics`` and ``/status`` of ``server --workers N`` merged from the workers' (tunnel/merge.py)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from trio_tunnel.merge import merge_metrics, merge_status, worker_families
from trio_tunnel.metrics import Metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_equal_samples_are_summed_except_info_which_stays_one() -> None:
    one, two = Metrics("server"), Metrics("server")
    one.handshake_failed("bad-token")
    two.handshake_failed("bad-token")
    two.handshake_failed("tls")
    one.service("home", "web", kind="expose").failed("refused", "x")
    two.service("home", "web", kind="expose").failed("refused", "y")  # the client moved to the other worker
    merged = merge_metrics([generate_latest(m.registry).decode() for m in (one, two)])
    samples = _samples(merged)
    assert samples[("trio_tunnel_info", (("role", "server"), ("version", samples_version(merged))))] == 1.0
    assert samples[("trio_tunnel_auth_failures_total", (("reason", "bad-token"),))] == 2.0
    assert samples[("trio_tunnel_auth_failures_total", (("reason", "tls"),))] == 1.0
    key = ("trio_tunnel_streams_opened_total", (("client", "home"), ("result", "refused"), ("service", "web")))
    assert samples[key] == 2.0
    assert samples[("trio_tunnel_sessions_connected", ())] == 0.0
    assert merged.count("# TYPE trio_tunnel_auth_failures counter") == 1


def samples_version(text: str) -> str:
    for family in text_string_to_metric_families(text):
        if family.name == "trio_tunnel_info":
            return str(family.samples[0].labels["version"])
    raise AssertionError("no info")


def test_label_values_are_escaped_back() -> None:
    text = '# HELP x_total A.\n# TYPE x_total counter\nx_total{client="a\\"b\\\\c"} 1.0\n'
    merged = merge_metrics([text, text])
    assert _samples(merged)[("x_total", (("client", 'a"b\\c'),))] == 2.0


def test_worker_families_parse() -> None:
    samples = _samples(worker_families(2, 3, 1))
    assert samples[("trio_tunnel_workers", ())] == 2.0
    assert samples[("trio_tunnel_workers_configured", ())] == 3.0
    assert samples[("trio_tunnel_worker_restarts_total", ())] == 1.0


def test_status_is_the_union_of_the_workers() -> None:
    docs = [
        {"sessions": [{"client": "a", "worker": 0}], "services": [], "auth_failures": {"tls": 1}},
        {"sessions": [{"client": "b", "worker": 1}], "services": [{"client": "b"}], "auth_failures": {"tls": 2}},
    ]
    merged = merge_status(docs, 100.0, [{"index": 0}, {"index": 1}])
    assert [s["client"] for s in merged["sessions"]] == ["a", "b"]
    assert merged["services"] == [{"client": "b"}]
    assert merged["auth_failures"] == {"tls": 3}
    assert merged["started"] == 100.0 and merged["role"] == "server" and "trio_tunnel" in merged
    assert len(merged["workers"]) == 2
