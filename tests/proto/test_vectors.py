"""docs/PROTOCOL.md's test vectors, parsed from the document and checked against the encoder, the decoder and a real
handshake. A vector that the document drops, renames or gets wrong fails here."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path

import pytest
from proto_helpers import decode_all, scripted_random
from trio_tunnel.proto import PROTOCOL_VERSION, Connection, ErrorCode, HandshakeComplete, Limits, Role
from trio_tunnel.proto import frames as F

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def parse_vectors(text: str) -> dict[str, dict[str, str]]:
    """Every fenced block tagged ``vector``: ``key: value`` lines, indented lines continue the previous value."""
    vectors: dict[str, dict[str, str]] = {}
    for block in re.findall(r"^```vector\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if not line.strip():
                continue
            if line[0].isspace():
                assert key is not None, f"continuation line without a key: {line!r}"
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            assert key not in fields, f"repeated key {key!r}"
            fields[key] = value.strip()
        name = fields.pop("name")
        assert name not in vectors, f"repeated vector {name!r}"
        vectors[name] = fields
    return vectors


def unhex(value: str) -> bytes:
    return bytes.fromhex("".join(value.split()))


VECTORS = parse_vectors(DOC.read_text(encoding="utf-8"))

TOKEN = b"s3cret-token"
CLIENT_NONCE = bytes([0x11]) * 32
SERVER_NONCE = bytes([0x22]) * 32
SESSION_RANDOM = bytes([0x33]) * 12
LIMITS = Limits().declared()

FRAMES: dict[str, F.Frame] = {
    "data": F.Data(1, b"hello"),
    "data-fin": F.Data(1, b"hello", fin=True),
    "data-empty-fin": F.Data(3, b"", fin=True),
    "data-sid-300": F.Data(300, b"hi"),
    "window": F.Window(1, 524288),
    "open": F.Open(1, "web", {"peer_ip": "203.0.113.7", "peer_port": 51234}),
    "open-ok": F.OpenOk(1),
    "open-err": F.OpenErr(1, ErrorCode.UNKNOWN_ROUTE, "no route 'db'"),
    "rst": F.Reset(5, ErrorCode.STREAM_CLOSED, "stream closed"),
    "ping": F.Ping(1),
    "pong": F.Pong(1),
    "goaway": F.GoAway(7, ErrorCode.NO_ERROR, "shutting down"),
    "max-streams": F.MaxStreams(257),
    "ctrl": F.Ctrl(1, "bind", {"route": "web"}),
    "ctrl-reply": F.CtrlReply(1, 0, {"port": 8080}),
    "refuse": F.Refuse(ErrorCode.AUTH, "authentication failed"),
    "hello": F.Hello("edge-1", CLIENT_NONCE, LIMITS),
    "challenge": F.Challenge(PROTOCOL_VERSION, SERVER_NONCE, "hmac-sha256"),
}
# Vectors whose expected frame needs the HMAC example (checked below, against a real handshake).
HANDSHAKE_ONLY = {"auth", "welcome"}
SPECIAL = {"preamble", "hmac-example"}


def test_the_document_has_every_vector_and_no_unknown_one() -> None:
    assert set(VECTORS) == set(FRAMES) | HANDSHAKE_ONLY | SPECIAL


def test_every_frame_type_of_the_protocol_has_a_vector() -> None:
    covered = {type(f) for f in FRAMES.values()} | {F.Auth, F.Welcome}
    assert len(covered) == len(F.FrameType)


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_vector_matches_the_encoder(name: str) -> None:
    assert F.encode(FRAMES[name]).hex() == unhex(VECTORS[name]["hex"]).hex()


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_vector_decodes_to_the_frame(name: str) -> None:
    assert decode_all(unhex(VECTORS[name]["hex"])) == [FRAMES[name]]


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_vector_decodes_one_byte_at_a_time(name: str) -> None:
    raw = unhex(VECTORS[name]["hex"])
    decoder = F.FrameDecoder(max_header=1024, max_payload=65536)
    out = []
    for i in range(len(raw)):
        decoder.feed(raw[i : i + 1])
        frame = decoder.next_frame()
        if frame is not None:
            out.append(frame)
    assert out == [FRAMES[name]]


def test_data_header_encoder_matches_the_data_vectors() -> None:
    for name in ("data", "data-fin", "data-empty-fin", "data-sid-300"):
        frame = FRAMES[name]
        assert isinstance(frame, F.Data)
        raw = unhex(VECTORS[name]["hex"])
        assert F.encode_data_header(frame.stream_id, len(frame.payload), frame.fin) + frame.payload == raw


def test_preamble_vector() -> None:
    raw = unhex(VECTORS["preamble"]["hex"])
    assert raw == F.encode_preamble(PROTOCOL_VERSION, PROTOCOL_VERSION)
    assert F.parse_preamble(raw) == (PROTOCOL_VERSION, PROTOCOL_VERSION) == (2, 2)


# ---------------------------------------------------------------------------------------------- HMAC example


def example() -> dict[str, bytes | str]:
    v = VECTORS["hmac-example"]
    out: dict[str, bytes | str] = {}
    for key, value in v.items():
        out[key] = json.loads(value) if value.startswith('"') else unhex(value)
    return out


def test_hmac_example_is_self_consistent() -> None:
    ex = example()
    token = str(ex["token"]).encode()
    name = str(ex["client_name"]).encode()
    assert isinstance(ex["client_nonce"], bytes) and isinstance(ex["server_nonce"], bytes)
    binding = ex["channel_binding"]
    assert isinstance(binding, bytes) and len(binding) == 32
    tail = len(name).to_bytes(2, "big") + name + bytes([len(binding)]) + binding
    client = b"trio-tunnel/2 client\x00" + ex["client_nonce"] + ex["server_nonce"] + tail
    assert ex["client_transcript"] == client
    assert ex["mac"] == hmac.new(token, client, hashlib.sha256).digest()
    server = b"trio-tunnel/2 server\x00" + client[21:] + str(ex["session_id"]).encode()
    assert ex["server_transcript"] == server
    assert ex["proof"] == hmac.new(token, server, hashlib.sha256).digest()


def test_hmac_example_matches_a_real_handshake() -> None:
    """Two Connections with fixed random bytes produce exactly the documented handshake, MAC and proof."""
    ex = example()
    assert ex["client_nonce"] == CLIENT_NONCE and ex["server_nonce"] == SERVER_NONCE
    token = str(ex["token"]).encode()
    assert token == TOKEN
    binding = ex["channel_binding"]
    assert isinstance(binding, bytes)
    client = Connection(
        Role.CLIENT,
        name=str(ex["client_name"]),
        token=token,
        random_bytes=scripted_random(CLIENT_NONCE),
        channel_binding=binding,
    )
    server = Connection(
        Role.SERVER,
        tokens=[b"an older token", token],
        random_bytes=scripted_random(SERVER_NONCE, SESSION_RANDOM),
        channel_binding=binding,
    )

    first = client.data_to_send()
    assert first == unhex(VECTORS["preamble"]["hex"]) + unhex(VECTORS["hello"]["hex"])
    assert server.receive_data(first) == []
    challenge = server.data_to_send()
    assert challenge == unhex(VECTORS["challenge"]["hex"])
    assert client.receive_data(challenge) == []
    auth = client.data_to_send()
    assert auth == unhex(VECTORS["auth"]["hex"])
    assert decode_all(auth) == [F.Auth(ex["mac"])]  # type: ignore[arg-type]
    server_events = server.receive_data(auth)
    welcome = server.data_to_send()
    assert welcome == unhex(VECTORS["welcome"]["hex"])
    assert decode_all(welcome) == [F.Welcome(str(ex["session_id"]), LIMITS, ex["proof"])]  # type: ignore[arg-type]
    client_events = client.receive_data(welcome)
    assert [type(e) for e in server_events] == [type(e) for e in client_events] == [HandshakeComplete]
    assert client_events[0].session_id == server_events[0].session_id == ex["session_id"]
    assert server_events[0].peer_name == ex["client_name"] and server_events[0].authenticated
