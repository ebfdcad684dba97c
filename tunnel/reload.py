"""Reloading a running server or client on SIGHUP: what changed between two configs, and the one-line outcome.

The diff is pure (no sockets, no trio): :func:`plan_client` and :func:`plan_server` compare the running config
with the newly read one and say what has to happen, so the rules are unit-tested without a network. The server
and the client apply a plan themselves (they own the listeners and the link); :func:`reload_on_sighup` runs the
signal loop around them and prints the outcome: ``reloaded``, or ``reload-failed REASON`` when anything in the
new config cannot be used, in which case nothing has changed.

Why a plan rather than "restart the changed parts": the point of a reload is that everything that did not change
keeps going untouched. Only three client settings (``server``, ``name``, the token, and the link's TLS trust:
``server_fingerprint``, ``tls_ca``, ``insecure_plaintext``) define the link itself; any other change is applied on
the live link, service by service.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final, TypeVar

import attrs
import trio

from .config import ClientConfig, LocalSpec, RemoteSpec, ServerConfig
from .console import announce
from .errors import ConfigError, TunnelError

__all__ = [
    "ClientPlan",
    "ReloadError",
    "ServerPlan",
    "plan_client",
    "plan_server",
    "reload_on_signals",
    "sighup_receiver",
]

logger: Final = logging.getLogger(__name__)

C = TypeVar("C", ClientConfig, ServerConfig)

LINK_KEYS: Final = ("server", "name", "token", "server_fingerprint", "tls_ca", "insecure_plaintext")
"""Client settings that define the link: a change makes a new link (the old one's connections end)."""

FIXED_SERVER_KEYS: Final = ("listen", "state_dir", "insecure_plaintext", "workers")
"""Server settings a reload cannot change: the link port stays bound, and the link's security stays what live and
new clients were told. Changing one of them needs a restart; a reload that tries fails and changes nothing."""


class ReloadError(TunnelError):
    """The new config cannot be applied to the running process (the message says why); nothing changed."""


# ---------------------------------------------------------------------------------------------------- client


@attrs.frozen
class ClientPlan:
    """What a client does to go from its running config to a new one. Services and forwards are keyed by name."""

    relink: tuple[str, ...] = ()
    """The link settings that changed (:data:`LINK_KEYS`); non-empty: reconnect with the new ones."""
    expose: tuple[RemoteSpec, ...] = ()
    """Services added: expose them."""
    unexpose: tuple[RemoteSpec, ...] = ()
    """Services removed (their running specs): release their public ports."""
    reexpose: tuple[tuple[RemoteSpec, RemoteSpec], ...] = ()
    """(running, new) services whose public side (``bind``, ``remote_port``) changed: register them again."""
    retarget: tuple[RemoteSpec, ...] = ()
    """Services whose local target alone changed: new connections go to the new target; the public port stays."""
    forward: tuple[LocalSpec, ...] = ()
    """Forwards added: listen for them."""
    unforward: tuple[LocalSpec, ...] = ()
    """Forwards removed (their running specs): stop listening."""
    reforward: tuple[tuple[LocalSpec, LocalSpec], ...] = ()
    """(running, new) forwards whose listening address changed: listen again."""
    retarget_forwards: tuple[LocalSpec, ...] = ()
    """Forwards whose target alone changed: new connections ask the server for the new target."""

    @property
    def services_changed(self) -> bool:
        return bool(self.expose or self.unexpose or self.reexpose or self.retarget)

    @property
    def forwards_changed(self) -> bool:
        return bool(self.forward or self.unforward or self.reforward or self.retarget_forwards)

    def pinned(self, exposed: Mapping[str, tuple[str, int]], listening: Mapping[str, tuple[str, int]]) -> ClientPlan:
        """This plan, where a service or forward whose new address is the one it has now (say a ``remote_port = 0``
        now written as the port it got) is retargeted in place instead of registered or bound again.

        ``exposed``/``listening``: name -> (host, port) actually bound on the server / here."""
        keep_r = [
            (was, now)
            for was, now in self.reexpose
            if exposed.get(was.name) == _public(now)[:2] and _public(was)[2:] == _public(now)[2:]
        ]
        keep_l = [
            (was, now)
            for was, now in self.reforward
            if listening.get(was.name) == _listen(now)[:2] and _listen(was)[2:] == _listen(now)[2:]
        ]
        return attrs.evolve(
            self,
            reexpose=tuple(pair for pair in self.reexpose if pair not in keep_r),
            retarget=self.retarget + tuple(now for _was, now in keep_r),
            reforward=tuple(pair for pair in self.reforward if pair not in keep_l),
            retarget_forwards=self.retarget_forwards + tuple(now for _was, now in keep_l),
        )

    def summary(self) -> str:
        """One line for the log: what the reload does."""
        parts = []
        if self.relink:
            parts.append(f"reconnect ({', '.join(self.relink)} changed)")
        for word, specs in (
            ("expose", self.expose),
            ("unexpose", self.unexpose),
            ("re-expose", [new for _old, new in self.reexpose]),
            ("retarget", self.retarget),
            ("forward", self.forward),
            ("stop forwarding", self.unforward),
            ("re-listen", [new for _old, new in self.reforward]),
            ("retarget forward", self.retarget_forwards),
        ):
            if specs:
                parts.append(f"{word} {', '.join(spec.name for spec in specs)}")
        return "; ".join(parts) or "no change to the link, services or forwards"


def _public(spec: RemoteSpec) -> tuple[object, ...]:
    """What the server holds for a service: a change here registers it again. (A UDP flow's idle timeout is the
    server's to apply, so it is part of it; the local target is the client's alone.)"""
    return spec.bind_host, spec.bind_port, spec.protocol, spec.idle_timeout if spec.protocol == "udp" else None


def _listen(spec: LocalSpec) -> tuple[object, ...]:
    """What a running forward holds: a change here binds it again. A TCP forward reads its target per connection,
    so a new target alone is applied in place; a UDP forward's flows carry theirs, so any change restarts it."""
    if spec.protocol == "udp":
        return spec.bind_host, spec.bind_port, spec.protocol, spec.target_host, spec.target_port, spec.idle_timeout
    return spec.bind_host, spec.bind_port, spec.protocol


def plan_client(old: ClientConfig, new: ClientConfig) -> ClientPlan:
    """The steps from ``old`` to ``new``. Timeouts are not in the plan: they are read when used, so the new ones
    apply from the next connection, dial or link on."""
    relink = tuple(key for key in LINK_KEYS if getattr(old, key) != getattr(new, key))
    old_r = {spec.name: spec for spec in old.remotes}
    new_r = {spec.name: spec for spec in new.remotes}
    old_l = {spec.name: spec for spec in old.locals}
    new_l = {spec.name: spec for spec in new.locals}
    changed_r = [(old_r[name], spec) for name, spec in new_r.items() if name in old_r and old_r[name] != spec]
    changed_l = [(old_l[name], spec) for name, spec in new_l.items() if name in old_l and old_l[name] != spec]
    return ClientPlan(
        relink=relink,
        expose=tuple(spec for name, spec in new_r.items() if name not in old_r),
        unexpose=tuple(spec for name, spec in old_r.items() if name not in new_r),
        reexpose=tuple((was, now) for was, now in changed_r if _public(was) != _public(now)),
        retarget=tuple(now for was, now in changed_r if _public(was) == _public(now)),
        forward=tuple(spec for name, spec in new_l.items() if name not in old_l),
        unforward=tuple(spec for name, spec in old_l.items() if name not in new_l),
        reforward=tuple((was, now) for was, now in changed_l if _listen(was) != _listen(now)),
        retarget_forwards=tuple(now for was, now in changed_l if _listen(was) == _listen(now)),
    )


# ---------------------------------------------------------------------------------------------------- server


@attrs.frozen
class ServerPlan:
    """What a server does to go from its running config to a new one (everything else is read when used: new
    links see the new timeouts, ``max_clients`` and ``max_streams_per_client``, new forwards the new
    ``allow_targets``)."""

    new: ServerConfig
    tokens_removed: int = 0
    tokens_added: int = 0
    tls_files: bool = False
    """Re-read the TLS certificate and key (``tls_cert`` is set in either config; dropped: the server's own key)."""

    def keeps_token(self, token: bytes | None) -> bool:
        """Whether a live link that authenticated with ``token`` (None: no authentication) may stay."""
        tokens = self.new.tokens
        return not tokens or token in tokens

    def keeps_port(self, port: int, *, udp: bool = False) -> bool:
        """Whether a live service bound to ``port`` is still allowed (one exposed on "any port" too: the port it
        got must be in the new set; a UDP service's in the set's ``/udp`` ports)."""
        return port in (self.new.allow_ports.udp if udp else self.new.allow_ports)

    def summary(self) -> str:
        parts = []
        if self.tokens_removed or self.tokens_added:
            parts.append(f"tokens: {self.tokens_added} added, {self.tokens_removed} removed")
        if self.tls_files:
            parts.append("TLS files re-read")
        return "; ".join(parts) or "no token change"


def plan_server(old: ServerConfig, new: ServerConfig) -> ServerPlan:
    """The steps from ``old`` to ``new``.

    Raises:
        ReloadError: ``new`` changes a setting that needs a restart (:data:`FIXED_SERVER_KEYS`).
    """
    for key in FIXED_SERVER_KEYS:
        was, now = getattr(old, key), getattr(new, key)
        if was != now:
            raise ReloadError(f"{key} cannot change on a reload (running with {was}, the file says {now}); restart")
    old_tokens, new_tokens = set(old.tokens), set(new.tokens)
    return ServerPlan(
        new=new,
        tokens_removed=len(old_tokens - new_tokens),
        tokens_added=len(new_tokens - old_tokens),
        tls_files=new.tls_cert is not None or old.tls_cert is not None,
    )


# ---------------------------------------------------------------------------------------------------- SIGHUP


def one_line(exc: BaseException) -> str:
    """An error's message on one line (``reload-failed REASON`` must be a single stdout line)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}"
    return " ".join(text.split())


async def reload_once(load: Callable[[], C], apply: Callable[[C], Awaitable[None]]) -> bool:
    """Read the config again (``load``) and apply it; print ``reloaded`` or ``reload-failed REASON``.

    ``apply`` must change nothing when it raises ConfigError, ReloadError or OSError.
    """
    try:
        new = load()
        await apply(new)
    except (ConfigError, ReloadError, OSError) as exc:
        reason = one_line(exc)
        logger.error("SIGHUP: reload failed, still running with the previous configuration: %s", reason)
        announce(f"reload-failed {reason}")
        return False
    announce("reloaded")
    return True


@contextmanager
def sighup_receiver(enabled: bool) -> Iterator[AsyncIterator[int] | None]:
    """SIGHUP delivered to an iterator (when ``enabled``) from the moment this is entered. A run function enters it
    before it prints its first stdout line, so that a SIGHUP sent in reply to that line never meets the default
    action (which ends the process)."""
    if not enabled:
        yield None
        return
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        yield signals


async def reload_on_signals(
    signals: AsyncIterator[int], load: Callable[[], C], apply: Callable[[C], Awaitable[None]]
) -> None:
    """On every SIGHUP, :func:`reload_once`. Signals that arrive during a reload are coalesced into one more."""
    async for _ in signals:
        logger.info("SIGHUP: reloading the configuration")
        await reload_once(load, apply)
