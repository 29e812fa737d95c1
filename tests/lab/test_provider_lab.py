"""The issue's "done when": the example provider started from the controller in the lab answers ``ping``.

``ping`` runs in ``mac`` against virtual addresses routed into the tunnel; the provider sees the requests in
``read_packet_objects()`` and its replies reach ``ping``. UDP echo goes through a socket in ``mac``.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from netsim.apple import (
    IPv4Route,
    IPv4Settings,
    PacketTunnelNetworkSettings,
    ProviderStopReason,
    TunnelProviderProtocol,
    VPNStatus,
)
from netsim.runtime.controller import SubprocessLauncher, TunnelProviderManager, TunnelProviderSession
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.require import require_binary, require_root, require_tun

pytestmark = [pytest.mark.lab, pytest.mark.tun]

VIRTUAL_V4, VIRTUAL_V6 = "10.66.0.1", "fd00:66::1"


class Moody(PacketTunnelProvider):
    """Fails its start when asked to; otherwise cancels itself with an error on the first app message."""

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        if options and options.get("fail"):
            raise ConnectionRefusedError("server said no")

    async def handle_app_message(self, data: bytes) -> bytes | None:
        self.cancel_tunnel_with_error(PermissionError("auth expired"))
        return b"bye"


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    require_root()
    require_tun()
    require_binary("ip", "nft", "ping")
    from netsim.lab import Lab
    from netsim.testing.fixtures import assert_root_unchanged, root_snapshot

    before = root_snapshot()
    with Lab(services=False) as the_lab:
        yield the_lab
    assert_root_unchanged(before)


def test_ping_and_udp_echo_answered_by_the_example_provider(lab: Any, tmp_path: Any) -> None:
    manager = TunnelProviderManager(
        "examples.ping_responder:PingResponder",
        SubprocessLauncher(lab.netns("mac"), log_path=tmp_path / "provider.log"),
        TunnelProviderProtocol(
            server_address="192.0.2.2",
            provider_configuration={"virtual_v4": VIRTUAL_V4, "virtual_v6": VIRTUAL_V6},
        ),
    )

    async def main() -> None:
        async with manager.open_session() as session:
            changes = session.status_changes()
            await session.start_vpn_tunnel({"started_by": "test"})
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
            assert session.status is VPNStatus.CONNECTED, session.last_disconnect_error

            # Before: the LAN gateway is still reached directly; the virtual address goes into the tunnel.
            utun = (session.applied_settings or {})["device"]
            route = json.loads((await lab.run("mac", ["ip", "-j", "route", "get", VIRTUAL_V4])).stdout)[0]
            assert route["dev"] == utun

            for target in (VIRTUAL_V4, VIRTUAL_V6):
                result = await lab.run("mac", ["ping", "-c", "3", "-i", "0.2", "-W", "2", target], timeout=20)
                out = result.stdout.decode()
                assert re.search(r"3 packets transmitted, 3 received", out), out

            sock = lab.socket("mac", socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            try:
                sock.sendto(b"hello through the tunnel", (VIRTUAL_V4, 7))
                data, peer = sock.recvfrom(2048)
            finally:
                sock.close()
            assert data == b"hello through the tunnel" and peer == (VIRTUAL_V4, 7)

            stats = json.loads(await session.send_provider_message(b"stats") or b"{}")
            assert stats["requests_seen"] == 7 and stats["replies_written"] == 7  # 3 + 3 pings, 1 UDP
            assert stats["packets_read"] >= 7 and stats["read_batches"] >= 1

            await session.stop_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.DISCONNECTED)
            seen = []
            while True:
                try:
                    seen.append(changes.receive_nowait().status)
                except trio.WouldBlock:
                    break
            assert seen == [VPNStatus.CONNECTING, VPNStatus.CONNECTED, VPNStatus.DISCONNECTING, VPNStatus.DISCONNECTED]
            assert session.last_disconnect_error is None

        # After stop the address is no longer routed into any tunnel.
        route = json.loads(lab.run_sync("mac", ["ip", "-j", "route", "get", VIRTUAL_V4]).stdout)[0]
        assert route["dev"] == "en0"

    trio.run(main)


def test_failing_provider_process_reports_provider_failed(lab: Any) -> None:
    manager = TunnelProviderManager("examples.ping_responder:NoSuchProvider", SubprocessLauncher(lab.netns("mac")))

    async def main() -> None:
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.DISCONNECTED)
            assert session.stop_reason is not None and session.stop_reason.name == "PROVIDER_FAILED"
            assert "exit code" in (session.last_disconnect_error or "")

    trio.run(main)


def test_real_process_status_transitions(lab: Any) -> None:
    manager = TunnelProviderManager(f"{__file__}:Moody", SubprocessLauncher(lab.netns("mac")))

    async def main() -> None:
        async with manager.open_session() as session:
            await session.start_vpn_tunnel({"fail": True})
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.DISCONNECTED)
            assert [c.status for c in session.history] == [
                VPNStatus.CONNECTING, VPNStatus.DISCONNECTING, VPNStatus.DISCONNECTED
            ]  # fmt: skip
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "ConnectionRefusedError: server said no" in (session.last_disconnect_error or "")

            await session.start_vpn_tunnel(None)
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.CONNECTED)
                assert await session.send_provider_message(b"x") == b"bye"
                await session.wait_status(VPNStatus.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "auth expired" in (session.last_disconnect_error or "")

    trio.run(main)


class Lingering(PacketTunnelProvider):
    """Its host outlives DISCONNECTED: a background task takes ``linger`` s to finish (or forever: ``-1``)."""

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        self.start_soon(self._background, float((options or {}).get("linger", 0.3)))
        s = PacketTunnelNetworkSettings("192.0.2.2")
        routes = [IPv4Route("10.66.0.0", "255.255.255.0")]  # VIRTUAL_V4 goes into the tunnel
        s.ipv4_settings = IPv4Settings(["10.77.0.2"], ["255.255.255.0"], included_routes=routes)
        await self.set_tunnel_network_settings(s)

    async def handle_app_message(self, data: bytes) -> bytes | None:
        return b"pong:" + data

    async def _background(self, linger: float) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await (trio.sleep_forever() if linger < 0 else trio.sleep(linger))


async def _one_cycle(session: TunnelProviderSession, lab: Any, options: dict[str, Any], cycle: int) -> None:
    """start at once (no wait after the previous DISCONNECTED) -> CONNECTED -> stop -> DISCONNECTED."""
    await session.start_vpn_tunnel(options)
    with trio.fail_after(30):
        await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
    assert session.status is VPNStatus.CONNECTED, (cycle, session.last_disconnect_error)
    utun = (session.applied_settings or {})["device"]
    route = json.loads((await lab.run("mac", ["ip", "-j", "route", "get", VIRTUAL_V4])).stdout)[0]
    assert route["dev"] == utun
    assert await session.send_provider_message(b"%d" % cycle) == b"pong:%d" % cycle
    assert session.status is VPNStatus.CONNECTED, (cycle, session.last_disconnect_error)
    await session.stop_vpn_tunnel()
    with trio.fail_after(30):
        await session.wait_status(VPNStatus.DISCONNECTED)
    assert session.stop_reason is ProviderStopReason.USER_INITIATED, (cycle, session.last_disconnect_error)
    assert session.last_disconnect_error is None


def test_restart_at_once_after_disconnected(lab: Any, tmp_path: Any) -> None:
    """Apple: startVPNTunnel right after ``disconnected`` works; the previous process, still exiting, is ignored."""
    launcher = SubprocessLauncher(lab.netns("mac"), log_path=tmp_path / "provider.log")
    manager = TunnelProviderManager(
        f"{__file__}:Lingering", launcher, TunnelProviderProtocol(server_address="192.0.2.2")
    )
    cycles = 3

    async def main() -> None:
        async with manager.open_session() as session:
            changes = session.status_changes()
            for cycle in range(cycles):
                await _one_cycle(session, lab, {"linger": 0.3}, cycle)
            seen = []
            while True:
                try:
                    seen.append(changes.receive_nowait().status)
                except trio.WouldBlock:
                    break
            one = [VPNStatus.CONNECTING, VPNStatus.CONNECTED, VPNStatus.DISCONNECTING, VPNStatus.DISCONNECTED]
            assert seen == one * cycles

    trio.run(main)
    # One process per start, each reaped after exiting by itself (0): none killed, none left running.
    assert [p.returncode for p in launcher.processes] == [0] * cycles
    route = json.loads(lab.run_sync("mac", ["ip", "-j", "route", "get", VIRTUAL_V4]).stdout)[0]
    assert route["dev"] == "en0"


def test_host_that_never_exits_is_killed_without_touching_the_next_tunnel(lab: Any, tmp_path: Any) -> None:
    launcher = SubprocessLauncher(lab.netns("mac"), log_path=tmp_path / "provider.log")
    manager = TunnelProviderManager(
        f"{__file__}:Lingering", launcher, TunnelProviderProtocol(server_address="192.0.2.2"), exit_grace=1.0
    )

    async def main() -> None:
        async with manager.open_session() as session:
            await _one_cycle(session, lab, {"linger": -1}, 0)
            await session.start_vpn_tunnel({"linger": 0})
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
                while launcher.processes[0].returncode is None:  # reaped by the session after exit_grace
                    await trio.sleep(0.05)
            assert launcher.processes[0].returncode == -signal.SIGKILL
            assert session.status is VPNStatus.CONNECTED, session.last_disconnect_error
            assert [c.status for c in session.history][-2:] == [VPNStatus.CONNECTING, VPNStatus.CONNECTED]
            await session.stop_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.USER_INITIATED

    trio.run(main)
    assert [p.returncode for p in launcher.processes] == [-signal.SIGKILL, 0]
