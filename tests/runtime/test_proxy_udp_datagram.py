"""The TPROXY host's raw UDP replies (`udp_datagram`): IPv4 and IPv6 packets whose checksums scapy agrees with.

The host sends them when a local server owns the reply's source address (the DNS proxy answering from the Mac's
resolver, ``127.0.0.53:53`` or ``[::1]:53``); the lab test (tests/lab/test_proxy_v6_lab.py) checks them on lo.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from netsim.core.checksum import verify_l4_checksum
from netsim.core.packet import PacketView
from netsim.runtime.proxy_tproxy import udp_datagram


@pytest.mark.parametrize(
    ("source", "client"),
    [
        (("127.0.0.53", 53), ("127.0.0.1", 40001)),
        (("::1", 53), ("::1", 40001)),
        (("2001:db8:113::10", 7), ("fd00:6e73:1::10", 40104)),
    ],
)
@pytest.mark.parametrize("data", [b"", b"x", b"\x12\x34" * 300 + b"z"])
def test_udp_datagram_fields_and_checksums(source: tuple[str, int], client: tuple[str, int], data: bytes) -> None:
    packet = udp_datagram(data, source, client)
    view = PacketView.parse_untrusted(packet)
    assert (view.sport, view.dport, bytes(packet[view.l4_offset + 8 :])) == (source[1], client[1], data)
    assert verify_l4_checksum(view)
    layer = IPv6 if ":" in source[0] else IP
    parsed = layer(packet)
    assert (parsed.src, parsed.dst, parsed[UDP].len) == (source[0], client[0], 8 + len(data))
    stored = int(parsed[UDP].chksum)
    fresh = layer(packet)
    del fresh[UDP].chksum  # scapy recomputes it (the oracle)
    if layer is IP:
        del fresh[IP].chksum
        assert int(parsed[IP].chksum) == int(IP(bytes(fresh))[IP].chksum)
    assert stored != 0 and stored == int(layer(bytes(fresh))[UDP].chksum)  # IPv6: mandatory (RFC 8200 §8.1)


def test_a_reply_too_long_for_one_packet_is_a_counted_loss() -> None:
    """`raw_reply` drops a datagram that cannot be one packet and counts it (``udp_reply_errors``), no socket."""
    import trio

    from netsim.apple.proxy import TransparentProxyProvider
    from netsim.runtime.proxy_tproxy import TproxyHost

    host = TproxyHost(TransparentProxyProvider())
    for source, client, size in ((("127.0.0.53", 53), ("127.0.0.1", 1), 65508), (("::1", 53), ("::1", 1), 65528)):
        trio.run(host.raw_reply, b"x" * size, source, client)
    trio.run(host.raw_reply, b"x", ("::1", 53), ("127.0.0.1", 1))  # mixed families: never a packet
    stats = host.statistics()
    assert (stats.udp_reply_errors, stats.udp_queue_full) == (3, 0)
    assert host._raw == {}  # nothing was opened for them
