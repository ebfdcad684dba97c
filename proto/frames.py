"""Frames: the wire format, its encoder and a bounded incremental decoder.

Layout of every frame after the 8-byte preamble (docs/PROTOCOL.md, "Frame layout")::

    prefix  = u16 hlen | u32 plen        struct "!HI", network order
    header  = msgpack array of exactly hlen bytes: [type, sid, *fields]
    payload = plen raw bytes             DATA bytes, or the msgpack body of CTRL / CTRL_REPLY

The decoder reads the 6-byte prefix first and rejects a header above ``max_header`` or a payload above
``max_frame_payload`` before it buffers any of it. Headers are decoded with msgpack, then checked field by field
against a per-type schema: a malformed frame becomes one :class:`~.errors.RemoteProtocolError` with a reason
that names the frame and the field, never a msgpack exception or a traceback.
"""

from __future__ import annotations

import enum
import reprlib
import struct
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias

import attrs
import msgpack

from .errors import FrameSizeError, RemoteProtocolError

__all__ = [
    "CTRL_KIND_MAX",
    "Auth",
    "Challenge",
    "Ctrl",
    "CtrlReply",
    "Data",
    "FLAG_FIN",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "GoAway",
    "Hello",
    "MAGIC",
    "MaxStreams",
    "Open",
    "OpenErr",
    "OpenOk",
    "PREAMBLE_SIZE",
    "PREFIX",
    "Ping",
    "Pong",
    "Refuse",
    "Reset",
    "SID_LIMIT",
    "Welcome",
    "Window",
    "check",
    "decode_frame",
    "encode",
    "encode_data_header",
    "encode_preamble",
    "parse_preamble",
]

MAGIC: Final = b"TTUN"
PREAMBLE_SIZE: Final = 8
PREFIX: Final = struct.Struct("!HI")
SID_LIMIT: Final = 1 << 62
"""Stream IDs and WINDOW limits are below 2**62 (they never run out in practice)."""
U64: Final = 1 << 64
FLAG_FIN: Final = 0x01
CTRL_KIND_MAX: Final = 64
ROUTE_MAX: Final = 255
REASON_MAX: Final = 256
NAME_MAX: Final = 64
NONCE_SIZE: Final = 32
META_MAX_ENTRIES: Final = 16
META_VALUE_MAX: Final = 256


class FrameType(enum.IntEnum):
    DATA = 0
    WINDOW = 1
    OPEN = 2
    OPEN_OK = 3
    OPEN_ERR = 4
    RST = 5
    PING = 6
    PONG = 7
    GOAWAY = 8
    MAX_STREAMS = 9
    CTRL = 10
    CTRL_REPLY = 11
    HELLO = 16
    CHALLENGE = 17
    AUTH = 18
    WELCOME = 19
    REFUSE = 20


MetaValue: TypeAlias = "str | int | bool | None"
Meta: TypeAlias = "Mapping[str, str | int | bool | None]"


def _frozen_meta(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return dict(value)


# --------------------------------------------------------------------------------------------------- frame classes


@attrs.frozen
class Data:
    """Stream bytes. ``fin`` half-closes the sender's direction after ``payload`` (it cannot overtake data)."""

    stream_id: int
    payload: bytes = b""
    fin: bool = False


@attrs.frozen
class Window:
    """The *absolute* number of bytes the receiver allows on this stream in total (never an increment)."""

    stream_id: int
    limit: int


@attrs.frozen
class Open:
    """Open a stream towards ``route``; ``meta`` describes it (e.g. the external peer's address)."""

    stream_id: int
    route: str
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_meta)


@attrs.frozen
class OpenOk:
    stream_id: int


@attrs.frozen
class OpenErr:
    """The stream was not opened; terminal."""

    stream_id: int
    code: int
    reason: str = ""


@attrs.frozen
class Reset:
    """Abort both directions of a stream; terminal, and never answered with another RST."""

    stream_id: int
    code: int
    reason: str = ""


@attrs.frozen
class Ping:
    opaque: int


@attrs.frozen
class Pong:
    opaque: int


@attrs.frozen
class GoAway:
    """No new streams; the sender processed peer streams up to ``last_stream_id`` and none above."""

    last_stream_id: int
    code: int
    reason: str = ""


@attrs.frozen
class MaxStreams:
    """Cumulative number of streams the receiver of this frame may ever have opened (only rises)."""

    count: int


@attrs.frozen
class Ctrl:
    """An application request (``request_id`` > 0 expects a reply; 0 is a notification)."""

    request_id: int
    kind: str
    body: Any = None


