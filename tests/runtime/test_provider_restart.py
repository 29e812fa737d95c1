"""start -> stop -> start at once on one session (Apple: startVPNTunnel right after ``disconnected`` works).

A host outlives its tunnel for a moment: it reports DISCONNECTED, then finishes and exits. `Lingering` makes that
moment long and controlled (a background task that finishes ``linger`` seconds after being cancelled) so the old
host's exit lands, deterministically under the MockClock, in each phase of the next tunnel. Before the fix the
session took that exit for the new host dying ("the provider host exited", PROVIDER_FAILED).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from netsim.apple import (
    IPv4Settings,
    PacketTunnelNetworkSettings,
    ProviderStopReason,
    TunnelProviderProtocol,
    VPNStatus,
)
from netsim.errors import LocalProtocolError
from netsim.runtime.controller import InProcessLauncher, TunnelProviderManager, memory_launcher
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.memory_tun import MemoryTun

S = VPNStatus
ONE_CYCLE = [S.CONNECTING, S.CONNECTED, S.DISCONNECTING, S.DISCONNECTED]


class Lingering(PacketTunnelProvider):
    """Starts in ``start_delay`` s, stops in ``stop_delay`` s; its host exits ``linger`` s after DISCONNECTED."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_reasons: list[ProviderStopReason] = []
        self.exited_cleanly = False

    def _config(self, key: str) -> float:
        return float((self.protocol_configuration.provider_configuration or {})[key])

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        self.start_soon(self._background)
        await trio.sleep(self._config("start_delay"))
        s = PacketTunnelNetworkSettings("203.0.113.5", mtu=1400)
        s.ipv4_settings = IPv4Settings(["10.8.0.2"], ["255.255.255.0"])
        await self.set_tunnel_network_settings(s)

    async def stop_tunnel(self, reason: ProviderStopReason) -> None:
        self.stop_reasons.append(reason)
        await trio.sleep(self._config("stop_delay"))

    async def handle_app_message(self, data: bytes) -> bytes | None:
        return b"pong:" + data

    async def _background(self) -> None:
        try:
            await trio.sleep_forever()
        finally:  # cancelled at stop; finishing takes a while, so the host exits after reporting DISCONNECTED
            with trio.CancelScope(shield=True):
                await trio.sleep(self._config("linger"))
            self.exited_cleanly = True


def lingering_manager(
    start_delay: float, stop_delay: float, linger: float
) -> tuple[TunnelProviderManager, InProcessLauncher]:
    launcher = memory_launcher(MemoryTun, physical_mtu=1500)
    config = {"start_delay": start_delay, "stop_delay": stop_delay, "linger": linger}
    protocol = TunnelProviderProtocol(server_address="203.0.113.5", provider_configuration=config)
    return TunnelProviderManager(Lingering, launcher, protocol), launcher


