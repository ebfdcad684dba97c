"""trio-tunnel's wire protocol, sans-I/O: bytes in, events and bytes out. No trio, no sockets, no clock.

The whole public API is re-exported here; docs/PROTOCOL.md is the wire specification.
"""

from .connection import PROTOCOL_VERSION, Connection, ConnectionState, ConnectionStatistics, Role
from .errors import (
    AuthProblem,
    ErrorCode,
    FlowControlError,
    FrameSizeError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    code_name,
)
from .events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    StreamAccepted,
    StreamCreditGranted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    WindowUpdated,
)
from .limits import Limits, RateLimit
from .stream import StreamState

__all__ = [
    "PROTOCOL_VERSION",
    "AuthProblem",
    "Connection",
    "ConnectionState",
    "ConnectionStatistics",
    "ConnectionTerminated",
    "DataReceived",
    "ErrorCode",
    "Event",
    "FlowControlError",
    "FrameSizeError",
    "GoAwayReceived",
    "HandshakeComplete",
    "Limits",
    "LocalProtocolError",
    "PongReceived",
    "ProtocolError",
    "RateLimit",
    "RemoteProtocolError",
    "ReplyReceived",
    "RequestReceived",
    "Role",
    "StreamAccepted",
    "StreamCreditGranted",
    "StreamEnded",
    "StreamOpened",
    "StreamRejected",
    "StreamReset",
    "StreamState",
    "WindowUpdated",
    "code_name",
]
