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
* `lab_process`, `signal_process`, `freeze`: a process the lab started (the helper, wireguard-go, a service) is
  stopped and continued, or killed, by the pid its run file records, after checking the pid still names that
  process (its start time), so a reused pid is never signalled.
* Path change (a lab with ``second_uplink=True``): `move_default` moves the Mac's main-table default routes
  between en0 and en1, `uplink_down` / `uplink_up` take one uplink away and bring it back.
* `change_public_address`: the home router's public (WAN) address changes, the masquerade follows and its
  conntrack table is flushed: every flow reaches the internet from the new address.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import signal
from dataclasses import dataclass

import trio

from netsim.core.resolver import SystemDns
from netsim.errors import LabError
from netsim.lab import netlink
from netsim.lab.addressing import ADDR, ALL_ROLES, LAB_DOMAIN, Addressing
from netsim.lab.cleanup import RunRecord, valid_run_id
from netsim.lab.process import ProcessInfo, process_start_time
from netsim.runtime.resolver import DNS_STATE_DIR, SYSTEM_FILE, write_state_file
from netsim.transports.netns import CommandResult, require_lab_netns, run_netns_command

__all__ = [
    "UPLINKS",
    "AddressChange",
    "Blackhole",
    "LinkPlan",
    "change_public_address",
    "flap",
    "freeze",
    "lab_netns",
    "lab_process",
    "link_down",
    "link_plan",
    "link_up",
    "move_default",
    "nat_flush",
    "primary_uplink",
    "signal_process",
    "uplink_down",
    "uplink_gateways",
    "uplink_up",
]

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def lab_netns(run_id: str, role: str) -> str:
    """The namespace of ``role`` in lab ``run_id`` (``netsim-<run>-<role>``), checked."""
    if not valid_run_id(run_id) or role not in ALL_ROLES:
        raise LabError(f"no lab namespace for run {run_id!r} role {role!r} (roles: {', '.join(ALL_ROLES)})")
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
        ("isp2", "wan"): (addr.inet_isp2_v4, addr.inet_isp2_v6),
        ("vpn", "wan"): (addr.inet_vpn_v4, addr.inet_vpn_v6),
    }.get((role, ifname))
    routes = () if gateways is None else (("0.0.0.0/0", str(gateways[0])), ("::/0", str(gateways[1])))
    return LinkPlan(addresses, routes)


def _lab_ns(netns: str) -> None:
    require_lab_netns(netns, "inject a fault")


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

    def _nft(self, script: str, *args: str) -> CommandResult:
        return run_netns_command(self.netns, ["nft", *args], stdin=script)

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

    held = run_netns_command(netns, ["conntrack", "-C"]).stdout.strip()
    run_netns_command(netns, ["conntrack", "-F"])
    return int(held) if held.isdigit() else 0


# ---- processes ----
#: Signals `signal_process` sends (by name on the CLI): freeze, continue, stop gracefully, crash.
PROCESS_SIGNALS: dict[str, signal.Signals] = {
    "STOP": signal.SIGSTOP,
    "CONT": signal.SIGCONT,
    "TERM": signal.SIGTERM,
    "KILL": signal.SIGKILL,
}
_MAX_FREEZE = 300.0


def lab_process(run: RunRecord, name: str) -> ProcessInfo:
    """The process called ``name`` in lab ``run``'s run file: ``helper``, ``provider``,
    ``wireguard-go-<ifname>-<n>``, ``svc-inet`` ... (as ``netsim lab status`` lists them).

    Raises:
        LabError: no such process (the message lists the names there are).
    """
    for info in run.processes:
        if info.name == name:
            return info
    names = ", ".join(sorted(p.name for p in run.processes)) or "none"
    raise LabError(f"lab {run.run_id} has no process {name!r} (it has: {names})")


def signal_process(info: ProcessInfo, sig: int) -> None:
    """Send ``sig`` to the lab process ``info`` by pidfd, once its start time shows the pid is still that process.

    Raises:
        LabError: the process is gone (or its pid now names another process).
    """
    try:
        fd = os.pidfd_open(info.pid)
    except ProcessLookupError:
        raise LabError(f"process {info.name} (pid {info.pid}) is gone") from None
    try:
        # checked after the pidfd is open: from here on the pid cannot be reused under us
        if info.start_time is None or process_start_time(info.pid) != info.start_time:
            raise LabError(f"pid {info.pid} no longer names the lab's process {info.name}; not signalling it")
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        raise LabError(f"process {info.name} (pid {info.pid}) is gone") from None
    finally:
        os.close(fd)


