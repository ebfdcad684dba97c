"""The handshake and its authentication (docs/PROTOCOL.md section 5), as one small state machine. Sans-I/O.

Everything that changes the handshake's state lives here (h11's rule): the preamble, HELLO, CHALLENGE, AUTH,
WELCOME, the HMAC transcripts and the peer's declared limits. :class:`~.connection.Connection` feeds it the frames
that arrive before the handshake is done, queues the frame it answers with, and switches to the stream protocol
once :attr:`Handshake.done` is true. A REFUSE ends the connection, so the connection handles that one itself.

The messages of the errors raised here are neutral (this layer does not know the command line): an authentication
failure carries an :class:`~.errors.AuthProblem` instead, which the caller may map to advice of its own.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import attrs

from . import frames as F
from .errors import AuthProblem, ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import ACCEPT_BACKLOG, Limits

__all__ = ["AUTH_HMAC", "AUTH_NONE", "PROTOCOL_VERSION", "Handshake", "PeerLimits", "Step"]

PROTOCOL_VERSION: Final = 2
"""2: the HMAC transcripts end with the channel binding (docs/PROTOCOL.md 5.1). Version 1 had none."""
AUTH_HMAC: Final = "hmac-sha256"
AUTH_NONE: Final = "none"
_CLIENT_LABEL: Final = b"trio-tunnel/2 client\x00"
_SERVER_LABEL: Final = b"trio-tunnel/2 server\x00"
_MAX_USED_PAYLOAD: Final = 16 * 1024 * 1024
"""We cap the peer's declared frame payload at this (a bigger frame only costs memory, docs/PROTOCOL.md 5.3)."""


@attrs.frozen(kw_only=True)
class PeerLimits:
    """The peer's declared limits as this side uses them.

    The defaults are written here once: they are what docs/PROTOCOL.md (section 5.3, "if absent") assumes for a key
    the peer left out, and what the connection assumes before the peer's HELLO or WELCOME has arrived.
    """

    max_frame_payload: int = 16 * 1024
    initial_window: int = 64 * 1024
    max_streams: int = 1
    accept_backlog: int = ACCEPT_BACKLOG
    """The same as ours by default: the reference default and the "if absent" value agree."""

    @classmethod
    def parse(cls, declared: Mapping[str, int]) -> PeerLimits:
        """Validate a HELLO's or WELCOME's limits map and clamp what we use of it. Unknown keys are ignored."""
        absent = cls()
        payload = declared.get("max_frame_payload", absent.max_frame_payload)
        window = declared.get("initial_window", absent.initial_window)
        streams = declared.get("max_streams", absent.max_streams)
        if payload < 1024 or window < 1024 or streams < 1:
            raise RemoteProtocolError(
                "peer limits too small (max_frame_payload and initial_window must be >= 1024, max_streams >= 1)"
            )
        return cls(
            max_frame_payload=min(payload, _MAX_USED_PAYLOAD),
            initial_window=min(window, F.SID_LIMIT - 1),
            max_streams=streams,
            accept_backlog=max(1, declared.get("accept_backlog", absent.accept_backlog)),
        )


class Step(enum.Enum):
    """What the handshake waits for next."""

    AWAIT_PREAMBLE = enum.auto()  # server
    AWAIT_HELLO = enum.auto()  # server
    AWAIT_AUTH = enum.auto()  # server
    AWAIT_CHALLENGE = enum.auto()  # client
    AWAIT_WELCOME = enum.auto()  # client
    DONE = enum.auto()


def _mac(token: bytes, message: bytes) -> bytes:
    return hmac.new(token, message, hashlib.sha256).digest()


