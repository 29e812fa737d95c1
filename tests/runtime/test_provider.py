"""Provider lifecycle through the controller, on the in-memory backend with an autojump MockClock."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from netsim.apple import (
    AF_INET,
    DNSSettings,
    IPv4Route,
    IPv4Settings,
    Packet,
    PacketTunnelNetworkSettings,
    ProviderStopReason,
    TunnelProviderError,
    TunnelProviderErrorCode,
    TunnelProviderProtocol,
    VPNStatus,
)
from netsim.errors import LocalProtocolError
from netsim.runtime.controller import (
    InProcessLauncher,
    ProviderMessageError,
    TunnelProviderManager,
    TunnelProviderSession,
    memory_launcher,
)
from netsim.runtime.netconfig import MemoryNetworkConfigurator
from netsim.runtime.provider import PacketTunnelProvider, ProviderHost, load_provider_class, memory_control_pair
from netsim.testing.memory_tun import MemoryTun

S = VPNStatus


def settings(mtu: int | None = 1400) -> PacketTunnelNetworkSettings:
    s = PacketTunnelNetworkSettings("203.0.113.5", mtu=mtu)
    s.ipv4_settings = IPv4Settings(["10.8.0.2"], ["255.255.255.0"], included_routes=[IPv4Route.default()])
    s.dns_settings = DNSSettings(["10.8.0.1"], match_domains=[""])
    return s


class Recorder(PacketTunnelProvider):
    """Applies settings on start and obeys commands sent as app messages."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        self.calls.append(("start", options))
        if options and options.get("fail"):
            raise RuntimeError("server unreachable")
        if options and options.get("hang"):
            await trio.sleep_forever()
        await self.set_tunnel_network_settings(settings())

    async def stop_tunnel(self, reason: ProviderStopReason) -> None:
        self.calls.append(("stop", reason))
        if self.protocol_configuration.provider_configuration == {"slow_stop": True}:
            await trio.sleep_forever()

    async def handle_app_message(self, data: bytes) -> bytes | None:
        command, _, arg = data.partition(b":")
        if command == b"reassert":
            self.reasserting = arg == b"1"
        elif command == b"cancel":
            self.cancel_tunnel_with_error(RuntimeError("auth expired") if arg else None)
        elif command == b"settings":
            s: PacketTunnelNetworkSettings | None = None
            if arg != b"null":
                s = settings()
                for key, value in json.loads(arg or b"{}").items():
                    setattr(s, key, value)
            try:
                await self.set_tunnel_network_settings(s)
            except TunnelProviderError as exc:
                return f"{int(exc.code)} {exc}".encode()
        elif command == b"config":
            return json.dumps(self.protocol_configuration.provider_configuration).encode()
        elif command == b"raise":
            raise ValueError("boom")
        elif command == b"silent":
            return None
        return b"ok"

    async def sleep(self) -> None:
        self.calls.append(("sleep", None))

    def wake(self) -> None:
        self.calls.append(("wake", None))


def mock_run(fn: Callable[[], Awaitable[None]]) -> trio.testing.MockClock:
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(fn, clock=clock)
    return clock


def manager(provider: Any = Recorder, **kwargs: Any) -> tuple[TunnelProviderManager, InProcessLauncher]:
    launcher = memory_launcher(MemoryTun, physical_mtu=1500)
    protocol = kwargs.pop("protocol", TunnelProviderProtocol(server_address="203.0.113.5"))
    return TunnelProviderManager(provider, launcher, protocol, **kwargs), launcher


def statuses(session: TunnelProviderSession) -> list[VPNStatus]:
    return [c.status for c in session.history]


def test_start_then_stop_walks_the_apple_states() -> None:
    m, launcher = manager()

    async def main() -> None:
        async with m.open_session() as session:
            changes = session.status_changes()
            await session.start_vpn_tunnel({"user": "alice"})
            assert session.status is S.CONNECTING
            await session.wait_status(S.CONNECTED)
            host = launcher.hosts[-1]
            assert isinstance(host.configurator, MemoryNetworkConfigurator)
            assert host.flow.device is host.configurator.device
            assert session.applied_settings is not None and session.applied_settings["mtu"] == 1400
            await session.stop_vpn_tunnel()
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.USER_INITIATED
            assert host.provider.calls == [("start", {"user": "alice"}), ("stop", ProviderStopReason.USER_INITIATED)]  # type: ignore[attr-defined]
            assert host.configurator.device is None and host.flow.device is None  # utun closed
            seen = [changes.receive_nowait().status for _ in range(4)]
            assert seen == [S.CONNECTING, S.CONNECTED, S.DISCONNECTING, S.DISCONNECTED]

    mock_run(main)


def test_on_demand_start_gets_none_options_and_session_can_restart() -> None:
    m, launcher = manager()

    async def main() -> None:
        async with m.open_session() as session:
            for options in (None, {"n": 2}):
                await session.start_vpn_tunnel(options)
                await session.wait_status(S.CONNECTED)
                assert launcher.hosts[-1].provider.calls[0] == ("start", options)  # type: ignore[attr-defined]
                with pytest.raises(LocalProtocolError, match="stop it first"):
                    await session.start_vpn_tunnel()
                await session.stop_vpn_tunnel()
                await session.wait_status(S.DISCONNECTED)
        assert len(launcher.hosts) == 2  # a fresh provider (and flow) per start, as on Apple

    mock_run(main)