@attrs.frozen
class CtrlReply:
    """The answer to the peer's CTRL ``request_id``; ``code`` 0 is success, else an :class:`ErrorCode`."""

    request_id: int
    code: int
    body: Any = None


@attrs.frozen
class Hello:
    """Client -> server, right after the preamble."""

    name: str
    nonce: bytes
    limits: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_meta)


@attrs.frozen
class Challenge:
    """Server -> client: the chosen version, a fresh nonce and the auth method ("hmac-sha256" or "none")."""

    version: int
    nonce: bytes
    method: str


@attrs.frozen
class Auth:
    """Client -> server: HMAC-SHA256 over the transcript (empty for method "none")."""

    mac: bytes


@attrs.frozen
class Welcome:
    """Server -> client: the session is open. ``proof`` shows the server knows the token too."""

    session_id: str
    limits: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_meta)
    proof: bytes = b""


@attrs.frozen
class Refuse:
    """Server -> client during the handshake: why the session was refused; the server then closes."""

    code: int
    message: str


Frame: TypeAlias = (
    Data
    | Window
    | Open
    | OpenOk
    | OpenErr
    | Reset
    | Ping
    | Pong
    | GoAway
    | MaxStreams
    | Ctrl
    | CtrlReply
    | Hello
    | Challenge
    | Auth
    | Welcome
    | Refuse
)

# ------------------------------------------------------------------------------------------------------- encoding

_packb: Final[Callable[[Any], bytes]] = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def _body(obj: Any) -> bytes:
    return b"" if obj is None else _packb(obj)


def _header_fields(frame: Frame) -> tuple[list[Any], bytes]:
    match frame:
        case Data(sid, payload, fin):
            return [FrameType.DATA, sid, FLAG_FIN if fin else 0], payload
        case Window(sid, limit):
            return [FrameType.WINDOW, sid, limit], b""
        case Open(sid, route, meta):
            return [FrameType.OPEN, sid, route, dict(meta)], b""
        case OpenOk(sid):
            return [FrameType.OPEN_OK, sid], b""
        case OpenErr(sid, code, reason):
            return [FrameType.OPEN_ERR, sid, int(code), reason], b""
        case Reset(sid, code, reason):
            return [FrameType.RST, sid, int(code), reason], b""
        case Ping(opaque):
            return [FrameType.PING, 0, opaque], b""
        case Pong(opaque):
            return [FrameType.PONG, 0, opaque], b""
        case GoAway(last, code, reason):
            return [FrameType.GOAWAY, 0, last, int(code), reason], b""
        case MaxStreams(count):
            return [FrameType.MAX_STREAMS, 0, count], b""
        case Ctrl(req, kind, body):
            return [FrameType.CTRL, 0, req, kind], _body(body)
        case CtrlReply(req, code, body):
            return [FrameType.CTRL_REPLY, 0, req, int(code)], _body(body)
        case Hello(name, nonce, limits):
            return [FrameType.HELLO, 0, name, nonce, dict(limits)], b""
        case Challenge(version, nonce, method):
            return [FrameType.CHALLENGE, 0, version, nonce, method], b""
        case Auth(mac):
            return [FrameType.AUTH, 0, mac], b""
        case Welcome(session_id, limits, proof):
            return [FrameType.WELCOME, 0, session_id, dict(limits), proof], b""
        case Refuse(code, message):
            return [FrameType.REFUSE, 0, int(code), message], b""
    raise TypeError(f"not a frame: {frame!r}")


def encode(frame: Frame) -> bytes:
    """The bytes of one frame: prefix, msgpack header, payload."""
    fields, payload = _header_fields(frame)
    # IntEnum members pack as plain ints; make that explicit so the bytes never depend on it.
    fields[0] = int(fields[0])
    header = _packb(fields)
    return PREFIX.pack(len(header), len(payload)) + header + payload


def encode_data_header(stream_id: int, length: int, fin: bool) -> bytes:
    """Prefix and header of a DATA frame of ``length`` payload bytes (the payload is appended by the caller).

    The hot path of the writer: it joins this with the payload, so the payload is copied exactly once.
    """
    header = _packb([0, stream_id, FLAG_FIN if fin else 0])
    return PREFIX.pack(len(header), length) + header


def encode_preamble(max_major: int, min_major: int) -> bytes:
    """The 8 bytes a client sends first: ``b"TTUN"``, highest and lowest major version it speaks, two zero bytes."""
    return MAGIC + bytes([max_major, min_major, 0, 0])


