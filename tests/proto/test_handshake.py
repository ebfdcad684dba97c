"""The handshake: preamble, HELLO / CHALLENGE / AUTH / WELCOME / REFUSE (section 6 item 14, plus auth).

Each failure must give the other side a readable REFUSE (or nothing at all, for a scanner) and a single
ConnectionTerminated, never an exception out of receive_data.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from proto_helpers import (
    NAME,
    OTHER_TOKEN,
    TOKEN,
    ConnectionPair,
    counter_random,
    decode_all,
    kinds,
    only,
    terminated,
)
from trio_tunnel.proto import (
    PROTOCOL_VERSION,
    AuthProblem,
    Connection,
    ConnectionState,
    ErrorCode,
    HandshakeComplete,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
)
from trio_tunnel.proto import frames as F

PREAMBLE = F.encode_preamble(PROTOCOL_VERSION, PROTOCOL_VERSION)


def client(
    token: bytes | None = TOKEN,
    name: str = NAME,
    seed: int = 0x10,
    limits: Limits | None = None,
    channel_binding: bytes = b"",
) -> Connection:
    return Connection(
        Role.CLIENT,
        name=name,
        token=token,
        random_bytes=counter_random(seed),
        limits=limits,
        channel_binding=channel_binding,
    )


def server(
    tokens: tuple[bytes, ...] = (TOKEN,), seed: int = 0x80, limits: Limits | None = None, channel_binding: bytes = b""
) -> Connection:
    return Connection(
        Role.SERVER, tokens=tokens, random_bytes=counter_random(seed), limits=limits, channel_binding=channel_binding
    )


def refusal(srv: Connection) -> F.Refuse:
    """The only thing the server sends after failing: exactly one REFUSE."""
    frames = decode_all(srv.data_to_send())
    assert len(frames) == 1 and isinstance(frames[0], F.Refuse), frames
    assert srv.data_to_send() == b""
    return frames[0]


def to_server_after_hello(srv: Connection, cli: Connection) -> None:
    """Deliver the client's preamble and HELLO; the server answers with a CHALLENGE."""
    assert srv.receive_data(cli.data_to_send()) == []
    frames = decode_all(srv.data_to_send())
    assert len(frames) == 1 and isinstance(frames[0], F.Challenge)
    cli.receive_data(F.encode(frames[0]))


# ---------------------------------------------------------------------------------------------- success


def test_hmac_handshake_completes_on_both_sides() -> None:
    pair = ConnectionPair(handshake=False)
    client_events, server_events = pair.pump()
    (c,) = only(client_events, HandshakeComplete)
    (s,) = only(server_events, HandshakeComplete)
    assert c.authenticated and s.authenticated
    assert s.peer_name == NAME and c.peer_name == ""
    assert c.session_id == s.session_id == pair.client.session_id == pair.server.session_id != ""
    assert c.peer_limits == Limits().declared() == s.peer_limits
    assert pair.client.state is pair.server.state is ConnectionState.OPEN
    assert pair.server.peer_name == NAME


def test_client_sends_preamble_and_hello_first() -> None:
    cli = client()
    data = cli.data_to_send()
    assert data[:8] == F.encode_preamble(PROTOCOL_VERSION, PROTOCOL_VERSION) == b"TTUN\x02\x02\x00\x00"
    (hello,) = decode_all(data, preamble=True)
    assert hello == F.Hello(NAME, bytes([0x10]) * 32, Limits().declared())
    assert not cli.wants_write


def test_handshake_takes_four_messages() -> None:
    pair = ConnectionPair(handshake=False)
    pair.pump()
    sent_by_client = [type(f).__name__ for f in pair.taps[pair.client].frames]
    sent_by_server = [type(f).__name__ for f in pair.taps[pair.server].frames]
    assert sent_by_client == ["Hello", "Auth"]
    assert sent_by_server == ["Challenge", "Welcome"]


def test_token_never_crosses_the_wire() -> None:
    pair = ConnectionPair(handshake=False)
    raw = pair.client.data_to_send()
    pair.server.receive_data(raw)
    raw2 = pair.server.data_to_send()
    pair.client.receive_data(raw2)
    raw3 = pair.client.data_to_send()
    pair.server.receive_data(raw3)
    raw4 = pair.server.data_to_send()
    pair.client.receive_data(raw4)
    assert pair.client.is_open
    assert TOKEN not in raw + raw2 + raw3 + raw4


