"""proto/proxyheader.py against HAProxy's proxy-protocol.txt: the spec's own v1 example line and worst cases, v2
headers built byte by byte from the spec's layout table (not from the encoder), and the parser's refusals."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from trio_tunnel.proto.proxyheader import (
    MAX_V1_LINE,
    V2_SIGNATURE,
    Address,
    ProxyHeader,
    ProxyHeaderError,
    Transport,
    encode,
    encode_v1,
    encode_v2,
    parse,
)


def addr(host: str, port: int) -> Address:
    return Address(ipaddress.ip_address(host), port)


# The signature as the spec writes it: \x0D \x0A \x0D \x0A \x00 \x0D \x0A \x51 \x55 \x49 \x54 \x0A
SPEC_SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def test_signature_is_the_specs() -> None:
    assert V2_SIGNATURE == SPEC_SIGNATURE


def test_v1_spec_example_round_trip() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"  # the spec's example (section 2.1)
    assert encode_v1(addr("192.168.0.1", 56324), addr("192.168.0.11", 443)) == line
    header = parse(line + b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n")
    assert header == ProxyHeader(1, addr("192.168.0.1", 56324), addr("192.168.0.11", 443), len(line))


def test_v1_ipv6() -> None:
    line = b"PROXY TCP6 2001:db8::1 2001:db8::11 56324 443\r\n"
    assert encode_v1(addr("2001:db8::1", 56324), addr("2001:db8::11", 443)) == line
    header = parse(line)
    assert header is not None and header.source == addr("2001:db8::1", 56324) and header.length == len(line)


def test_v1_worst_cases_fit_the_spec_bounds() -> None:
    # The spec: 56 characters for TCP4, 104 for TCP6, 107 for UNKNOWN with full addresses (CRLF included).
    four = encode_v1(addr("255.255.255.255", 65535), addr("255.255.255.255", 65535))
    assert len(four) == 56
    six = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    assert len(encode_v1(addr(six, 65535), addr(six, 65535))) == 104
    unknown = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(unknown) == MAX_V1_LINE
    assert parse(unknown) == ProxyHeader(1, None, None, MAX_V1_LINE)


def test_v1_unknown() -> None:
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert parse(b"PROXY UNKNOWN\r\nrest") == ProxyHeader(1, None, None, 15)


def test_v1_mixed_families_become_ipv6() -> None:
    # A header has one family; an IPv4 end next to an IPv6 one is written IPv4-mapped.
    line = encode_v1(addr("192.0.2.1", 1), addr("2001:db8::2", 2))
    assert line.startswith(b"PROXY TCP6 ") and line.endswith(b" 2001:db8::2 1 2\r\n")
    header = parse(line)
    assert header is not None and header.source == Address(ipaddress.IPv6Address("::ffff:192.0.2.1"), 1)


def test_address_of_maps_dual_stack_addresses_back_to_ipv4() -> None:
    assert Address.of("::ffff:192.0.2.7", 80) == addr("192.0.2.7", 80)
    assert Address.of("fe80::1%eth0", 80) == addr("fe80::1", 80)


@pytest.mark.parametrize("cut", range(1, 46))
def test_v1_prefixes_need_more(cut: int) -> None:
    assert parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
        b"PROXY TCP4 999.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY UNKNOWN " + b"x" * 100,
        b"PROXY \xff\r\n",
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c",
    ],
)
def test_refuses_what_is_not_a_header(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def v2(command: int, family_transport: int, body: bytes) -> bytes:
    """A v2 header built from the spec's table: signature, ver_cmd, fam, len (network order), body."""
    return SPEC_SIGNATURE + bytes([0x20 | command, family_transport]) + struct.pack("!H", len(body)) + body


