"""Example packet filter: drops every packet to or from some hosts, logs one line per other packet.

A plain `FilterPacketProvider` (Apple: NEFilterPacketProvider) written only against the public API. Its
``vendor_configuration`` names the hosts: ``{"drop_hosts": ["192.168.1.20", "fd00:6e73:1::20"]}``, and
optionally ``"log": false`` to stay quiet. Each allowed packet is logged as
``allow outbound en0 icmp 192.168.1.10 -> 203.0.113.10``; each dropped one as ``drop ...``.

The handler parses with one reused `PacketView` (bounded, no object per packet beyond the addresses); a packet
it cannot parse is allowed and logged as ``unparsed`` (a filter that drops what it does not understand would say
so here).

Run it on the lab's Mac (root)::

    async with Lab() as lab:
        with packet_filter(lab, "netsim.examples.packet_filter:DropHostFilter",
                           vendor_configuration={"drop_hosts": [str(lab.addr.lan_eth0_v4)]}) as pf:
            ...  # ping the LAN host: no reply; ping www: replies
        print(pf.statistics().filter, pf.log_text())

(docs/filters.md has it in full; tests/lab/test_filter_packet_lab.py runs it with captures).
"""

from __future__ import annotations

import ipaddress
import logging

from netsim.apple import TrafficDirection
from netsim.apple.filter import FilterPacketContext, FilterPacketProvider, FilterPacketProviderVerdict
from netsim.core.packet import PacketView
from netsim.errors import BadPacket

log = logging.getLogger("netsim.examples.packet_filter")

_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}
_DIRECTIONS = {TrafficDirection.INBOUND: "inbound", TrafficDirection.OUTBOUND: "outbound"}


class DropHostFilter(FilterPacketProvider):
    """Drop packets to or from ``vendor_configuration["drop_hosts"]``; allow and log the rest."""

    async def start_filter(self) -> None:
        config = self.filter_configuration.vendor_configuration
        self._drop = {ipaddress.ip_address(h).packed for h in config.get("drop_hosts", [])}
        self._log = bool(config.get("log", True))
        self._view = PacketView()
        self.packet_handler = self.handle_packet
        log.info("filtering; dropping %s", sorted(config.get("drop_hosts", [])))

    def handle_packet(
        self,
        context: FilterPacketContext,
        interface: str,
        direction: TrafficDirection,
        packet_bytes: bytes,
        packet_length: int,
    ) -> FilterPacketProviderVerdict:
        view = self._view
        try:
            view.load_untrusted(packet_bytes)
        except BadPacket as exc:
            if self._log:
                log.info("unparsed %s %s %d bytes (%s)", _DIRECTIONS.get(direction), interface, packet_length, exc)
            return FilterPacketProviderVerdict.ALLOW
        verdict = (
            FilterPacketProviderVerdict.DROP
            if view.src in self._drop or view.dst in self._drop
            else FilterPacketProviderVerdict.ALLOW
        )
        if self._log:
            log.info(
                "%s %s %s %s %s -> %s",
                verdict.name.lower(),
                _DIRECTIONS.get(direction, "any"),
                interface,
                _PROTOCOLS.get(view.protocol, str(view.protocol)),
                ipaddress.ip_address(view.src),
                ipaddress.ip_address(view.dst),
            )
        return verdict
