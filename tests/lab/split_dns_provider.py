"""A split-tunnel provider for the Mac resolver's lab test: netsim's own provider, with the helper's settings
rewritten so only the lab's internet resolver is routed into the tunnel and only ``corp.lab.test`` is a match
domain (Apple's split DNS: ``NEDNSSettings.matchDomains`` without ``""`` and without the default route)."""

from __future__ import annotations

from netsim.apple.settings import IPv4Route, IPv6Route, PacketTunnelNetworkSettings
from netsim.runtime.forwarding import HelperForwardingProvider

MATCH_DOMAIN = "corp.lab.test"
TUNNEL_DNS_V4, TUNNEL_DNS_V6 = "203.0.113.53", "2001:db8:113::53"  # lab.addr.dns_v4/v6, the tunnel's DNS


class SplitDnsProvider(HelperForwardingProvider):
    def merge_settings(self, settings: PacketTunnelNetworkSettings) -> PacketTunnelNetworkSettings:
        assert settings.dns_settings is not None, "the lab tunnel always announces DNS servers"
        settings.dns_settings.match_domains = [MATCH_DOMAIN]
        if settings.ipv4_settings is not None:
            settings.ipv4_settings.included_routes = [IPv4Route(TUNNEL_DNS_V4, "255.255.255.255")]
        if settings.ipv6_settings is not None:
            settings.ipv6_settings.included_routes = [IPv6Route(TUNNEL_DNS_V6, 128)]
        return settings