@pytest.mark.parametrize(
    ("start_delay", "stop_delay", "linger", "dwell"),
    [
        pytest.param(0.0, 0.0, 0.0, 0.0, id="host-exits-at-once"),
        pytest.param(2.0, 0.0, 1.0, 0.0, id="old-host-exits-while-new-is-connecting"),
        pytest.param(0.0, 0.0, 1.0, 2.0, id="old-host-exits-while-new-is-connected"),
        pytest.param(0.0, 2.0, 1.0, 0.0, id="old-host-exits-while-new-is-disconnecting"),
    ],
)
def test_start_right_after_disconnected_works_every_cycle(
    start_delay: float, stop_delay: float, linger: float, dwell: float
) -> None:
    m, launcher = lingering_manager(start_delay, stop_delay, linger)
    cycles = 4

    async def main() -> None:
        async with m.open_session() as session:
            changes = session.status_changes()
            for cycle in range(cycles):
                await session.start_vpn_tunnel({"cycle": cycle})  # no wait after the previous DISCONNECTED
                await session.wait_status(S.CONNECTED, S.DISCONNECTED)
                assert session.status is S.CONNECTED, (cycle, session.last_disconnect_error)
                await trio.sleep(dwell)
                assert session.status is S.CONNECTED, (cycle, session.last_disconnect_error)
                assert await session.send_provider_message(b"%d" % cycle) == b"pong:%d" % cycle
                await session.stop_vpn_tunnel()
                await session.wait_status(S.DISCONNECTED)
                assert session.stop_reason is ProviderStopReason.USER_INITIATED, session.last_disconnect_error
                assert session.last_disconnect_error is None
            await trio.sleep(linger + 1.0)  # the last host's exit must not be reported either
            assert [c.status for c in session.history] == ONE_CYCLE * cycles
            assert session.stop_reason is ProviderStopReason.USER_INITIATED
            seen = []
            while True:
                try:
                    seen.append(changes.receive_nowait().status)
                except trio.WouldBlock:
                    break
            assert seen == ONE_CYCLE * cycles

        # open_session returned: every host task has finished (they run in its nursery), one host per start,
        # each told USER_INITIATED exactly once and each left on its own (none cancelled mid-exit).
        assert len(launcher.hosts) == cycles
        for host in launcher.hosts:
            assert isinstance(host.provider, Lingering)
            assert host.provider.stop_reasons == [ProviderStopReason.USER_INITIATED]
            assert host.provider.exited_cleanly
            assert host.status is S.DISCONNECTED

    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(main, clock=clock)


def test_stale_host_exit_after_failed_start_does_not_fail_the_next_tunnel() -> None:
    """A start that fails (PROVIDER_FAILED) followed at once by a good one: the failed host's exit is ignored."""

    class FailsFirst(Lingering):
        async def start_tunnel(self, options: dict[str, Any] | None) -> None:
            if options and options.get("fail"):
                self.start_soon(self._background)
                raise ConnectionRefusedError("server said no")
            await super().start_tunnel(options)

    launcher = memory_launcher(MemoryTun, physical_mtu=1500)
    protocol = TunnelProviderProtocol(provider_configuration={"start_delay": 0.5, "stop_delay": 0, "linger": 1.0})
    m = TunnelProviderManager(FailsFirst, launcher, protocol)

    async def main() -> None:
        async with m.open_session() as session:
            for _ in range(3):
                await session.start_vpn_tunnel({"fail": True})
                await session.wait_status(S.DISCONNECTED)
                assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
                assert "server said no" in (session.last_disconnect_error or "")
                await session.start_vpn_tunnel()
                await session.wait_status(S.CONNECTED, S.DISCONNECTED)
                assert session.status is S.CONNECTED, session.last_disconnect_error
                await trio.sleep(2.0)  # the failed host exits meanwhile
                assert session.status is S.CONNECTED, session.last_disconnect_error
                await session.stop_vpn_tunnel()
                await session.wait_status(S.DISCONNECTED)
            failed = [S.CONNECTING, S.DISCONNECTING, S.DISCONNECTED]
            assert [c.status for c in session.history] == (failed + ONE_CYCLE) * 3
            ends = [(c.reason, c.error) for c in session.history if c.status is S.DISCONNECTED]
            assert (
                ends
                == [
                    (ProviderStopReason.PROVIDER_FAILED, "ConnectionRefusedError: server said no"),
                    (ProviderStopReason.USER_INITIATED, None),
                ]
                * 3
            )

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_crash_of_the_current_host_is_still_reported_after_restarts() -> None:
    """The attribution fix must not hide real failures: killing the *current* host is PROVIDER_FAILED."""
    m, _ = lingering_manager(0.0, 0.0, 1.0)

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            await session.stop_vpn_tunnel()
            await session.wait_status(S.DISCONNECTED)
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            session._host.kill()  # type: ignore[union-attr]  # as if the new extension crashed
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "went away" in (session.last_disconnect_error or "")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_second_start_while_starting_is_refused() -> None:
    m, _ = lingering_manager(1.0, 0.0, 0.0)

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            with pytest.raises(LocalProtocolError, match="cannot start: the tunnel is connecting"):
                await session.start_vpn_tunnel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
