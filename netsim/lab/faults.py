"""Faults on a running lab's links, from Python or ``netsim lab fault`` (issue 16; docs/faults.md).

Everything here acts on one of the lab's own namespaces (``netsim-<run>-<role>``, checked): links, addresses
and routes through `netsim.lab.netlink`; nftables and conntrack run inside it. So a fault can be injected into a
lab owned by another process (the CLI, a detached ``netsim lab up``) as well as by the `Lab` object's owner.
Nothing touches the root namespace.

* `link_down` / `link_up` / `flap`: a link goes down and comes back. Linux drops every route through a link
  that goes down and, for IPv6, its global addresses; on a real network DHCP and router advertisements bring
  them back. `link_up` plays that part for the lab's own plan (`link_plan`: the link's addresses and the
  role's default route through it), and nothing else: kernel state a tunnel installed (its table, its server
  route) is the tunnel's to re-apply, which is what a fault test exercises.
* `Blackhole`: packets to (or from) an address are dropped in a role's namespace (an nftables table of its
  own, with a counter), e.g. the VPN server made unreachable without restarting it.
* `nat_flush`: the home router forgets its NAT mappings (``conntrack -F`` in ``isp``), as a router reboot or a
  mapping timeout does; the next packet of every flow gets a new mapping.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import subprocess
from dataclasses import dataclass

import trio

from netsim.errors import LabError
from netsim.lab import netlink
from netsim.lab.addressing import ADDR, ROLES, Addressing

__all__ = ["Blackhole", "LinkPlan", "flap", "lab_netns", "link_down", "link_plan", "link_up", "nat_flush"]

_RUN_ID = re.compile(r"^[a-z0-9]{1,6}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def lab_netns(run_id: str, role: str) -> str:
    """The namespace of ``role`` in lab ``run_id`` (``netsim-<run>-<role>``), checked."""
    if not _RUN_ID.match(run_id) or role not in ROLES:
        raise LabError(f"no lab namespace for run {run_id!r} role {role!r} (roles: {', '.join(ROLES)})")
    return f"netsim-{run_id}-{role}"


@dataclass(frozen=True)
class LinkPlan:
    """What the lab's network gives one link: its addresses (``"addr/prefix"``) and the default routes
    (``(destination, gateway)``) the role has through it."""

    addresses: tuple[str, ...]
    routes: tuple[tuple[str, str], ...]


def link_plan(role: str, ifname: str, addr: Addressing = ADDR) -> LinkPlan:
    """The lab's plan for ``role``'s ``ifname`` (the same as `netsim.lab.lab.Lab` configures; a lab test checks
    the two agree), or an empty plan for a link the lab does not address."""
    addresses = tuple(a for r, i, v4, v6 in addr.table() if r == role and i == ifname for a in (v4, v6))
    gateways = {
        ("mac", "en0"): (addr.isp_lan_v4, addr.isp_lan_v6),
        ("lan", "eth0"): (addr.isp_lan_v4, addr.isp_lan_v6),
        ("isp", "wan"): (addr.inet_isp_v4, addr.inet_isp_v6),
        ("vpn", "wan"): (addr.inet_vpn_v4, addr.inet_vpn_v6),
    }.get((role, ifname))
    routes = () if gateways is None else (("0.0.0.0/0", str(gateways[0])), ("::/0", str(gateways[1])))
    return LinkPlan(addresses, routes)


def _lab_ns(netns: str) -> None:
    if not netns.startswith("netsim-"):
        raise LabError(f"refusing to change namespace {netns!r}: netsim only touches 'netsim-*' namespaces")


def _check_ifname(ifname: str) -> None:
    if not _IFNAME.match(ifname):
        raise LabError(f"bad interface name {ifname!r}")


def link_down(netns: str, ifname: str) -> None:
    """Take ``ifname`` in ``netns`` down (the kernel drops its routes, and its global IPv6 addresses)."""
    _lab_ns(netns)
    _check_ifname(ifname)
    netlink.set_link(netns, ifname, up=False)


def link_up(netns: str, ifname: str, plan: LinkPlan | None = None) -> None:
    """Bring ``ifname`` up and, with ``plan``, give back what the network provides (addresses, default
    routes), as DHCP and router advertisements would."""
    _lab_ns(netns)
    _check_ifname(ifname)
    netlink.set_link(netns, ifname, up=True)
    if plan is None:
        return
    for address in plan.addresses:
        netlink.add_address(netns, address, ifname, replace=True)
    for dst, gateway in plan.routes:
        netlink.add_route(netns, dst, ifname=ifname, gateway=gateway, replace=True)


async def flap(
    netns: str,
    ifname: str,
    *,
    down_for: float,
    times: int = 1,
    up_for: float = 0.0,
    plan: LinkPlan | None = None,
) -> list[tuple[float, float]]:
    """Take the link down for ``down_for`` seconds, ``times`` times, ``up_for`` seconds apart; returns the
    (down, up) trio times. Bounded: at most 100 flaps of at most 60 s each."""
    if not (0 < times <= 100 and 0 <= down_for <= 60 and 0 <= up_for <= 60):
        raise LabError("flap: 1-100 times, down_for and up_for within 0-60 s")
    spans: list[tuple[float, float]] = []
    for n in range(times):
        if n:
            await trio.sleep(up_for)
        await trio.to_thread.run_sync(link_down, netns, ifname)
        down = trio.current_time()
        await trio.sleep(down_for)
        await trio.to_thread.run_sync(link_up, netns, ifname, plan)
        spans.append((down, trio.current_time()))
    return spans


class Blackhole:
    """Drop every packet to or from ``address`` in ``netns`` (input, output and forward), counted.

    A table of its own (``inet netsim_fault_<id>``), so several blackholes and the lab's own rules stay
    independent; `remove` deletes only it. Use as a context manager or call `install` / `remove`.
    """

    def __init__(self, netns: str, address: str) -> None:
        _lab_ns(netns)
        self.netns = netns
        self.address = ipaddress.ip_address(address)
        self.table = f"netsim_fault_{secrets.token_hex(3)}"
        self.installed = False

    def _nft(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", self.netns, "nft", *args]
        done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=10, check=False)
        if done.returncode != 0:
            raise LabError(f"nft in {self.netns} failed: {done.stderr.strip()[:300]}")
        return done

    def install(self) -> Blackhole:
        fam = "ip" if self.address.version == 4 else "ip6"
        match = f"{fam} daddr {self.address} counter drop\n    {fam} saddr {self.address} counter drop"
        chains = "".join(
            f"  chain {hook} {{\n    type filter hook {hook} priority -10; policy accept;\n    {match}\n  }}\n"
            for hook in ("input", "output", "forward")
        )
        self._nft(f"table inet {self.table} {{\n{chains}}}\n", "-f", "-")
        self.installed = True
        return self

    def dropped(self) -> int:
        """Packets dropped so far."""
        text = self._nft("", "list", "table", "inet", self.table).stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", text))

    def remove(self) -> None:
        if self.installed:
            self._nft("", "delete", "table", "inet", self.table)
            self.installed = False

    def __enter__(self) -> Blackhole:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def nat_flush(netns: str) -> int:
    """Flush the conntrack table of ``netns`` (the home router forgets its NAT mappings); returns how many
    entries it held just before (``conntrack -C``; ``-F`` itself does not say)."""
    _lab_ns(netns)

    def conntrack(*args: str) -> str:
        argv = ["ip", "netns", "exec", netns, "conntrack", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        if done.returncode != 0:
            raise LabError(f"conntrack {' '.join(args)} in {netns} failed: {done.stderr.strip()[:300]}")
        return done.stdout

    held = conntrack("-C").strip()
    conntrack("-F")
    return int(held) if held.isdigit() else 0


# ---- impairment ----
# Impaired links (loss, delay, jitter, reorder, duplication, rate) per direction: netsim.lab.impair, re-exported
# here with the other faults (docs/impairment.md).
from netsim.lab.impair import Impairer, ImpairerStatistics, impair  # noqa: E402

__all__ += ["Impairer", "ImpairerStatistics", "impair"]
