"""Errors raised by the Trio layer. Stream problems use trio's own Broken/Closed/BusyResourceError; these carry
the protocol's reason for them (as ``__cause__``) or describe failures of a whole session or of the configuration."""

from __future__ import annotations

from typing import Any

from trio_tunnel.proto.errors import AuthProblem, ErrorCode, ProtocolError, code_name

__all__ = [
    "ConfigError",
    "HandshakeError",
    "LinkSecurityError",
    "NameTakenError",
    "RequestError",
    "SessionClosedError",
    "StreamOpenError",
    "StreamResetError",
    "TunnelError",
    "with_auth_advice",
]


class TunnelError(Exception):
    """Base class of trio-tunnel's own errors."""


class ConfigError(TunnelError):
    """A configuration problem: the message names the file or flag, the key, and the fix."""


class LinkSecurityError(TunnelError):
    """The link cannot be secured as configured (a key that is not the pinned one, a certificate that cannot be
    verified, TLS on one side only): retrying cannot help. The message says what to check and which flag to use."""


class _Coded(TunnelError):
    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """True when the peer never processed the request, so trying again (e.g. on a new session) is safe."""
        return self.code in (ErrorCode.REFUSED, ErrorCode.SHUTTING_DOWN)

    def __str__(self) -> str:
        name = code_name(self.code)
        return f"{self.reason} ({name})" if self.reason else name


class HandshakeError(_Coded):
    """The peer refused the session (bad token, version, not allowed) or the handshake failed.

    ``silent`` is True when the peer was not a trio-tunnel at all (wrong magic bytes; a scanner, say).
    """

    silent: bool = False


class NameTakenError(HandshakeError):
    """Another live client connected with our name and the server gave it our services: stop rather than take
    them back (which would go on forever)."""


class StreamOpenError(_Coded):
    """The peer answered our OPEN with OPEN_ERR (target refused, not allowed, timeout, ...)."""


class StreamResetError(_Coded):
    """The peer reset the stream; ``code`` CONN_RESET means the far TCP peer sent a RST."""


class SessionClosedError(_Coded):
    """The session ended (GOAWAY, transport lost, protocol error, keepalive timeout)."""


class RequestError(TunnelError):
    """A CTRL request was answered with an error code."""

    def __init__(self, code: int, body: Any = None) -> None:
        super().__init__(code, body)
        self.code = code
        self.body = body

    def __str__(self) -> str:
        detail = self.body.get("message") if isinstance(self.body, dict) else self.body
        return f"{code_name(self.code)}: {detail}" if detail else code_name(self.code)


_AUTH_ADVICE: dict[AuthProblem, str] = {
    AuthProblem.TOKEN_REJECTED: "check --token, --token-file or TRIO_TUNNEL_TOKEN on both sides",
    AuthProblem.TOKEN_MISSING: "pass --token, --token-file or TRIO_TUNNEL_TOKEN",
    AuthProblem.TOKEN_UNEXPECTED: "drop the client's token only if the server really runs with --insecure-no-auth",
}


def with_auth_advice(code: int, reason: str, *, by_peer: bool, error: ProtocolError | None) -> str:
    """The protocol layer's messages do not know the command line: add the flags to check to an authentication
    failure. Ours carry an AuthProblem; the only AUTH refusal a server sends is a token it does not accept."""
    problem = error.auth_problem if error is not None else None
    if problem is None and by_peer and code == ErrorCode.AUTH:
        problem = AuthProblem.TOKEN_REJECTED
    advice = _AUTH_ADVICE.get(problem) if problem is not None else None
    if advice is None or advice in reason:  # (an older peer may have said it already)
        return reason
    return f"{reason} ({advice})"