def parse_preamble(data: bytes) -> tuple[int, int] | None:
    """``(max_major, min_major)`` from 8 preamble bytes, or None when the magic is wrong (not our protocol)."""
    if len(data) != PREAMBLE_SIZE or data[:4] != MAGIC:
        return None
    return data[4], data[5]


# ------------------------------------------------------------------------------------------------------- decoding


class _Bad(Exception):
    """Raised inside the field checkers; turned into RemoteProtocolError with the frame's name."""


def _uint(value: Any, limit: int = SID_LIMIT) -> int:
    if type(value) is not int or not 0 <= value < limit:
        raise _Bad(f"expected an integer in [0, {limit}), got {_describe(value)}")
    return value


def _str(value: Any, max_bytes: int) -> str:
    if type(value) is not str:
        raise _Bad(f"expected a string, got {_describe(value)}")
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _Bad(f"string longer than {max_bytes} bytes")
    return value


def _bin(value: Any, max_bytes: int) -> bytes:
    if type(value) is not bytes:
        raise _Bad(f"expected binary, got {_describe(value)}")
    if len(value) > max_bytes:
        raise _Bad(f"binary longer than {max_bytes} bytes")
    return value


def _meta(value: Any) -> dict[str, MetaValue]:
    if type(value) is not dict:
        raise _Bad(f"expected a map, got {_describe(value)}")
    if len(value) > META_MAX_ENTRIES:
        raise _Bad(f"map has more than {META_MAX_ENTRIES} entries")
    out: dict[str, MetaValue] = {}
    for key, item in value.items():
        _str(key, NAME_MAX)
        if item is None or type(item) in (bool, int):
            out[key] = item
        elif type(item) is str:
            out[key] = _str(item, META_VALUE_MAX)
        else:
            raise _Bad(f"map value for {key!r} must be a string, integer, boolean or nil")
    return out


def _limits(value: Any) -> dict[str, int]:
    meta = _meta(value)
    out: dict[str, int] = {}
    for key, item in meta.items():
        out[key] = _uint(item, U64)
    return out


def _plain(value: Any, depth: int = 0) -> Any:
    """Accept only plain msgpack data (no ext types, no timestamps), at most 16 levels deep."""
    if depth > 16:
        raise _Bad("body nested too deeply")
    if value is None or type(value) in (bool, int, float, str, bytes):
        return value
    if type(value) is list:
        return [_plain(item, depth + 1) for item in value]
    if type(value) is dict:
        return {_str(key, 1024): _plain(item, depth + 1) for key, item in value.items()}
    raise _Bad(f"unsupported value in body: {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    # reprlib, not repr: a 1 KiB header can nest ~1000 arrays, deeper than repr's recursion limit.
    text = reprlib.repr(value)
    return f"{type(value).__name__} {text[:40]}"


def _why(exc: Exception) -> str:
    """msgpack's message, or its exception's name when the message is empty (FormatError for 0xc1 has none)."""
    return str(exc) or type(exc).__name__


def _no_ext(code: int, data: bytes) -> Any:
    raise _Bad(f"msgpack extension type {code} is not allowed")


def _unpack(raw: bytes | memoryview) -> Any:
    # unpackb derives its max_*_len limits from len(raw), so a 5-byte header claiming 2**32 elements fails at once.
    return msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext, timestamp=0)


