"""The error family of the sans-I/O protocol.

Two kinds of failure, split by who is at fault (as h11 does):

* :class:`LocalProtocolError`: *we* misused the API (sending on a closed stream, opening a stream before the
  handshake finished, ...). It is a bug in the caller, raised synchronously from the offending method.
* :class:`RemoteProtocolError`: *the peer* broke the protocol (a malformed frame, a window overrun, a stream it
  may not open). The connection never raises it out of :meth:`Connection.receive_data`; instead it queues a
  GOAWAY (or a REFUSE during the handshake) carrying :attr:`ProtocolError.code` and a readable reason, and reports
  a :class:`~trio_tunnel.proto.ConnectionTerminated` event that holds the error.

Both carry an :class:`ErrorCode`, the same table that RST, OPEN_ERR, GOAWAY and REFUSE put on the wire.
"""

from __future__ import annotations

import enum

__all__ = [
    "AuthProblem",
    "code_name",
    "ErrorCode",
    "FlowControlError",
    "FrameSizeError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(enum.IntEnum):
    """Codes shared by RST, OPEN_ERR, GOAWAY and REFUSE (docs/PROTOCOL.md, "Error codes")."""

    NO_ERROR = 0
    PROTOCOL = 1
    INTERNAL = 2
    FLOW_CONTROL = 3
    STREAM_LIMIT = 4
    REFUSED = 5
    """The stream was never processed; opening it again (on this or the next session) is safe."""
    CANCEL = 6
    CONNECT_FAILED = 7
    CONNECT_TIMEOUT = 8
    PROHIBITED = 9
    UNKNOWN_ROUTE = 10
    CONN_RESET = 11
    """A TCP reset carried end to end."""
    STREAM_CLOSED = 12
    ENHANCE_YOUR_CALM = 13
    AUTH = 14
    VERSION = 15
    FRAME_SIZE = 16
    IDLE_TIMEOUT = 17
    SHUTTING_DOWN = 18
    NAME_NOT_FOUND = 19
    """A forward target's host name did not resolve."""
    NAME_IN_USE = 20
    """The client name is held by a live session (or bound to another token): retry later, or pick another name."""
    ADDRESS_IN_USE = 22
    """A listening address (an exposed service's port) is taken; asking again later may succeed."""
    GROUP_TOKEN = 26
    """A load-balancing group belongs to clients that authenticated with another token."""
    GROUP_MISMATCH = 27
    """A load-balancing group exists with other settings (bind address, port, balance) than the request's."""

    @classmethod
    def parse(cls, value: int) -> ErrorCode | int:
        """Return the enum member for ``value``, or ``value`` itself for a code this version does not know."""
        try:
            return cls(value)
        except ValueError:
            return value


def code_name(code: int) -> str:
    """A readable name for any code, known or not (``"PROTOCOL"``, ``"code 4711"``)."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


class AuthProblem(enum.Enum):
    """Why authentication failed, on an error with code AUTH (:attr:`ProtocolError.auth_problem`).

    The messages of this layer are neutral: it does not know how the caller configures tokens. A caller with a
    command line maps these to its own advice (which flag or variable to check).
    """

    TOKEN_REJECTED = "token rejected"
    """Server side: the client's MAC matched none of the tokens this server accepts."""
    TOKEN_MISSING = "token missing"
    """Client side: the server requires a token and this client has none."""
    TOKEN_UNEXPECTED = "token unexpected"
    """Client side: this client has a token but the server does not authenticate (it may be an impostor)."""
    PROOF_MISMATCH = "proof mismatch"
    """Client side: the server could not prove it knows the token."""


class ProtocolError(Exception):
    """Base class of every error the protocol raises. Never instantiated directly.

    Attributes:
        code: the :class:`ErrorCode` that goes on the wire for this error.
        reason: a readable sentence for logs and for the peer.
        auth_problem: for an authentication failure, which one (None otherwise).
    """

    code: ErrorCode
    reason: str
    auth_problem: AuthProblem | None

    def __init__(
        self, reason: str, code: ErrorCode = ErrorCode.PROTOCOL, *, auth_problem: AuthProblem | None = None
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("tried to directly instantiate ProtocolError")
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.auth_problem = auth_problem

    def __str__(self) -> str:
        return f"{self.reason} ({self.code.name})"


class LocalProtocolError(ProtocolError):
    """The caller used the API in a way the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection is closed with :attr:`code`."""


class FrameSizeError(RemoteProtocolError):
    """A frame's prefix announced a header or payload above the agreed limits; nothing of it was buffered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, ErrorCode.FRAME_SIZE)


class FlowControlError(RemoteProtocolError):
    """The peer sent more bytes on a stream than the window we granted it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, ErrorCode.FLOW_CONTROL)
