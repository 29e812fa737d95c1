"""Per-app FlowMetaData on read packets (SOURCE_APPLICATION), over MemoryTun with an injected owner lookup."""

from __future__ import annotations

import ipaddress

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from netsim.apple import AppRule, FlowMetaData, IPv4Settings, PacketTunnelNetworkSettings, RoutingMethod
from netsim.errors import ConfigError
from netsim.runtime.flow import METADATA_NEGATIVE_TTL, METADATA_TTL, PacketTunnelFlow, flow_key
from netsim.runtime.netconfig import MemoryNetworkConfigurator
from netsim.testing.memory_tun import MemoryTun

SRC4, DST4, SRC6, DST6 = "10.8.0.2", "10.66.0.1", "fd00:8::2", "fd00:66::1"
BROWSER = AppRule("com.example.browser", uid=1001, executable_path="/usr/bin/browser")
MAIL = AppRule("com.example.mail", uid=1002)
RULES = [BROWSER, MAIL]
OWNERS = {40001: 1001, 40002: 1002, 40003: 0}  # source port -> uid of the socket (40003: root, no rule)


class Owners:
    """An owner lookup by source port, recording every call (the /proc/net stand-in)."""

    def __init__(self, owners: dict[int, int]) -> None:
        self.owners = dict(owners)
        self.calls: list[tuple[int, int, bytes, int]] = []

    def __call__(self, version: int, protocol: int, source: bytes, port: int) -> int | None:
        self.calls.append((version, protocol, source, port))
        return self.owners.get(port)


def udp4(sport: int, payload: bytes = b"x") -> bytes:
    return bytes(IP(src=SRC4, dst=DST4) / UDP(sport=sport, dport=7) / payload)


def meta(rule: AppRule) -> FlowMetaData:
    return FlowMetaData(rule.signing_identifier, rule.unique_identifier)


