"""Example provider: answers ping and UDP echo for a virtual address routed into the tunnel.

There is no server yet: the provider itself plays the far end of the tunnel. It claims a virtual IPv4 and IPv6
address as included routes, reads what the Mac sends there with ``read_packet_objects()``, builds the ICMP /
ICMPv6 echo replies and UDP echo replies itself (checksums via `netsim.core.checksum`) and writes them back
with ``write_packet_objects()``. Everything else it reads is counted and dropped.

Run it from the lab (needs root)::

    async with Lab(services=False) as lab:
        manager = TunnelProviderManager(
            "examples.ping_responder:PingResponder", SubprocessLauncher(lab.netns("mac")),
            TunnelProviderProtocol(provider_configuration={"virtual_v4": "10.66.0.1"}),
        )
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            await session.wait_status(VPNStatus.CONNECTED)
            await lab.run("mac", ["ping", "-c", "3", "10.66.0.1"])
            print(await session.send_provider_message(b"stats"))

or in memory with `netsim.runtime.controller.memory_launcher` and `netsim.testing.MemoryTun`.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from netsim.apple import (
    IPv4Route,
    IPv4Settings,
    IPv6Route,
    IPv6Settings,
    Packet,
    PacketTunnelNetworkSettings,
    ProviderStopReason,
)
from netsim.core.checksum import fill_checksums
from netsim.core.packet import PacketView
from netsim.errors import BadPacket
from netsim.runtime.provider import PacketTunnelProvider

__all__ = ["PingResponder", "echo_reply"]

ICMP, UDP, ICMPV6 = 1, 17, 58
ECHO_REQUEST_V4, ECHO_REPLY_V4 = 8, 0  # RFC 792
ECHO_REQUEST_V6, ECHO_REPLY_V6 = 128, 129  # RFC 4443 §4
DEFAULTS: dict[str, Any] = {
    "server": "192.0.2.2",  # tunnel_remote_address (the lab's VPN server; auto-excluded from the routes)
    "address_v4": "10.66.0.2",
    "virtual_v4": "10.66.0.1",
    "address_v6": "fd00:66::2",
    "virtual_v6": "fd00:66::1",
    "udp_echo_port": 7,  # RFC 862
    "mtu": 1400,
}


def echo_reply(data: bytes, virtual: set[bytes], udp_port: int) -> bytes | None:
    """The reply to ``data`` if it is an echo request (ICMP, ICMPv6, or UDP to ``udp_port``) for a virtual
    address, else None. Untrusted input: malformed packets return None."""
    try:
        view = PacketView.parse_untrusted(data)
    except BadPacket:
        return None
    if view.dst not in virtual or view.is_fragment:
        return None
    off = view.l4_offset
    if view.protocol == ICMP and view.version == 4 and view.icmp_type == ECHO_REQUEST_V4:
        new_type = ECHO_REPLY_V4
    elif view.protocol == ICMPV6 and view.version == 6 and view.icmp_type == ECHO_REQUEST_V6:
        new_type = ECHO_REPLY_V6
    elif view.protocol == UDP and view.dport == udp_port:
        new_type = -1
    else:
        return None
    buf = bytearray(data[: view.total_length])
    src, dst = (slice(12, 16), slice(16, 20)) if view.version == 4 else (slice(8, 24), slice(24, 40))
    buf[src], buf[dst] = view.dst, view.src  # answer from the virtual address to the sender
    if view.version == 4:
        buf[8] = 64  # fresh TTL
        buf[10:12] = b"\0\0"
    else:
        buf[7] = 64  # hop limit
    if new_type >= 0:
        buf[off] = new_type
        buf[off + 2 : off + 4] = b"\0\0"
    else:
        buf[off : off + 2], buf[off + 2 : off + 4] = data[off + 2 : off + 4], data[off : off + 2]  # swap ports
        buf[off + 6 : off + 8] = b"\0\0"
    fill_checksums(buf)
    return bytes(buf)


class PingResponder(PacketTunnelProvider):
    """Answers ping / UDP echo for ``virtual_v4`` and ``virtual_v6`` (see DEFAULTS; override them through
    ``provider_configuration``). App messages: ``b"stats"`` returns JSON counters."""

    def __init__(self) -> None:
        super().__init__()
        self.requests_seen = 0
        self.replies_written = 0
        self.ignored = 0
        self.request_sources: list[str] = []

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        conf = {**DEFAULTS, **(self.protocol_configuration.provider_configuration or {})}
        settings = PacketTunnelNetworkSettings(tunnel_remote_address=conf["server"], mtu=conf["mtu"])
        settings.ipv4_settings = IPv4Settings([conf["address_v4"]], ["255.255.255.255"])
        settings.ipv4_settings.included_routes = [IPv4Route(conf["virtual_v4"], "255.255.255.255")]
        settings.ipv6_settings = IPv6Settings([conf["address_v6"]], [128])
        settings.ipv6_settings.included_routes = [IPv6Route(conf["virtual_v6"], 128)]
        await self.set_tunnel_network_settings(settings)
        virtual = {ipaddress.ip_address(conf["virtual_v4"]).packed, ipaddress.ip_address(conf["virtual_v6"]).packed}
        self.start_soon(self._answer, virtual, int(conf["udp_echo_port"]))

    async def _answer(self, virtual: set[bytes], udp_port: int) -> None:
        flow = self.packet_flow
        while True:
            packets = await flow.read_packet_objects()  # one batch per wakeup
            replies = []
            for packet in packets:
                reply = echo_reply(bytes(packet.data), virtual, udp_port)
                if reply is None:
                    self.ignored += 1  # e.g. IPv6 router solicitations the kernel sends on a new interface
                    continue
                self.requests_seen += 1
                replies.append(Packet(reply, packet.protocol_family))
            if replies and flow.write_packet_objects(replies):
                self.replies_written += len(replies)

    async def stop_tunnel(self, reason: ProviderStopReason) -> None:
        pass  # nothing to tear down: the host closes the utun and removes the settings

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"stats":
            stats = self.packet_flow.statistics()
            return json.dumps(
                {
                    "requests_seen": self.requests_seen,
                    "replies_written": self.replies_written,
                    "ignored": self.ignored,
                    "packets_read": stats.packets_read,
                    "read_batches": stats.read_batches,
                    "packets_written": stats.packets_written,
                }
            ).encode()
        return None