async def freeze(info: ProcessInfo, seconds: float) -> None:
    """SIGSTOP the lab process ``info`` for ``seconds`` (at most 300), then SIGCONT it, even if cancelled: a
    stalled helper or server, as a debugger or an overloaded Mac would leave it."""
    if not 0 < seconds <= _MAX_FREEZE:
        raise LabError(f"freeze for {seconds} s: choose 0 < seconds <= {_MAX_FREEZE:g}")
    signal_process(info, signal.SIGSTOP)
    try:
        await trio.sleep(seconds)
    finally:
        signal_process(info, signal.SIGCONT)  # synchronous: runs even when the sleep was cancelled


# ---- mtu ----
__all__ += ["VETH_PEERS", "PmtuBlackhole", "set_mtu"]

#: The other end of each lab veth, ``(role, ifname) -> (role, ifname)`` (as `netsim.lab.lab.Lab` wires them): a
#: link's MTU is set on both ends, since a veth also drops what arrives larger than its own MTU.
VETH_PEERS: dict[tuple[str, str], tuple[str, str]] = {
    ("mac", "en0"): ("isp", "mac"),
    ("lan", "eth0"): ("isp", "lan"),
    ("isp", "wan"): ("inet", "isp"),
    ("vpn", "wan"): ("inet", "vpn"),
    ("mac", "en1"): ("isp2", "mac"),  # a lab with second_uplink=True
    ("isp2", "wan"): ("inet", "isp2"),
}
VETH_PEERS.update({peer: end for end, peer in list(VETH_PEERS.items())})


def set_mtu(run_id: str, role: str, ifname: str, mtu: int) -> list[tuple[str, str]]:
    """A smaller (or larger) path MTU on a lab link: ``mtu`` on ``role``'s ``ifname`` and on its veth peer.

    The router in front of the small link then answers a larger packet with DF set with ICMP fragmentation
    needed (RFC 1191) or ICMPv6 packet too big (RFC 8201), and fragments one without DF (IPv4 only; RFC 8200
    §5: IPv6 routers never fragment). Returns the ``(role, ifname)`` ends changed; 1500 puts the lab's back.
    """
    if not 1280 <= mtu <= 65535:
        raise LabError("set_mtu: 1280-65535 (1280 is IPv6's minimum link MTU, RFC 8200 §5)")
    _check_ifname(ifname)
    ends = [(role, ifname)] + ([VETH_PEERS[(role, ifname)]] if (role, ifname) in VETH_PEERS else [])
    for end_role, end_ifname in ends:
        netlink.set_link(lab_netns(run_id, end_role), end_ifname, mtu=mtu)
    return ends


class PmtuBlackhole(Blackhole):
    """A PMTU black hole on a router: ICMP fragmentation-needed and ICMPv6 packet-too-big dropped, counted.

    The router still drops the packet that does not fit (DF set, or any IPv6 packet): only the message that
    would tell the sender is lost, as a filtering firewall does (RFC 2923 §2.1). One ``inet`` table named after
    the run (``netsim_pmtu_<run>``) hooks output (the router's own ICMP) and forward (ICMP from further on);
    `remove` deletes only it; `adopt` takes over one a ``netsim lab fault pmtu-blackhole`` left in place.
    `dropped` counts both kinds, `dropped_by_type` each.
    """

    def __init__(self, run_id: str, role: str = "isp") -> None:
        super().__init__(lab_netns(run_id, role), "::")  # no address: the match is on ICMP types
        self.table = f"netsim_pmtu_{run_id}"

    def install(self) -> PmtuBlackhole:
        match = (
            "icmp type destination-unreachable icmp code frag-needed counter drop\n"
            "    icmpv6 type packet-too-big counter drop"
        )
        chains = "".join(
            f"  chain {hook} {{\n    type filter hook {hook} priority -10; policy accept;\n    {match}\n  }}\n"
            for hook in ("output", "forward")
        )
        self._nft(f"table inet {self.table} {{\n{chains}}}\n", "-f", "-")
        self.installed = True
        return self

    def adopt(self) -> PmtuBlackhole:
        """Take over the run's table installed by another process (raises `LabError` if there is none)."""
        self._nft("", "list", "table", "inet", self.table)
        self.installed = True
        return self

    def dropped_by_type(self) -> tuple[int, int]:
        """(ICMP frag-needed, ICMPv6 packet-too-big) messages dropped so far."""
        text = self._nft("", "list", "table", "inet", self.table).stdout
        v4 = sum(int(n) for n in re.findall(r"frag-needed counter packets (\d+)", text))
        v6 = sum(int(n) for n in re.findall(r"packet-too-big counter packets (\d+)", text))
        return v4, v6

    def __enter__(self) -> PmtuBlackhole:
        return self.install()


