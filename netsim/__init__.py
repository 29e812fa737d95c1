"""netsim: a macOS NetworkExtension packet-tunnel data plane, simulated on Linux with real packets.

The public names below load lazily (PEP 562), so ``import netsim`` stays cheap and importing the sans-IO core
(``netsim.core``) never drags in trio, sockets or pyroute2.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import netsim.apple as _apple  # pure data and the sans-IO core: cheap, no I/O modules

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    # errors
    **{
        n: ("netsim.errors", n)
        for n in (
            "NetsimError",
            "BadPacket",
            "ConfigError",
            "LabError",
            "LocalProtocolError",
            "MissingDependency",
            "PrivilegeError",
            "RemoteProtocolError",
            "TunnelDown",
        )
    },
    # Apple mirror (pure data): every public name of netsim.apple
    **{n: ("netsim.apple", n) for n in _apple.__all__ if not n[0].islower()},
    # runtime (trio)
    "PacketTunnelFlow": ("netsim.runtime.flow", "PacketTunnelFlow"),
    "FlowStatistics": ("netsim.runtime.flow", "FlowStatistics"),
    "PacketTunnelProvider": ("netsim.runtime.provider", "PacketTunnelProvider"),
    "TunnelProviderManager": ("netsim.runtime.controller", "TunnelProviderManager"),
    "TunnelProviderSession": ("netsim.runtime.controller", "TunnelProviderSession"),
    "StatusChange": ("netsim.runtime.controller", "StatusChange"),
    "SubprocessLauncher": ("netsim.runtime.controller", "SubprocessLauncher"),
    "InProcessLauncher": ("netsim.runtime.controller", "InProcessLauncher"),
    "memory_launcher": ("netsim.runtime.controller", "memory_launcher"),
    "ProviderMessageError": ("netsim.runtime.controller", "ProviderMessageError"),
    "WireGuardSocket": ("netsim.runtime.wgsocket", "WireGuardSocket"),
    # content filters (docs/filters.md)
    "FilterDataHost": ("netsim.runtime.filter_data", "FilterDataHost"),
    # the includeAllNetworks kill switch (docs/kill-switch.md)
    "KernelKillSwitch": ("netsim.runtime.killswitch", "KernelKillSwitch"),
    "MemoryKillSwitch": ("netsim.runtime.killswitch", "MemoryKillSwitch"),
    "load_policy_file": ("netsim.runtime.policy_file", "load_policy_file"),
    # the provider's side of the helper (docs/helper.md, "Your own provider and the helper")
    **{
        n: ("netsim.runtime.helper_client", n)
        for n in ("HelperBusy", "HelperClient", "HelperClientConfig", "open_helper_client", "start_helper_client")
    },
    # sans-IO core
    "PacketView": ("netsim.core.packet", "PacketView"),
    "PrefixTable": ("netsim.core.prefix", "PrefixTable"),
    "RouteTable": ("netsim.core.routes", "RouteTable"),
    "DuplicatePolicy": ("netsim.core.routes", "DuplicatePolicy"),
    "WireGuardDevice": ("netsim.core.wireguard", "WireGuardDevice"),
    "WireGuardTimers": ("netsim.core.wireguard", "Timers"),
    "TunnelConfig": ("netsim.core.wireguard", "TunnelConfig"),
    "parse_wireguard_config": ("netsim.core.wireguard", "parse_config"),
    "Action": ("netsim.core.policy", "Action"),
    "Mechanism": ("netsim.core.policy", "Mechanism"),
    "Rule": ("netsim.core.policy", "Rule"),
    "Policy": ("netsim.core.policy", "Policy"),
    "PolicyEngine": ("netsim.core.policy", "PolicyEngine"),
    "Verdict": ("netsim.core.policy", "Verdict"),
    "parse_policy": ("netsim.core.policy", "parse_policy"),
    "excluded_routes_for": ("netsim.core.policy", "excluded_routes_for"),
    "NatTable": ("netsim.core.nat", "NatTable"),
    "NatConfig": ("netsim.core.nat", "NatConfig"),
    # lab, transports, testing
    "Lab": ("netsim.lab", "Lab"),
    "WireGuardGo": ("netsim.lab.wireguard", "WireGuardGo"),
    "TunDevice": ("netsim.transports.tun", "TunDevice"),
    "MemoryTun": ("netsim.testing.memory_tun", "MemoryTun"),
}

__all__ = ["__version__", *sorted(_EXPORTS)]  # noqa: PLE0604


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'netsim' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - the lazy names' real types, for type checkers and IDEs
    # One import per `_EXPORTS` entry, from the same module and attribute (tests/test_typed_exports.py checks
    # that they agree). ``X as X`` is an explicit re-export; a renamed export is an alias assignment.
    from netsim.apple import AF_INET as AF_INET
    from netsim.apple import AF_INET6 as AF_INET6
    from netsim.apple import TUNNEL_PROVIDER_ERROR_DOMAIN as TUNNEL_PROVIDER_ERROR_DOMAIN
    from netsim.apple import AppRule as AppRule
    from netsim.apple import DNSOverHTTPSSettings as DNSOverHTTPSSettings
    from netsim.apple import DNSOverTLSSettings as DNSOverTLSSettings
    from netsim.apple import DNSProtocol as DNSProtocol
    from netsim.apple import DNSSettings as DNSSettings
    from netsim.apple import FilterAction as FilterAction
    from netsim.apple import FilterControlProvider as FilterControlProvider
    from netsim.apple import FilterControlVerdict as FilterControlVerdict
    from netsim.apple import FilterDataProvider as FilterDataProvider
    from netsim.apple import FilterDataVerdict as FilterDataVerdict
    from netsim.apple import FilterFlow as FilterFlow
    from netsim.apple import FilterNewFlowVerdict as FilterNewFlowVerdict
    from netsim.apple import FilterPacketContext as FilterPacketContext
    from netsim.apple import FilterPacketProvider as FilterPacketProvider
    from netsim.apple import FilterPacketProviderVerdict as FilterPacketProviderVerdict
    from netsim.apple import FilterProviderConfiguration as FilterProviderConfiguration
    from netsim.apple import FilterReport as FilterReport
    from netsim.apple import FilterReportEvent as FilterReportEvent
    from netsim.apple import FilterRule as FilterRule
    from netsim.apple import FilterSettings as FilterSettings
    from netsim.apple import FilterSocketFlow as FilterSocketFlow
    from netsim.apple import FlowMetaData as FlowMetaData
    from netsim.apple import IPv4Route as IPv4Route
    from netsim.apple import IPv4Settings as IPv4Settings
    from netsim.apple import IPv6Route as IPv6Route
    from netsim.apple import IPv6Settings as IPv6Settings
    from netsim.apple import Packet as Packet
    from netsim.apple import PacketTunnelNetworkSettings as PacketTunnelNetworkSettings
    from netsim.apple import ProviderStopReason as ProviderStopReason
    from netsim.apple import ProxyServer as ProxyServer
    from netsim.apple import ProxySettings as ProxySettings
    from netsim.apple import RoutingMethod as RoutingMethod
    from netsim.apple import TrafficDirection as TrafficDirection
    from netsim.apple import TunnelNetworkSettings as TunnelNetworkSettings
    from netsim.apple import TunnelProviderError as TunnelProviderError
    from netsim.apple import TunnelProviderErrorCode as TunnelProviderErrorCode
    from netsim.apple import TunnelProviderProtocol as TunnelProviderProtocol
    from netsim.apple import VPNStatus as VPNStatus
    from netsim.core.nat import NatConfig as NatConfig
    from netsim.core.nat import NatTable as NatTable
    from netsim.core.packet import PacketView as PacketView
    from netsim.core.policy import Action as Action
    from netsim.core.policy import Mechanism as Mechanism
    from netsim.core.policy import Policy as Policy
    from netsim.core.policy import PolicyEngine as PolicyEngine
    from netsim.core.policy import Rule as Rule
    from netsim.core.policy import Verdict as Verdict
    from netsim.core.policy import excluded_routes_for as excluded_routes_for
    from netsim.core.policy import parse_policy as parse_policy
    from netsim.core.prefix import PrefixTable as PrefixTable
    from netsim.core.routes import DuplicatePolicy as DuplicatePolicy
    from netsim.core.routes import RouteTable as RouteTable
    from netsim.core.wireguard import Timers as _WireGuardTimers
    from netsim.core.wireguard import TunnelConfig as TunnelConfig
    from netsim.core.wireguard import WireGuardDevice as WireGuardDevice
    from netsim.core.wireguard import parse_config as _parse_wireguard_config
    from netsim.errors import BadPacket as BadPacket
    from netsim.errors import ConfigError as ConfigError
    from netsim.errors import LabError as LabError
    from netsim.errors import LocalProtocolError as LocalProtocolError
    from netsim.errors import MissingDependency as MissingDependency
    from netsim.errors import NetsimError as NetsimError
    from netsim.errors import PrivilegeError as PrivilegeError
    from netsim.errors import RemoteProtocolError as RemoteProtocolError
    from netsim.errors import TunnelDown as TunnelDown
    from netsim.lab import Lab as Lab
    from netsim.lab.wireguard import WireGuardGo as WireGuardGo
    from netsim.runtime.controller import InProcessLauncher as InProcessLauncher
    from netsim.runtime.controller import ProviderMessageError as ProviderMessageError
    from netsim.runtime.controller import StatusChange as StatusChange
    from netsim.runtime.controller import SubprocessLauncher as SubprocessLauncher
    from netsim.runtime.controller import TunnelProviderManager as TunnelProviderManager
    from netsim.runtime.controller import TunnelProviderSession as TunnelProviderSession
    from netsim.runtime.controller import memory_launcher as memory_launcher
    from netsim.runtime.filter_data import FilterDataHost as FilterDataHost
    from netsim.runtime.flow import FlowStatistics as FlowStatistics
    from netsim.runtime.flow import PacketTunnelFlow as PacketTunnelFlow
    from netsim.runtime.helper_client import HelperBusy as HelperBusy
    from netsim.runtime.helper_client import HelperClient as HelperClient
    from netsim.runtime.helper_client import HelperClientConfig as HelperClientConfig
    from netsim.runtime.helper_client import open_helper_client as open_helper_client
    from netsim.runtime.helper_client import start_helper_client as start_helper_client
    from netsim.runtime.killswitch import KernelKillSwitch as KernelKillSwitch
    from netsim.runtime.killswitch import MemoryKillSwitch as MemoryKillSwitch
    from netsim.runtime.policy_file import load_policy_file as load_policy_file
    from netsim.runtime.provider import PacketTunnelProvider as PacketTunnelProvider
    from netsim.runtime.wgsocket import WireGuardSocket as WireGuardSocket
    from netsim.testing.memory_tun import MemoryTun as MemoryTun
    from netsim.transports.tun import TunDevice as TunDevice

    WireGuardTimers = _WireGuardTimers
    parse_wireguard_config = _parse_wireguard_config
