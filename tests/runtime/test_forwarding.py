"""HelperForwardingProvider: settings from the helper, the forwarding loop's batching, reasserting and giving up."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from netsim.apple.enums import ProviderStopReason, VPNStatus
from netsim.apple.protocol import TunnelProviderProtocol
from netsim.apple.settings import IPv4Route, IPv6Route, PacketTunnelNetworkSettings
from netsim.core import ipc
from netsim.core.ledger import LedgerSnapshot
from netsim.errors import ConfigError, TunnelDown
from netsim.runtime.controller import TunnelProviderManager, memory_launcher
from netsim.runtime.flow import PacketTunnelFlow
from netsim.runtime.forwarding import HelperForwardingProvider, settings_from_payload
from netsim.runtime.netconfig import MemoryNetworkConfigurator
from netsim.runtime.provider import ProviderHost
from netsim.testing.memory_tun import MemoryTun
from netsim.testing.memory_tunnel import icmp_echo, memory_tunnel, udp_packet

WWW4 = "203.0.113.10"


def run_memory(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


PAYLOAD: dict[str, Any] = {
    "v": 1,
    "addresses": ["10.66.0.2/32", "fd00:66::2/128"],
    "dns": ["203.0.113.53"],
    "dns_search": ["lab.test"],
    "routes": ["0.0.0.0/0", "::/0", "10.9.0.0/16"],
    "mtu": 1400,
    "server": "192.0.2.2",
}


def test_settings_from_payload_maps_the_wireguard_config() -> None:
    s = settings_from_payload(PAYLOAD)
    s.validate()
    assert s.tunnel_remote_address == "192.0.2.2"
    assert s.mtu == 1400
    assert s.ipv4_settings is not None and s.ipv6_settings is not None
    assert s.ipv4_settings.addresses == ["10.66.0.2"] and s.ipv4_settings.subnet_masks == ["255.255.255.255"]
    assert s.ipv4_settings.included_routes == [IPv4Route("0.0.0.0", "0.0.0.0"), IPv4Route("10.9.0.0", "255.255.0.0")]
    assert s.ipv6_settings.network_prefix_lengths == [128]
    assert s.ipv6_settings.included_routes == [IPv6Route("::", 0)]
    assert s.dns_settings is not None
    assert s.dns_settings.servers == ["203.0.113.53"] and s.dns_settings.match_domains == [""]
    assert s.dns_settings.search_domains == ["lab.test"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "version"),
        ({"server": None}, "server"),
        ({"addresses": ["not-an-address"]}, "bad helper settings"),
        ({"routes": ["10.0.0.0/33"]}, "bad helper settings"),
    ],
)
def test_settings_from_payload_rejects_bad_input(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_payload({**PAYLOAD, **change})


def test_one_flow_read_becomes_one_ipc_frame() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            burst = [icmp_echo(t.client_v4, WWW4, i) for i in range(200)]
            replies = await t.exchange(burst)
            assert len(replies) == 200
            p = t.provider.statistics()
            # 200 queued packets: batch_limit (64) per read -> 4 reads, and exactly one IPC frame per read
            assert p.read_batches == 4
            assert t.helper.statistics().ledger["ipc_in"].read == 200
            ch = t.provider._channel
            assert ch is not None
            assert ch.statistics().frames_sent == 1 + p.read_batches  # HELLO, then one frame per read
            assert p.write_batches <= 8  # replies also arrive in batches, not one frame per packet

    run_memory(main)


@pytest.mark.reliability("F1")
def test_helper_death_reasserts_then_resumes_and_accounts_for_every_packet() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            changes = t.session.status_changes()
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 0)])) == 1
            t.kill_helper()
            await trio.sleep(0.5)
            assert t.session.status is VPNStatus.REASSERTING
            lost = [icmp_echo(t.client_v4, WWW4, i) for i in range(1, 11)]
            assert await t.exchange(lost, expect=1, timeout=2.0) == []
            await t.start_helper()
            await t.wait_connected(after_connects=1)
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 11)])) == 1
            assert [c.status for c in [changes.receive_nowait() for _ in range(2)]] == [
                VPNStatus.REASSERTING,
                VPNStatus.CONNECTED,
            ]
            p = t.provider.statistics()
            assert p.connects == 2 and p.disconnects == 1
            assert p.ledger.check() == []
            assert p.ledger["tun_read"].dropped_for("helper_down") == 10
            assert p.ledger["tun_read"].read == 12
            h = LedgerSnapshot.from_json_untrusted((await t.helper_stats())["ledger"])
            assert h.check() == [] and h["ipc_in"].read == 1  # the fresh helper saw only the last probe

    run_memory(main)


def test_start_fails_when_the_helper_is_unreachable() -> None:
    async def main() -> None:
        manager = TunnelProviderManager(
            HelperForwardingProvider,
            memory_launcher(lambda name, mtu: MemoryTun(name=name, mtu=mtu)),
            TunnelProviderProtocol(
                provider_configuration={"helper_socket": "memory:nobody", "connect_timeout": 3, "reconnect_for": 2}
            ),
        )
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(VPNStatus.DISCONNECTED)
            assert session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "unreachable" in (session.last_disconnect_error or "")

    run_memory(main)


def test_missing_helper_socket_is_a_clear_configuration_error() -> None:
    async def main() -> None:
        manager = TunnelProviderManager(
            HelperForwardingProvider, memory_launcher(lambda name, mtu: MemoryTun(name=name, mtu=mtu))
        )
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(VPNStatus.DISCONNECTED)
            assert "helper_socket" in (session.last_disconnect_error or "")

    run_memory(main)


def test_gives_up_after_reconnect_for_and_stops_with_an_error() -> None:
    async def main() -> None:
        async with memory_tunnel(reconnect_for=5) as t:
            t.kill_helper()
            with trio.fail_after(60):
                await t.session.wait_status(VPNStatus.DISCONNECTED)
            assert t.session.stop_reason is ProviderStopReason.PROVIDER_FAILED
            assert "unreachable for 5 s" in (t.session.last_disconnect_error or "")

    run_memory(main)


def test_app_messages_report_provider_and_helper_statistics() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])
            import json

            mine = json.loads(await t.session.send_provider_message(b"stats") or b"")
            theirs = json.loads(await t.session.send_provider_message(b"helper-stats") or b"")
            assert mine["ledger"]["stages"]["tun_read"]["read"] == 1
            assert mine["flow"]["packets_written"] == 1
            assert theirs["ledger"]["stages"]["ipc_in"]["read"] == 1
            assert theirs["connected"] is True

    run_memory(main)


def test_forwarding_moves_batches_without_packet_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both loops use Apple's list APIs (readPackets / writePackets(_:withProtocols:)): no per-packet objects."""

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("the forwarding path must not use the Packet-object flow API")

    monkeypatch.setattr(PacketTunnelFlow, "read_packet_objects", refuse)
    monkeypatch.setattr(PacketTunnelFlow, "write_packet_objects", refuse)

    async def main() -> None:
        async with memory_tunnel() as t:
            burst = [icmp_echo(t.client_v4, WWW4, i) for i in range(100)]
            burst += [icmp_echo("fd00:66::2", "2001:db8:2::10", i) for i in range(20)]  # families travel along
            assert len(await t.exchange(burst)) == 120
            p = t.provider.statistics()
            assert p.ledger["tun_read"].forwarded == 120 and p.ledger["ipc_in"].forwarded == 120
            assert p.ledger.check() == []

    run_memory(main)


