"""A ``-R`` service the server refused: the word the ``refused NAME REASON`` line carries, whether asking again can
help, and the error that ends a client run with ``--exit-on-refusal``.

A refusal used to be one log line on stderr while stdout kept saying ``connected``: a supervisor or a script saw a
healthy client that exposed nothing. Now it is a lifecycle line with a machine-readable reason (the protocol's
error code in lower case: ``address_in_use``, ``prohibited``, ``connect_failed``; an unknown code N is ``code_N``),
and the client either retries (a port in use may be freed) or, when asked to, stops.
"""

from __future__ import annotations

from typing import Final

from trio_tunnel.proto import ErrorCode, code_name

from .errors import TunnelError

__all__ = ["HEALABLE", "ServiceRefusedError", "can_heal", "reason_word"]

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
