"""When the session (the system) engages and releases the includeAllNetworks kill switch (no root, MockClock).

Apple semantics (docs/kill-switch.md): engaged before the provider starts, kept through CONNECTING, CONNECTED,
REASSERTING, a crashed host, a provider that cancels itself and a failed start; released only by the user:
stop (also after a crash), ``set_enabled(False)``, closing the session. The kernel side is in
tests/lab/test_kill_switch_lab.py; here `MemoryKillSwitch` records what the session asked for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
from netsim.errors import LocalProtocolError
from netsim.runtime.controller import InProcessLauncher, LaunchedHost, TunnelProviderManager, memory_launcher
from netsim.runtime.killswitch import KillSwitchEvent, MemoryKillSwitch
from netsim.runtime.netconfig import MemoryNetworkConfigurator
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.memory_tun import MemoryTun

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
            session._host.kill()  # type: ignore[union-attr]
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
    class Bare:
        def __init__(self) -> None:
            self.launched = 0

        async def launch(self, nursery: trio.Nursery, provider: Any) -> LaunchedHost:
            self.launched += 1
            raise AssertionError("must not launch")

    bare = Bare()
    proto = TunnelProviderProtocol(server_address="203.0.113.5", include_all_networks=True)
    m = TunnelProviderManager(Provider, bare, proto)

    async def main() -> None:
        async with m.open_session() as session:
            with pytest.raises(LocalProtocolError, match="kill_switch"):
                await session.start_vpn_tunnel()
            assert session.status is S.DISCONNECTED and not session.kill_switch_engaged
        assert bare.launched == 0

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
