"""HAProxy's PROXY protocol header, sans-I/O: encode one (v1 text or v2 binary) and parse one from bytes.

trio-tunnel writes this header to a local service (``proxy_protocol = "v1"|"v2"``) so that the service sees the
external user's address instead of the client's loopback connection, and reads it on a server's public port from
a trusted load balancer (``accept_proxy_protocol``). The layout follows HAProxy's ``proxy-protocol.txt``:

* **v1**: one US-ASCII line, at most 107 bytes with its CRLF: ``PROXY TCP4 SRC DST SPORT DPORT\\r\\n`` (``TCP6``
  for IPv6), or ``PROXY UNKNOWN\\r\\n`` ("use the connection's own addresses"; anything after ``UNKNOWN`` up to
  the CRLF is ignored). v1 has no UDP.
* **v2**: the 12-byte signature ``0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A``; one byte version (high nibble, 2) and
  command (low nibble: 0 LOCAL, 1 PROXY); one byte address family (high nibble: 0 UNSPEC, 1 INET, 2 INET6,
  3 UNIX) and transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM); a big-endian 16-bit length of the rest; then
  for INET ``src(4) dst(4) sport(2) dport(2)``, for INET6 ``src(16) dst(16) sport(2) dport(2)``, for UNIX two
  108-byte paths; then TLVs (skipped here) up to the length.

Parsing is incremental: :func:`parse` returns None while the bytes could still become a valid header, and raises
:class:`ProxyHeaderError` as soon as they cannot, so a reader never holds more than :data:`MAX_HEADER` bytes. The
receiver does not guess: bytes that do not start like a header are an error, not data (the spec's rule, because
a guessing receiver lets anyone spoof an address).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Final

import attrs

__all__ = [
    "MAX_HEADER",
    "MAX_V1_LINE",
    "V2_SIGNATURE",
    "Address",
    "ProxyHeader",
    "ProxyHeaderError",
    "Transport",
    "encode",
    "encode_v1",
    "encode_v2",
    "parse",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes every v2 header starts with."""
V1_PREFIX: Final = b"PROXY "
MAX_V1_LINE: Final = 107
"""The longest v1 line, CRLF included (the spec's worst case: ``PROXY UNKNOWN`` with two full IPv6 addresses)."""
_V2_FIXED: Final = 16
MAX_HEADER: Final = _V2_FIXED + 0xFFFF
"""The longest v2 header (the length field is 16 bits): the most a reader ever buffers."""

_V2_VERSION: Final = 0x20
_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_ADDRESS_SIZE: Final = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class Transport(enum.IntEnum):
    """The v2 transport nibble (v1 knows only TCP, which is STREAM)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header (the message says what is wrong, for one log line)."""


@attrs.frozen
class Address:
    """One end of a connection: an IP address and a port."""

    ip: IPAddress
    port: int = attrs.field()

    @port.validator
    def _port(self, _attribute: object, value: int) -> None:
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"port {value} is out of range 0-65535")

    @classmethod
    def of(cls, host: str, port: int) -> Address:
        """From a socket's ``(host, port)``; an IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, from a dual-stack
        listener) becomes the IPv4 address it maps, as a service behind the tunnel expects."""
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return cls(ip, port)


@attrs.frozen
class ProxyHeader:
    """A parsed header. ``source``/``destination`` are None when the header says to use the connection's own
    addresses (v1 ``UNKNOWN``, v2 ``LOCAL`` or an unspecified or UNIX family)."""

    version: int
    source: Address | None
    destination: Address | None
    length: int
    """Bytes the header took; what follows is the connection's data."""
    transport: Transport = Transport.STREAM
    local: bool = False
    """v2 LOCAL: the proxy's own connection (a health check), not a relayed one."""


def _same_family(source: Address, destination: Address) -> tuple[Address, Address]:
    """Both ends in one family, as a header has one: an IPv4 end next to an IPv6 one becomes IPv4-mapped IPv6."""
    if source.ip.version == destination.ip.version:
        return source, destination

    def six(address: Address) -> Address:
        if isinstance(address.ip, ipaddress.IPv4Address):
            return Address(ipaddress.IPv6Address(f"::ffff:{address.ip}"), address.port)
        return address

    return six(source), six(destination)


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n``, or ``PROXY UNKNOWN\\r\\n`` when an end is not known."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    source, destination = _same_family(source, destination)
    family = "TCP4" if source.ip.version == 4 else "TCP6"
    return f"PROXY {family} {source.ip} {destination.ip} {source.port} {destination.port}\r\n".encode("ascii")