def test_v2_tcp4_bytes() -> None:
    body = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 51234, 443)
    expected = v2(0x1, 0x11, body)
    assert expected.hex() == "0d0a0d0a000d0a515549540a2111000cc0000201c6336402c82201bb"
    assert encode_v2(addr("192.0.2.1", 51234), addr("198.51.100.2", 443)) == expected
    assert encode("v2", addr("192.0.2.1", 51234), addr("198.51.100.2", 443)) == expected
    assert parse(expected + b"data") == ProxyHeader(2, addr("192.0.2.1", 51234), addr("198.51.100.2", 443), 28)


def test_v2_tcp6_bytes() -> None:
    src, dst = ipaddress.IPv6Address("2001:db8::1"), ipaddress.IPv6Address("2001:db8::2")
    expected = v2(0x1, 0x21, src.packed + dst.packed + struct.pack("!HH", 40000, 8443))
    assert len(expected) == 16 + 36
    assert encode_v2(Address(src, 40000), Address(dst, 8443)) == expected
    assert parse(expected) == ProxyHeader(2, Address(src, 40000), Address(dst, 8443), 52)


def test_v2_udp_bytes() -> None:
    body = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 5353, 53)
    expected = v2(0x1, 0x12, body)
    assert encode_v2(addr("10.0.0.1", 5353), addr("10.0.0.2", 53), transport=Transport.DGRAM) == expected
    header = parse(expected)
    assert header is not None and header.transport is Transport.DGRAM and header.source == addr("10.0.0.1", 5353)


def test_v2_unknown_addresses_are_unspec() -> None:
    assert encode_v2(None, None) == SPEC_SIGNATURE + b"\x21\x00\x00\x00"
    assert parse(SPEC_SIGNATURE + b"\x21\x00\x00\x00") == ProxyHeader(2, None, None, 16, Transport.UNSPEC)


def test_v2_local_command_and_tlvs_are_skipped() -> None:
    # LOCAL (a health check): the receiver uses the connection's own addresses and skips the block.
    local = v2(0x0, 0x00, b"")
    assert parse(local) == ProxyHeader(2, None, None, 16, Transport.UNSPEC, local=True)
    # PROXY with a TLV after the addresses (PP2_TYPE_AUTHORITY 0x02, "example.com"): the length covers it.
    body = bytes([192, 0, 2, 1, 192, 0, 2, 2]) + struct.pack("!HH", 1, 2) + b"\x02\x00\x0bexample.com"
    header = parse(v2(0x1, 0x11, body) + b"payload")
    assert header is not None and header.length == 16 + len(body) and header.destination == addr("192.0.2.2", 2)


def test_v2_needs_more_until_complete() -> None:
    whole = encode_v2(addr("192.0.2.1", 1), addr("192.0.2.2", 2))
    for cut in range(1, len(whole)):
        assert parse(whole[:cut]) is None


@pytest.mark.parametrize(
    ("ver_cmd", "fam", "body", "why"),
    [
        (0x11, 0x11, bytes(12), "version"),
        (0x22, 0x11, bytes(12), "command"),
        (0x21, 0x41, bytes(12), "family"),
        (0x21, 0x13, bytes(12), "family"),
        (0x21, 0x11, bytes(8), "too short"),
        (0x21, 0x21, bytes(12), "too short"),
    ],
)
def test_v2_refusals(ver_cmd: int, fam: int, body: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse(SPEC_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body)


def test_encode_refuses_unknown_versions() -> None:
    with pytest.raises(ValueError, match="v3"):
        encode("v3", None, None)


def test_protocol_md_example_is_what_the_encoder_writes() -> None:
    """docs/PROTOCOL.md 9.1 shows one OPEN metadata's v1 and v2 headers; they must stay what the code writes."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    source, destination = addr("203.0.113.7", 51234), addr("198.51.100.2", 443)
    assert "`" + encode_v1(source, destination).decode().replace("\r\n", "\\r\\n") + "`" in doc
    assert "\n0d0a0d0a000d0a515549540a 21 11 000c cb007107 c6336402 c822 01bb\n" in doc
    assert encode_v2(source, destination).hex() == "0d0a0d0a000d0a515549540a2111000ccb007107c6336402c82201bb"
