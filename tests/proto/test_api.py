"""The small public helpers: error codes and the error family, Limits validation and what a side declares."""

from __future__ import annotations

import pytest
from trio_tunnel.proto import (
    ErrorCode,
    FlowControlError,
    FrameSizeError,
    Limits,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    code_name,
)


def test_error_code_parse_keeps_unknown_codes() -> None:
    assert ErrorCode.parse(14) is ErrorCode.AUTH
    assert ErrorCode.parse(4711) == 4711


def test_code_name_is_readable_for_any_code() -> None:
    assert code_name(1) == "PROTOCOL"
    assert code_name(4711) == "code 4711"


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError, match="directly instantiate"):
        ProtocolError("x")


def test_error_family() -> None:
    assert issubclass(FlowControlError, RemoteProtocolError) and issubclass(FrameSizeError, RemoteProtocolError)
    assert FlowControlError("x").code == ErrorCode.FLOW_CONTROL
    assert FrameSizeError("x").code == ErrorCode.FRAME_SIZE
    error = LocalProtocolError("misuse", ErrorCode.STREAM_LIMIT)
    assert str(error) == "misuse (STREAM_LIMIT)" and error.reason == "misuse"


def test_limits_defaults_are_the_documented_ones() -> None:
    limits = Limits()
    assert limits.declared() == {
        "max_frame_payload": 65536,
        "initial_window": 262144,
        "max_streams": 256,
        "accept_backlog": 64,
    }
    assert (limits.max_header, limits.send_quantum, limits.max_window, limits.autotune_budget) == (
        1024,
        16384,
        8 * 1024 * 1024,
        32 * 1024 * 1024,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_streams": 0}, "max_streams must be positive"),
        ({"max_frame_payload": 512}, "at least 1 KiB"),
        ({"initial_window": 1 << 20, "max_window": 1 << 19}, "max_window must be at least initial_window"),
        ({"max_header": 64}, "at least 128 bytes"),
    ],
)
def test_limits_reject_unusable_values(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)


def test_proto_does_not_import_trio_sockets_or_a_clock() -> None:
    """Sans-I/O: importing trio_tunnel.proto pulls in no trio and no socket module (checked in a fresh interpreter)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import trio_tunnel.proto, sys; bad = {'trio', 'socket', 'asyncio'} & set(sys.modules); assert not bad, bad"
    root = Path(__file__).resolve().parents[2]
    # Without the suite's PYTHONPATH: its sitecustomize (the resolver guard) imports socket itself.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
