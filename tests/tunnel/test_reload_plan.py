"""The reload plans (trio_tunnel.reload): what a SIGHUP changes, computed from two configs without any socket."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from trio_tunnel.config import ClientConfig, HostPort, LocalSpec, PortSet, RemoteSpec, ServerConfig, Timeouts
from trio_tunnel.proto import frames as F
from trio_tunnel.reload import ReloadError, one_line, plan_client, plan_server
from trio_tunnel.wire import UNEXPOSE

SERVER = HostPort(host="127.0.0.1", port=7835)


def client(*remotes: str, locals: tuple[str, ...] = (), **kwargs: Any) -> ClientConfig:
    return ClientConfig(
        server=kwargs.pop("server", SERVER),
        name=kwargs.pop("name", "home"),
        token=kwargs.pop("token", b"t" * 32),
        remotes=tuple(RemoteSpec.parse(r) for r in remotes),
        locals=tuple(LocalSpec.parse(spec) for spec in locals),
        **kwargs,
    )


def names(specs: Any) -> list[str]:
    return [spec.name for spec in specs]


def test_the_same_config_plans_nothing() -> None:
    old = client("a=0:127.0.0.1:80", locals=("f=0:db:5432",))
    plan = plan_client(old, client("a=0:127.0.0.1:80", locals=("f=0:db:5432",)))
    assert plan == type(plan)()
    assert not plan.services_changed and not plan.forwards_changed
    assert plan.summary() == "no change to the link, services or forwards"


def test_services_added_removed_and_changed_by_name() -> None:
    old = client("a=0:127.0.0.1:80", "c=0:127.0.0.1:82", "d=0:127.0.0.1:83", "e=0:127.0.0.1:84")
    new = client("a=0:127.0.0.1:80", "b=0:127.0.0.1:81", "d=9000:127.0.0.1:93", "e=0:127.0.0.1:94")
    plan = plan_client(old, new)
    assert plan.relink == ()
    assert names(plan.expose) == ["b"]
    assert names(plan.unexpose) == ["c"]
    # d's public port changed: it is registered again; e's local target alone changed: the port stays.
    assert [(was.bind_port, now.bind_port) for was, now in plan.reexpose] == [(0, 9000)]
    assert [(spec.name, spec.target_port) for spec in plan.retarget] == [("e", 94)]
    assert plan.services_changed and not plan.forwards_changed
    assert plan.summary() == "expose b; unexpose c; re-expose d; retarget e"


def test_a_new_bind_address_alone_re_registers() -> None:
    plan = plan_client(client("a=127.0.0.1:0:127.0.0.1:80"), client("a=0.0.0.0:0:127.0.0.1:80"))
    assert names(new for _old, new in plan.reexpose) == ["a"] and not plan.retarget


def test_forwards_added_removed_moved_and_retargeted() -> None:
    old = client(locals=("f=0:db:5432", "g=15000:db:1", "h=15001:db:2", "x=0:db:3"))
    new = client(locals=("f=0:db:5432", "g=15002:db:1", "h=15001:db:22", "y=0:db:4"))
    plan = plan_client(old, new)
    assert names(plan.forward) == ["y"]
    assert names(plan.unforward) == ["x"]
    assert [(was.bind_port, now.bind_port) for was, now in plan.reforward] == [(15000, 15002)]
    assert [(spec.name, spec.target_port) for spec in plan.retarget_forwards] == [("h", 22)]
    assert plan.forwards_changed and not plan.services_changed


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"server": HostPort(host="127.0.0.2", port=7835)}, "server"),
        ({"name": "other"}, "name"),
        ({"token": b"u" * 32}, "token"),
        ({"server_fingerprint": ("sha256:" + "A" * 43,)}, "server_fingerprint"),
        ({"insecure_plaintext": True}, "insecure_plaintext"),
    ],
)
def test_link_settings_make_a_new_link(change: dict[str, Any], key: str) -> None:
    old = client("a=0:127.0.0.1:80")
    plan = plan_client(old, attrs.evolve(old, **change))
    assert plan.relink == (key,)
    assert plan.summary() == f"reconnect ({key} changed)"


def test_timeouts_apply_without_a_new_link() -> None:
    old = client("a=0:127.0.0.1:80")
    plan = plan_client(old, attrs.evolve(old, timeouts=Timeouts(connect=3)))
    assert plan == type(plan)()


def server(**kwargs: Any) -> ServerConfig:
    kwargs.setdefault("tokens", (b"a" * 32, b"b" * 32))
    kwargs.setdefault("listen", HostPort(host="127.0.0.1", port=7835))
    return ServerConfig(**kwargs)


def test_server_plan_keeps_tokens_and_ports_still_allowed() -> None:
    old = server(allow_ports=PortSet.parse("1024-65535"))
    plan = plan_server(old, server(tokens=(b"a" * 32, b"c" * 32), allow_ports=PortSet.parse("9000-9010")))
    assert (plan.tokens_added, plan.tokens_removed) == (1, 1)
    assert plan.keeps_token(b"a" * 32) and plan.keeps_token(b"c" * 32)
    assert not plan.keeps_token(b"b" * 32)
    assert not plan.keeps_token(None), "an unauthenticated link may not stay once tokens are required"
    assert plan.keeps_port(9005) and not plan.keeps_port(9011) and not plan.keeps_port(40000)
    assert plan.summary() == "tokens: 1 added, 1 removed"


def test_without_tokens_every_link_stays() -> None:
    plan = plan_server(server(), server(tokens=(), insecure_no_auth=True))
    assert plan.keeps_token(None) and plan.keeps_token(b"a" * 32)


@pytest.mark.parametrize(
    "change",
    [
        {"listen": HostPort(host="127.0.0.1", port=7836)},
        {"state_dir": "/elsewhere"},
        {"insecure_plaintext": True},
    ],
    ids=["listen", "state_dir", "insecure_plaintext"],
)
def test_server_settings_that_need_a_restart_fail_the_reload(change: dict[str, Any]) -> None:
    with pytest.raises(ReloadError, match=f"^{next(iter(change))} cannot change on a reload .*; restart$"):
        plan_server(server(), server(**change))


def test_tls_files_are_read_again_when_set() -> None:
    assert plan_server(server(), server(tls_cert="c.pem", tls_key="k.pem")).tls_files
    assert plan_server(server(tls_cert="c.pem", tls_key="k.pem"), server()).tls_files, "back to the own key"
    assert not plan_server(server(), server()).tls_files


def test_one_line() -> None:
    assert one_line(ValueError("two\nlines  here")) == "two lines here"
    assert one_line(OSError(errno.ENOENT, "No such file or directory", "x.toml")) == "No such file or directory: x.toml"


def test_writing_down_the_port_a_service_got_changes_nothing_on_the_wire() -> None:
    """``remote_port = 0`` (or ``listen = ":0"``) rewritten as the port it got: retargeted in place, not bound again."""
    old = client("a=0:127.0.0.1:80", "b=0:127.0.0.1:81", locals=("f=0:db:1", "g=0:db:2"))
    new = client("a=41000:127.0.0.1:80", "b=41001:127.0.0.1:81", locals=("f=127.0.0.1:42000:db:1", "g=42001:db:2"))
    plan = plan_client(old, new).pinned(
        {"a": ("0.0.0.0", 41000), "b": ("0.0.0.0", 40999)}, {"f": ("127.0.0.1", 42000), "g": ("127.0.0.1", 1)}
    )
    assert names(plan.retarget) == ["a"] and names(new for _old, new in plan.reexpose) == ["b"]
    assert names(plan.retarget_forwards) == ["f"] and names(new for _old, new in plan.reforward) == ["g"]


def test_the_unexpose_request_bytes_in_the_protocol_document() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    request = F.encode(F.Ctrl(3, UNEXPOSE, {"name": "c"})).hex()
    reply = F.encode(F.CtrlReply(3, 0, {})).hex()
    shown = {"".join(match.split()) for match in re.findall(r"`([0-9a-f ]{20,})`", doc)}
    assert request in shown and reply in shown


def test_udp_changes_the_server_or_a_forward_holds_register_again() -> None:
    """A UDP service's protocol and idle timeout are the server's to apply, and a UDP forward's flows carry their
    target: a change to either is registered or bound again; a TCP forward's new target alone is applied in place."""
    old = client("a=9000:127.0.0.1:53/udp", "b=9001:127.0.0.1:80", locals=("f=5353:10.0.0.2:53/udp", "g=8080:db:80"))
    new = client(
        "a=9000:127.0.0.1:54/udp", "b=9001:127.0.0.1:80/udp", locals=("f=5353:10.0.0.3:53/udp", "g=8080:db:81")
    )
    plan = plan_client(old, new)
    assert names(plan.retarget) == ["a"]  # the client's own target: in place
    assert names(now for _was, now in plan.reexpose) == ["b"]  # tcp -> udp
    assert names(now for _was, now in plan.reforward) == ["f"]
    assert names(plan.retarget_forwards) == ["g"]
    longer = client("a=9000:127.0.0.1:53/udp", locals=("f=5353:10.0.0.2:53/udp",))
    longer = attrs.evolve(longer, remotes=(attrs.evolve(longer.remotes[0], idle_timeout=120.0),))
    plan = plan_client(client("a=9000:127.0.0.1:53/udp", locals=("f=5353:10.0.0.2:53/udp",)), longer)
    assert names(now for _was, now in plan.reexpose) == ["a"]
    # the port a 0 got, written down, still changes nothing for a UDP forward
    pinned = plan_client(client(locals=("f=0:10.0.0.2:53/udp",)), client(locals=("f=5353:10.0.0.2:53/udp",))).pinned(
        {}, {"f": ("127.0.0.1", 5353)}
    )
    assert not pinned.reforward and names(pinned.retarget_forwards) == ["f"]
