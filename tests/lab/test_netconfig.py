"""Tunnel settings applied to the lab's ``mac`` namespace by a provider process, read back from the kernel.

Each test starts a real provider host (``ip netns exec <mac> python -m netsim.runtime.provider``) through the
controller; the provider applies settings it receives as app messages, and the test reads the kernel's links,
addresses, rules, routes and resolver back with pyroute2 and ``ip route get``, and checks every routing
decision against the `netsim.core.routes.RouteTable` model.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.apple import (
    DNSSettings,
    IPv4Route,
    IPv4Settings,
    IPv6Route,
    IPv6Settings,
    PacketTunnelNetworkSettings,
    TunnelProviderError,
    TunnelProviderProtocol,
    VPNStatus,
)
from netsim.core.routes import RouteTable
from netsim.runtime.controller import SubprocessLauncher, TunnelProviderManager, TunnelProviderSession
from netsim.runtime.netconfig import (
    BACKSTOP_METRIC,
    RULE_PRIORITY,
    TUNNEL_LOCK_DIR,
    TUNNEL_TABLE,
    open_iproute,
    tunnel_route_table,
)
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.require import require_binary, require_root, require_tun

pytestmark = [pytest.mark.lab, pytest.mark.tun]

LAN_HOST4, LAN_GW4, LAN_HOST6, LAN_GW6 = "192.168.1.20", "192.168.1.1", "fd00:6e73:1::20", "fd00:6e73:1::1"
SERVER4 = "192.0.2.2"
FAMILIES = (socket.AF_INET, socket.AF_INET6)


def build(spec: dict[str, Any]) -> PacketTunnelNetworkSettings:
    """Settings from a JSON-able spec (what the test sends to the provider)."""
    s = PacketTunnelNetworkSettings(spec.get("remote", SERVER4), mtu=spec.get("mtu"))
    s.tunnel_overhead_bytes = spec.get("overhead")
    if "v4" in spec:
        v4 = spec["v4"]
        s.ipv4_settings = IPv4Settings(v4["addresses"], v4["masks"])
        s.ipv4_settings.included_routes = [IPv4Route(*r) for r in v4.get("included", [])]
        s.ipv4_settings.excluded_routes = [IPv4Route(*r) for r in v4.get("excluded", [])]
    if "v6" in spec:
        v6 = spec["v6"]
        s.ipv6_settings = IPv6Settings(v6["addresses"], v6["lengths"])
        s.ipv6_settings.included_routes = [IPv6Route(*r) for r in v6.get("included", [])]
        s.ipv6_settings.excluded_routes = [IPv6Route(*r) for r in v6.get("excluded", [])]
    if "dns" in spec:
        s.dns_settings = DNSSettings(**spec["dns"])
    return s


class SettingsProvider(PacketTunnelProvider):
    """Applies the settings spec in each app message (``null`` clears); replies with the error, if any."""

    async def handle_app_message(self, data: bytes) -> bytes | None:
        spec = json.loads(data)
        try:
            await self.set_tunnel_network_settings(None if spec is None else build(spec))
        except TunnelProviderError as exc:
            return json.dumps({"code": int(exc.code), "error": str(exc)}).encode()
        return b"{}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    require_root()
    require_tun()
    require_binary("ip", "nft")
    from netsim.lab import Lab
    from netsim.testing.fixtures import assert_root_unchanged, root_snapshot

    before = root_snapshot()
    with Lab(services=False) as the_lab:
        yield the_lab
    assert_root_unchanged(before)


def run_with_tunnel(
    lab: Any, body: Callable[[TunnelProviderSession], Awaitable[None]], *, enforce_routes: bool = False
) -> None:
    manager = TunnelProviderManager(
        f"{__file__}:SettingsProvider",
        SubprocessLauncher(lab.netns("mac")),
        TunnelProviderProtocol(server_address=SERVER4, enforce_routes=enforce_routes),
    )

    async def main() -> None:
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
            assert session.status is VPNStatus.CONNECTED, session.last_disconnect_error
            await body(session)
            await session.stop_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.DISCONNECTED)
            assert session.last_disconnect_error is None

    trio.run(main)


async def apply(session: TunnelProviderSession, spec: dict[str, Any] | None) -> dict[str, Any]:
    with trio.fail_after(30):
        reply = await session.send_provider_message(json.dumps(spec).encode())
    return json.loads(reply or b"{}")  # type: ignore[no-any-return]


# -- kernel read-back ---------------------------------------------------------------------------------------
class Kernel:
    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.ipr = open_iproute(lab.netns("mac"))

    def close(self) -> None:
        self.ipr.close()

    def index(self, name: str) -> int:
        return int(self.ipr.link_lookup(ifname=name)[0])

    def name(self, index: int) -> str:
        return str(self.ipr.get_links(index)[0].get("ifname"))

    def mtu(self, name: str) -> int:
        return int(self.ipr.get_links(self.index(name))[0].get("mtu"))

    def addresses(self, name: str) -> set[str]:
        out = set()
        for msg in self.ipr.get_addr(index=self.index(name)):
            iface = ipaddress.ip_interface(f"{msg.get('address')}/{msg.get('prefixlen')}")
            if not iface.ip.is_link_local:
                out.add(str(iface))
        return out

    def table(self) -> set[tuple[str, str, str | None]]:
        """(destination, 'dev X' or 'via G dev X' or 'throw') of every route in the tunnel table."""
        out: set[tuple[str, str, str | None]] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self.ipr.get_routes(family=family, table=TUNNEL_TABLE):
                dst = f"{msg.get('dst') or ('0.0.0.0' if family == socket.AF_INET else '::')}/{msg.get('dst_len')}"
                if msg.get("priority") == BACKSTOP_METRIC:
                    continue  # the throw behind an excluded route (`backstops`)
                if msg.get("type") == 9:
                    out.add((dst, "throw", None))
                else:
                    out.add((dst, self.name(msg.get("oif")), msg.get("gateway")))
        return out

    def backstops(self) -> set[str]:
        """Destinations of the throw routes netsim keeps behind excluded routes through a link (row F8)."""
        return {
            f"{msg.get('dst')}/{msg.get('dst_len')}"
            for family in (socket.AF_INET, socket.AF_INET6)
            for msg in self.ipr.get_routes(family=family, table=TUNNEL_TABLE)
            if msg.get("priority") == BACKSTOP_METRIC and msg.get("type") == 9
        }

    def rules(self) -> set[tuple[int, int, int, int | None, int | None]]:
        """(family, priority, table, suppress_prefixlen, fwmark) of netsim's rules."""
        out: set[tuple[int, int, int, int | None, int | None]] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for rule in self.ipr.get_rules(family=family):
                if rule.get("priority") in (RULE_PRIORITY, RULE_PRIORITY + 1):
                    sup = rule.get("suppress_prefixlen")
                    out.add(
                        (
                            family,
                            rule.get("priority"),
                            rule.get("table"),
                            None if sup == 0xFFFFFFFF else sup,
                            rule.get("fwmark"),
                        )
                    )
        return out

    def route_get(self, address: str) -> tuple[str, str | None]:
        """(device, gateway) the kernel picks for ``address`` (``ip -j route get``)."""
        result = self.lab.run_sync("mac", ["ip", "-j", "route", "get", address])
        route = json.loads(result.stdout)[0]
        return route["dev"], route.get("gateway")

    def model(self, settings: PacketTunnelNetworkSettings, *, enforce_routes: bool = False) -> RouteTable:
        """The RouteTable model: netsim's tunnel routes plus the kernel's own main table."""
        model = tunnel_route_table(settings, enforce_routes=enforce_routes)
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self.ipr.get_routes(family=family, table=254):
                if msg.get("type") != 1:
                    continue
                plen = msg.get("dst_len")
                dst = msg.get("dst") or ("0.0.0.0" if family == socket.AF_INET else "::")
                net = ipaddress.ip_network(f"{dst}/{plen}")
                if net.is_link_local or net.is_multicast:
                    continue
                model.add_system_route(
                    net,
                    interface=self.name(msg.get("oif")),
                    gateway=msg.get("gateway"),
                    connected=msg.get("gateway") is None,
                )
        return model


