"""``trio-tunnel status [URL]``: the ``/status`` document of a server's or client's ``--metrics`` endpoint, as tables.

The request is a hand-written HTTP/1.1 GET over a Trio TCP stream: the endpoint is ours and answers one request per
connection with a Content-Length, so an HTTP library would add a dependency and nothing else. Rates (``--watch``)
are the difference of two documents' byte counters over the difference of their ``now``: the endpoint never
samples the data path, and neither does this.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, TextIO

import attrs
import trio

from .config import parse_hostport
from .console import format_hostport
from .errors import ConfigError, TunnelError

__all__ = ["StatusError", "fetch_status", "parse_url", "render", "run_status"]

TIME_LIMIT: Final = 5.0
"""Seconds one fetch may take, connect to last byte."""
MAX_RESPONSE: Final = 16 * 1024 * 1024
"""Bytes of a response read at most (a /status document of a thousand clients is a few hundred KiB)."""
INTERVAL: Final = 1.0
"""Seconds between redraws of ``--watch``."""
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2


class StatusError(TunnelError):
    """The endpoint could not be read, or is not a trio-tunnel's (the message says which, in one line)."""


@attrs.frozen
class Endpoint:
    host: str
    port: int
    url: str


def parse_url(url: str) -> Endpoint:
    """``http://HOST:PORT[/...]``, ``HOST:PORT`` or ``PORT`` (then 127.0.0.1). Raises ConfigError."""
    text = url.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() != "http":
            raise ConfigError(f"status URL {url!r}: only http:// is served by --metrics")
    text = text.split("/", 1)[0]
    try:
        address = parse_hostport(text, default_host="127.0.0.1", allow_zero=False)
    except ConfigError as exc:
        raise ConfigError(f"status URL {url!r}: {exc}") from None
    return Endpoint(address.host, address.port, f"http://{format_hostport(address.host, address.port)}")


async def fetch_status(endpoint: Endpoint) -> dict[str, Any]:
    """GET /status; the parsed document.

    Raises:
        StatusError: nothing listens, no answer within :data:`TIME_LIMIT`, or the answer is not trio-tunnel's.
    """
    where = endpoint.url
    with trio.move_on_after(TIME_LIMIT):
        try:
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StatusError(
                f"nothing answers at {where} ({reason}): is a trio-tunnel server or client running there with "
                f"--metrics {format_hostport(endpoint.host, endpoint.port)}?"
            ) from None
        async with stream:
            request = f"GET /status HTTP/1.1\r\nHost: {format_hostport(endpoint.host, endpoint.port)}\r\n"
            request += "Accept: application/json\r\nConnection: close\r\n\r\n"
            try:
                await stream.send_all(request.encode())
                response = bytearray()
                while len(response) <= MAX_RESPONSE and (block := await stream.receive_some(65536)):
                    response += block
            except trio.BrokenResourceError as exc:
                raise StatusError(f"{where} closed the connection: {exc.__cause__ or exc}") from None
        return _parse(where, bytes(response))
    raise StatusError(f"no answer from {where} within {TIME_LIMIT:g} s")


def _parse(where: str, response: bytes) -> dict[str, Any]:
    not_ours = f"{where} is not a trio-tunnel --metrics endpoint"
    head, sep, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if not sep or not status_line.startswith("HTTP/1."):
        raise StatusError(f"{not_ours}: it did not answer in HTTP")
    status = status_line.partition(" ")[2]
    if not status.startswith("200"):
        raise StatusError(f"{not_ours}: GET /status answered {status!r}")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise StatusError(f"{not_ours}: /status is not JSON") from None
    if not isinstance(document, dict) or "trio_tunnel" not in document or "sessions" not in document:
        raise StatusError(f"{not_ours}: /status is JSON but not trio-tunnel's document")
    return document


# ------------------------------------------------------------------------------------------------ rendering


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _since(when: float, now: float) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))} ({_duration(now - when)})"


def _rtt(value: object) -> str:
    return f"{value * 1e3:.1f} ms" if isinstance(value, int | float) else "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(row) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def _rate(now: dict[str, Any], before: dict[str, Any] | None, total: int, key: tuple[str, ...], kind: str) -> str:
    """Bytes per second since ``before`` (the previous document), from the counters; ``-`` without one."""
    if before is None:
        return "-"
    span = float(now["now"]) - float(before["now"])
    previous = _totals(before, kind).get(key)
    if span <= 0 or previous is None or previous > total:
        return "-"
    return f"{human_bytes((total - previous) / span)}/s"


