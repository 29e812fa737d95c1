"""When the session (the system) engages and releases the includeAllNetworks kill switch (MockClock).

Apple semantics (docs/kill-switch.md): engaged before the provider starts, kept through CONNECTING, CONNECTED,
REASSERTING, a crashed host, a provider that cancels itself and a failed start; released only by the user:
stop (also after a crash), ``set_enabled(False)``, closing the session. The kernel side is in
tests/lab/test_kill_switch_lab.py; here `MemoryKillSwitch` records what the session asked for. The last test
loads `KernelKillSwitch` into a throwaway netsim-prefixed namespace (root only; skipped otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from netsim.apple import (
    IPv4Route,
    IPv4Settings,
    PacketTunnelNetworkSettings,
    ProviderStopReason,
    TunnelProviderProtocol,
    VPNStatus,
)
from netsim.errors import LabError, LocalProtocolError
from netsim.runtime.controller import (
    InProcessLauncher,
    LaunchedHost,
    SubprocessLauncher,
    TunnelProviderManager,
    memory_launcher,
)
from netsim.runtime.killswitch import KernelKillSwitch, KillSwitchEvent, MemoryKillSwitch, connected_prefixes
from netsim.runtime.netconfig import MemoryNetworkConfigurator
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.memory_tun import MemoryTun
from netsim.testing.require import require_binary, require_root

S = VPNStatus
ENGAGE = KillSwitchEvent("engage")
RELEASE = KillSwitchEvent("release")


class Provider(PacketTunnelProvider):
    """Connects (or fails, or hangs, by start option) and obeys ``reassert:1`` / ``cancel`` app messages."""

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        if options and options.get("fail"):
            raise RuntimeError("server unreachable")
        if options and options.get("hang"):
            await trio.sleep_forever()
        s = PacketTunnelNetworkSettings("203.0.113.5")
        s.ipv4_settings = IPv4Settings(["10.8.0.2"], ["255.255.255.0"], included_routes=[IPv4Route.default()])
        await self.set_tunnel_network_settings(s)

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"reassert:1":
            self.reasserting = True
        elif data == b"reassert:0":
            self.reasserting = False
        elif data == b"cancel":
            self.cancel_tunnel_with_error(RuntimeError("auth expired"))
        return b"ok"


class RecordingLauncher(InProcessLauncher):
    """Records whether the kill switch was already engaged when each host was launched."""

    def __init__(self) -> None:
        super().__init__(lambda: MemoryNetworkConfigurator(MemoryTun, physical_mtu=1500))
        self.engaged_at_launch: list[bool] = []

    async def launch(self, nursery: trio.Nursery, provider: type[PacketTunnelProvider] | str) -> LaunchedHost:
        self.engaged_at_launch.append(self.kill_switch.engaged)
        return await super().launch(nursery, provider)


def setup(ian: bool = True, **protocol: Any) -> tuple[TunnelProviderManager, RecordingLauncher, MemoryKillSwitch]:
    launcher = RecordingLauncher()
    proto = TunnelProviderProtocol(server_address="203.0.113.5", include_all_networks=ian, **protocol)
    switch = launcher.kill_switch
    assert isinstance(switch, MemoryKillSwitch)
    return TunnelProviderManager(Provider, launcher, proto), launcher, switch


def mock_run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.reliability("K9")
def test_engaged_before_the_host_launches_and_kept_while_connecting_connected_reasserting() -> None:
    m, launcher, switch = setup()

    async def main() -> None:
        async with m.open_session() as session:
            assert not session.kill_switch_engaged
            await session.start_vpn_tunnel({"hang": True})
            assert launcher.engaged_at_launch == [True], "the block must exist before the provider runs"
            assert session.status is S.CONNECTING and session.kill_switch_engaged
            await trio.sleep(5)
            assert session.status is S.CONNECTING and session.kill_switch_engaged
            await session.stop_vpn_tunnel()  # the user gives up on a tunnel that never connected
            assert session.status is S.DISCONNECTED and not session.kill_switch_engaged

            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            assert session.kill_switch_engaged
            await session.send_provider_message(b"reassert:1")
            await session.wait_status(S.REASSERTING)
            assert session.kill_switch_engaged
            await session.send_provider_message(b"reassert:0")
            await session.wait_status(S.CONNECTED)
            assert session.kill_switch_engaged
            await session.stop_vpn_tunnel()
            assert session.status is S.DISCONNECTED, "with the kill switch, stop returns once the tunnel is down"
            assert not session.kill_switch_engaged
        assert switch.history == [ENGAGE, RELEASE, ENGAGE, RELEASE]

    mock_run(main)


@pytest.mark.reliability("K9")
def test_kept_after_a_crash_until_the_user_stops_an_already_disconnected_tunnel() -> None:
    m, launcher, switch = setup()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            session._host.kill()  # type: ignore[union-attr]  # the extension crashes
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            await trio.sleep(30)
            assert session.kill_switch_engaged, "a crashed provider must not lift the block (fail closed)"
            await session.start_vpn_tunnel()  # a restart keeps the same block: no release in between
            await session.wait_status(S.CONNECTED)
            session._host.kill()  # type: ignore[union-attr]
            await session.wait_status(S.DISCONNECTED)
            assert switch.history == [ENGAGE]
            await session.stop_vpn_tunnel()  # the user presses Disconnect on a DISCONNECTED tunnel
            assert not session.kill_switch_engaged
            assert switch.history == [ENGAGE, RELEASE]
            assert launcher.engaged_at_launch == [True, True]

    mock_run(main)


@pytest.mark.parametrize("how", ["cancel", "failed start"])
def test_kept_when_the_provider_gives_up_or_the_start_fails(how: str) -> None:
    m, _, switch = setup()

    async def main() -> None:
        async with m.open_session() as session:
            if how == "cancel":
                await session.start_vpn_tunnel()
                await session.wait_status(S.CONNECTED)
                await session.send_provider_message(b"cancel")
            else:
                await session.start_vpn_tunnel({"fail": True})
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert session.kill_switch_engaged
        assert switch.history == [ENGAGE, RELEASE]  # closing the session released it

    mock_run(main)


def test_set_enabled_false_stops_releases_and_refuses_starts_until_enabled() -> None:
    m, _, switch = setup()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            await m.set_enabled(False)
            assert m.is_enabled is False
            assert session.status is S.DISCONNECTED and session.stop_reason is ProviderStopReason.USER_INITIATED
            assert not session.kill_switch_engaged
            with pytest.raises(LocalProtocolError, match="disabled"):
                await session.start_vpn_tunnel()
            assert not session.kill_switch_engaged, "a refused start must not engage the block"
            await m.set_enabled(True)
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            assert session.kill_switch_engaged
            session._host.kill()
            await session.wait_status(S.DISCONNECTED)
            await m.set_enabled(False)  # disabling after a crash also lifts the kept block
            assert not session.kill_switch_engaged
        assert switch.history == [ENGAGE, RELEASE, ENGAGE, RELEASE]

    mock_run(main)


def test_released_when_the_session_closes_running_or_crashed() -> None:
    m, _, switch = setup()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
        assert switch.history == [ENGAGE, RELEASE] and not switch.engaged
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            session._host.kill()  # type: ignore[union-attr]
            await session.wait_status(S.DISCONNECTED)
            assert session.kill_switch_engaged
        assert switch.history == [ENGAGE, RELEASE, ENGAGE, RELEASE] and not switch.engaged

    mock_run(main)


def test_not_engaged_without_include_all_networks() -> None:
    m, launcher, switch = setup(ian=False, exclude_local_networks=True, enforce_routes=True)

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            assert not session.kill_switch_engaged
            session._host.kill()  # type: ignore[union-attr]
            await session.wait_status(S.DISCONNECTED)
            assert not session.kill_switch_engaged
            assert await session.kill_switch_counters() == {}
        assert switch.history == [] and launcher.engaged_at_launch == [False]

    mock_run(main)


def test_a_start_without_ian_lifts_a_block_kept_from_a_crash() -> None:
    m, _, switch = setup()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            session._host.kill()  # type: ignore[union-attr]
            await session.wait_status(S.DISCONNECTED)
            assert session.kill_switch_engaged
            m.protocol_configuration.include_all_networks = False  # the app saves a configuration without IAN
            await session.start_vpn_tunnel()
            assert not session.kill_switch_engaged
            await session.wait_status(S.CONNECTED)
        assert switch.history == [ENGAGE, RELEASE]

    mock_run(main)


def test_exclude_local_networks_reaches_the_kill_switch_with_only_private_prefixes() -> None:
    launcher = memory_launcher(MemoryTun, physical_mtu=1500)
    switch = MemoryKillSwitch(local_prefixes=("192.168.1.10/24", "203.0.113.7/24", "fe80::1/64"))
    launcher.kill_switch = switch
    proto = TunnelProviderProtocol(server_address="203.0.113.5", include_all_networks=True, exclude_local_networks=True)
    m = TunnelProviderManager(Provider, launcher, proto)

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            assert switch.config is not None and switch.config.exclude_local_networks
            assert switch.config.local_prefixes == ("192.168.1.0/24", "fe80::/64")  # the public /24 is refused
        assert switch.history == [KillSwitchEvent("engage", True), RELEASE]

    mock_run(main)


def test_a_launcher_without_a_kill_switch_cannot_start_an_ian_tunnel() -> None:
    launcher = memory_launcher(MemoryTun, physical_mtu=1500)
    del launcher.kill_switch  # a third-party launcher that has none
    proto = TunnelProviderProtocol(server_address="203.0.113.5", include_all_networks=True)
    m = TunnelProviderManager(Provider, launcher, proto)

    async def main() -> None:
        async with m.open_session() as session:
            with pytest.raises(LocalProtocolError, match="kill_switch"):
                await session.start_vpn_tunnel()
            assert session.status is S.DISCONNECTED and not session.kill_switch_engaged
        assert launcher.hosts == [], "nothing may be launched without the block"

    mock_run(main)


def test_include_all_networks_gives_the_configurator_enforce_routes_ordering() -> None:
    """IAN overrides enforceRoutes (apple-reference §3 rule 5): the host must use the enforce-routes rule order."""
    m, launcher, _ = setup(enforce_routes=False)

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            configurator = launcher.hosts[-1].configurator
            assert isinstance(configurator, MemoryNetworkConfigurator) and configurator.enforce_routes is True
            assert session.applied_settings is not None and session.applied_settings["enforce_routes"] is True

    mock_run(main)


def test_protocol_exclude_flags_default_to_apples_yes_and_round_trip() -> None:
    proto = TunnelProviderProtocol()
    assert (proto.exclude_apns, proto.exclude_cellular_services, proto.exclude_device_communication) == (True,) * 3
    changed = TunnelProviderProtocol(exclude_apns=False, exclude_cellular_services=False)
    again = TunnelProviderProtocol.from_dict(changed.to_dict())
    assert again == changed and again.exclude_device_communication is True
    legacy = {k: v for k, v in proto.to_dict().items() if not k.startswith("exclude_") or k == "exclude_local_networks"}
    assert TunnelProviderProtocol.from_dict(legacy).exclude_apns is True  # an older dict gets Apple's default


# ------------------------------------------------------------------------------------------------ KernelKillSwitch
def test_kernel_kill_switch_refuses_a_namespace_that_is_not_netsims() -> None:
    for netns in ("", "default", "root", "mac"):
        with pytest.raises(LabError, match="netsim-"):
            KernelKillSwitch(netns)
    with pytest.raises(LabError, match="netsim-"):
        SubprocessLauncher("other-ns")


def test_connected_prefixes_reads_ip_json_and_skips_lo_utun_and_junk() -> None:
    doc = [
        {"ifname": "lo", "addr_info": [{"local": "127.0.0.1", "prefixlen": 8}]},
        {
            "ifname": "en0",
            "addr_info": [{"local": "192.168.1.10", "prefixlen": 24}, {"local": "fe80::1", "prefixlen": 64}],
        },
        {"ifname": "utun0", "addr_info": [{"local": "10.8.0.2", "prefixlen": 32}]},
        {"ifname": "en1", "addr_info": [{"local": "nonsense", "prefixlen": 24}, {"prefixlen": "x"}, "junk"]},
        "junk",
        {"ifname": 5},
    ]
    assert connected_prefixes(json.dumps(doc)) == ["192.168.1.0/24", "fe80::/64"]
    for bad in ("", "{", "{}", b"\xff"):
        assert connected_prefixes(bad) == []


@pytest.fixture
def scratch_netns() -> Iterator[str]:
    require_root()
    require_binary("ip", "nft")
    name = f"netsim-ksrt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_kernel_kill_switch_is_idempotent_counts_and_removes_only_its_table(scratch_netns: str) -> None:
    ns = ["ip", "netns", "exec", scratch_netns]
    subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True)
    subprocess.run([*ns, "ip", "link", "add", "en0", "type", "veth", "peer", "name", "en0p"], check=True)
    subprocess.run([*ns, "ip", "addr", "add", "192.168.7.2/24", "dev", "en0"], check=True)
    subprocess.run([*ns, "ip", "addr", "add", "198.51.100.2/24", "dev", "en0"], check=True)  # public "on-link"
    subprocess.run([*ns, "ip", "link", "set", "en0p", "up"], check=True)
    subprocess.run([*ns, "ip", "link", "set", "en0", "up"], check=True)
    subprocess.run([*ns, "nft", "add", "table", "inet", "someone_else"], check=True)
    switch = KernelKillSwitch(scratch_netns)

    def send(addr: str) -> str:
        code = (
            "import socket, sys\ntry:\n socket.socket(2, 2).sendto(b'x', (sys.argv[1], 9)); print('sent')\n"
            "except OSError as e:\n print(type(e).__name__)"
        )
        done = subprocess.run([*ns, sys.executable, "-c", code, addr], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    async def main() -> None:
        await switch.engage(exclude_local_networks=True)
        await switch.engage(exclude_local_networks=True)  # idempotent: one table, one history entry
        assert switch.engaged and switch.history == [KillSwitchEvent("engage", True)]
        assert switch.config is not None and set(switch.config.local_prefixes) == {"192.168.7.0/24", "fe80::/64"}
        assert switch.refused_prefixes == ("198.51.100.0/24",)
        assert await trio.to_thread.run_sync(send, "198.51.100.9") == "PermissionError"
        assert await trio.to_thread.run_sync(send, "192.168.7.9") == "sent"
        counters = await switch.counters()
        assert counters["out_drop"].packets == 1 and counters["out_local"].packets >= 1
        await switch.release()
        await switch.release()
        assert not switch.engaged and switch.history == [KillSwitchEvent("engage", True), RELEASE]
        assert (await switch.counters())["out_drop"].packets == 1  # the last values, read before the release
        assert await trio.to_thread.run_sync(send, "198.51.100.9") == "sent"

    trio.run(main)
    tables = subprocess.run([*ns, "nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert "netsim_killswitch" not in tables and "someone_else" in tables


def test_a_restart_with_other_local_network_flags_replaces_the_block_without_a_release() -> None:
    m, _, switch = setup()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            session._host.kill()  # type: ignore[union-attr]
            await session.wait_status(S.DISCONNECTED)
            m.protocol_configuration.exclude_local_networks = True
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            assert session.kill_switch_engaged and switch.config is not None and switch.config.exclude_local_networks
        assert switch.history == [ENGAGE, KillSwitchEvent("engage", True), RELEASE]

    mock_run(main)