@pytest.fixture
def kernel(lab: Any) -> Iterator[Kernel]:
    k = Kernel(lab)
    yield k
    k.close()


def check_against_model(
    kernel: Kernel, spec: dict[str, Any], utun: str, addresses: list[str], *, enforce_routes: bool = False
) -> None:
    model = kernel.model(build(spec), enforce_routes=enforce_routes)
    for address in addresses:
        dev, _ = kernel.route_get(address)
        route = model.resolve(address)
        assert route is not None, address
        into_tunnel = route.via_tunnel or route.interface == utun  # the utun's own subnet is a system route
        assert (dev == utun) == into_tunnel, (address, dev, route)
        if not into_tunnel:
            assert dev == "en0", (address, dev)


FULL = {
    "remote": SERVER4,
    "overhead": 80,
    "v4": {"addresses": ["10.8.0.2"], "masks": ["255.255.255.0"], "included": [["0.0.0.0", "0.0.0.0"]],
           "excluded": [["198.51.100.0", "255.255.255.0"]]},
    "v6": {"addresses": ["fd00:8::2"], "lengths": [64], "included": [["::", 0]],
           "excluded": [["2001:db8:113::", 64]]},
    "dns": {"servers": ["10.8.0.1", "fd00:8::1"], "search_domains": ["corp.example"],
            "match_domains": ["corp.example"]},
}  # fmt: skip


