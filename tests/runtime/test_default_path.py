"""``default_path`` without root: a user's provider sees path changes in the memory backend, and the built-in
tunnel reasserts and forces a handshake when the path is back (issue 16; rows F8, F16 in part).

The lab test with real packets is tests/lab/test_path_change_lab.py.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import trio
import trio.testing

from netsim.apple.enums import VPNStatus
from netsim.apple.path import NWInterfaceType, NWPath, NWPathStatus
from netsim.apple.protocol import TunnelProviderProtocol
from netsim.apple.settings import IPv4Settings, PacketTunnelNetworkSettings
from netsim.runtime.controller import TunnelProviderManager, memory_launcher
from netsim.runtime.netconfig import MemoryNetworkConfigurator
from netsim.runtime.pathmonitor import default_route_interface
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.memory_tun import MemoryTun
from netsim.testing.memory_tunnel import memory_tunnel


def run(fn: Any) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


class PathWatcher(PacketTunnelProvider):
    """A user's provider that is not the built-in one: records what it sees of the path."""

    def __init__(self) -> None:
        super().__init__()
        self.at_start: NWPath | None = None
        self.seen: list[NWPath] = []

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        self.at_start = self.default_path
        settings = PacketTunnelNetworkSettings("192.0.2.1", ipv4_settings=IPv4Settings(["10.9.0.2"], ["255.255.255.0"]))
        await self.set_tunnel_network_settings(settings)

    def default_path_did_change(self, path: NWPath) -> None:
        self.seen.append(path)


async def _wait(predicate: Any) -> None:
    with trio.fail_after(30):
        while not predicate():
            await trio.sleep(0.01)


def test_a_users_provider_sees_default_path_changes_in_memory() -> None:
    async def main() -> tuple[PathWatcher, list[NWPath | None]]:
        launcher = memory_launcher(lambda name, mtu: MemoryTun(name=name, mtu=mtu))
        manager = TunnelProviderManager(PathWatcher, launcher, TunnelProviderProtocol(server_address="192.0.2.1"))
        current: list[NWPath | None] = []
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(VPNStatus.CONNECTED)
            host = launcher.hosts[-1]
            provider = host.provider
            assert isinstance(provider, PathWatcher) and isinstance(host.configurator, MemoryNetworkConfigurator)
            host.configurator.set_path(NWPathStatus.UNSATISFIED)
            await _wait(lambda: len(provider.seen) == 1)
            current.append(provider.default_path)
            host.configurator.set_path(interface_name="en1", interface_type=NWInterfaceType.WIRED_ETHERNET)
            await _wait(lambda: len(provider.seen) == 2)
            host.configurator.set_path(interface_name="en1", interface_type=NWInterfaceType.WIRED_ETHERNET)
            host.configurator.set_path(
                NWPathStatus.SATISFIED, interface_name="en2", interface_type=NWInterfaceType.CELLULAR, is_expensive=True
            )
            await _wait(lambda: len(provider.seen) == 3)
            current.append(provider.default_path)
            await session.stop_vpn_tunnel()
            await session.wait_status(VPNStatus.DISCONNECTED)
        return provider, current

    provider, current = run(main)
    wifi = NWPath(NWPathStatus.SATISFIED, interface_type=NWInterfaceType.WIFI, interface_name="en0")
    assert provider.at_start == wifi
    statuses = [(p.status, p.interface_name, p.interface_type) for p in provider.seen]
    assert statuses == [
        (NWPathStatus.UNSATISFIED, None, None),  # link down: no interface
        (NWPathStatus.SATISFIED, "en1", NWInterfaceType.WIRED_ETHERNET),  # back, on another interface
        (NWPathStatus.SATISFIED, "en2", NWInterfaceType.CELLULAR),  # the same path set twice is no change
    ]
    assert provider.seen[2].is_expensive and current[0] == provider.seen[0] and current[1] == provider.seen[2]
    assert provider.seen[0].to_json() == {
        "status": 2,
        "is_expensive": False,
        "is_constrained": False,
        "interface_type": None,
        "interface_name": None,
    }


def test_the_built_in_tunnel_reasserts_while_the_path_is_down_and_handshakes_when_it_is_back() -> None:
    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with memory_tunnel() as t:
            await t.wait_connected()
            helper, provider = t.helper, t.provider
            before = helper.device.handshakes_initiated
            t.set_path(NWPathStatus.UNSATISFIED)
            await _wait(lambda: provider.reasserting)
            await trio.sleep(1)
            out["down"] = (t.session.status, helper.path_json())
            t.set_path()  # back on en0, well within REKEY_TIMEOUT of the start's handshake
            await _wait(lambda: not provider.reasserting)
            out["up"] = (t.session.status, helper.path_json())
            out["forced"] = helper.device.handshakes_initiated - before
            out["history"] = [c.status for c in t.session.history]
            out["stats"] = await t.provider_stats()
        return out

    out = run(main)
    status, path = out["down"]
    assert status is VPNStatus.REASSERTING and path["satisfied"] is False and path["ready"] is False
    status, path = out["up"]
    assert status is VPNStatus.CONNECTED and path["ready"] is True
    assert path["handshakes_by_reason"]["path_change"] == 1 and path["recoveries"] == 1 and out["forced"] == 1
    history = out["history"]
    assert history[history.index(VPNStatus.REASSERTING) + 1] is VPNStatus.CONNECTED
    assert [p["status"] for p in out["stats"]["path_history"]] == [2, 1]


