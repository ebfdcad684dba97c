"""Applying a reloaded config to a running client (SIGHUP), on the live link: see :mod:`.reload` for the plan.

Everything that can fail is done first, each step with its undo: bind the new ``-L`` ports, then on the live link
release removed services, register added ones and re-register changed ones. If one of them fails (a port taken
here or on the server, a port the server does not allow), the steps already done are undone in reverse and the
reload fails, leaving the client as it was. Only then is the new config committed, which cannot fail: old ``-L``
ports closed, targets switched, and, when the link's own settings changed, a new link made.

Connections already open are never cut by a service or forward change: a released port stops accepting, and the
connections it accepted carry on to their end. Only a new link (``server``, ``name``, token or TLS trust changed)
ends the old link's connections.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Final

from .client import client_tls
from .config import ClientConfig, LocalSpec, RemoteSpec
from .errors import RequestError, SessionClosedError
from .forwards import BoundForward, ForwardSet
from .handlers import Destination
from .mux import Session
from .reload import ReloadError, one_line, plan_client

if TYPE_CHECKING:
    from .client import _Client

__all__ = ["apply_client_reload"]

logger: Final = logging.getLogger(__name__)

Undo = Callable[[], Awaitable[None]]


async def apply_client_reload(client: _Client, forwards: ForwardSet, new: ClientConfig) -> None:
    """Go from the client's running config to ``new``.

    Raises:
        ReloadError, ConfigError: ``new`` cannot be applied; nothing has changed.
    """
    exposed = {name: (bound.host, bound.port) for name, bound in client.exposed.items()}
    listening = {name: (bound.host, bound.port) for name, bound in forwards.running.items()}
    plan = plan_client(client.config, new).pinned(exposed, listening)
    logger.info("SIGHUP: %s", plan.summary())
    tls = client_tls(new) if plan.relink else client.tls  # a bad CA file fails here, before anything changed
    undo: list[Undo] = []
    bound: dict[str, BoundForward] = {}
    async with client.registry:
        try:
            for spec in plan.forward:
                bound[spec.name] = await _bind(spec)
            for was, spec in plan.reforward:
                bound[spec.name] = await _rebind(forwards, was, spec, undo)
            session = None if plan.relink else client.session
            if session is not None and plan.services_changed:
                await _services(client, session, plan.expose, plan.unexpose, plan.reexpose, undo)
        except (ReloadError, OSError, RequestError) as exc:
            for step in reversed(undo):
                with suppress(RequestError, SessionClosedError, OSError):
                    await step()
            for listener in bound.values():
                await forwards.discard(listener)
            raise exc if isinstance(exc, ReloadError) else ReloadError(one_line(exc)) from None
        except SessionClosedError:
            pass  # the link ended mid-way: the next one registers the new services
        # Commit: nothing below fails.
        client.set_config(new, tls)
        for spec in plan.unforward:
            await forwards.stop(spec.name)
        for was, _spec in plan.reforward:
            if was.name in forwards.running:
                await forwards.stop(was.name, quiet=True)
        for listener in bound.values():
            forwards.start(listener)
        for spec in plan.retarget_forwards:
            forwards.running[spec.name].slot.spec = spec
            logger.info("%s: new connections ask the server for %s", spec.name, spec.target)
        for service in plan.retarget:
            logger.info("%s: new connections go to %s", service.name, service.target)
    if plan.relink:
        logger.info("reconnecting: %s changed", ", ".join(plan.relink))
        client.relink()


async def _bind(spec: LocalSpec) -> BoundForward:
    try:
        return await ForwardSet.bind(spec)
    except OSError as exc:
        raise ReloadError(f"forward {spec.name}: cannot listen on {spec.bind}: {exc.strerror or exc}") from None


async def _rebind(forwards: ForwardSet, was: LocalSpec, spec: LocalSpec, undo: list[Undo]) -> BoundForward:
    """Listen at a forward's new address. If its old listener holds the port (a new host, the same port), close
    that first, and listen at the old address again if the new one cannot be had."""
    try:
        return await ForwardSet.bind(spec)
    except OSError as exc:
        running = forwards.running.get(was.name)
        if exc.errno != errno.EADDRINUSE or running is None or spec.bind_port != was.bind_port:
            raise ReloadError(f"forward {spec.name}: cannot listen on {spec.bind}: {exc.strerror or exc}") from None
    await forwards.stop(was.name, quiet=True)

    async def restore() -> None:
        forwards.start(await ForwardSet.bind(was))

    undo.append(restore)
    return await _bind(spec)


async def _services(
    client: _Client,
    session: Session,
    added: tuple[RemoteSpec, ...],
    removed: tuple[RemoteSpec, ...],
    changed: tuple[tuple[RemoteSpec, RemoteSpec], ...],
    undo: list[Undo],
) -> None:
    """Change the services on the live link, each step with its undo. A server that does not know UNEXPOSE (an
    older version) fails the reload: it cannot release a port without ending the link."""
    destinations = client.destinations
    for spec in removed:
        if spec.name in client.exposed:
            await client.unexpose_one(session, spec.name)
            undo.append(partial(client.expose_one, session, spec))
    for was, spec in changed:
        if was.name in client.exposed:
            await client.unexpose_one(session, was.name)
            undo.append(partial(client.expose_one, session, was))
        destinations[spec.name] = client.destination(spec)
        undo.append(partial(_set, destinations, was.name, client.destination(was)))
        await _expose(client, session, spec)
        undo.append(partial(client.unexpose_one, session, spec.name))
    for spec in added:
        destinations[spec.name] = client.destination(spec)  # before the port opens: its first stream finds its route
        await _expose(client, session, spec)
        undo.append(partial(client.unexpose_one, session, spec.name))


async def _expose(client: _Client, session: Session, spec: RemoteSpec) -> None:
    try:
        await client.expose_one(session, spec)
    except RequestError as exc:
        raise ReloadError(f"the server refused to expose {spec.name}: {exc}") from None


async def _set(destinations: dict[str, Destination], name: str, value: Destination) -> None:
    destinations[name] = value
