"""Tokens (from flags, the environment and token files) and client names."""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from typing import Final

from trio_tunnel.errors import ConfigError

from .fields import Rule

logger = logging.getLogger("trio_tunnel.config")

MIN_TOKEN_LENGTH: Final = 16
"""Tokens shorter than this are accepted with a warning."""

MAX_NAME_LENGTH: Final = 64
"""Longest client name (the client's identity on the server)."""

_TOKEN_HINT: Final = 'make one with: python3 -c "import secrets; print(secrets.token_urlsafe(32))"'

_CLIENT_NAME_RE: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_NAME_LENGTH}}}")


# --------------------------------------------------------------------------------------------------------------------
# Tokens and names


def parse_token(text: str, *, source: str) -> bytes:
    """One token: the UTF-8 bytes of ``text`` without surrounding whitespace.

    ``source`` names where it came from (a flag, a file, an environment variable) for messages; the token itself is
    never logged. A token shorter than 16 characters is accepted with a warning.

    Raises:
        ConfigError: the token is empty.
    """
    token = text.strip()
    if not token:
        raise ConfigError(f"{source}: the token is empty; {_TOKEN_HINT}")
    if len(token) < MIN_TOKEN_LENGTH:
        logger.warning(
            "%s: the token is only %d characters long; use at least %d (%s)",
            source,
            len(token),
            MIN_TOKEN_LENGTH,
            _TOKEN_HINT,
        )
    return token.encode("utf-8")


def parse_token_list(text: str, *, source: str) -> tuple[bytes, ...]:
    """Comma-separated tokens (the form of ``TRIO_TUNNEL_TOKEN``); a token itself cannot contain a comma."""
    return tuple(parse_token(part, source=source) for part in text.split(","))


def read_token_file(path: str | os.PathLike[str]) -> tuple[bytes, ...]:
    """Tokens from a file: one per line; blank lines and lines starting with ``#`` are ignored.

    Logs a warning when the file is readable by other users.

    Raises:
        ConfigError: the file cannot be read or holds no token.
    """
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: token file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: token file is not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read token file: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s: token file is accessible by other users; run: chmod 600 %s", path, path)
    tokens = tuple(
        parse_token(line, source=f"{path}:{number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise ConfigError(f"{path}: token file holds no token (one per line); {_TOKEN_HINT}")
    return tokens


def default_client_name() -> str:
    """This host's name, reduced to ``[A-Za-z0-9._-]`` and 64 characters (``client`` if nothing is left)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:MAX_NAME_LENGTH].strip("-")
    return name or "client"


CLIENT_NAME: Final = Rule(
    types=(str,),
    expected=f"a client name is 1-{MAX_NAME_LENGTH} characters of A-Z a-z 0-9 . _ -",
    plain=f"client name {{value!r}} must be 1-{MAX_NAME_LENGTH} characters of A-Z a-z 0-9 . _ -",
    wrong_type="client name {value!r} must be a string",
    file="{expected}",
    file_wrong_type="expected a string, got {got}",
    problem=lambda name: None if _CLIENT_NAME_RE.fullmatch(name) else "no",
)
"""The client's name: from ``--name``, ``name`` in ``[client]``, or :func:`default_client_name`."""