def _totals(document: dict[str, Any], kind: str) -> dict[tuple[str, ...], int]:
    if kind == "session":
        return {(s["client"], s["address"]): s["bytes_received"] + s["bytes_sent"] for s in document["sessions"]}
    return {(s["client"], s["name"]): s["bytes_in"] + s["bytes_out"] for s in document["services"]}


def render(document: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    """The tables ``status`` prints: a summary line, one row per session, one per service."""
    now = float(document["now"])
    role = document.get("role", "?")
    sessions = document["sessions"]
    services = document["services"]
    who = f" {document['name']}" if document.get("name") else ""
    lines = [
        f"trio-tunnel {role}{who} {document['trio_tunnel']}, up {_duration(now - float(document['started']))}, "
        f"{len(sessions)} session{'s' if len(sessions) != 1 else ''}, {len(services)} "
        f"service{'s' if len(services) != 1 else ''}"
        + (f", {sum(document['auth_failures'].values())} refused handshakes" if document.get("auth_failures") else "")
        + (f", {document['reconnects']} reconnects" if document.get("reconnects") else ""),
        "",
    ]
    session_rows = []
    for s in sessions:
        total = int(s["bytes_received"]) + int(s["bytes_sent"])
        session_rows.append(
            [
                s["client"],
                s["address"],
                _since(float(s["since"]), now),
                _rtt(s.get("rtt")),
                str(s["streams"]),
                human_bytes(s["bytes_received"]),
                human_bytes(s["bytes_sent"]),
                _rate(document, previous, total, (s["client"], s["address"]), "session"),
            ]
        )
    session_header = ["CLIENT", "ADDRESS", "CONNECTED SINCE", "RTT", "STREAMS", "RECEIVED", "SENT", "RATE"]
    lines += _table(session_header, session_rows) if session_rows else ["no sessions"]
    lines.append("")
    service_rows = []
    for s in services:
        total = int(s["bytes_in"]) + int(s["bytes_out"])
        service_rows.append(
            [
                s["name"],
                s["client"],
                s["kind"],
                s["public"] or "-",
                s["target"] or "-",
                str(s["open"]),
                human_bytes(s["bytes_in"]),
                human_bytes(s["bytes_out"]),
                _rate(document, previous, total, (s["client"], s["name"]), "service"),
                s["last_error"] or "-",
            ]
        )
    service_header = ["SERVICE", "CLIENT", "KIND", "PUBLIC", "TARGET", "OPEN", "IN", "OUT", "RATE", "LAST ERROR"]
    lines += _table(service_header, service_rows) if service_rows else ["no services"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ running


async def _watch(endpoint: Endpoint, out: TextIO) -> None:
    """Redraw every :data:`INTERVAL` seconds until cancelled (Ctrl+C); an unreachable endpoint is shown, not fatal."""
    previous: dict[str, Any] | None = None
    clear = "\x1b[H\x1b[2J" if out.isatty() else "\n"
    while True:
        try:
            document = await fetch_status(endpoint)
            text = render(document, previous)
            previous = document
        except StatusError as exc:
            text = f"{exc}\n(retrying every {INTERVAL:g} s; Ctrl+C to stop)\n"
            previous = None
        out.write(f"{clear}{endpoint.url}  {time.strftime('%H:%M:%S')}\n\n{text}")
        out.flush()
        await trio.sleep(INTERVAL)  # a redraw interval, not a wait for an event


async def _once(endpoint: Endpoint, as_json: bool, out: TextIO) -> None:
    document = await fetch_status(endpoint)
    out.write(json.dumps(document, indent=2) + "\n" if as_json else render(document))
    out.flush()


def run_status(url: str, *, watch: bool = False, as_json: bool = False, out: TextIO | None = None) -> int:
    """The ``status`` command; returns the exit code (errors: one line on stderr)."""
    out = out or sys.stdout
    try:
        endpoint = parse_url(url)
    except ConfigError as exc:
        sys.stderr.write(f"trio-tunnel: error: {exc}\n")
        return EXIT_USAGE
    try:
        if watch:
            trio.run(_watch, endpoint, out)
        else:
            trio.run(_once, endpoint, as_json, out)
    except StatusError as exc:
        sys.stderr.write(f"trio-tunnel: error: {exc}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if not watch:
            raise
        out.write("\n")
    return EXIT_OK