def run(body: object) -> None:
    trio.run(body, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


def test_destination_ip_never_looks_anything_up() -> None:
    async def main() -> None:
        tun = MemoryTun("utun0", 1400)
        owners = Owners(OWNERS)
        flow = PacketTunnelFlow(tun)
        flow.set_routing_method(RoutingMethod.DESTINATION_IP, RULES, owner_lookup=owners)
        tun.inject([udp4(40001), udp4(40002)])
        packets = await flow.read_packet_objects()
        assert [p.metadata for p in packets] == [None, None]
        assert owners.calls == []
        stats = flow.statistics()
        assert stats.metadata_attributed == stats.metadata_unattributed == stats.metadata_lookups == 0

    run(main)


def test_source_application_names_the_owning_app() -> None:
    async def main() -> None:
        tun = MemoryTun("utun0", 1400)
        owners = Owners(OWNERS)
        flow = PacketTunnelFlow(tun)
        flow.set_routing_method(RoutingMethod.SOURCE_APPLICATION, RULES, owner_lookup=owners)
        batch = [
            udp4(40001),
            bytes(IP(src=SRC4, dst=DST4) / TCP(sport=40002, dport=443, flags="S")),
            bytes(IPv6(src=SRC6, dst=DST6) / UDP(sport=40001, dport=7) / b"v6"),
            udp4(40003),  # root's socket: no app rule
            udp4(40009),  # no socket (gone before the lookup)
            bytes(IP(src=SRC4, dst=DST4) / ICMP()),  # no socket at all
        ]
        tun.inject(batch)
        packets = await flow.read_packet_objects()
        assert [p.metadata for p in packets] == [meta(BROWSER), meta(MAIL), meta(BROWSER), None, None, None]
        assert packets[0].metadata is packets[2].metadata  # one shared instance per app
        assert owners.calls == [
            (4, 17, ipaddress.ip_address(SRC4).packed, 40001),
            (4, 6, ipaddress.ip_address(SRC4).packed, 40002),
            (6, 17, ipaddress.ip_address(SRC6).packed, 40001),
            (4, 17, ipaddress.ip_address(SRC4).packed, 40003),
            (4, 17, ipaddress.ip_address(SRC4).packed, 40009),
        ]
        stats = flow.statistics()
        assert (stats.metadata_attributed, stats.metadata_unattributed) == (3, 3)
        assert (stats.metadata_lookups, stats.metadata_cache_hits) == (5, 0)

        # The same flows again, in two batches: answered from the cache.
        tun.inject([udp4(40001), udp4(40003)])
        await flow.read_packet_objects()
        tun.inject([udp4(40001)])
        again = await flow.read_packet_objects()
        assert again[0].metadata == meta(BROWSER) and len(owners.calls) == 5
        assert flow.statistics().metadata_cache_hits == 3

        # read_packets carries no metadata and does no lookups (Apple's readPackets has none either).
        tun.inject([udp4(40077)])
        datas, families = await flow.read_packets()
        assert len(datas) == 1 and families == [2] and len(owners.calls) == 5

    run(main)


def test_cached_answers_expire_so_a_reused_port_is_reattributed() -> None:
    async def main() -> None:
        tun = MemoryTun("utun0", 1400)
        owners = Owners({40001: 1001})
        flow = PacketTunnelFlow(tun)
        flow.set_routing_method(RoutingMethod.SOURCE_APPLICATION, RULES, owner_lookup=owners)

        async def one(sport: int) -> FlowMetaData | None:
            tun.inject([udp4(sport)])
            (packet,) = await flow.read_packet_objects()
            return packet.metadata

        assert await one(40001) == meta(BROWSER)
        owners.owners[40001] = 1002  # the browser closed its socket; mail bound the same port
        assert await one(40001) == meta(BROWSER)  # still cached
        await trio.sleep(METADATA_TTL + 0.1)
        assert await one(40001) == meta(MAIL)

        assert await one(40005) is None  # socket not (yet) visible
        owners.owners[40005] = 1001
        assert await one(40005) is None  # negative answer cached briefly
        await trio.sleep(METADATA_NEGATIVE_TTL + 0.1)
        assert await one(40005) == meta(BROWSER)
        assert len(owners.calls) == 4

    run(main)


@pytest.mark.parametrize(("cache_size", "lookups"), [(2, 4), (3, 3)])
def test_the_flow_cache_is_bounded_oldest_first(cache_size: int, lookups: int) -> None:
    async def main() -> None:
        tun = MemoryTun("utun0", 1400)
        owners = Owners(OWNERS)
        flow = PacketTunnelFlow(tun)
        flow.set_routing_method(RoutingMethod.SOURCE_APPLICATION, RULES, owner_lookup=owners, cache_size=cache_size)
        for sport in (40001, 40002, 40003, 40001):  # with room for 2 flows, 40001 was evicted by 40003
            tun.inject([udp4(sport)])
            await flow.read_packet_objects()
        assert len(owners.calls) == lookups

    run(main)


def test_switching_back_to_destination_ip_stops_attribution() -> None:
    async def main() -> None:
        tun = MemoryTun("utun0", 1400)
        owners = Owners(OWNERS)
        flow = PacketTunnelFlow(tun)
        flow.set_routing_method(RoutingMethod.SOURCE_APPLICATION, RULES, owner_lookup=owners)
        tun.inject([udp4(40001)])
        assert (await flow.read_packet_objects())[0].metadata == meta(BROWSER)
        flow.set_routing_method(RoutingMethod.DESTINATION_IP)
        tun.inject([udp4(40001)])
        assert (await flow.read_packet_objects())[0].metadata is None
        assert len(owners.calls) == 1 and flow.routing_method is RoutingMethod.DESTINATION_IP

    run(main)


def test_source_application_needs_rules_with_uids() -> None:
    flow = PacketTunnelFlow()
    with pytest.raises(ConfigError, match="needs app_rules"):
        flow.set_routing_method(RoutingMethod.SOURCE_APPLICATION, None)
    with pytest.raises(ConfigError, match="has no uid"):
        flow.set_routing_method(RoutingMethod.SOURCE_APPLICATION, [AppRule("com.example.x")])
    with pytest.raises(ValueError, match="cache_size"):
        flow.set_routing_method(RoutingMethod.SOURCE_APPLICATION, RULES, cache_size=0)


def test_memory_configurator_records_the_routing_method() -> None:
    configurator = MemoryNetworkConfigurator(MemoryTun)
    settings = PacketTunnelNetworkSettings("192.0.2.2")
    settings.ipv4_settings = IPv4Settings([SRC4], ["255.255.255.255"])

    def uids() -> tuple[int, ...]:
        assert configurator.applied is not None
        return configurator.applied.app_uids

    configurator.apply(settings)
    assert uids() == ()
    configurator.set_routing_method(RoutingMethod.SOURCE_APPLICATION, [MAIL, BROWSER])
    assert configurator.applied is not None
    assert configurator.applied.routing_method is RoutingMethod.SOURCE_APPLICATION
    assert uids() == (1001, 1002)
    configurator.apply(settings)
    assert uids() == (1001, 1002)
    with pytest.raises(ConfigError):
        configurator.set_routing_method(RoutingMethod.SOURCE_APPLICATION, [AppRule("a", uid=1), AppRule("b", uid=1)])
    assert uids() == (1001, 1002)  # a rejected change leaves the applied state alone
    configurator.set_routing_method(RoutingMethod.DESTINATION_IP)
    assert uids() == ()


l4 = st.sampled_from(["udp", "tcp", "icmp"])


@settings(max_examples=300)
@given(l4, st.booleans(), st.integers(0, 65535), st.integers(0, 8191))
def test_flow_key_matches_scapy(kind: str, v6: bool, sport: int, frag: int) -> None:
    layer = {"udp": UDP(sport=sport), "tcp": TCP(sport=sport), "icmp": ICMP()}[kind]
    if v6:
        pkt = IPv6(src=SRC6, dst=DST6) / (layer if kind != "icmp" else UDP(sport=sport))
        key = flow_key(bytes(pkt))
        assert key == (6, 6 if kind == "tcp" else 17, ipaddress.ip_address(SRC6).packed, sport)
        return
    pkt4 = IP(src=SRC4, dst=DST4, frag=frag) / layer
    key = flow_key(bytes(pkt4))
    if kind == "icmp" or frag:
        assert key is None  # no socket / no L4 header in a non-first fragment (RFC 791 §3.1)
    else:
        assert key == (4, pkt4.proto, ipaddress.ip_address(SRC4).packed, sport)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_flow_key_never_raises_on_garbage(data: bytes) -> None:
    key = flow_key(data)
    assert key is None or key[0] in (4, 6)


def test_fragments_options_and_short_packets_in_a_batch() -> None:
    """The flow's inlined IPv4 fast path agrees with `flow_key` on the cases it must not attribute."""

    async def main() -> None:
        tun = MemoryTun("utun0", 1400)
        owners = Owners(OWNERS)
        flow = PacketTunnelFlow(tun)
        flow.set_routing_method(RoutingMethod.SOURCE_APPLICATION, RULES, owner_lookup=owners)
        fragment = bytes(IP(src=SRC4, dst=DST4, frag=100, proto=17) / bytes(UDP(sport=40001, dport=7)))
        with_options = bytes(IP(src=SRC4, dst=DST4, options=[b"\x01\x01\x01\x00"]) / UDP(sport=40002, dport=7))
        short = bytes(IP(src=SRC4, dst=DST4, proto=17))  # a UDP header that is not there
        tun.inject([fragment, with_options, short])
        packets = await flow.read_packet_objects()
        assert [p.metadata for p in packets] == [None, meta(MAIL), None]
        assert [c[3] for c in owners.calls] == [40002]

    run(main)
