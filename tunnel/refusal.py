"""A ``-R`` service the server refused: the word the ``refused NAME REASON`` line carries, whether asking again can
help, and the error that ends a client run with ``--exit-on-refusal``.

A refusal used to be one log line on stderr while stdout kept saying ``connected``: a supervisor or a script saw a
healthy client that exposed nothing. Now it is a lifecycle line with a machine-readable reason (the protocol's
error code in lower case: ``address_in_use``, ``prohibited``, ``connect_failed``; an unknown code N is ``code_N``),
and the client either retries (a port in use may be freed) or, when asked to, stops.
"""

from __future__ import annotations

import logging
from typing import Final

import attrs
from trio_tunnel.proto import ErrorCode, code_name

from .console import announce
from .errors import RequestError, TunnelError

__all__ = ["HEALABLE", "Refusals", "ServiceRefusedError", "can_heal", "reason_word"]

HEALABLE: Final = frozenset({ErrorCode.ADDRESS_IN_USE})
"""Refusals that may go away by themselves: whoever holds the port may let it go (an old client's listener in its
last moments, another program). Policy refusals (PROHIBITED) and bad requests stay refused, so asking again would
only add load."""


def reason_word(code: int) -> str:
    """The REASON of ``refused NAME REASON``: the error code's name in lower case, one word."""
    return code_name(code).lower().replace(" ", "_")


def can_heal(code: int) -> bool:
    """True when asking the server again later may succeed."""
    return code in HEALABLE


class ServiceRefusedError(TunnelError):
    """The server refused a service and the client runs with ``--exit-on-refusal``: the run ends (exit 1)."""

    def __init__(self, name: str, code: int, message: str) -> None:
        super().__init__(name, code, message)
        self.name = name
        self.code = code
        self.message = message

    def __str__(self) -> str:
        detail = f": {self.message}" if self.message else ""
        reason = reason_word(self.code)
        return f"the server refused the service {self.name} ({reason}{detail}); stopping (--exit-on-refusal)"


@attrs.define
class Refusals:
    """The client's side of refused services: one ``refused NAME REASON`` line per service, reason and link (a
    retry that meets the same refusal logs at info level only), and the end of the run with ``exit_on_refusal``."""

    exit_on_refusal: bool
    logger: logging.Logger
    last: dict[str, str] = attrs.field(factory=dict)
    """Service name -> the reason of its last ``refused`` line on the current link."""

    def new_link(self) -> None:
        self.last.clear()

    def exposed(self, name: str) -> None:
        self.last.pop(name, None)

    def refused(self, name: str, exc: RequestError) -> None:
        """Report the server's refusal of service ``name``.

        Raises:
            ServiceRefusedError: with ``exit_on_refusal``.
        """
        reason = reason_word(exc.code)
        if self.last.get(name) != reason:
            self.last[name] = reason
            announce(f"refused {name} {reason}")
            retry = " (asking again with the reconnect backoff)" if can_heal(exc.code) else ""
            self.logger.error("the server refused to expose %s: %s%s", name, exc, retry)
        else:
            self.logger.info("the server still refuses to expose %s: %s", name, exc)
        if self.exit_on_refusal:
            message = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
            raise ServiceRefusedError(name, exc.code, str(message or ""))