class Handshake:
    """One side of the handshake. The client speaks first: :meth:`start` gives its preamble and HELLO.

    Args:
        client: which side this is.
        limits: ours, declared in HELLO (client) or WELCOME (server).
        name: the client's identity (client only).
        token: the client's shared secret (client only).
        tokens: the secrets the server accepts; empty means no authentication (server only).
        random_bytes: source of nonces and session ids.
    """

    def __init__(
        self,
        *,
        client: bool,
        limits: Limits,
        name: str,
        token: bytes | None,
        tokens: Sequence[bytes],
        random_bytes: Callable[[int], bytes],
        binding: bytes = b"",
    ) -> None:
        if len(binding) > 255:
            raise ValueError("a channel binding is at most 255 bytes")
        self._binding = binding
        self._client = client
        self._limits = limits
        self._name = name
        self._token = token
        self._tokens = tuple(tokens)
        self._random = random_bytes
        self.step = Step.AWAIT_CHALLENGE if client else Step.AWAIT_PREAMBLE
        self._client_nonce = b""
        self._server_nonce = b""
        self._auth_method = ""
        self._matched_token: bytes | None = None
        self.session_id = ""
        self.peer_name = ""
        self.peer_limits: dict[str, int] = {}
        """The peer's limits map as it sent it (unknown keys included), for :class:`~.events.HandshakeComplete`."""
        self.peer = PeerLimits()
        """What we use of the peer's limits (the assumed values until its map arrives)."""
        self.authenticated = False

    @property
    def matched_token(self) -> bytes | None:
        """Server side: the accepted token the client proved it knows (None without authentication). A server that
        reloads its token list checks live sessions against it."""
        return self._matched_token

    @property
    def token_id(self) -> str:
        """See :attr:`~.events.HandshakeComplete.token_id`."""
        if self._matched_token is None:
            return ""
        return hashlib.sha256(b"trio-tunnel token id\0" + self._matched_token).hexdigest()[:32]

    @property
    def done(self) -> bool:
        return self.step is Step.DONE

    @property
    def can_refuse(self) -> bool:
        """A server may answer with REFUSE once the client proved, by its preamble, that it speaks the protocol."""
        return not self._client and self.step is not Step.AWAIT_PREAMBLE

    def start(self) -> tuple[bytes, F.Hello]:
        """The client's opening: the raw preamble and its HELLO."""
        self._client_nonce = self._random(F.NONCE_SIZE)
        preamble = F.encode_preamble(PROTOCOL_VERSION, PROTOCOL_VERSION)
        return preamble, F.Hello(self._name, self._client_nonce, self._limits.declared())

    def receive_preamble(self, raw: bytes) -> bool:
        """Check the client's preamble (server). False: not a trio-tunnel client at all (wrong magic bytes)."""
        versions = F.parse_preamble(raw)
        if versions is None:
            return False
        high, low = versions
        if not low <= PROTOCOL_VERSION <= high:
            raise RemoteProtocolError(
                f"the client speaks protocol versions {low} to {high}, this server speaks {PROTOCOL_VERSION}: "
                "upgrade the older of the two",
                ErrorCode.VERSION,
            )
        self.step = Step.AWAIT_HELLO
        return True

    def closed_early_reason(self) -> str | None:
        """Why the peer closing the transport now is worth a word of its own (None: nothing special)."""
        if self.step is Step.AWAIT_AUTH:
            return "the client closed the connection instead of authenticating (has it a token?)"
        return None

    def receive(self, frame: F.Frame) -> F.Frame | None:
        """Take one handshake frame (not REFUSE); returns the frame to answer with (None after WELCOME).

        Raises:
            RemoteProtocolError: the peer broke the handshake or failed to authenticate.
            LocalProtocolError: our own configuration cannot go on (a token missing, or one the server ignores).
        """
        step = self.step
        if step is Step.AWAIT_HELLO and isinstance(frame, F.Hello):
            return self._on_hello(frame)
        if step is Step.AWAIT_AUTH and isinstance(frame, F.Auth):
            return self._on_auth(frame)
        if step is Step.AWAIT_CHALLENGE and isinstance(frame, F.Challenge):
            return self._on_challenge(frame)
        if step is Step.AWAIT_WELCOME and isinstance(frame, F.Welcome):
            self._on_welcome(frame)
            return None
        raise RemoteProtocolError(f"unexpected {type(frame).__name__.upper()} frame during the handshake")

    def _take_limits(self, declared: Mapping[str, int]) -> None:
        self.peer = PeerLimits.parse(declared)
        self.peer_limits = dict(declared)

    def _transcript(self, label: bytes, extra: bytes = b"") -> bytes:
        name = (self._name if self._client else self.peer_name).encode()
        binding = len(self._binding).to_bytes(1, "big") + self._binding
        head = label + self._client_nonce + self._server_nonce
        return head + len(name).to_bytes(2, "big") + name + binding + extra

    def _on_hello(self, hello: F.Hello) -> F.Frame:
        if len(hello.nonce) != F.NONCE_SIZE:
            raise RemoteProtocolError(f"HELLO nonce must be {F.NONCE_SIZE} bytes")
        self.peer_name = hello.name
        self._client_nonce = hello.nonce
        self._take_limits(hello.limits)
        self._server_nonce = self._random(F.NONCE_SIZE)
        self._auth_method = AUTH_HMAC if self._tokens else AUTH_NONE
        self.step = Step.AWAIT_AUTH
        return F.Challenge(PROTOCOL_VERSION, self._server_nonce, self._auth_method)

    def _on_auth(self, auth: F.Auth) -> F.Frame:
        if self._auth_method == AUTH_HMAC:
            message = self._transcript(_CLIENT_LABEL)
            matched = None
            for token in self._tokens:  # check all, so timing does not tell which one matched
                if hmac.compare_digest(_mac(token, message), auth.mac) and matched is None:
                    matched = token
            if matched is None:
                raise RemoteProtocolError(
                    "authentication failed: the client's token is not one this server accepts"
                    + (
                        " (or a relay between client and server terminates TLS with a certificate of its own: the "
                        "client's proof is bound to the certificate it saw)"
                        if self._binding
                        else ""
                    ),
                    ErrorCode.AUTH,
                    auth_problem=AuthProblem.TOKEN_REJECTED,
                )
            self._matched_token = matched
        self.session_id = self._random(12).hex()
        proof = b""
        if self._matched_token is not None:
            proof = _mac(self._matched_token, self._transcript(_SERVER_LABEL, self.session_id.encode()))
        self._finish(authenticated=self._matched_token is not None)
        return F.Welcome(self.session_id, self._limits.declared(), proof)

    def _on_challenge(self, challenge: F.Challenge) -> F.Frame:
        if challenge.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"server chose protocol version {challenge.version}", ErrorCode.VERSION)
        if len(challenge.nonce) != F.NONCE_SIZE:
            raise RemoteProtocolError(f"CHALLENGE nonce must be {F.NONCE_SIZE} bytes")
        self._server_nonce = challenge.nonce
        self._auth_method = challenge.method
        if challenge.method == AUTH_HMAC:
            if self._token is None:
                raise LocalProtocolError(
                    "the server requires a token and this client has none",
                    ErrorCode.AUTH,
                    auth_problem=AuthProblem.TOKEN_MISSING,
                )
            mac = _mac(self._token, self._transcript(_CLIENT_LABEL))
        elif challenge.method == AUTH_NONE:
            if self._token is not None:
                raise LocalProtocolError(
                    "the server does not authenticate, but this client has a token: refusing to connect, since a "
                    "server that cannot prove it knows the token may be an impostor",
                    ErrorCode.AUTH,
                    auth_problem=AuthProblem.TOKEN_UNEXPECTED,
                )
            mac = b""
        else:
            raise RemoteProtocolError(f"unknown authentication method {challenge.method!r}", ErrorCode.AUTH)
        self.step = Step.AWAIT_WELCOME
        return F.Auth(mac)

    def _on_welcome(self, welcome: F.Welcome) -> None:
        self.session_id = welcome.session_id
        if self._auth_method == AUTH_HMAC:
            assert self._token is not None
            expected = _mac(self._token, self._transcript(_SERVER_LABEL, welcome.session_id.encode()))
            if not hmac.compare_digest(expected, welcome.proof):
                raise RemoteProtocolError(
                    "the server could not prove it knows the token: wrong server address, or someone in between",
                    ErrorCode.AUTH,
                    auth_problem=AuthProblem.PROOF_MISMATCH,
                )
        self._take_limits(welcome.limits)
        self._finish(authenticated=self._auth_method == AUTH_HMAC)

    def _finish(self, *, authenticated: bool) -> None:
        self.step = Step.DONE
        self.authenticated = authenticated
