"""The frame codec alone: round trips for every frame type, split-invariant decoding, size limits, malformed headers.

Section 6 items 1 (round trips, splits), 15 (sizes checked from the prefix) and 16/17 at the codec level; the same
inputs through a Connection (GOAWAY, ConnectionTerminated) are in test_defences.py.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proto_helpers import MALFORMED, packed, raw_frame
from trio_tunnel.proto import ErrorCode, FrameSizeError, RemoteProtocolError
from trio_tunnel.proto import frames as F

# ---------------------------------------------------------------------------------------------- strategies

SID = st.integers(1, F.SID_LIMIT - 1)
U62 = st.integers(0, F.SID_LIMIT - 1)
U64 = st.integers(0, (1 << 64) - 1)
CODE = st.integers(0, (1 << 16) - 1)


def text(max_bytes: int) -> st.SearchStrategy[str]:
    """Unicode text (no surrogates: they cannot be UTF-8) of at most ``max_bytes`` once encoded."""
    return st.text(st.characters(exclude_categories=["Cs"]), max_size=max_bytes // 4)


META_VALUE = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | text(F.META_VALUE_MAX)
META = st.dictionaries(text(F.NAME_MAX), META_VALUE, max_size=F.META_MAX_ENTRIES)
LIMITS = st.dictionaries(text(F.NAME_MAX), U64, max_size=F.META_MAX_ENTRIES)
BODY_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | text(64)
    | st.binary(max_size=64)
)
BODY = st.recursive(
    BODY_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(32), inner, max_size=4), max_leaves=20
)

FRAMES: dict[type, st.SearchStrategy[F.Frame]] = {
    F.Data: st.builds(F.Data, SID, st.binary(max_size=2048), st.booleans()).filter(lambda f: f.payload or f.fin),
    F.Window: st.builds(F.Window, SID, U62),
    F.Open: st.builds(F.Open, SID, text(F.ROUTE_MAX), META),
    F.OpenOk: st.builds(F.OpenOk, SID),
    F.OpenErr: st.builds(F.OpenErr, SID, CODE, text(F.REASON_MAX)),
    F.Reset: st.builds(F.Reset, SID, CODE, text(F.REASON_MAX)),
    F.Ping: st.builds(F.Ping, U64),
    F.Pong: st.builds(F.Pong, U64),
    F.GoAway: st.builds(F.GoAway, U62, CODE, text(F.REASON_MAX)),
    F.MaxStreams: st.builds(F.MaxStreams, U62),
    F.Ctrl: st.builds(F.Ctrl, U62, text(F.CTRL_KIND_MAX), BODY),
    F.CtrlReply: st.builds(F.CtrlReply, U62, CODE, BODY),
    F.Hello: st.builds(F.Hello, text(F.NAME_MAX), st.binary(max_size=F.NONCE_SIZE), LIMITS),
    F.Challenge: st.builds(F.Challenge, st.integers(0, 255), st.binary(max_size=F.NONCE_SIZE), text(F.NAME_MAX)),
    F.Auth: st.builds(F.Auth, st.binary(max_size=64)),
    F.Welcome: st.builds(F.Welcome, text(F.NAME_MAX), LIMITS, st.binary(max_size=64)),
    F.Refuse: st.builds(F.Refuse, CODE, text(F.REASON_MAX)),
}
ANY_FRAME = st.one_of(*FRAMES.values())


def decoder() -> F.FrameDecoder:
    return F.FrameDecoder(max_header=4096, max_payload=1 << 20)


def decode_one(data: bytes) -> F.Frame:
    d = decoder()
    d.feed(data)
    frame = d.next_frame()
    assert frame is not None
    assert d.buffered == 0
    assert d.next_frame() is None
    return frame


# ---------------------------------------------------------------------------------------------- round trips


def test_every_frame_type_has_a_strategy() -> None:
    assert {t.__name__.upper() for t in FRAMES} >= {"DATA", "WINDOW", "OPEN", "HELLO"}
    assert len(FRAMES) == len(F.FrameType)


@pytest.mark.parametrize("frame_type", list(FRAMES), ids=lambda t: t.__name__)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(frame_type: type, data: st.DataObject) -> None:
    frame = data.draw(FRAMES[frame_type])
    encoded = F.encode(frame)
    assert decode_one(encoded) == frame
    F.check(frame)  # our own pre-send check agrees with the decoder


@given(frame=ANY_FRAME)
def test_prefix_announces_exact_lengths(frame: F.Frame) -> None:
    encoded = F.encode(frame)
    hlen, plen = F.PREFIX.unpack_from(encoded)
    assert len(encoded) == 6 + hlen + plen
    header = msgpack.unpackb(encoded[6 : 6 + hlen], raw=False)
    assert type(header) is list and header[0] == F.FrameType[_type_name(frame)]


def _type_name(frame: F.Frame) -> str:
    return {
        F.Reset: "RST",
        F.GoAway: "GOAWAY",
        F.MaxStreams: "MAX_STREAMS",
        F.OpenOk: "OPEN_OK",
        F.OpenErr: "OPEN_ERR",
        F.CtrlReply: "CTRL_REPLY",
    }.get(type(frame), type(frame).__name__.upper())


@given(sid=SID, length=st.integers(0, (1 << 32) - 1), fin=st.booleans())
def test_encode_data_header_matches_encode(sid: int, length: int, fin: bool) -> None:
    payload = b"x" * min(length, 64)
    assert F.encode_data_header(sid, len(payload), fin) + payload == F.encode(F.Data(sid, payload, fin))
    # the length is only in the prefix, so any length works
    assert F.encode_data_header(sid, length, fin)[2:6] == length.to_bytes(4, "big")


def test_encode_rejects_non_frames() -> None:
    with pytest.raises(TypeError, match="not a frame"):
        F.encode("DATA")  # type: ignore[arg-type]


def test_ctrl_without_body_has_no_payload() -> None:
    encoded = F.encode(F.Ctrl(1, "status"))
    assert F.PREFIX.unpack_from(encoded)[1] == 0
    assert decode_one(encoded) == F.Ctrl(1, "status", None)


# ---------------------------------------------------------------------------------------------- splitting


@settings(max_examples=80)
@given(frames=st.lists(ANY_FRAME, max_size=8), cuts=st.lists(st.integers(0, 4096), max_size=12))
def test_random_splits_yield_the_same_frames(frames: list[F.Frame], cuts: list[int]) -> None:
    stream = b"".join(map(F.encode, frames))
    points = sorted({c % (len(stream) + 1) for c in cuts})
    d = decoder()
    out = []
    last = 0
    for point in [*points, len(stream)]:
        d.feed(stream[last:point])
        last = point
        while (frame := d.next_frame()) is not None:
            out.append(frame)
    assert out == frames
    assert d.buffered == 0


@settings(max_examples=30)
@given(frames=st.lists(ANY_FRAME, min_size=1, max_size=4))
def test_one_byte_at_a_time_yields_the_same_frames(frames: list[F.Frame]) -> None:
    stream = b"".join(map(F.encode, frames))
    d = decoder()
    out = []
    for i in range(len(stream)):
        d.feed(stream[i : i + 1])
        while (frame := d.next_frame()) is not None:
            out.append(frame)
    assert out == frames


def test_incomplete_frame_waits_for_more() -> None:
    encoded = F.encode(F.Data(1, b"abc", fin=True))
    d = decoder()
    d.feed(encoded[:5])
    assert d.next_frame() is None  # not even a prefix
    d.feed(encoded[5:-1])
    assert d.next_frame() is None  # prefix known, body incomplete
    assert d.buffered == len(encoded) - 1
    d.feed(encoded[-1:])
    assert d.next_frame() == F.Data(1, b"abc", True)


def test_take_reads_raw_bytes_for_the_preamble() -> None:
    d = decoder()
    d.feed(F.encode_preamble(1, 1)[:7])
    assert d.take(8) is None
    d.feed(F.encode_preamble(1, 1)[7:] + F.encode(F.Ping(5)))
    assert d.take(8) == b"TTUN\x01\x01\x00\x00"
    assert d.next_frame() == F.Ping(5)


# ---------------------------------------------------------------------------------------------- preamble


def test_preamble_layout() -> None:
    assert F.encode_preamble(3, 1) == b"TTUN\x03\x01\x00\x00"
    assert F.parse_preamble(b"TTUN\x03\x01\x00\x00") == (3, 1)


@pytest.mark.parametrize("data", [b"GET / HT", b"TTUX\x01\x01\x00\x00", b"TTUN\x01\x01\x00", b""])
def test_preamble_with_wrong_magic_or_size_is_not_ours(data: bytes) -> None:
    assert F.parse_preamble(data) is None


# ---------------------------------------------------------------------------------------------- size limits


def test_oversized_header_is_rejected_from_the_prefix_alone() -> None:
    d = F.FrameDecoder(max_header=1024, max_payload=65536)
    d.feed(F.PREFIX.pack(1025, 0))  # only the 6-byte prefix: nothing of the body was buffered
    with pytest.raises(FrameSizeError, match="header of 1025 bytes"):
        d.next_frame()


def test_oversized_payload_is_rejected_from_the_prefix_alone() -> None:
    d = F.FrameDecoder(max_header=1024, max_payload=65536)
    d.feed(F.PREFIX.pack(4, 65537))
    with pytest.raises(FrameSizeError, match="payload of 65537 bytes") as info:
        d.next_frame()
    assert info.value.code == ErrorCode.FRAME_SIZE


def test_zero_length_header_is_a_frame_size_error() -> None:
    d = decoder()
    d.feed(F.PREFIX.pack(0, 0))
    with pytest.raises(FrameSizeError):
        d.next_frame()


def test_payload_on_a_frame_type_without_payload_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="malformed WINDOW frame: this frame type carries no payload"):
        decode_one(raw_frame(packed(1, 1, 5), b"junk"))


def test_stream_frame_on_stream_zero_and_session_frame_on_a_stream_are_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="stream frames need a stream id >= 1"):
        decode_one(raw_frame(packed(0, 0, 0), b"x"))
    with pytest.raises(RemoteProtocolError, match="session frames must have stream id 0"):
        decode_one(raw_frame(packed(6, 3, 1)))


# ---------------------------------------------------------------------------------------------- malformed headers


@pytest.mark.parametrize(("header", "payload", "fragment"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_header_is_one_readable_remote_protocol_error(header: bytes, payload: bytes, fragment: str) -> None:
    d = F.FrameDecoder(max_header=1024, max_payload=65536)
    d.feed(raw_frame(header, payload))
    with pytest.raises(RemoteProtocolError) as info:
        d.next_frame()
    error = info.value
    assert type(error) is RemoteProtocolError
    assert error.code == 1  # PROTOCOL
    assert fragment.lower() in error.reason.lower(), error.reason
    assert error.reason.isprintable()
    assert not error.reason.endswith("()"), "the reason must say what is wrong"
    assert error.__cause__ is None, "no msgpack traceback chained to it"
    assert error.__context__ is None or error.__suppress_context__, "no msgpack traceback chained to it"


@settings(max_examples=300)
@given(
    header=st.one_of(
        st.binary(max_size=10),
        st.builds(lambda tail: b"\x93\x00" + tail, st.binary(max_size=8)),
        st.builds(
            lambda m, tail: b"\x93\x00" + bytes([m]) + tail,
            st.sampled_from([0xCC, 0xCD, 0xCE, 0x05]),
            st.binary(max_size=6),
        ),
    ),
    payload=st.binary(max_size=4),
)
def test_decoder_agrees_with_decode_frame_on_any_short_header(header: bytes, payload: bytes) -> None:
    """The decoder's hand-written DATA fast path must give exactly what decode_frame gives (or the same error),
    even for a header that is the last thing in the buffer."""
    if not header:
        return
    try:
        expected: object = F.decode_frame(header, payload)
    except RemoteProtocolError as exc:
        expected = ("error", exc.reason)
    d = F.FrameDecoder(max_header=1024, max_payload=65536)
    d.feed(raw_frame(header, payload))
    try:
        got: object = d.next_frame()
    except RemoteProtocolError as exc:
        got = ("error", exc.reason)
    assert got == expected


@pytest.mark.parametrize("ftype", [32, 47, 63])
def test_extension_types_are_skipped(ftype: int) -> None:
    d = decoder()
    d.feed(raw_frame(packed(ftype, 7, "anything", {"x": 1}), b"payload") + F.encode(F.Ping(1)))
    assert d.next_frame() == F.Ping(1)
    assert d.buffered == 0


def test_extension_frame_must_still_be_a_valid_header() -> None:
    with pytest.raises(RemoteProtocolError, match="not valid msgpack"):
        decode_one(raw_frame(b"\x93\x20\x00\xc1"))


def test_check_rejects_what_the_decoder_would_reject() -> None:
    with pytest.raises(RemoteProtocolError, match="longer than 255"):
        F.check(F.Open(1, "r" * 300))
    with pytest.raises(RemoteProtocolError, match="stream frames need a stream id >= 1"):
        F.check(F.Data(0, b"x"))