def test_insecure_server_and_tokenless_client_agree_on_no_auth() -> None:
    pair = ConnectionPair(token=None, tokens=(), handshake=False)
    client_events, server_events = pair.pump()
    assert only(client_events, HandshakeComplete)[0].authenticated is False
    assert only(server_events, HandshakeComplete)[0].authenticated is False
    (challenge,) = [f for f in pair.taps[pair.server].frames if isinstance(f, F.Challenge)]
    assert challenge.method == "none"
    (welcome,) = [f for f in pair.taps[pair.server].frames if isinstance(f, F.Welcome)]
    assert welcome.proof == b""


def test_token_rotation_server_with_two_tokens_accepts_both() -> None:
    for token in (TOKEN, OTHER_TOKEN):
        pair = ConnectionPair(token=token, tokens=(OTHER_TOKEN, TOKEN))
        assert pair.client.is_open and pair.server.is_open
    pair = ConnectionPair(token=b"a third token", tokens=(OTHER_TOKEN, TOKEN), handshake=False)
    pair.pump()
    assert pair.server.terminated is not None and pair.server.terminated.code == ErrorCode.AUTH


def test_handshake_survives_one_byte_at_a_time() -> None:
    pair = ConnectionPair(handshake=False)
    client_events, server_events = pair.pump(chunk=1)
    assert kinds(client_events) == kinds(server_events) == ["HandshakeComplete"]


def test_missing_peer_limits_take_conservative_defaults() -> None:
    srv = server()
    srv.receive_data(PREAMBLE + F.encode(F.Hello("n", b"\x01" * 32, {})))
    assert srv.peer_limits == {}
    assert srv.peer_max_frame_payload == 16 * 1024


# ---------------------------------------------------------------------------------------------- authentication


def test_wrong_token_gets_refuse_auth_with_a_readable_message_and_nothing_else() -> None:
    pair = ConnectionPair(token=b"wrong token", handshake=False)
    client_events, server_events = pair.pump()
    server_end = terminated(server_events)
    assert server_end.code == ErrorCode.AUTH and not server_end.by_peer
    assert isinstance(server_end.error, RemoteProtocolError)
    assert server_end.error.auth_problem is AuthProblem.TOKEN_REJECTED
    (refuse,) = [f for f in pair.taps[pair.server].frames if isinstance(f, F.Refuse)]
    assert pair.taps[pair.server].frames[-1] == refuse, "REFUSE is the last thing the server sends"
    assert refuse.code == ErrorCode.AUTH
    assert "authentication failed" in refuse.message and "token" in refuse.message
    client_end = terminated(client_events)
    assert client_end.by_peer and client_end.code == ErrorCode.AUTH and client_end.reason == refuse.message
    assert not only(client_events, HandshakeComplete) and not only(server_events, HandshakeComplete)
    assert pair.client.data_to_send() == pair.server.data_to_send() == b""


def test_client_without_token_against_hmac_server_gives_up_with_auth() -> None:
    pair = ConnectionPair(token=None, handshake=False)
    client_events, _ = pair.pump()
    end = terminated(client_events)
    assert end.code == ErrorCode.AUTH and not end.by_peer
    assert isinstance(end.error, LocalProtocolError)
    assert "requires a token" in end.reason and end.error.auth_problem is AuthProblem.TOKEN_MISSING
    assert [type(f) for f in pair.taps[pair.client].frames] == [F.Hello], "no AUTH was sent"
    assert pair.server.state is ConnectionState.HANDSHAKE  # it will time out or see EOF


def test_client_with_token_against_insecure_server_refuses_to_connect() -> None:
    pair = ConnectionPair(tokens=(), handshake=False)
    client_events, server_events = pair.pump()
    end = terminated(client_events)
    assert end.code == ErrorCode.AUTH and "does not authenticate" in end.reason and "impostor" in end.reason
    assert end.error is not None and end.error.auth_problem is AuthProblem.TOKEN_UNEXPECTED
    assert [type(f) for f in pair.taps[pair.client].frames] == [F.Hello]
    assert not server_events


def test_replaying_a_recorded_auth_against_a_fresh_server_fails() -> None:
    # Record a complete, successful handshake from the client's side of the wire.
    pair = ConnectionPair(handshake=False)
    recorded, answers = [], []
    while pair.client.wants_write or pair.server.wants_write:
        data = pair.client.data_to_send()
        recorded.append(data)
        pair.server.receive_data(data)
        answers.append(pair.server.data_to_send())
        pair.client.receive_data(answers[-1])
    assert pair.server.is_open
    # An eavesdropper replays those bytes to a fresh server, which picks a fresh nonce.
    fresh = server(seed=0x40)
    assert fresh.receive_data(recorded[0]) == []
    (challenge,) = decode_all(fresh.data_to_send())
    assert challenge.nonce != decode_all(answers[0])[0].nonce
    end = terminated(fresh.receive_data(b"".join(recorded[1:])))
    assert end.code == ErrorCode.AUTH
    assert refusal(fresh).code == ErrorCode.AUTH


