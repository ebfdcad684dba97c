"""The datagram framing of UDP flows and the admission of new flows (proto/datagram.py), sans-I/O."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from trio_tunnel.proto import frames as F
from trio_tunnel.proto.datagram import (
    DGRAM_META,
    IDLE_META,
    MAX_DATAGRAM,
    Admission,
    BurstLog,
    DatagramDecoder,
    DatagramError,
    DatagramQueue,
    FlowBudget,
    FlowGate,
    encode_datagram,
    max_datagram,
)
from trio_tunnel.proto.limits import RateLimit

# The vectors of docs/PROTOCOL.md, section 17.
VECTORS = [
    (b"", "0000"),
    (b"hi", "00026869"),
    (bytes(300), "012c" + "00" * 300),
]


@pytest.mark.parametrize(("payload", "hex_"), VECTORS)
def test_vectors(payload: bytes, hex_: str) -> None:
    assert encode_datagram(payload).hex() == hex_
    assert DatagramDecoder(MAX_DATAGRAM).feed(bytes.fromhex(hex_)) == [payload]


def test_boundaries_survive_any_cut() -> None:
    datagrams = [b"", b"a", b"bc" * 700, b"\x00\x01", bytes(range(256))]
    wire = b"".join(map(encode_datagram, datagrams))
    for step in (1, 2, 3, 7, 1000, len(wire)):
        decoder = DatagramDecoder(2000)
        out: list[bytes] = []
        for offset in range(0, len(wire), step):
            out += decoder.feed(wire[offset : offset + step])
            assert decoder.pending <= 2000 + 2
        decoder.end()
        assert out == datagrams


def test_a_length_above_the_limit_is_an_error_before_its_body_arrives() -> None:
    decoder = DatagramDecoder(100)
    assert decoder.feed(encode_datagram(bytes(100))) == [bytes(100)]
    with pytest.raises(DatagramError, match="101 bytes is above the limit of 100"):
        decoder.feed(b"\x00\x65")


def test_a_stream_that_ends_inside_a_datagram_is_an_error() -> None:
    decoder = DatagramDecoder(100)
    assert decoder.feed(b"\x00\x05abc") == []
    with pytest.raises(DatagramError, match="inside a datagram"):
        decoder.end()


def test_encode_refuses_what_the_prefix_cannot_say() -> None:
    with pytest.raises(ValueError, match="above 65535"):
        encode_datagram(bytes(MAX_DATAGRAM + 1))


def test_max_datagram_fits_one_frame() -> None:
    assert max_datagram(65536) == 65534
    assert max_datagram(1 << 20) == MAX_DATAGRAM
    assert max_datagram(1024) == 1022


def test_queue_is_bounded_in_count_and_bytes() -> None:
    queue = DatagramQueue(max_count=3, max_bytes=10)
    assert queue.push(b"1234") and queue.push(b"5678")
    assert not queue.push(b"abc")  # 11 bytes
    assert queue.push(b"ab") and not queue.push(b"")  # count
    assert len(queue) == 3 and queue.nbytes == 10
    assert [queue.pop(), queue.pop(), queue.pop(), queue.pop()] == [b"1234", b"5678", b"ab", None]
    assert queue.nbytes == 0


def test_gate_caps_flows_and_returns_slots() -> None:
    gate = FlowGate(2)
    assert [gate.admit(0.0) for _ in range(3)] == [Admission.OPEN, Admission.OPEN, Admission.SERVICE_FULL]
    gate.release()
    assert gate.admit(0.0) is Admission.OPEN
    assert gate.refused == 1


def test_gate_rate_limits_opens() -> None:
    gate = FlowGate(100, rate=RateLimit(burst=2, rate=1.0))
    assert [gate.admit(5.0) for _ in range(3)] == [Admission.OPEN, Admission.OPEN, Admission.RATE]
    assert gate.admit(5.5) is Admission.RATE
    assert gate.admit(6.0) is Admission.OPEN


def test_client_budget_is_shared_by_its_services() -> None:
    budget = FlowBudget(3)
    a, b = FlowGate(10, budget=budget), FlowGate(10, budget=budget)
    assert [a.admit(0), a.admit(0), b.admit(0), b.admit(0)] == [Admission.OPEN] * 3 + [Admission.CLIENT_FULL]
    a.release()
    assert b.admit(0) is Admission.OPEN and budget.used == 3
    assert b.active == 2 and a.active == 1


def test_burst_log_writes_one_line_per_burst() -> None:
    log = BurstLog(quiet=10.0)
    assert log.note(0.0) == 1
    assert [log.note(t) for t in (0.1, 1.0, 9.9)] == [0, 0, 0]
    assert log.note(10.0) == 4  # the three held back and this one
    assert log.note(10.5) == 0


# --------------------------------------------------------------------------------------------------------------------
# docs/PROTOCOL.md, section 17.1

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
DOC_FRAMES = {
    "three-in-one-frame": F.Data(2, bytes.fromhex("0002686900000003000102")),
    "open-udp-flow": F.Open(2, "dns", {"peer": "203.0.113.7:40000", DGRAM_META: True, IDLE_META: 60000}),
    "open-udp-forward": F.Open(
        1,
        "forward-udp",
        {
            "host": "10.0.0.2",
            "port": 53,
            "name": "resolver",
            "peer": "127.0.0.1:5555",
            DGRAM_META: True,
            IDLE_META: 60000,
        },
    ),
}


def _doc_vectors() -> dict[str, dict[str, str]]:
    vectors: dict[str, dict[str, str]] = {}
    for block in re.findall(r"^```datagram\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL | re.M):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1].isspace():
                fields[key] += line.strip()
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        vectors[fields["name"]] = fields
    return vectors


def test_the_document_vectors() -> None:
    vectors = _doc_vectors()
    assert set(vectors) == {"datagram-hi", "datagram-empty", *DOC_FRAMES}
    for name, fields in vectors.items():
        if "payloads" in fields:
            payloads = [b"" if p.strip() == "-" else bytes.fromhex(p) for p in fields["payloads"].split("|")]
            wire = bytes.fromhex(fields["bytes"].replace(" ", ""))
            assert b"".join(map(encode_datagram, payloads)) == wire, name
            assert DatagramDecoder(MAX_DATAGRAM).feed(wire) == payloads, name
        if "hex" in fields:
            assert F.encode(DOC_FRAMES[name]).hex() == fields["hex"].replace(" ", ""), name