def encode_v2(source: Address | None, destination: Address | None, *, transport: Transport = Transport.STREAM) -> bytes:
    """The binary header with command PROXY; without addresses, family UNSPEC and no address block (the receiver
    then uses the connection's own addresses). ``transport=DGRAM`` describes a UDP flow."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([_V2_VERSION | _CMD_PROXY, (_AF_UNSPEC << 4) | Transport.UNSPEC]) + b"\0\0"
    source, destination = _same_family(source, destination)
    family = _AF_INET if source.ip.version == 4 else _AF_INET6
    block = source.ip.packed + destination.ip.packed + struct.pack("!HH", source.port, destination.port)
    return (
        V2_SIGNATURE + bytes([_V2_VERSION | _CMD_PROXY, (family << 4) | transport]) + struct.pack("!H", len(block))
    ) + block


def encode(version: str, source: Address | None, destination: Address | None) -> bytes:
    """The header of ``version`` (``"v1"`` or ``"v2"``) for a TCP connection."""
    if version == "v1":
        return encode_v1(source, destination)
    if version == "v2":
        return encode_v2(source, destination)
    raise ValueError(f"unknown PROXY protocol version {version!r} (expected 'v1' or 'v2')")


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed.

    Raises:
        ProxyHeaderError: ``data`` does not start with a valid header (or a v1 line is longer than 107 bytes).
    """
    data = bytes(data[:MAX_HEADER])
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
    end = data.find(b"\r\n", 0, MAX_V1_LINE)
    if end < 0:
        if len(data) >= MAX_V1_LINE:
            raise ProxyHeaderError(f"PROXY v1 line without CRLF in its first {MAX_V1_LINE} bytes")
        if b"\n" in data:
            raise ProxyHeaderError("PROXY v1 line ends without CR")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, None, None, end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line {line[:60]!r}")
    _, family, src, dst, sport, dport = parts
    version = 4 if family == "TCP4" else 6
    try:
        source = Address(_ip(src, version), _port(sport))
        destination = Address(_ip(dst, version), _port(dport))
    except ValueError as exc:
        raise ProxyHeaderError(f"malformed PROXY v1 line {line[:60]!r}: {exc}") from None
    return ProxyHeader(1, source, destination, end + 2)


def _ip(text: str, version: int) -> IPAddress:
    ip = ipaddress.ip_address(text)
    if ip.version != version:
        raise ValueError(f"{text} is not an IPv{version} address")
    return ip


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 0xFFFF:
        raise ValueError(f"bad port {text!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    head = data[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
    if len(data) < _V2_FIXED:
        return None
    version_command, family_transport = data[12], data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if version_command & 0xF0 != _V2_VERSION:
        raise ProxyHeaderError(f"PROXY v2 header with version {version_command >> 4} (expected 2)")
    command = version_command & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family not in _ADDRESS_SIZE or transport not in (0, 1, 2):
        raise ProxyHeaderError(f"PROXY v2 header with unknown address family/transport 0x{family_transport:02x}")
    if command == _CMD_PROXY and length < _ADDRESS_SIZE[family]:
        raise ProxyHeaderError(f"PROXY v2 header too short for its addresses ({length} bytes)")
    total = _V2_FIXED + length
    if len(data) < total:
        return None
    if command == _CMD_LOCAL or family in (_AF_UNSPEC, _AF_UNIX):
        return ProxyHeader(2, None, None, total, Transport(transport), local=command == _CMD_LOCAL)
    body = data[_V2_FIXED:total]
    if family == _AF_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        source = Address(ipaddress.IPv4Address(src), sport)
        destination = Address(ipaddress.IPv4Address(dst), dport)
    else:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        source = Address(ipaddress.IPv6Address(src), sport)
        destination = Address(ipaddress.IPv6Address(dst), dport)
    return ProxyHeader(2, source, destination, total, Transport(transport))
