"""The parent/worker channel of ``server --workers N`` (tunnel/ipc.py): the frame codec sans I/O, then
requests, replies and posts over a memory stream pair."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from trio_tunnel.errors import TunnelError
from trio_tunnel.ipc import MAX_FRAME, Channel, ChannelClosedError, Decoder, IpcError, encode


def test_frames_split_anywhere_decode_to_the_same_messages() -> None:
    messages = [{"op": "claim", "id": 1, "name": "home", "token": b"\x00" * 32}, {"op": "ready", "pid": 7}]
    data = b"".join(encode(m) for m in messages)
    assert data[:4] == struct.pack(">I", len(data) - len(encode(messages[1])) - 4)
    for cut in range(len(data) + 1):
        decoder = Decoder()
        assert decoder.feed(data[:cut]) + decoder.feed(data[cut:]) == messages
    decoder = Decoder()
    got = [m for byte in data for m in decoder.feed(bytes([byte]))]
    assert got == messages and not decoder.buffer


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (struct.pack(">I", MAX_FRAME + 1), "over the"),
        (struct.pack(">I", 1) + b"\xc1", "not msgpack"),
        (struct.pack(">I", 2) + b"\x91\x01", "not a message"),
        (struct.pack(">I", 1) + msgpack.packb({}), "not a message"),
    ],
)
def test_what_is_not_a_frame_is_refused(data: bytes, error: str) -> None:
    with pytest.raises(IpcError, match=error):
        Decoder().feed(data)


def test_a_message_too_large_is_not_sent() -> None:
    with pytest.raises(IpcError, match="over the"):
        encode({"op": "status", "blob": b"x" * (MAX_FRAME + 1)})


async def test_requests_replies_and_posts_both_ways_in_order() -> None:
    with trio.fail_after(5):
        left_stream, right_stream = trio.testing.memory_stream_pair()
        posts: list[dict[str, Any]] = []

        async def answer(message: dict[str, Any]) -> dict[str, Any]:
            if message["op"] == "fail":
                raise TunnelError("no such thing")
            await trio.sleep(0.01 if message["op"] == "slow" else 0)
            return {"echo": message.get("x")}

        left = Channel(left_stream, answer, posts.append, name="left")
        right = Channel(right_stream, answer, lambda m: None, name="right")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.run)
            nursery.start_soon(right.run)
            right.post("release", name="a")
            right.post("release", name="b")
            assert (await right.request("echo", x=1))["echo"] == 1
            assert [p["name"] for p in posts] == ["a", "b"]  # posts made before a request arrive before it
            results: dict[str, Any] = {}

            async def ask(op: str, x: int) -> None:
                results[op] = (await left.request(op, x=x))["echo"]

            async with trio.open_nursery() as inner:  # concurrent requests: each gets its own reply
                inner.start_soon(ask, "slow", 2)
                inner.start_soon(ask, "fast", 3)
            assert results == {"slow": 2, "fast": 3}
            with pytest.raises(IpcError, match="no such thing"):
                await left.request("fail")
            nursery.cancel_scope.cancel()


async def test_a_request_fails_when_the_other_end_goes_away() -> None:
    with trio.fail_after(5):
        left_stream, right_stream = trio.testing.memory_stream_pair()
        never = trio.Event()

        async def hang(message: dict[str, Any]) -> dict[str, Any]:
            await never.wait()
            return {}

        left = Channel(left_stream, hang, lambda m: None, name="left")
        right = Channel(right_stream, hang, lambda m: None, name="right")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.run)
            nursery.start_soon(right.run)

            async def close_soon() -> None:
                await trio.testing.wait_all_tasks_blocked()
                await right_stream.aclose()

            nursery.start_soon(close_soon)
            with pytest.raises(ChannelClosedError):
                await left.request("replace", name="home")
            await left.closed.wait()
            with pytest.raises(ChannelClosedError):
                left.post("release", name="home")
            nursery.cancel_scope.cancel()
