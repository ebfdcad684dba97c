"""A server that refuses a session right after authenticating it (server full, name in use) sends WELCOME, then
GOAWAY: the GOAWAY must not overtake the queued WELCOME (the client reported "unexpected GOAWAY frame during the
handshake"), and closing must not drop the WELCOME either."""

from __future__ import annotations

import pytest
from proto_helpers import ConnectionPair, kinds, terminated
from trio_tunnel.proto import ErrorCode


@pytest.mark.parametrize("close", [False, True])
def test_goaway_right_after_the_handshake_follows_the_welcome(close: bool) -> None:
    pair = ConnectionPair(handshake=False)
    client, server = pair.client, pair.server
    pair.transfer(client)  # preamble + HELLO
    pair.transfer(server)  # CHALLENGE
    events = pair.transfer(client)  # AUTH: the server is open, its WELCOME queued but not yet written
    assert "HandshakeComplete" in kinds(events)
    server.go_away(ErrorCode.ENHANCE_YOUR_CALM, "the server has too many clients")
    if close:  # the session's shutdown: the final GOAWAY, then the transport closes
        server.close(ErrorCode.ENHANCE_YOUR_CALM, "the server has too many clients")
    got = pair.transfer(server)
    assert kinds(got)[0] == "HandshakeComplete", kinds(got)
    assert "GoAwayReceived" in kinds(got)
    if close:
        ended = terminated(client.receive_data(b""))  # then the transport closes
        assert (ended.code, ended.reason, ended.by_peer) == (
            ErrorCode.ENHANCE_YOUR_CALM,
            "the server has too many clients",
            True,
        )