# ---- path change ----
# A Mac with Wi-Fi (en0) and Ethernet or a hotspot (en1) has one primary interface, the one with the default
# route (configd's IPMonitor, ip_plugin.c: "decides which interface will be made the primary interface, that is,
# the one with the default route assigned"), picked by service order; the others keep only interface-scoped
# routes. Linux has no scoped routes, so the lab's second uplink carries no default route until it becomes the
# primary: a path change moves the main table's default routes, both families at once.

#: the Mac's uplinks, in service order (en0 first: Wi-Fi in the lab's story, en1 the second uplink)
UPLINKS = ("en0", "en1")


def uplink_gateways(ifname: str, addr: Addressing = ADDR) -> tuple[str, str]:
    """The (IPv4, IPv6) gateways of the Mac's uplink ``ifname``: its home router's LAN addresses."""
    gateways = {"en0": (addr.isp_lan_v4, addr.isp_lan_v6), "en1": (addr.isp2_lan_v4, addr.isp2_lan_v6)}.get(ifname)
    if gateways is None:
        raise LabError(f"{ifname!r} is not an uplink of the Mac (uplinks: {', '.join(UPLINKS)})")
    return str(gateways[0]), str(gateways[1])


def primary_uplink(netns: str) -> str | None:
    """The interface of the main table's first default route (IPv4 before IPv6): the primary path, None when
    there is no default route (the Mac is offline)."""
    _lab_ns(netns)
    return next((dev for _, _, dev in netlink.default_routes(netns) if dev is not None), None)


def move_default(netns: str, to: str, addr: Addressing = ADDR) -> str | None:
    """Make uplink ``to`` the primary path: the main table's IPv4 and IPv6 default routes go through its home
    router, each replaced in place (never an instant without one), as macOS moves the default route when the
    primary interface changes. Addresses are left alone, so the other uplink stays up and on-link. Returns the
    primary uplink before."""
    _lab_ns(netns)
    _check_ifname(to)
    gateways = uplink_gateways(to, addr)
    before = primary_uplink(netns)
    for dst, gateway in zip(("0.0.0.0/0", "::/0"), gateways, strict=True):
        netlink.add_route(netns, dst, ifname=to, gateway=gateway, replace=True)
    _follow_primary_dns(netns, gateways)
    return before


def _follow_primary_dns(netns: str, servers: tuple[str, str]) -> None:
    """The Mac's system resolvers become the new primary's router (each home router serves DNS), as macOS takes
    the primary service's DNS. Only where the lab runs the Mac's resolver daemon (it re-reads the file)."""
    system = DNS_STATE_DIR / netns / SYSTEM_FILE
    if system.exists():
        write_state_file(system, SystemDns(servers, (LAB_DOMAIN,)).to_json())


def uplink_down(netns: str, ifname: str, addr: Addressing = ADDR) -> str | None:
    """Take the Mac's uplink ``ifname`` away (link down: Linux drops its routes and global IPv6 addresses). If it
    was the primary, the default routes move to the next uplink that is up, as macOS promotes the next service.
    Returns the primary uplink afterwards (None: no uplink left)."""
    _lab_ns(netns)
    uplink_gateways(ifname, addr)  # an uplink, or LabError
    was_primary = primary_uplink(netns) in (ifname, None)
    link_down(netns, ifname)
    if was_primary:
        present = netlink.link_names(netns)
        for other in (u for u in UPLINKS if u != ifname and u in present):
            try:
                move_default(netns, other, addr)
                break
            except LabError:  # that link is down too (the kernel refuses a route through it)
                continue
    return primary_uplink(netns)