def _body_of(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return _plain(_unpack(payload))
    except _Bad:
        raise
    except (ValueError, TypeError, msgpack.ExtraData) as exc:
        raise _Bad(f"body is not valid msgpack ({_why(exc)})") from None


_Parser: TypeAlias = Callable[[int, list[Any], bytes], Frame]


def _p_data(sid: int, f: list[Any], payload: bytes) -> Frame:
    (flags,) = f
    flags = _uint(flags, 256)
    if flags & ~FLAG_FIN:
        raise _Bad(f"unknown DATA flags {flags:#x}")
    return Data(sid, payload, bool(flags & FLAG_FIN))


def _p_window(sid: int, f: list[Any], payload: bytes) -> Frame:
    (limit,) = f
    return Window(sid, _uint(limit))


def _p_open(sid: int, f: list[Any], payload: bytes) -> Frame:
    route, meta = f
    return Open(sid, _str(route, ROUTE_MAX), _meta(meta))


def _p_open_ok(sid: int, f: list[Any], payload: bytes) -> Frame:
    () = f
    return OpenOk(sid)


def _p_open_err(sid: int, f: list[Any], payload: bytes) -> Frame:
    code, reason = f
    return OpenErr(sid, _uint(code, 1 << 16), _str(reason, REASON_MAX))


def _p_rst(sid: int, f: list[Any], payload: bytes) -> Frame:
    code, reason = f
    return Reset(sid, _uint(code, 1 << 16), _str(reason, REASON_MAX))


def _p_ping(sid: int, f: list[Any], payload: bytes) -> Frame:
    (opaque,) = f
    return Ping(_uint(opaque, U64))


def _p_pong(sid: int, f: list[Any], payload: bytes) -> Frame:
    (opaque,) = f
    return Pong(_uint(opaque, U64))


def _p_goaway(sid: int, f: list[Any], payload: bytes) -> Frame:
    last, code, reason = f
    return GoAway(_uint(last), _uint(code, 1 << 16), _str(reason, REASON_MAX))


def _p_max_streams(sid: int, f: list[Any], payload: bytes) -> Frame:
    (count,) = f
    return MaxStreams(_uint(count))


def _p_ctrl(sid: int, f: list[Any], payload: bytes) -> Frame:
    req, kind = f
    return Ctrl(_uint(req), _str(kind, CTRL_KIND_MAX), _body_of(payload))


def _p_ctrl_reply(sid: int, f: list[Any], payload: bytes) -> Frame:
    req, code = f
    return CtrlReply(_uint(req), _uint(code, 1 << 16), _body_of(payload))


def _p_hello(sid: int, f: list[Any], payload: bytes) -> Frame:
    name, nonce, limits = f
    return Hello(_str(name, NAME_MAX), _bin(nonce, NONCE_SIZE), _limits(limits))


def _p_challenge(sid: int, f: list[Any], payload: bytes) -> Frame:
    version, nonce, method = f
    return Challenge(_uint(version, 256), _bin(nonce, NONCE_SIZE), _str(method, NAME_MAX))


def _p_auth(sid: int, f: list[Any], payload: bytes) -> Frame:
    (mac,) = f
    return Auth(_bin(mac, 64))


def _p_welcome(sid: int, f: list[Any], payload: bytes) -> Frame:
    session_id, limits, proof = f
    return Welcome(_str(session_id, NAME_MAX), _limits(limits), _bin(proof, 64))


def _p_refuse(sid: int, f: list[Any], payload: bytes) -> Frame:
    code, message = f
    return Refuse(_uint(code, 1 << 16), _str(message, REASON_MAX))


# type -> (parser, stream frame?, may carry a payload?)
_PARSERS: Final[dict[int, tuple[_Parser, bool, bool]]] = {
    FrameType.DATA: (_p_data, True, True),
    FrameType.WINDOW: (_p_window, True, False),
    FrameType.OPEN: (_p_open, True, False),
    FrameType.OPEN_OK: (_p_open_ok, True, False),
    FrameType.OPEN_ERR: (_p_open_err, True, False),
    FrameType.RST: (_p_rst, True, False),
    FrameType.PING: (_p_ping, False, False),
    FrameType.PONG: (_p_pong, False, False),
    FrameType.GOAWAY: (_p_goaway, False, False),
    FrameType.MAX_STREAMS: (_p_max_streams, False, False),
    FrameType.CTRL: (_p_ctrl, False, True),
    FrameType.CTRL_REPLY: (_p_ctrl_reply, False, True),
    FrameType.HELLO: (_p_hello, False, False),
    FrameType.CHALLENGE: (_p_challenge, False, False),
    FrameType.AUTH: (_p_auth, False, False),
    FrameType.WELCOME: (_p_welcome, False, False),
    FrameType.REFUSE: (_p_refuse, False, False),
}

EXTENSION_TYPES: Final = range(32, 64)
"""Frame types reserved for extensions: ignored when unknown. An unknown type below 32 is a protocol error."""


def decode_frame(header: bytes | memoryview, payload: bytes) -> Frame | None:
    """Decode one frame from its header bytes and payload; None for an unknown extension frame (ignore it).

    Raises:
        RemoteProtocolError: the header is not valid msgpack, not an array of the right shape, or a field is out
            of range. The reason names the frame type and the problem.
    """
    try:
        fields = _unpack(header)
    except _Bad as exc:
        raise RemoteProtocolError(f"malformed frame header: {exc}") from None
    except (ValueError, TypeError, msgpack.ExtraData) as exc:
        raise RemoteProtocolError(f"malformed frame header: not valid msgpack ({_why(exc)})") from None
    if type(fields) is not list or len(fields) < 2:
        raise RemoteProtocolError("malformed frame header: expected an array [type, stream_id, ...]")
    ftype, sid, *rest = fields
    if type(ftype) is not int or not 0 <= ftype < 256:
        raise RemoteProtocolError(f"malformed frame header: bad frame type {_describe(ftype)}")
    entry = _PARSERS.get(ftype)
    if entry is None:
        if ftype in EXTENSION_TYPES:
            return None
        raise RemoteProtocolError(f"unknown frame type {ftype}")
    parser, is_stream, has_payload = entry
    name = FrameType(ftype).name
    try:
        sid = _uint(sid)
        if is_stream and sid == 0:
            raise _Bad("stream frames need a stream id >= 1")
        if not is_stream and sid != 0:
            raise _Bad("session frames must have stream id 0")
        if payload and not has_payload:
            raise _Bad("this frame type carries no payload")
        return parser(sid, rest, payload)
    except _Bad as exc:
        raise RemoteProtocolError(f"malformed {name} frame: {exc}") from None
    except ValueError:
        # A field list of the wrong length fails the unpacking in the parser.
        raise RemoteProtocolError(f"malformed {name} frame: wrong number of fields ({len(rest)})") from None


@attrs.define(eq=False)
class FrameDecoder:
    """Incremental, bounded frame decoder: :meth:`feed` bytes, then call :meth:`next_frame` until it returns None.

    Holds at most one partial frame: ``6 + max_header + max_payload`` bytes (plus whatever one ``feed`` adds).
    Feeding the same bytes split in any way yields the same frames.
    """

    max_header: int
    max_payload: int
    _buf: bytearray = attrs.field(factory=bytearray, init=False)
    _pos: int = attrs.field(default=0, init=False)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def take(self, n: int) -> bytes | None:
        """Exactly ``n`` raw bytes (the preamble), or None if fewer are buffered."""
        if self.buffered < n:
            return None
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    @staticmethod
    def _fast_data(buf: bytearray, start: int, hlen: int, end: int) -> Data | None:
        """The hot path: a DATA header ``[0, sid, flags]`` with a canonical msgpack uint sid and flags 0 or FIN,
        decoded by hand. Anything else (including every malformed variant) returns None and takes the general
        path, so the result is always what :func:`decode_frame` would give."""
        # Check hlen before reading: a short header may be the last bytes in the buffer (IndexError otherwise).
        if hlen < 4 or buf[start] != 0x93 or buf[start + 1] != 0x00:
            return None
        marker = buf[start + 2]
        if marker < 0x80 and hlen == 4:
            sid = marker
        elif marker == 0xCD and hlen == 6:
            sid = (buf[start + 3] << 8) | buf[start + 4]
        elif marker == 0xCE and hlen == 8:
            sid = int.from_bytes(buf[start + 3 : start + 7], "big")
        elif marker == 0xCC and hlen == 5:
            sid = buf[start + 3]
        else:
            return None
        if sid == 0:
            return None
        flags = buf[start + hlen - 1]
        if flags > FLAG_FIN:
            return None
        if end > start + hlen:
            with memoryview(buf) as view:
                payload = bytes(view[start + hlen : end])  # one copy
        else:
            payload = b""
        return Data(sid, payload, flags == FLAG_FIN)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed.

        Raises:
            FrameSizeError: the prefix announces a header or payload above the limits.
            RemoteProtocolError: the frame is malformed.
        """
        while True:
            buf = self._buf
            pos = self._pos
            avail = len(buf) - pos
            if avail < 6:
                return None
            hlen, plen = PREFIX.unpack_from(buf, pos)
            if hlen > self.max_header or hlen == 0:
                raise FrameSizeError(f"frame header of {hlen} bytes (limit {self.max_header})")
            if plen > self.max_payload:
                raise FrameSizeError(f"frame payload of {plen} bytes (limit {self.max_payload})")
            end = pos + 6 + hlen + plen
            if len(buf) < end:
                return None
            data = self._fast_data(buf, pos + 6, hlen, end)
            if data is not None:
                self._pos = end
                return data
            with memoryview(buf) as view:
                header = view[pos + 6 : pos + 6 + hlen]
                payload = bytes(view[pos + 6 + hlen : end]) if plen else b""
                try:
                    frame = decode_frame(header, payload)
                finally:
                    header.release()
            self._pos = end
            if frame is not None:
                return frame


def check(frame: Frame) -> None:
    """Raise :class:`RemoteProtocolError` if ``frame`` would not pass our own decoder (used before sending)."""
    fields, payload = _header_fields(frame)
    fields[0] = int(fields[0])
    decode_frame(_packb(fields), payload)
