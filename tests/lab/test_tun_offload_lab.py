"""TUN offloads through real packets (root): two namespaces, a TUN each, netsim's code relaying between them.

A TCP connection crosses ``utunA`` -> relay -> ``utunB`` (`netsim.lab.tunpair`). With offloads on, the kernel of
``a`` hands over TSO super-packets, which the device cuts into wire packets, and takes coalesced writes (GRO on
writes). Every transfer is checked byte for byte; the super-packet counters are the positive control (they are
zero when offloads are off, so the assertions that they are not can fail).
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from netsim.core.segment import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, VNET_PLAIN, VNET_REASONS, VnetHeader
from netsim.errors import LocalProtocolError
from netsim.lab.tunpair import MTU, transfer, tun_pair
from netsim.runtime.flow import PacketTunnelFlow
from netsim.transports.tun import TunDevice

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]
NBYTES = 4_000_000


def _no_vnet_drops(stats: object) -> bool:
    dropped = getattr(stats, "dropped", {})
    return not any(reason in dropped for reason in VNET_REASONS)


def test_tso_reads_are_cut_into_wire_packets_and_the_data_arrives_identical() -> None:
    with tun_pair(True, False) as pair:
        res = transfer(pair, NBYTES, seed=1)
    assert res.identical
    a = res.stats_a
    assert a.super_packets_read > 0  # the kernel did hand over super-packets
    assert a.segments_read > a.super_packets_read  # and each became several wire packets
    assert res.reads < res.packets
    assert _no_vnet_drops(a) and not a.dropped


def test_gro_on_writes_merges_a_download_and_the_data_arrives_identical() -> None:
    with tun_pair(True, False, read_offload=0) as pair:
        res = transfer(pair, NBYTES, reverse=True, seed=2)
    assert res.identical
    a = res.stats_a
    assert a.super_packets_written > 0 and a.segments_written > a.super_packets_written
    assert res.writes < res.packets  # fewer TUN writes than packets
    assert a.super_packets_read == 0  # offload flags 0: the kernel cut its own segments
    assert not a.dropped


def test_without_offloads_nothing_is_a_super_packet() -> None:
    """The control: the same transfers on plain TUNs leave every super-packet counter at zero."""
    with tun_pair(False, False) as pair:
        up = transfer(pair, NBYTES, seed=3)
        down = transfer(pair, NBYTES, reverse=True, seed=4)
    assert up.identical and down.identical
    for s in (up.stats_a, down.stats_a):
        assert (s.super_packets_read, s.segments_read, s.super_packets_written, s.segments_written) == (0, 0, 0, 0)
    assert up.reads == up.packets and down.writes == down.packets


@pytest.mark.trio
async def test_a_flow_over_offload_tuns_keeps_one_packet_per_object() -> None:
    """`PacketTunnelFlow` on both devices (the Apple-facing API): reads give wire packets only, never a
    super-packet, while the devices count the super-packets they cut and merged."""
    sizes: list[int] = []

    async def move(src: PacketTunnelFlow, dst: PacketTunnelFlow) -> None:
        while True:
            packets, families = await src.read_packets()
            sizes.extend(map(len, packets))
            dst.write_packets(packets, families)

    with tun_pair(True, True) as pair:
        fa, fb = PacketTunnelFlow(pair.a), PacketTunnelFlow(pair.b)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(move, fa, fb)
            nursery.start_soon(move, fb, fa)
            up = await trio.to_thread.run_sync(functools.partial(transfer, pair, NBYTES, seed=5, relay=False))
            down = await trio.to_thread.run_sync(
                functools.partial(transfer, pair, NBYTES, reverse=True, seed=6, relay=False)
            )
            nursery.cancel_scope.cancel()
        sa, sb = pair.a.statistics(), pair.b.statistics()
    assert up.identical and down.identical
    assert sizes and max(sizes) <= MTU  # one wire packet per object
    assert sa.super_packets_read > 0 and sb.super_packets_read > 0  # TSO on both sides
    assert sa.super_packets_written > 0 and sb.super_packets_written > 0  # GRO on writes on both sides
    assert fa.statistics().write_dropped_refused == 0 and fb.statistics().write_dropped_refused == 0


def test_bad_vnet_reads_are_counted_drops_by_name() -> None:
    """The device's read path on hostile bytes: the TUN fd is swapped for a SEQPACKET socket we write to, so each
    datagram is one "read" (the kernel itself never sends a bad header)."""
    ok = bytes(IP(src="10.201.0.1", dst="10.201.0.2") / UDP(sport=1, dport=2) / Raw(b"fine"))
    big = bytes(IP(src="10.201.0.1", dst="10.201.0.2") / UDP(sport=1, dport=2) / Raw(b"x" * 600))
    mismatched = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 28, 256, 20, 16).pack() + big  # v4 as TCPv6
    reads = [b"\x01" * 5, VnetHeader(0x10, 0, 0, 0, 0, 0).pack() + ok, mismatched, VNET_PLAIN, VNET_PLAIN + ok]
    with tun_pair(True, False) as pair:
        dev = pair.a
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        real_fd = dev._fd
        with ours, theirs:
            ours.setblocking(False)
            for data in reads:
                theirs.send(data)
            dev._fd = ours.fileno()
            try:
                out: list[bytes] = []
                taken = dev.read_offload_packets(64, out)
            finally:
                dev._fd = real_fd
        stats = dev.statistics()
    assert taken == len(reads) and out == [ok]
    assert stats.dropped == {"vnet_truncated": 1, "vnet_bad_flags": 1, "vnet_bad_gso": 1, "empty": 1}


def test_offload_settings_refuse_misuse() -> None:
    with tun_pair(False, False) as pair, pytest.raises(LocalProtocolError, match="offload=True"):
        pair.a.set_offload(0)
    with pytest.raises(LocalProtocolError, match="utun_framing"):
        TunDevice.create(None, offload=True, utun_framing=True)