def test_settings_are_applied_exactly(lab: Any, kernel: Kernel) -> None:
    resolv = Path("/etc/netns") / lab.netns("mac") / "resolv.conf"
    original = resolv.read_text()

    async def body(session: TunnelProviderSession) -> None:
        assert await apply(session, FULL) == {}
        applied = session.applied_settings
        assert applied is not None
        utun = applied["device"]
        assert kernel.mtu(utun) == kernel.mtu("en0") - 80 == applied["mtu"]
        assert kernel.addresses(utun) == {"10.8.0.2/24", "fd00:8::2/64"}
        assert kernel.table() == {
            ("0.0.0.0/0", utun, None),
            ("198.51.100.0/24", "en0", LAN_GW4),
            (f"{SERVER4}/32", "en0", LAN_GW4),  # tunnel server auto-excluded
            ("::/0", utun, None),
            ("2001:db8:113::/64", "en0", LAN_GW6),
        }
        assert kernel.backstops() == {"198.51.100.0/24", f"{SERVER4}/32", "2001:db8:113::/64"}
        assert kernel.rules() == {(fam, RULE_PRIORITY, 254, 0, None) for fam in (socket.AF_INET, socket.AF_INET6)} | {
            (fam, RULE_PRIORITY + 1, TUNNEL_TABLE, None, 0x6E73) for fam in (socket.AF_INET, socket.AF_INET6)
        }
        text = resolv.read_text()
        assert "nameserver 10.8.0.1\nnameserver fd00:8::1\n" in text and "search corp.example\n" in text
        seen = lab.run_sync("mac", ["cat", "/etc/resolv.conf"]).stdout.decode()
        assert seen == text  # what processes in mac see through ip netns exec
        check_against_model(
            kernel, FULL, utun,
            ["203.0.113.10", LAN_HOST4, SERVER4, "198.51.100.7", "10.8.0.9",
             "2001:db8:2::2", "2001:db8:113::10", LAN_HOST6],
        )  # fmt: skip

        # Clear: everything netsim added is gone, the utun stays, the resolver is restored.
        assert await apply(session, None) == {}
        assert session.applied_settings is None
        assert kernel.table() == set() and kernel.rules() == set()
        assert kernel.addresses(utun) == set()
        assert resolv.read_text() == original
        assert kernel.route_get("203.0.113.10") == ("en0", LAN_GW4)

        # Re-apply different settings on the same utun.
        again = {"mtu": 1300, "v4": {"addresses": ["10.9.0.2"], "masks": ["255.255.255.255"],
                                     "included": [["10.0.0.0", "255.0.0.0"]]}}  # fmt: skip
        assert await apply(session, again) == {}
        assert session.applied_settings is not None and session.applied_settings["device"] == utun
        assert kernel.mtu(utun) == 1300 and kernel.addresses(utun) == {"10.9.0.2/32"}
        assert kernel.table() == {("10.0.0.0/8", utun, None), (f"{SERVER4}/32", "en0", LAN_GW4)}
        assert resolv.read_text() == original

    run_with_tunnel(lab, body)
    assert kernel.table() == set() == kernel.backstops() and kernel.rules() == set()  # stopping removed everything
    assert not any(link.get("ifname", "").startswith("utun") for link in kernel.ipr.get_links())


