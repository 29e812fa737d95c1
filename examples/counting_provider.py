"""Example provider: forwards the utun to the netsim helper and counts packets per protocol and direction.

It is a plain `PacketTunnelProvider` (not a `HelperForwardingProvider` subclass), written only against the public
API: `netsim.runtime.helper_client.start_helper_client` connects to the helper named in
``provider_configuration`` (the backends put ``helper_socket`` and ``token_file`` there), waits for the helper's
settings and applies them; two ``start_soon`` loops then move batches:

* out: ``packet_flow.read_packets()`` -> count -> ``helper.send_packets(packets, families)``
* in:  ``helper.receive_packets()`` -> count -> ``packet_flow.write_packets(packets, families)``

The app message ``b"counts"`` is answered with JSON: ``{"out": {"icmp": n, "tcp": n, "udp": n, "other": n},
"in": {...}}`` (ICMP and ICMPv6 are both ``icmp``; the protocol is the one after any IPv6 extension headers).
``b"helper-stats"`` returns the helper's statistics. When the helper goes away the tunnel stops with the error
(no reconnect; `HelperForwardingProvider` shows one).

Run it without root, in memory::

    async with memory_tunnel(provider=CountingProvider) as t:
        await t.exchange([icmp_echo(t.client_v4, "203.0.113.10", 1)])
        print(await t.send_provider_message(b"counts"))

in the lab (root): ``async with Lab() as lab, netsim_tunnel(lab, provider=CountingProvider) as t: ...``, as a
spec ``"netsim.examples.counting_provider:CountingProvider"`` (pytest plugin, ``netsim bench --provider``; in a
checkout also ``examples.counting_provider``), or ``python -m netsim.examples.counting_provider`` (the in-memory
run above).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import trio
import trio.testing

from netsim.apple import ProviderStopReason
from netsim.core.packet import PacketView
from netsim.errors import BadPacket
from netsim.runtime.helper_client import HelperClient, start_helper_client
from netsim.runtime.provider import PacketTunnelProvider

__all__ = ["PROTOCOLS", "CountingProvider"]

PROTOCOLS = ("icmp", "tcp", "udp", "other")
_NAMES = {1: "icmp", 58: "icmp", 6: "tcp", 17: "udp"}  # IANA protocol numbers (ICMP, ICMPv6, TCP, UDP)


class CountingProvider(PacketTunnelProvider):
    """Forwards utun <-> helper and counts packets per protocol, per direction; answers ``b"counts"``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, dict[str, int]] = {d: dict.fromkeys(PROTOCOLS, 0) for d in ("out", "in")}
        self.helper: HelperClient | None = None

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        # connect (token from provider_configuration), wait for SETTINGS, apply them (Apple: setTunnelNetworkSettings)
        helper = self.helper = await start_helper_client(self)
        self.start_soon(self._outbound, helper)
        self.start_soon(self._inbound, helper)

    async def stop_tunnel(self, reason: ProviderStopReason) -> None:
        if self.helper is not None:
            await self.helper.aclose()  # GOODBYE to the helper

    async def _outbound(self, helper: HelperClient) -> None:
        read = self.packet_flow.read_packets
        out = self.counts["out"]
        while True:
            packets, families = await read()  # one wakeup per batch
            _count(out, packets)
            helper.send_packets(packets, families)  # one IPC frame; False (and counted) if dropped

    async def _inbound(self, helper: HelperClient) -> None:
        write = self.packet_flow.write_packets
        inbound = self.counts["in"]
        while True:
            packets, families = await helper.receive_packets()  # raises TunnelDown when the helper goes away
            _count(inbound, packets)
            write(packets, families)

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"counts":
            return json.dumps(self.counts).encode()
        if data == b"helper-stats" and self.helper is not None:
            return json.dumps(await self.helper.helper_statistics()).encode()
        return None


def _count(counts: dict[str, int], packets: Sequence[bytes | memoryview]) -> None:
    for packet in packets:
        try:
            name = _NAMES.get(PacketView.parse_untrusted(packet).protocol, "other")
        except BadPacket:
            name = "other"
        counts[name] += 1


async def _demo() -> None:
    from netsim.testing.memory_tunnel import icmp_echo, memory_tunnel, udp_packet

    async with memory_tunnel(provider=CountingProvider) as t:
        await t.exchange([icmp_echo(t.client_v4, "203.0.113.10", seq) for seq in range(3)])
        await t.exchange([udp_packet(t.client_v4, "203.0.113.10", 40000, 7, b"hello")])
        print((await t.send_provider_message(b"counts") or b"").decode())


if __name__ == "__main__":
    trio.run(_demo, clock=trio.testing.MockClock(autojump_threshold=0))