def test_failing_start_tunnel() -> None:
    m, launcher = manager()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel({"fail": True})
            await session.wait_status(S.DISCONNECTED)
            assert statuses(session) == [S.CONNECTING, S.DISCONNECTING, S.DISCONNECTED]
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "server unreachable" in (session.last_disconnect_error or "")
            assert [c[0] for c in launcher.hosts[-1].provider.calls] == ["start"]  # type: ignore[attr-defined]

    mock_run(main)


def test_start_timeout_is_60_seconds_then_stop_tunnel() -> None:
    m, launcher = manager()
    times: dict[str, float] = {}

    async def main() -> None:
        async with m.open_session() as session:
            times["start"] = trio.current_time()
            await session.start_vpn_tunnel({"hang": True})
            await session.wait_status(S.DISCONNECTED)
            times["end"] = trio.current_time()
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "within 60 s" in (session.last_disconnect_error or "")
            calls = launcher.hosts[-1].provider.calls  # type: ignore[attr-defined]
            assert calls[-1] == ("stop", ProviderStopReason.PROVIDER_FAILED)
            assert statuses(session) == [S.CONNECTING, S.DISCONNECTING, S.DISCONNECTED]

    mock_run(main)
    assert 60 <= times["end"] - times["start"] < 61


def test_custom_start_timeout_and_stop_timeout() -> None:
    proto = TunnelProviderProtocol(provider_configuration={"slow_stop": True})
    m, _ = manager(protocol=proto, start_timeout=5, stop_timeout=3)
    times: list[float] = []

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            times.append(trio.current_time())
            await session.stop_vpn_tunnel()
            await session.wait_status(S.DISCONNECTED)
            times.append(trio.current_time())
            assert "stop_tunnel did not complete within 3 s" in (session.last_disconnect_error or "")

    mock_run(main)
    assert 3 <= times[1] - times[0] < 4


@pytest.mark.parametrize(
    ("arg", "reason"), [(b"x", ProviderStopReason.PROVIDER_FAILED), (b"", ProviderStopReason.NONE)]
)
def test_cancel_tunnel_with_error(arg: bytes, reason: ProviderStopReason) -> None:
    m, launcher = manager()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            assert await session.send_provider_message(b"cancel:" + arg) == b"ok"
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is reason
            assert launcher.hosts[-1].provider.calls[-1] == ("stop", reason)  # type: ignore[attr-defined]
            if arg:
                assert "auth expired" in (session.last_disconnect_error or "")
            assert statuses(session)[-2:] == [S.DISCONNECTING, S.DISCONNECTED]

    mock_run(main)


def test_reasserting_only_while_connected() -> None:
    m, _ = manager()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            await session.send_provider_message(b"reassert:1")
            await session.wait_status(S.REASSERTING)
            await session.send_provider_message(b"reassert:1")  # no duplicate notification
            await session.send_provider_message(b"reassert:0")
            await session.wait_status(S.CONNECTED)
            assert statuses(session) == [S.CONNECTING, S.CONNECTED, S.REASSERTING, S.CONNECTED]

    mock_run(main)


def test_app_messages_round_trip_and_errors() -> None:
    conf = {"server": "vpn.example", "keys": [1, 2]}
    m, _ = manager(protocol=TunnelProviderProtocol(provider_configuration=conf))

    async def main() -> None:
        async with m.open_session() as session:
            with pytest.raises(ProviderMessageError, match="no tunnel is running"):
                await session.send_provider_message(b"x")
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            assert json.loads(await session.send_provider_message(b"config") or b"") == conf
            assert await session.send_provider_message(b"silent") is None
            with pytest.raises(ProviderMessageError, match="ValueError: boom"):
                await session.send_provider_message(b"raise")

    mock_run(main)


def test_settings_reapply_clear_and_errors_are_reported() -> None:
    m, launcher = manager()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            host = launcher.hosts[-1]
            device = host.configurator.device
            assert await session.send_provider_message(b'settings:{"mtu": null, "tunnel_overhead_bytes": 80}') == b"ok"
            assert session.applied_settings is not None and session.applied_settings["mtu"] == 1420
            assert host.configurator.device is device  # same utun, new settings
            assert await session.send_provider_message(b"settings:null") == b"ok"
            assert session.applied_settings is None and host.configurator.applied is None
            reply = await session.send_provider_message(b'settings:{"mtu": 40}')
            assert reply is not None and reply.startswith(b"1 ") and b"mtu: 40" in reply
            reply = await session.send_provider_message(b'settings:{"tunnel_remote_address": "vpn.example"}')
            assert reply is not None and b"tunnel_remote_address: 'vpn.example'" in reply
            routes = [(r["network"], r["kind"]) for r in (session.applied_settings or {"routes": []})["routes"]]
            assert routes == []  # a rejected call changed nothing
            assert await session.send_provider_message(b"settings:{}") == b"ok"
            assert session.applied_settings is not None
            assert [(r["network"], r["kind"]) for r in session.applied_settings["routes"]] == [
                ("0.0.0.0/0", "included"),
                ("203.0.113.5/32", "server"),
            ]
            assert session.applied_settings["resolver"]["nameservers"] == ["10.8.0.1"]

    mock_run(main)


