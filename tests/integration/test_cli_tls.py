"""TLS on the link through the real CLI: the server's own key and its pin, operator certificates verified against a
CA, and every refusal readable (no pin, a wrong pin, a wrong host name, an expired certificate, plaintext on one
side only, a relay that terminates TLS), with nothing exposed on the server."""

from __future__ import annotations

import datetime
import os
import re
import signal
import stat
from pathlib import Path

import pytest
import trio
import trustme
from trio_tunnel.link import ClientTls, ServerTls
from trio_tunnel.tcp import TcpStream
from trio_tunnel.tls import TlsStream
from tunnel_helpers import (
    LOCALHOST,
    TOKEN_TEXT,
    Cli,
    cli,
    error_lines,
    free_port,
    http_get,
    http_handler,
    is_listening,
    start_service,
)

ENV = {"TRIO_TUNNEL_TOKEN": TOKEN_TEXT}
HOSTPORT = r"127\.0\.0\.1:(\d+)"
FINGERPRINT = r"fingerprint (sha256:[A-Za-z0-9+/]{43})"


async def _refused_client(server_port: int, public: int, *flags: str) -> Cli:
    """Run a client that must give up: exit 1, one error line, no lifecycle line, nothing exposed."""
    async with trio.open_nursery() as nursery:
        spec = f"web={LOCALHOST}:{public}:{LOCALHOST}:9"
        args = ["client", "--server", f"{LOCALHOST}:{server_port}", "-R", spec, *flags]
        async with cli(nursery, *args, env=ENV, test_tls=False) as c:
            assert await c.wait() == 1, c.stderr
    assert len(error_lines(c)) == 1 and "Traceback" not in c.stderr, c.stderr
    assert not c.out.lines, "nothing connected, nothing exposed"
    assert not await is_listening(public)
    return c


async def test_own_key_pinned_works_the_key_persists_and_its_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            async with cli(nursery, "server", "--print-fingerprint", "--state-dir", str(state)) as printed:
                assert await printed.wait() == 0, printed.stderr
            (pin,) = printed.out.lines
            assert re.fullmatch(r"sha256:[A-Za-z0-9+/]{43}", pin)
            assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
            assert {stat.S_IMODE(os.stat(p).st_mode) for p in state.iterdir()} == {0o600}

            service = await start_service(nursery, http_handler)
            for _ in range(2):  # the same key on every start
                async with cli(
                    nursery, "server", "--listen", f"{LOCALHOST}:0", "--state-dir", str(state), env=ENV
                ) as server:
                    assert (await server.expect(FINGERPRINT))[1] == pin
                    port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                    spec = f"web={LOCALHOST}:0:{LOCALHOST}:{service.port}"
                    args = ["--server", f"{LOCALHOST}:{port}", "--server-fingerprint", pin, "-R", spec]
                    async with cli(nursery, "client", *args, env=ENV) as client:
                        await client.expect(rf"connected {HOSTPORT}")
                        public = int((await client.expect(rf"exposed web {HOSTPORT}"))[1])
                        assert await http_get(public, "/tls") == ("HTTP/1.0 200 OK", b"hello from /tls\n")
                        client.interrupt()
                        assert await client.wait() == 0, client.stderr
                    server.interrupt()
                    assert await server.wait() == 0, server.stderr
            await service.stop()


@pytest.mark.parametrize("case", ["no pin", "wrong pin"])
async def test_unverified_or_wrongly_pinned_server_is_refused_showing_its_fingerprint(
    tmp_path: Path, case: str
) -> None:
    other = ServerTls.from_state_dir(tmp_path / "other").fingerprint
    with trio.fail_after(30):
        async with (
            trio.open_nursery() as nursery,
            cli(nursery, "server", "--listen", f"{LOCALHOST}:0", "--state-dir", str(tmp_path / "s"), env=ENV) as server,
        ):
            pin = (await server.expect(FINGERPRINT))[1]
            port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
            flags = ["--server-fingerprint", other] if case == "wrong pin" else []
            client = await _refused_client(port, await free_port(), *flags)
            (line,) = error_lines(client)
            assert pin in line and "--server-fingerprint" in line, line
            if case == "no pin":
                assert f"add --server-fingerprint {pin}" in line and "--print-fingerprint" in line, line
            else:
                assert "matches no pinned fingerprint" in line, line