def test_without_the_path_handshake_no_initiation_is_forced() -> None:
    """The control: with ``path_handshake`` off the path comes back and nothing is initiated for it."""

    async def main() -> dict[str, Any]:
        async with memory_tunnel() as t:
            await t.wait_connected()
            t.helper.path_handshake = False
            before = t.helper.device.handshakes_initiated
            t.set_path(NWPathStatus.UNSATISFIED)
            await _wait(lambda: t.provider.reasserting)
            t.set_path()
            await _wait(lambda: not t.provider.reasserting)
            return {"path": t.helper.path_json(), "initiated": t.helper.device.handshakes_initiated - before}

    out = run(main)
    assert out["path"]["handshakes_by_reason"]["path_change"] == 0 and out["initiated"] == 0
    assert out["path"]["ready"] is True


class _Rebindable:
    """Wraps the fake network's transport with the `UdpTransport.bind_to_device` the helper calls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.bound: list[str] = []

    def bind_to_device(self, interface: str) -> None:
        self.bound.append(interface)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_the_helper_rebinds_to_the_interface_the_default_route_moved_to() -> None:
    async def main() -> tuple[list[str], dict[str, Any]]:
        async with memory_tunnel() as t:
            await t.wait_connected()
            helper = t.helper
            wrapped = _Rebindable(helper.transport)
            helper.transport = wrapped
            helper.interface = "en0"
            helper.path_changed("en0")  # the same interface, still satisfied: nothing to do
            helper.path_changed(None)  # link down: stay put
            helper.path_changed("en1")  # back on another uplink
            await _wait(lambda: helper.path_json()["ready"])
            helper.path_changed("en0")  # and moved back
            return wrapped.bound, helper.path_json()

    bound, path = run(main)
    assert bound == ["en1", "en0"]
    assert path["interface"] == "en0" and path["rebinds"] == 2 and path["changes"] == 4
    assert path["handshakes_by_reason"]["path_change"] == 2


def test_the_helpers_watch_path_calls_path_changed_on_route_events() -> None:
    async def main() -> tuple[list[str | None], dict[str, Any]]:
        async with memory_tunnel() as t:
            await t.wait_connected()
            helper = t.helper
            seen: list[str | None] = []
            original = helper.path_changed

            def record(interface: str | None) -> None:
                seen.append(interface)
                original(interface)

            helper.path_changed = record  # type: ignore[method-assign]
            # the memory backend's event source and path stand in for the namespace's route events and table
            mac = MemoryNetworkConfigurator(lambda name, mtu: MemoryTun(name=name, mtu=mtu))
            events = mac.path_events()
            assert events is not None

            def interface() -> str | None:
                path = mac.default_path()
                return path.interface_name if path.is_satisfied else None

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: helper.watch_path(events, interface))
                await trio.sleep(0.1)
                mac.set_path(NWPathStatus.UNSATISFIED)
                await trio.sleep(0.2)
                mac.set_path(NWPathStatus.SATISFIED)
                await _wait(lambda: helper.path_json()["ready"])
                nursery.cancel_scope.cancel()
            return seen, helper.path_json()

    seen, path = run(main)
    assert seen == [None, "en0"] and path["recoveries"] == 1


def test_default_route_interface_reads_the_main_table(tmp_path: Path) -> None:
    (tmp_path / "route").write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "en0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "en1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n"
        "en0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "garbage line\n"
        "en2\t00000000\t0101A8C0\tzz\t0\t0\t1\t00000000\t0\t0\t0\n"
    )
    zero = "0" * 32
    (tmp_path / "ipv6_route").write_text(
        f"{zero} 00 {zero} 00 {zero} 00000400 1 0 00000001 utun0\n"
        f"{zero} 00 {zero} 00 {zero} ffffffff 1 0 00200200 lo\n"
        f"{zero} 00 {zero} 00 fd000000000000000000000000000001 00000400 1 0 00000003 en1\n"
    )
    assert default_route_interface(socket.AF_INET, proc_net=tmp_path) == "en0"  # the lower metric
    assert default_route_interface(socket.AF_INET6, proc_net=tmp_path) == "en1"  # not the tunnel's own default
    (tmp_path / "route").write_text("Iface\tDestination\n")
    assert default_route_interface(socket.AF_INET, proc_net=tmp_path) is None
    assert default_route_interface(socket.AF_INET, proc_net=tmp_path / "missing") is None
