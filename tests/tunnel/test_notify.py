"""sd_notify by hand (trio_tunnel.notify): one datagram per call to the socket $NOTIFY_SOCKET names, a path or an
``@`` abstract name; nothing at all without the variable; never an exception."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio_tunnel.console
from trio_tunnel import notify
from trio_tunnel.console import announce


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, as systemd's notify socket is."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_ready_with_status_is_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert notify.ready("listening 0.0.0.0:7835", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening 0.0.0.0:7835"
    assert notify.status("refused web address_in_use", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"STATUS=refused web address_in_use"
    assert notify.stopping(environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"STOPPING=1"


def test_status_is_one_bounded_line(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert notify.status("two\nlines " + "x" * 5000, environ={"NOTIFY_SOCKET": path})
    data = sock.recv(8192)
    assert data.startswith(b"STATUS=two lines x")
    assert b"\n" not in data
    assert len(data) == len("STATUS=") + notify.MAX_STATUS


def test_abstract_namespace() -> None:
    name = f"trio-tunnel-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert notify.ready(environ={"NOTIFY_SOCKET": f"@{name}"})
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_nothing_without_a_usable_socket(value: str) -> None:
    assert not notify.ready(environ={"NOTIFY_SOCKET": value} if value else {})


def test_a_missing_socket_is_not_an_error(tmp_path: Path) -> None:
    assert not notify.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_the_environment_is_the_default(receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.ready()
    assert sock.recv(4096) == b"READY=1"


def test_every_lifecycle_line_becomes_the_status(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    announce("connected 127.0.0.1:7835")
    assert capsys.readouterr().out == "connected 127.0.0.1:7835\n"
    assert sock.recv(4096) == b"STATUS=connected 127.0.0.1:7835"
    assert trio_tunnel.console.notify is notify