def _ca_files(tmp_path: Path, ca: trustme.CA, leaf: trustme.LeafCert) -> tuple[str, str, str]:
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca_file.write_bytes(ca.cert_pem.bytes())
    return str(cert), str(key), str(ca_file)


@pytest.mark.parametrize("case", ["good", "wrong host name", "expired"])
async def test_operator_certificate_is_verified_against_the_ca(tmp_path: Path, case: str) -> None:
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    if case == "good":
        leaf = ca.issue_cert(LOCALHOST)
    elif case == "wrong host name":
        leaf = ca.issue_cert("tunnel.test")
    else:
        leaf = ca.issue_cert(
            LOCALHOST, not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
        )
    cert, key, ca_file = _ca_files(tmp_path, ca, leaf)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            args = ["server", "--listen", f"{LOCALHOST}:0", "--tls-cert", cert, "--tls-key", key]
            async with cli(nursery, *args, env=ENV) as server:
                await server.expect(FINGERPRINT)
                port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                if case == "good":
                    service = await start_service(nursery, http_handler)
                    spec = f"web={LOCALHOST}:0:{LOCALHOST}:{service.port}"
                    flags = ["--server", f"{LOCALHOST}:{port}", "--tls-ca", ca_file, "-R", spec]
                    async with cli(nursery, "client", *flags, env=ENV) as client:
                        public = int((await client.expect(rf"exposed web {HOSTPORT}"))[1])
                        assert await http_get(public, "/ca") == ("HTTP/1.0 200 OK", b"hello from /ca\n")
                        client.interrupt()
                        assert await client.wait() == 0, client.stderr
                    await service.stop()
                else:
                    (line,) = error_lines(await _refused_client(port, await free_port(), "--tls-ca", ca_file))
                    assert "cannot verify the server" in line, line
                    assert ("expired" if case == "expired" else "match") in line, line
                server.interrupt()
                assert await server.wait() == 0, server.stderr


@pytest.mark.parametrize("plaintext", ["client", "server"])
async def test_plaintext_on_one_side_only_is_refused_readably_on_both(plaintext: str) -> None:
    with trio.fail_after(30):
        server_flags = ["--insecure-plaintext"] if plaintext == "server" else []
        async with (
            trio.open_nursery() as nursery,
            cli(nursery, "server", "--listen", f"{LOCALHOST}:0", *server_flags, env=ENV) as server,
        ):
            port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
            client_flags = ["--insecure-plaintext"] if plaintext == "client" else []
            (line,) = error_lines(await _refused_client(port, await free_port(), *client_flags))
            server.interrupt()
            assert await server.wait() == 0
            if plaintext == "client":
                assert "this server requires TLS; remove --insecure-plaintext from the client" in line, line
                assert re.search(r"refused a client from 127\.0\.0\.1:\d+: this server requires TLS", server.stderr)
            else:
                assert "runs without TLS (--insecure-plaintext)" in line, line
                assert "the client speaks TLS and this server runs with --insecure-plaintext" in server.stderr


