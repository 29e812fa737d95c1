"""Pure-data mirrors of Apple's NetworkExtension packet-tunnel types (the ``NE`` prefix dropped).

See docs/apple-mapping.md for every Apple symbol, its netsim name and how they differ.
"""

from __future__ import annotations

from netsim.apple.enums import (
    DNSProtocol,
    ProviderStopReason,
    RoutingMethod,
    TrafficDirection,
    TunnelProviderErrorCode,
    VPNStatus,
)
from netsim.apple.errors import TUNNEL_PROVIDER_ERROR_DOMAIN, TunnelProviderError
from netsim.apple.filter import (
    FilterAction,
    FilterControlProvider,
    FilterControlVerdict,
    FilterDataProvider,
    FilterDataVerdict,
    FilterFlow,
    FilterNewFlowVerdict,
    FilterPacketContext,
    FilterPacketProvider,
    FilterPacketProviderVerdict,
    FilterProviderConfiguration,
    FilterReport,
    FilterReportEvent,
    FilterRule,
    FilterSettings,
    FilterSocketFlow,
)
from netsim.apple.packet import AF_INET, AF_INET6, FlowMetaData, Packet, family_for_version, version_for_family
from netsim.apple.protocol import AppRule, TunnelProviderProtocol
from netsim.apple.settings import (
    DNSOverHTTPSSettings,
    DNSOverTLSSettings,
    DNSSettings,
    IPv4Route,
    IPv4Settings,
    IPv6Route,
    IPv6Settings,
    PacketTunnelNetworkSettings,
    ProxyServer,
    ProxySettings,
    TunnelNetworkSettings,
)

__all__ = [
    "AF_INET",
    "AF_INET6",
    "TUNNEL_PROVIDER_ERROR_DOMAIN",
    "AppRule",
    "DNSOverHTTPSSettings",
    "DNSOverTLSSettings",
    "DNSProtocol",
    "DNSSettings",
    "FilterAction",
    "FilterControlProvider",
    "FilterControlVerdict",
    "FilterDataProvider",
    "FilterDataVerdict",
    "FilterFlow",
    "FilterNewFlowVerdict",
    "FilterPacketContext",
    "FilterPacketProvider",
    "FilterPacketProviderVerdict",
    "FilterProviderConfiguration",
    "FilterReport",
    "FilterReportEvent",
    "FilterRule",
    "FilterSettings",
    "FilterSocketFlow",
    "FlowMetaData",
    "IPv4Route",
    "IPv4Settings",
    "IPv6Route",
    "IPv6Settings",
    "Packet",
    "PacketTunnelNetworkSettings",
    "ProviderStopReason",
    "ProxyServer",
    "ProxySettings",
    "RoutingMethod",
    "TrafficDirection",
    "TunnelNetworkSettings",
    "TunnelProviderError",
    "TunnelProviderErrorCode",
    "TunnelProviderProtocol",
    "VPNStatus",
    "family_for_version",
    "version_for_family",
]