def uplink_up(netns: str, ifname: str, *, primary: bool = False, addr: Addressing = ADDR) -> str | None:
    """Bring the Mac's uplink ``ifname`` back with its addresses (DHCP's part, `link_plan`); the default routes
    move to it when ``primary`` (it is first in the service order again) or when the Mac had none. Returns the
    primary uplink afterwards."""
    _lab_ns(netns)
    uplink_gateways(ifname, addr)
    link_up(netns, ifname, LinkPlan(link_plan("mac", ifname, addr).addresses, ()))
    if primary or primary_uplink(netns) is None:
        move_default(netns, ifname, addr)
    return primary_uplink(netns)


# ---- public address change ----
@dataclass(frozen=True)
class AddressChange:
    """What `change_public_address` did: the WAN addresses before and after (``addr/prefix``), and how many
    conntrack entries it flushed."""

    old: tuple[str, ...]
    new: tuple[str, ...]
    flushed: int


def _public_plans(role: str, addr: Addressing) -> tuple[tuple[str, str], tuple[str, str]]:
    """A home router's plan WAN addresses (IPv4, IPv6) and the next ones, as ``addr/prefix``."""
    a = addr
    plans = {
        "isp": (a.isp_wan_net_v4, a.isp_wan_net_v6, (a.isp_wan_v4, a.isp_wan_v6), (a.isp_wan_alt_v4, a.isp_wan_alt_v6)),
        "isp2": (
            *(a.isp2_wan_net_v4, a.isp2_wan_net_v6),
            *((a.isp2_wan_v4, a.isp2_wan_v6), (a.isp2_wan_alt_v4, a.isp2_wan_alt_v6)),
        ),
    }
    if role not in plans:
        raise LabError(f"{role!r} is not a home router (isp, isp2): pass the new addresses")
    net4, net6, first, second = plans[role]

    def pair(ips: tuple[object, object]) -> tuple[str, str]:
        return f"{ips[0]}/{net4.prefixlen}", f"{ips[1]}/{net6.prefixlen}"

    return pair(first), pair(second)


def change_public_address(
    netns: str, to: tuple[str, ...] | None = None, *, ifname: str = "wan", addr: Addressing = ADDR
) -> AddressChange:
    """The home router's public address changes, as with a new lease from its ISP: ``ifname``'s global
    addresses become ``to`` (``addr/prefix``, one per family), the default routes through it are put back, and
    its conntrack table is flushed (`nat_flush`). The masquerade needs nothing: nftables' ``masquerade`` takes
    the out-interface's address for every new mapping, so each flow's next packet leaves from the new address.

    Without ``to``, a lab router (``netsim-<run>-isp`` or ``-isp2``) switches between its plan's address and the
    next one (``.3`` / ``::3``, `netsim.lab.addressing.Addressing.isp_wan_alt_v4`), so calling it twice goes back.
    """
    _lab_ns(netns)
    _check_ifname(ifname)
    if to is None:
        first, second = _public_plans(netns.rsplit("-", 1)[-1], addr)  # before anything is read or changed
        old = tuple(netlink.addresses(netns, ifname))
        to = second if first[0] in old else first
    else:
        old = tuple(netlink.addresses(netns, ifname))
    new = tuple(str(ipaddress.ip_interface(a)) for a in to)
    routes = [r for r in netlink.default_routes(netns) if r[2] == ifname]
    # Old first: a second address in the same IPv4 prefix would only be secondary (masquerade takes the
    # primary), and deleting the primary deletes its secondaries unless promote_secondaries is set.
    for address in old:
        if address not in new:
            netlink.del_address(netns, address, ifname)
    for address in new:
        netlink.add_address(netns, address, ifname, replace=True)
    for dst, gateway, dev in routes:  # Linux dropped the IPv4 one with the prefix's last address
        netlink.add_route(netns, dst, ifname=dev, gateway=gateway, replace=True)
    return AddressChange(old, new, nat_flush(netns))


# ---- impairment ----
# Impaired links (loss, delay, jitter, reorder, duplication, rate) per direction: netsim.lab.impair, re-exported
# here with the other faults (docs/impairment.md).
from netsim.lab.impair import Impairer, ImpairerStatistics, impair  # noqa: E402

__all__ += ["Impairer", "ImpairerStatistics", "impair"]
