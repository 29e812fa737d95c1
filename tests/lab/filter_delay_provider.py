"""A test packet filter: holds outbound UDP to port 7 (the lab's echo) until an outbound UDP packet to port 9 (the
trigger) goes out, then allows what it held; everything else is allowed. In a capture on en0 the held echo
requests therefore come after the trigger, although they were sent before it."""

from __future__ import annotations

from netsim.apple import Packet, TrafficDirection
from netsim.apple.filter import FilterPacketContext, FilterPacketProvider, FilterPacketProviderVerdict
from netsim.core.packet import PacketView
from netsim.errors import BadPacket


class HoldUntilTrigger(FilterPacketProvider):
    async def start_filter(self) -> None:
        self._held: list[Packet] = []
        self._view = PacketView()
        self.packet_handler = self.handle

    def handle(
        self, context: FilterPacketContext, interface: str, direction: TrafficDirection, data: bytes, length: int
    ) -> FilterPacketProviderVerdict:
        try:
            self._view.load_untrusted(data)
        except BadPacket:
            return FilterPacketProviderVerdict.ALLOW
        if direction == TrafficDirection.OUTBOUND and self._view.protocol == 17:
            if self._view.dport == 7:
                self._held.append(self.delay_current_packet(context))
                return FilterPacketProviderVerdict.DELAY
            if self._view.dport == 9:
                held, self._held = self._held, []
                for packet in held:
                    self.allow(packet)  # buffered before this packet's own verdict, sent in the same flush
        return FilterPacketProviderVerdict.ALLOW


class HoldEchoForever(FilterPacketProvider):
    """Holds every outbound UDP packet to port 7 until the filter stops (to fill the kernel's bounded queue)."""

    async def start_filter(self) -> None:
        self._view = PacketView()
        self.packet_handler = self.handle

    def handle(
        self, context: FilterPacketContext, interface: str, direction: TrafficDirection, data: bytes, length: int
    ) -> FilterPacketProviderVerdict:
        try:
            self._view.load_untrusted(data)
        except BadPacket:
            return FilterPacketProviderVerdict.ALLOW
        if direction == TrafficDirection.OUTBOUND and self._view.protocol == 17 and self._view.dport == 7:
            self.delay_current_packet(context)
            return FilterPacketProviderVerdict.DELAY
        return FilterPacketProviderVerdict.ALLOW