async def test_a_relay_that_terminates_tls_gets_no_session(tmp_path: Path) -> None:
    """A man in the middle with its own certificate, which a client was (wrongly) told to trust, relays every byte
    between its two TLS connections: the client's proof is bound to the relay's certificate, so the real server
    refuses it and says why."""
    relay_identity = ServerTls.from_state_dir(tmp_path / "relay")
    with trio.fail_after(30):
        async with (
            trio.open_nursery() as nursery,
            cli(nursery, "server", "--listen", f"{LOCALHOST}:0", "--state-dir", str(tmp_path / "s"), env=ENV) as server,
        ):
            real_pin = (await server.expect(FINGERPRINT))[1]
            real_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
            upstream_tls = ClientTls.create(pins=[real_pin])
            listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
            relay_port = listeners[0].socket.getsockname()[1]

            async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
                try:
                    while data := await src.receive_some(65536):
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                done.cancel()

            async def relay(raw: trio.SocketStream) -> None:
                outer = await TlsStream.handshake(raw, relay_identity.context, server_side=True)
                inner = await TlsStream.handshake(
                    TcpStream.adopt(await trio.open_tcp_stream(LOCALHOST, real_port)),
                    upstream_tls.context,
                    server_side=False,
                )
                async with trio.open_nursery() as pair:
                    pair.start_soon(pump, outer, inner, pair.cancel_scope)
                    pair.start_soon(pump, inner, outer, pair.cancel_scope)
                await trio.aclose_forcefully(outer)
                await trio.aclose_forcefully(inner)

            nursery.start_soon(trio.serve_listeners, relay, listeners)
            client = await _refused_client(
                relay_port, await free_port(), "--server-fingerprint", relay_identity.fingerprint
            )
            (line,) = error_lines(client)
            assert "the server refused the session" in line and "authentication failed" in line, line
            server.interrupt()
            assert await server.wait() == 0
            refusals = [line for line in server.stderr.splitlines() if "refused a client" in line]
            assert len(refusals) == 1, server.stderr
            assert "terminates TLS with a certificate of its own" in refusals[0], refusals[0]
            nursery.cancel_scope.cancel()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _replace(path: str, data: bytes) -> None:
    """Write a file whole, as a certificate renewal tool does (a new file renamed over the old one)."""
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)


async def test_sighup_rereads_the_certificate_and_live_links_keep_going(tmp_path: Path) -> None:
    """A renewed certificate (here: another key, so the pin changes) is taken on SIGHUP: new clients see it, the
    client already connected keeps its link and its service; unusable files change nothing."""
    ca = trustme.CA()
    cert, key, _ca_file = _ca_files(tmp_path, ca, ca.issue_cert(LOCALHOST))
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            args = ["server", "--listen", f"{LOCALHOST}:0", "--tls-cert", cert, "--tls-key", key]
            async with cli(nursery, *args, env=ENV) as server:
                old_pin = (await server.expect(FINGERPRINT))[1]
                port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                spec = f"web={LOCALHOST}:0:{LOCALHOST}:{service.port}"
                flags = ["--server", f"{LOCALHOST}:{port}", "--server-fingerprint", old_pin, "-R", spec]
                async with cli(nursery, "client", *flags, env=ENV) as old_client:
                    public = int((await old_client.expect(rf"exposed web {HOSTPORT}"))[1])

                    _replace(key, b"not a key")
                    server.process.send_signal(signal.SIGHUP)
                    await server.expect_stderr("SIGHUP: kept the current TLS certificate")

                    renewed = tmp_path / "renewed"
                    renewed.mkdir()
                    new_cert, new_key, _ = _ca_files(renewed, ca, ca.issue_cert(LOCALHOST))
                    _replace(cert, _read(new_cert))
                    _replace(key, _read(new_key))
                    server.process.send_signal(signal.SIGHUP)
                    new_pin = (
                        await server.expect_stderr(r"SIGHUP: reloaded the TLS certificate \S+ \(fingerprint (\S+)\)")
                    )[1]
                    assert new_pin != old_pin

                    (line,) = error_lines(
                        await _refused_client(port, await free_port(), "--server-fingerprint", old_pin)
                    )
                    assert new_pin in line, line  # new links get the new certificate
                    spec2 = f"web2={LOCALHOST}:0:{LOCALHOST}:{service.port}"
                    flags2 = ["--server", f"{LOCALHOST}:{port}", "--server-fingerprint", new_pin, "-R", spec2]
                    async with cli(nursery, "client", *flags2, "--name", "renewed", env=ENV) as new_client:
                        public2 = int((await new_client.expect(rf"exposed web2 {HOSTPORT}"))[1])
                        assert await http_get(public2, "/new") == ("HTTP/1.0 200 OK", b"hello from /new\n")
                        new_client.interrupt()
                        assert await new_client.wait() == 0
                    # the link made before the reload is still the same one, and still serves
                    assert await http_get(public, "/old") == ("HTTP/1.0 200 OK", b"hello from /old\n")
                    assert "disconnected" not in " ".join(old_client.out.lines)
                    old_client.interrupt()
                    assert await old_client.wait() == 0
                server.interrupt()
                assert await server.wait() == 0
            await service.stop()