def test_sleep_wake_and_disconnect_on_sleep() -> None:
    m, launcher = manager()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            await session.simulate_sleep()
            await session.simulate_wake()
            await session.send_provider_message(b"silent")  # ordered after the wake
            assert launcher.hosts[-1].provider.calls[-2:] == [("sleep", None), ("wake", None)]  # type: ignore[attr-defined]
        m.protocol_configuration.disconnect_on_sleep = True
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            await session.simulate_sleep()
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.SLEEP

    mock_run(main)


class Echo(PacketTunnelProvider):
    """Writes every packet it reads straight back (swapping nothing: enough to see both directions)."""

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        await self.set_tunnel_network_settings(settings())
        self.start_soon(self._loop)

    async def _loop(self) -> None:
        flow = self.packet_flow
        while True:
            packets = await flow.read_packet_objects()
            if packets[0].data == b"\x45crash":
                raise RuntimeError("provider bug")
            flow.write_packet_objects(packets)


def test_packets_flow_through_a_provider_on_memory_tun() -> None:
    m, launcher = manager(Echo)

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            device = launcher.hosts[-1].configurator.device
            assert isinstance(device, MemoryTun)
            pkt = bytes.fromhex("4500001c000100004011") + bytes(10)
            device.inject([pkt, pkt])
            await trio.testing.wait_all_tasks_blocked()
            assert device.take_written() == [pkt, pkt]
            stats = launcher.hosts[-1].flow.statistics()
            assert stats.packets_read == 2 and stats.packets_written == 2
            await session.stop_vpn_tunnel()
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.USER_INITIATED  # the loop's TunnelDown is not a crash

    mock_run(main)


def test_exception_in_a_provider_task_fails_the_tunnel() -> None:
    m, launcher = manager(Echo)

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            device = launcher.hosts[-1].configurator.device
            assert isinstance(device, MemoryTun)
            device.inject([b"\x45crash"])
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "provider bug" in (session.last_disconnect_error or "")

    mock_run(main)


def test_host_going_away_is_a_provider_failure() -> None:
    m, _ = manager()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            session._host.kill()  # type: ignore[union-attr]  # as if the extension crashed
            await session.wait_status(S.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "went away" in (session.last_disconnect_error or "")

    mock_run(main)


def test_provider_methods_need_a_host_and_settings_need_a_running_tunnel() -> None:
    p = Recorder()
    with pytest.raises(LocalProtocolError, match="not running in a ProviderHost"):
        _ = p.packet_flow

    async def main() -> None:
        host = ProviderHost(p, MemoryNetworkConfigurator(MemoryTun))
        with pytest.raises(TunnelProviderError) as info:
            await p.set_tunnel_network_settings(settings())
        assert info.value.code is TunnelProviderErrorCode.NETWORK_SETTINGS_CANCELED
        assert host.flow is p.packet_flow
        system, host_end = memory_control_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.run, host_end)
            await system.send({"op": "bogus"})
        assert host.status is S.DISCONNECTED

    mock_run(main)


def test_load_provider_class() -> None:
    assert load_provider_class(f"{__file__}:Recorder").__name__ == "Recorder"
    with pytest.raises(LocalProtocolError, match="must look like"):
        load_provider_class("nocolon")
    with pytest.raises(LocalProtocolError, match="not a PacketTunnelProvider"):
        load_provider_class("netsim.apple:Packet")


def test_packet_write_through_provider_flow_counts_family_errors() -> None:
    m, launcher = manager()

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            flow = launcher.hosts[-1].flow
            assert flow.write_packet_objects([Packet(b"\x60" + bytes(39), AF_INET)]) is False
            assert flow.statistics().write_dropped_family == 1

    mock_run(main)


@pytest.mark.parametrize("enforce", [False, True])
def test_protocol_enforce_routes_reaches_the_configurator(enforce: bool) -> None:
    # NEVPNProtocol.enforceRoutes is documented to change routing: the host must hand the protocol's value to the
    # configurator it was given (built with the default, False), not leave the default in place.
    m, launcher = manager(protocol=TunnelProviderProtocol(server_address="203.0.113.5", enforce_routes=enforce))

    async def main() -> None:
        async with m.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(S.CONNECTED)
            configurator = launcher.hosts[-1].configurator
            assert isinstance(configurator, MemoryNetworkConfigurator)
            assert configurator.enforce_routes is enforce
            assert configurator.applied is not None and configurator.applied.enforce_routes is enforce
            assert session.applied_settings is not None and session.applied_settings["enforce_routes"] is enforce
            await session.stop_vpn_tunnel()
            await session.wait_status(S.DISCONNECTED)

    mock_run(main)