def test_replaying_a_recorded_server_to_a_fresh_client_fails() -> None:
    """Mutual proof: a recording of the server cannot impersonate it to a client with a fresh nonce."""
    pair = ConnectionPair(handshake=False)
    pair.pump()
    recorded = b"".join(F.encode(f) for f in pair.taps[pair.server].frames)
    fresh = client(seed=0x33)
    fresh.data_to_send()
    end = terminated(fresh.receive_data(recorded))
    assert end.code == ErrorCode.AUTH and "could not prove it knows the token" in end.reason
    assert end.error is not None and end.error.auth_problem is AuthProblem.PROOF_MISMATCH
    assert not fresh.is_open


def test_server_that_does_not_know_the_token_cannot_forge_welcome() -> None:
    cli = client()
    cli.data_to_send()
    cli.receive_data(F.encode(F.Challenge(PROTOCOL_VERSION, b"\x42" * 32, "hmac-sha256")))
    (auth,) = decode_all(cli.data_to_send())
    assert isinstance(auth, F.Auth) and len(auth.mac) == 32
    end = terminated(cli.receive_data(F.encode(F.Welcome("s", Limits().declared(), b"\x00" * 32))))
    assert end.code == ErrorCode.AUTH and not end.by_peer
    assert cli.data_to_send() == b"", "a client failing in the handshake sends nothing"


def test_client_name_is_covered_by_the_mac() -> None:
    """An attacker who rewrites the name in HELLO breaks the MAC: the name is authenticated."""
    cli = client(name="edge-1")
    srv = server()
    data = cli.data_to_send()
    tampered = data[:8] + F.encode(F.Hello("edge-2", bytes([0x10]) * 32, Limits().declared()))
    srv.receive_data(tampered)
    cli.receive_data(srv.data_to_send())
    end = terminated(srv.receive_data(cli.data_to_send()))
    assert end.code == ErrorCode.AUTH
    assert refusal(srv).code == ErrorCode.AUTH


def test_auth_mac_is_hmac_sha256_over_the_transcript() -> None:
    cli = client(name="edge-1")
    srv = server()
    to_server_after_hello(srv, cli)
    (auth,) = decode_all(cli.data_to_send())
    name = b"edge-1"
    transcript = (
        b"trio-tunnel/2 client\x00" + bytes([0x10]) * 32 + bytes([0x80]) * 32 + len(name).to_bytes(2, "big") + name
    )
    assert auth.mac == hmac.new(TOKEN, transcript + b"\x00", hashlib.sha256).digest()  # empty binding: plaintext


def test_channel_binding_is_in_both_transcripts_and_must_agree() -> None:
    """The same binding on both sides authenticates; a client that saw another certificate (a TLS-terminating
    relay) fails with AUTH and a message that says so, although its token is right."""
    binding = hashlib.sha256(b"the server's certificate").digest()
    cli, srv = client(channel_binding=binding), server(channel_binding=binding)
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    (auth,) = decode_all(cli.data_to_send())
    name = b"edge-1"
    transcript = b"trio-tunnel/2 client\x00" + bytes([0x10]) * 32 + bytes([0x80]) * 32 + b"\x00\x06" + name
    assert auth.mac == hmac.new(TOKEN, transcript + b"\x20" + binding, hashlib.sha256).digest()
    srv.receive_data(F.encode(auth))
    assert srv.state is ConnectionState.OPEN

    relayed = hashlib.sha256(b"the relay's certificate").digest()
    cli, srv = client(channel_binding=relayed), server(channel_binding=binding)
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    end = terminated(srv.receive_data(cli.data_to_send()))
    assert end.code == ErrorCode.AUTH and "terminates TLS with a certificate of its own" in end.reason


# ---------------------------------------------------------------------------------------------- preamble, versions