def test_route_precedence_cases(lab: Any, kernel: Kernel) -> None:
    base4 = {"addresses": ["10.8.0.2"], "masks": ["255.255.255.255"]}
    cases: list[tuple[dict[str, Any], dict[str, str]]] = [
        # default route included, a LAN host stays on the connected network
        ({"v4": {**base4, "included": [["0.0.0.0", "0.0.0.0"]]}}, {LAN_HOST4: "en0", "203.0.113.10": "utun"}),
        # excluded /32 inside an included /8
        ({"v4": {**base4, "included": [["10.0.0.0", "255.0.0.0"]], "excluded": [["10.1.2.3", "255.255.255.255"]]}},
         {"10.1.2.3": "en0", "10.1.2.4": "utun", "203.0.113.10": "en0"}),
        # connected network wins even over a longer included route
        ({"v4": {**base4, "included": [["192.168.1.0", "255.255.255.128"]]}}, {LAN_HOST4: "en0"}),
        # exact duplicate: excluded wins (documented choice)
        ({"v4": {**base4, "included": [["10.0.0.0", "255.0.0.0"]], "excluded": [["10.0.0.0", "255.0.0.0"]]}},
         {"10.5.5.5": "en0"}),
        # the tunnel server is excluded even when included explicitly
        ({"v4": {**base4, "included": [["0.0.0.0", "0.0.0.0"], [SERVER4, "255.255.255.255"]]}},
         {SERVER4: "en0", "192.0.2.3": "utun"}),
        # IPv6: default included, an excluded /64, the LAN stays direct
        ({"v6": {"addresses": ["fd00:8::2"], "lengths": [128], "included": [["::", 0]],
                 "excluded": [["2001:db8:113::", 64]]}},
         {"2001:db8:2::2": "utun", "2001:db8:113::10": "en0", LAN_HOST6: "en0"}),
    ]  # fmt: skip

    async def body(session: TunnelProviderSession) -> None:
        for spec, expected in cases:
            assert await apply(session, spec) == {}
            assert session.applied_settings is not None
            utun = session.applied_settings["device"]
            for address, want in expected.items():
                dev, gateway = kernel.route_get(address)
                assert dev == (utun if want == "utun" else "en0"), (spec, address, dev)
                if dev == "en0" and ipaddress.ip_address(address) not in ipaddress.ip_network(
                    "192.168.1.0/24" if ":" not in address else "fd00:6e73:1::/64"
                ):
                    assert gateway == (LAN_GW4 if ":" not in address else LAN_GW6)
            check_against_model(kernel, spec, utun, list(expected))

    run_with_tunnel(lab, body)


def test_bad_settings_fail_with_code_and_leave_the_kernel_alone(lab: Any, kernel: Kernel) -> None:
    async def body(session: TunnelProviderSession) -> None:
        assert await apply(session, {"v4": {"addresses": ["10.8.0.2"], "masks": ["255.255.255.255"]}}) == {}
        before = kernel.table()
        reply = await apply(session, {"mtu": 50, "v4": {"addresses": ["10.8.0.2"], "masks": ["255.255.255.255"]}})
        assert reply["code"] == 1 and "mtu: 50" in reply["error"]
        reply = await apply(session, {"v4": {"addresses": ["10.8.0.2", "10.8.0.3"], "masks": ["255.255.255.255"]}})
        assert reply["code"] == 1 and "ipv4_settings.subnet_masks" in reply["error"]
        reply = await apply(session, {"v6": {"addresses": ["fd00::1"], "lengths": [64], "included": [["10.0.0.0", 8]]}})
        assert reply["code"] == 1 and "included_routes[0].destination_address: '10.0.0.0'" in reply["error"]
        assert kernel.table() == before

    run_with_tunnel(lab, body)


@pytest.mark.parametrize("enforce", [False, True], ids=["default", "enforce_routes"])
def test_enforce_routes_from_the_protocol_reaches_the_kernel(lab: Any, kernel: Kernel, enforce: bool) -> None:
    """NEVPNProtocol.enforceRoutes (R47): tunnel routes then take precedence over locally defined routes.

    Included routes cover part of the LAN, whose connected route is in the system table. By default the system
    table wins (R49: the LAN host stays on en0); with ``enforce_routes=True`` on the protocol the provider
    process's configurator swaps netsim's two rules, so the same included route wins and the LAN host goes into
    the utun. Addresses no tunnel route covers keep the physical path either way.
    """
    spec = {
        "v4": {"addresses": ["10.8.0.2"], "masks": ["255.255.255.255"],
               "included": [["192.168.1.0", "255.255.255.128"], ["10.0.0.0", "255.0.0.0"]]},
        "v6": {"addresses": ["fd00:8::2"], "lengths": [128], "included": [["fd00:6e73:1::", 65]]},
    }  # fmt: skip
    tunnel_rules = {(fam, RULE_PRIORITY + (0 if enforce else 1), TUNNEL_TABLE, None, 0x6E73) for fam in FAMILIES}
    main_rules = {(fam, RULE_PRIORITY + (1 if enforce else 0), 254, 0, None) for fam in FAMILIES}

    async def body(session: TunnelProviderSession) -> None:
        assert await apply(session, spec) == {}
        applied = session.applied_settings
        assert applied is not None and applied["enforce_routes"] is enforce
        utun = applied["device"]
        assert kernel.rules() == tunnel_rules | main_rules
        lan = utun if enforce else "en0"
        assert kernel.route_get(LAN_HOST4)[0] == lan
        assert kernel.route_get(LAN_HOST6)[0] == lan
        assert kernel.route_get("10.1.2.3")[0] == utun  # included, nothing more specific locally: tunnel both ways
        assert kernel.route_get("203.0.113.10") == ("en0", LAN_GW4)  # no tunnel route: physical both ways
        check_against_model(
            kernel, spec, utun, [LAN_HOST4, LAN_HOST6, "10.1.2.3", "203.0.113.10"], enforce_routes=enforce
        )

    run_with_tunnel(lab, body, enforce_routes=enforce)
    assert kernel.rules() == set()


