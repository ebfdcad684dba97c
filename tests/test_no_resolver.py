"""The suite's resolver guard (tests/noresolve): names never reach the machine's resolver, in-process or in a
subprocess, and the names tests do use still resolve to loopback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import trio


def test_unknown_name_fails_at_once_in_process() -> None:
    with pytest.raises(socket.gaierror) as info:
        socket.getaddrinfo("nosuch.invalid", 80)
    assert info.value.errno == socket.EAI_NONAME
    assert "the tests resolve no name" in str(info.value)


def test_localhost_and_numeric_addresses_still_resolve() -> None:
    assert {ai[4][0] for ai in socket.getaddrinfo("localhost", 80, socket.AF_INET)} == {"127.0.0.1"}
    assert socket.getaddrinfo("127.0.0.1", 80, socket.AF_INET)[0][4] == ("127.0.0.1", 80)


async def test_trio_resolver_goes_through_the_guard() -> None:
    with trio.fail_after(5):
        with pytest.raises(OSError, match="the tests resolve no name"):
            await trio.open_tcp_stream("nosuch.invalid", 80)


def test_subprocesses_get_the_guard_too() -> None:
    code = "import socket\ntry:\n socket.getaddrinfo('nosuch.invalid', 80)\nexcept socket.gaierror as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "the tests resolve no name: nosuch.invalid" in out