class _KernelCountingTun(MemoryTun):
    """Counts reads of kernel counters (a /proc read on a real TUN)."""

    kernel_reads = 0

    def kernel_statistics(self) -> Any:
        type(self).kernel_reads += 1
        return self.statistics()


class _Frames:
    """The provider's end of an IPC channel that delivers a fixed list of events, then breaks."""

    is_broken = False

    def __init__(self, events: list[object]) -> None:
        self.events = events

    async def receive_event(self) -> object:
        await trio.lowlevel.checkpoint()
        if not self.events:
            raise TunnelDown("end of the scripted frames")
        return self.events.pop(0)


def test_refused_writes_are_booked_without_statistics_or_kernel_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused TUN write happens under load: the provider books it from plain counters, never a snapshot."""
    provider = HelperForwardingProvider()
    host = ProviderHost(provider, MemoryNetworkConfigurator(_KernelCountingTun))
    host.protocol_configuration = TunnelProviderProtocol(provider_configuration={"helper_socket": "memory:none"})
    host.status = VPNStatus.CONNECTING

    def no_snapshot() -> Any:
        raise AssertionError("flow.statistics() on the inbound path")

    monkeypatch.setattr(host.flow, "statistics", no_snapshot)
    settings = {"v": 1, "addresses": ["10.66.0.2/32"], "routes": ["0.0.0.0/0"], "mtu": 1400, "server": "192.0.2.2"}
    good = udp_packet("203.0.113.10", "10.66.0.2", 53, 40000, b"reply")
    too_big = udp_packet("203.0.113.10", "10.66.0.2", 53, 40000, bytes(1400))

    def frame(packets: list[bytes]) -> ipc.PacketBatch:
        return ipc.PacketBatch(
            memoryview(b"".join(packets)), (ipc.AF_INET,) * len(packets), tuple(len(p) for p in packets)
        )

    events: list[object] = [ipc.Settings(json.dumps(settings).encode()), frame([good, too_big, good]), frame([good])]

    async def main() -> None:
        with pytest.raises(TunnelDown):
            await provider._session(_Frames(events))  # type: ignore[arg-type]

    _KernelCountingTun.kernel_reads = 0
    run_memory(main)
    stage = provider.ledger.snapshot()["ipc_in"]
    assert (stage.read, stage.forwarded, stage.dropped_for("tun_refused")) == (4, 3, 1)
    assert _KernelCountingTun.kernel_reads == 0
    device = host.flow.device
    assert isinstance(device, MemoryTun) and len(device.take_written()) == 3


def test_a_start_refused_busy_says_the_helper_is_busy() -> None:
    """Issue 13: a second built-in provider refused BUSY used to fail with ``'TooSlowError: '`` (no message)."""

    async def main() -> None:
        async with memory_tunnel() as t:
            async with t.another_manager().open_session() as other:
                await other.start_vpn_tunnel()
                with trio.fail_after(60):
                    await other.wait_status(VPNStatus.DISCONNECTED)
                error = other.last_disconnect_error or ""
                assert other.stop_reason is ProviderStopReason.PROVIDER_FAILED
                assert "TooSlowError" not in error, error
                assert "BUSY" in error and "another provider" in error, error
                assert "10 s" in error, error  # how long it tried (connect_timeout)
            assert t.session.status is VPNStatus.CONNECTED

    run_memory(main)


class _Hooked(HelperForwardingProvider):
    """docs/helper.md's subclass: batch hooks, a settings merge and an app message of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = self.received = 0
        self.batches: list[tuple[str, int]] = []

    def on_outbound_batch(self, packets: Sequence[bytes], families: Sequence[int]) -> None:
        self.sent += len(packets)
        self.batches.append(("out", len(packets)))

    def on_inbound_batch(self, packets: Sequence[memoryview], families: Sequence[int]) -> None:
        self.received += len(packets)
        self.batches.append(("in", len(packets)))

    def merge_settings(self, settings: PacketTunnelNetworkSettings) -> PacketTunnelNetworkSettings:
        assert settings.ipv4_settings is not None
        settings.ipv4_settings.excluded_routes = [IPv4Route("198.51.100.0", "255.255.255.0")]
        return settings

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"sent":
            return str(self.sent).encode()
        return await super().handle_app_message(data)


def test_subclass_hooks_see_every_batch_merge_settings_and_pass_app_messages_on() -> None:
    async def main() -> None:
        async with memory_tunnel(provider=_Hooked) as t:
            p = t.provider
            assert isinstance(p, _Hooked)
            burst = [icmp_echo(t.client_v4, WWW4, i) for i in range(100)]
            assert len(await t.exchange(burst)) == 100
            assert (p.sent, p.received) == (100, 100)
            assert len([b for b in p.batches if b[0] == "out"]) == p.statistics().read_batches  # once per batch
            assert len([b for b in p.batches if b[0] == "in"]) == p.statistics().write_batches
            assert await t.send_provider_message(b"sent") == b"100"
            assert json.loads(await t.send_provider_message(b"stats") or b"")["connects"] == 1  # passed on
            assert await t.send_provider_message(b"nobody's") is None
            # the merged settings are what the host applied; the helper's own are kept apart (for the re-apply check)
            applied = t.session.applied_settings
            assert applied is not None
            assert {"network": "198.51.100.0/24", "kind": "excluded"} in applied["routes"]
            assert p._applied is not None and p._applied.ipv4_settings is not None
            assert p._applied.ipv4_settings.excluded_routes is None
            assert p.settings_applied == 1

    run_memory(main)