def test_second_tunnel_in_the_namespace_is_refused_and_leaves_the_first_alone(lab: Any, kernel: Kernel) -> None:
    """Issue 13: a second provider in a namespace with a tunnel must not take over or remove the first's state.

    Before the ownership claim the second provider's settings replaced the first's table entries, and its
    teardown deleted the first tunnel's rules at 6100/6101 and table 28275: the first session still said CONNECTED
    while its traffic left en0 (the leak, shown with a capture in tests/lab/test_tunnel_backends.py).
    """
    first_spec = {"v4": {"addresses": ["10.8.0.2"], "masks": ["255.255.255.255"], "included": [["0.0.0.0", "0.0.0.0"]]}}
    second_spec = {
        "v4": {"addresses": ["10.9.0.2"], "masks": ["255.255.255.255"], "included": [["10.0.0.0", "255.0.0.0"]]}
    }

    async def body(session: TunnelProviderSession) -> None:
        assert await apply(session, first_spec) == {}
        utun = session.applied_settings["device"] if session.applied_settings else ""
        table, rules = kernel.table(), kernel.rules()
        assert ("0.0.0.0/0", utun, None) in table and len(rules) == 4
        second = TunnelProviderManager(
            f"{__file__}:SettingsProvider",
            SubprocessLauncher(lab.netns("mac")),
            TunnelProviderProtocol(server_address=SERVER4),
        )
        async with second.open_session() as other:
            await other.start_vpn_tunnel()
            with trio.fail_after(30):
                await other.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
            reply = await apply(other, second_spec)
            assert reply.get("code") == 3, reply  # NETWORK_SETTINGS_FAILED, before anything changed
            assert "already has a tunnel" in reply["error"] and "pid" in reply["error"]
            assert kernel.table() == table and kernel.rules() == rules
            await other.stop_vpn_tunnel()
            with trio.fail_after(30):
                await other.wait_status(VPNStatus.DISCONNECTED)
        # The refused provider's teardown removed nothing of the first tunnel's.
        assert kernel.table() == table and kernel.rules() == rules
        assert kernel.route_get("203.0.113.10")[0] == utun

    run_with_tunnel(lab, body)
    assert kernel.table() == set() and kernel.rules() == set()


class _NoReclaimLauncher(SubprocessLauncher):
    async def launch(self, nursery: Any, provider: Any) -> Any:
        host = await super().launch(nursery, provider)
        host.reclaim = None  # type: ignore[attr-defined]  # the system side cannot sweep after this host
        return host


def test_a_killed_owners_claim_does_not_block_the_next_tunnel(lab: Any, kernel: Kernel) -> None:
    """The ownership claim is an flock: it dies with a SIGKILLed provider, whose rules the next owner replaces.

    The system side normally reclaims a dead host's state (row F3, tests/lab/test_utun_removed_lab.py); here it
    cannot (as if it had died too: the host's ``reclaim`` is taken away), so what the dead owner left stays until
    the next tunnel, which must not be blocked by it."""
    spec = {"v4": {"addresses": ["10.8.0.2"], "masks": ["255.255.255.255"], "included": [["0.0.0.0", "0.0.0.0"]]}}
    launcher = _NoReclaimLauncher(lab.netns("mac"))
    manager = TunnelProviderManager(
        f"{__file__}:SettingsProvider", launcher, TunnelProviderProtocol(server_address=SERVER4)
    )
    lock = TUNNEL_LOCK_DIR / f"{lab.netns('mac')}.lock"

    async def main() -> None:
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
            assert await apply(session, spec) == {}
            assert lock.read_text().strip() == str(launcher.processes[-1].pid)
            launcher.processes[-1].kill()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.DISCONNECTED)

    trio.run(main)
    assert lock.exists() and len(kernel.rules()) == 4  # what the dead owner left behind

    async def body(session: TunnelProviderSession) -> None:
        assert await apply(session, spec) == {}  # the claim was free: the next tunnel takes over
        assert len(kernel.rules()) == 4

    run_with_tunnel(lab, body)
    assert kernel.rules() == set() and kernel.table() == set() and not lock.exists()
