"""Netlink configuration inside a lab namespace, with pyroute2: the lab's one path to links, addresses, routes.

Every call enters the namespace in a dedicated thread (`netsim.lab.netns.run_in_netns`) and opens an ``IPRoute``
there, exactly as `netsim.lab.Lab` builds the topology; nothing runs the ``ip`` command to configure the lab.
(``ip netns exec`` still *runs programs* in a namespace: that is process placement, not netlink configuration.)
The blocking functions here are called from threads (``trio.to_thread``) by async code.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import ip_interface, ip_network
from typing import Any

from netsim.errors import LabError
from netsim.lab.netns import run_in_netns

__all__ = [
    "add_address",
    "add_route",
    "addresses",
    "default_routes",
    "del_address",
    "del_route",
    "link_names",
    "set_link",
]

_IFA_F_NODAD = 0x02  # <linux/if_addr.h>: no duplicate address detection, the address is usable at once


@contextmanager
def _netlink(netns: str, what: str) -> Iterator[Any]:
    """An ``IPRoute`` in the calling thread's namespace; a kernel refusal becomes a `LabError` naming the step."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise LabError(f"{netns}: {what} failed: {exc}") from exc


def _index(ipr: Any, netns: str, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"{netns}: interface {ifname} missing")
    return int(found[0])


def add_address(netns: str, address: str, ifname: str, *, replace: bool = False) -> None:
    """``ip -n <netns> address add|replace <address> dev <ifname>``: ``address`` is ``addr/prefixlen`` (a bare
    address is a host address, /32 or /128). IPv6 addresses skip DAD (the lab's sysctls disable it too)."""
    iface = ip_interface(address)
    op = "replace" if replace else "add"

    def body() -> None:
        with _netlink(netns, f"address {op} {address} dev {ifname}") as ipr:
            ipr.addr(
                op,
                index=_index(ipr, netns, ifname),
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                flags=_IFA_F_NODAD if iface.version == 6 else 0,
            )

    run_in_netns(netns, body)


def set_link(
    netns: str, ifname: str, *, up: bool | None = None, mtu: int | None = None, txqueuelen: int | None = None
) -> None:
    """``ip -n <netns> link set dev <ifname> [mtu N] [txqueuelen N] [up|down]`` (MTU and queue before state)."""

    def body() -> None:
        with _netlink(netns, f"link set {ifname}") as ipr:
            index = _index(ipr, netns, ifname)
            attrs: dict[str, Any] = {}
            if mtu is not None:
                attrs["mtu"] = mtu
            if txqueuelen is not None:
                attrs["txqlen"] = txqueuelen
            if attrs:
                ipr.link("set", index=index, **attrs)
            if up is not None:
                ipr.link("set", index=index, state="up" if up else "down")

    run_in_netns(netns, body)


def _route_args(ipr: Any, netns: str, dst: str, ifname: str | None, gateway: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"dst": str(ip_network(dst, strict=False))}
    if ifname is not None:
        args["oif"] = _index(ipr, netns, ifname)
    if gateway is not None:
        args["gateway"] = gateway
    return args


def add_route(
    netns: str, dst: str, *, ifname: str | None = None, gateway: str | None = None, replace: bool = False
) -> None:
    """``ip -n <netns> route add|replace <dst> [dev <ifname>] [via <gateway>]``."""
    op = "replace" if replace else "add"

    def body() -> None:
        with _netlink(netns, f"route {op} {dst}") as ipr:
            ipr.route(op, **_route_args(ipr, netns, dst, ifname, gateway))

    run_in_netns(netns, body)


def del_route(netns: str, dst: str, *, missing_ok: bool = False) -> bool:
    """``ip -n <netns> route del <dst>``; returns False if there was no such route and ``missing_ok``."""

    def body() -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        with _netlink(netns, f"route del {dst}") as ipr:
            try:
                ipr.route("del", **_route_args(ipr, netns, dst, None, None))
            except NetlinkError as exc:
                if missing_ok and exc.code == errno.ESRCH:  # no such route
                    return False
                raise
        return True

    return run_in_netns(netns, body)


def link_names(netns: str, kind: str | None = None) -> list[str]:
    """Interface names in ``netns`` (``ip -n <netns> -o link show [type <kind>]``), ``kind`` as netlink's
    ``IFLA_INFO_KIND`` (``tun``, ``veth``, ``bridge``...)."""

    def body() -> list[str]:
        names = []
        with _netlink(netns, "link show") as ipr:
            for link in ipr.get_links():
                info = link.get_attr("IFLA_LINKINFO")
                link_kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if kind is None or link_kind == kind:
                    names.append(str(link.get_attr("IFLA_IFNAME")))
        return names

    return run_in_netns(netns, body)


# ---- path change and public address change (issue 16) ----
def del_address(netns: str, address: str, ifname: str) -> None:
    """``ip -n <netns> address del <address> dev <ifname>`` (``addr/prefixlen``)."""
    iface = ip_interface(address)

    def body() -> None:
        with _netlink(netns, f"address del {address} dev {ifname}") as ipr:
            index = _index(ipr, netns, ifname)
            ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)

    run_in_netns(netns, body)


def addresses(netns: str, ifname: str) -> list[str]:
    """``ifname``'s global addresses (``addr/prefixlen``, IPv4 first, in the kernel's order: primary first)."""

    def body() -> list[str]:
        with _netlink(netns, f"address show dev {ifname}") as ipr:
            msgs = ipr.get_addr(index=_index(ipr, netns, ifname))
            found = [(m["family"], f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}") for m in msgs if m["scope"] == 0]
        return [text for _, text in sorted(found, key=lambda f: f[0])]

    return run_in_netns(netns, body)


def default_routes(netns: str) -> list[tuple[str, str | None, str | None]]:
    """The main table's default routes as ``(destination, gateway, interface)``, IPv4 first, lowest metric first."""

    def body() -> list[tuple[str, str | None, str | None]]:
        out: list[tuple[str, str | None, str | None]] = []
        with _netlink(netns, "route show default") as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for family, dst in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
                for route in ipr.get_routes(family=family, table=254):
                    if route["dst_len"] == 0 and route["type"] == 1:  # RTN_UNICAST in the main table
                        oif = route.get_attr("RTA_OIF")
                        out.append((dst, route.get_attr("RTA_GATEWAY"), names.get(oif)))
        return out

    return run_in_netns(netns, body)