def test_bad_magic_is_dropped_silently() -> None:
    srv = server()
    events = srv.receive_data(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    end = terminated(events)
    assert end.silent and end.by_peer and end.code == ErrorCode.PROTOCOL
    assert "magic" in end.reason
    assert srv.data_to_send() == b""
    assert not srv.wants_write
    assert srv.receive_data(b"more") == []


def test_partial_preamble_waits_silently() -> None:
    srv = server()
    assert srv.receive_data(b"TTU") == []
    assert srv.data_to_send() == b""
    assert srv.state is ConnectionState.HANDSHAKE


@pytest.mark.parametrize(("high", "low"), [(0, 0), (3, 3), (255, 3), (0, 1)])
def test_wrong_version_range_gets_refuse_version(high: int, low: int) -> None:
    srv = server()
    end = terminated(srv.receive_data(F.encode_preamble(high, low) + F.encode(F.Hello("x", b"\x00" * 32, {}))))
    assert end.code == ErrorCode.VERSION
    refuse = refusal(srv)
    assert refuse.code == ErrorCode.VERSION
    assert f"versions {low} to {high}" in refuse.message and "upgrade" in refuse.message


def test_client_accepts_only_the_version_it_speaks() -> None:
    cli = client()
    cli.data_to_send()
    end = terminated(cli.receive_data(F.encode(F.Challenge(1, b"\x01" * 32, "hmac-sha256"))))
    assert end.code == ErrorCode.VERSION and "version 1" in end.reason


def test_refuse_reaches_the_client_as_a_readable_termination() -> None:
    cli = client()
    cli.data_to_send()
    end = terminated(cli.receive_data(F.encode(F.Refuse(ErrorCode.PROHIBITED, "edge-1 may not connect"))))
    assert end.by_peer and end.code == ErrorCode.PROHIBITED and end.reason == "edge-1 may not connect"
    assert cli.data_to_send() == b""


# ---------------------------------------------------------------------------------------------- out-of-order frames


def test_frame_before_hello_is_refused_with_protocol() -> None:
    srv = server()
    end = terminated(srv.receive_data(PREAMBLE + F.encode(F.Open(1, "web"))))
    assert end.code == ErrorCode.PROTOCOL
    refuse = refusal(srv)
    assert refuse.code == ErrorCode.PROTOCOL and "unexpected OPEN frame during the handshake" in refuse.message


def test_frame_before_auth_is_refused_with_protocol() -> None:
    cli, srv = client(), server()
    srv.receive_data(cli.data_to_send())
    srv.data_to_send()
    end = terminated(srv.receive_data(F.encode(F.Data(1, b"early"))))
    assert end.code == ErrorCode.PROTOCOL
    assert "unexpected DATA" in refusal(srv).message


def test_second_hello_during_the_handshake_is_protocol() -> None:
    cli, srv = client(), server()
    srv.receive_data(cli.data_to_send())
    srv.data_to_send()
    end = terminated(srv.receive_data(F.encode(F.Hello(NAME, b"\x00" * 32, {}))))
    assert end.code == ErrorCode.PROTOCOL
    assert "unexpected HELLO" in refusal(srv).message


def test_second_hello_after_the_handshake_is_protocol() -> None:
    pair = ConnectionPair()
    end = terminated(pair.server.receive_data(F.encode(F.Hello(NAME, b"\x00" * 32, {}))))
    assert end.code == ErrorCode.PROTOCOL and "unexpected HELLO frame after the handshake" in end.reason
    (goaway,) = decode_all(pair.server.data_to_send())
    assert isinstance(goaway, F.GoAway) and goaway.code == ErrorCode.PROTOCOL


def test_frame_before_welcome_ends_the_client_with_protocol() -> None:
    cli = client()
    cli.data_to_send()
    end = terminated(cli.receive_data(F.encode(F.Window(1, 1 << 20))))
    assert end.code == ErrorCode.PROTOCOL and "unexpected WINDOW frame during the handshake" in end.reason
    assert cli.data_to_send() == b""


def test_welcome_before_challenge_ends_the_client_with_protocol() -> None:
    cli = client()
    cli.data_to_send()
    end = terminated(cli.receive_data(F.encode(F.Welcome("s", {}, b""))))
    assert end.code == ErrorCode.PROTOCOL


def test_refuse_sent_to_a_server_is_protocol() -> None:
    srv = server()
    srv.receive_data(F.encode_preamble(PROTOCOL_VERSION, PROTOCOL_VERSION))
    end = terminated(srv.receive_data(F.encode(F.Refuse(0, "no"))))
    assert end.code == ErrorCode.PROTOCOL and "unexpected REFUSE" in refusal(srv).message


@pytest.mark.parametrize(
    ("challenge", "code", "fragment"),
    [
        (F.Challenge(PROTOCOL_VERSION, b"\x01" * 31, "hmac-sha256"), ErrorCode.PROTOCOL, "nonce must be 32 bytes"),
        (F.Challenge(PROTOCOL_VERSION, b"\x01" * 32, "rot13"), ErrorCode.AUTH, "unknown authentication method"),
    ],
)
def test_bad_challenge_ends_the_client(challenge: F.Challenge, code: ErrorCode, fragment: str) -> None:
    cli = client()
    cli.data_to_send()
    end = terminated(cli.receive_data(F.encode(challenge)))
    assert end.code == code and fragment in end.reason


def test_hello_with_short_nonce_is_refused() -> None:
    srv = server()
    terminated(srv.receive_data(PREAMBLE + F.encode(F.Hello("n", b"\x01" * 31, {}))))
    assert "nonce must be 32 bytes" in refusal(srv).message


@pytest.mark.parametrize("limits", [{"initial_window": 1023}, {"max_frame_payload": 10}, {"max_streams": 0}])
def test_hello_with_unusable_limits_is_refused(limits: dict[str, int]) -> None:
    srv = server()
    terminated(srv.receive_data(PREAMBLE + F.encode(F.Hello("n", b"\x01" * 32, limits))))
    assert "peer limits too small" in refusal(srv).message


def test_welcome_with_unusable_limits_ends_the_client() -> None:
    pair = ConnectionPair(token=None, tokens=(), handshake=False)
    pair.server.receive_data(pair.client.data_to_send())
    pair.client.receive_data(pair.server.data_to_send())
    pair.client.data_to_send()
    end = terminated(pair.client.receive_data(F.encode(F.Welcome("s", {"max_streams": 0}, b""))))
    assert end.code == ErrorCode.PROTOCOL and "peer limits too small" in end.reason


# ---------------------------------------------------------------------------------------------- ending early


def test_eof_during_the_handshake_ends_the_connection() -> None:
    srv = server()
    end = terminated(srv.receive_data(b""))
    assert end.by_peer and end.code == ErrorCode.INTERNAL
    assert srv.data_to_send() == b""


def test_server_close_during_the_handshake_sends_refuse() -> None:
    cli, srv = client(), server()
    srv.receive_data(cli.data_to_send())
    srv.data_to_send()
    srv.close(ErrorCode.PROHIBITED, "edge-1 is not allowed here")
    refuse = refusal(srv)
    assert refuse == F.Refuse(ErrorCode.PROHIBITED, "edge-1 is not allowed here")
    assert srv.terminated is not None and not srv.terminated.by_peer
    srv.close()  # idempotent
    assert srv.data_to_send() == b""


def test_server_close_before_the_preamble_sends_nothing() -> None:
    srv = server()
    srv.close(ErrorCode.SHUTTING_DOWN, "bye")
    assert srv.data_to_send() == b""
    assert srv.closed


def test_client_close_during_the_handshake_sends_nothing_more() -> None:
    cli = client()
    cli.data_to_send()
    cli.close(ErrorCode.CANCEL, "user abort")
    assert cli.data_to_send() == b""
    assert cli.closed


@pytest.mark.parametrize("command", ["open_stream", "ping", "send_request", "send_reply"])
def test_commands_before_the_handshake_are_local_errors(command: str) -> None:
    cli = client()
    call = {
        "open_stream": lambda: cli.open_stream("web"),
        "ping": cli.ping,
        "send_request": lambda: cli.send_request("status"),
        "send_reply": lambda: cli.send_reply(1),
    }[command]
    with pytest.raises(LocalProtocolError, match="the connection is handshake"):
        call()
    assert cli.streams_available == 0 and not cli.can_open_streams


def test_a_client_that_hangs_up_instead_of_authenticating_is_named_as_such() -> None:
    """A client without a token closes on CHALLENGE; the server's reason says what probably happened."""
    server = Connection(Role.SERVER, tokens=[TOKEN])
    client = Connection(Role.CLIENT, name=NAME)  # no token
    assert server.receive_data(client.data_to_send()) == []
    events = client.receive_data(server.data_to_send())
    assert terminated(events).code == ErrorCode.AUTH and client.data_to_send() == b""
    events = server.receive_data(b"")
    ended = terminated(events)
    assert ended.by_peer and "instead of authenticating" in ended.reason and "has it a token?" in ended.reason


def test_protocol_messages_do_not_name_command_line_flags() -> None:
    """proto does not know the CLI: its messages stay neutral, and an auth failure says which one it is instead
    (AuthProblem), so the tunnel layer can add the flags to check."""
    import re
    from pathlib import Path

    import trio_tunnel.proto

    for module in Path(trio_tunnel.proto.__file__).parent.glob("*.py"):
        strings = re.findall(r'"[^"\n]*"', module.read_text())
        assert not [s for s in strings if re.search(r"--[a-z]|TRIO_TUNNEL_", s)], module.name
