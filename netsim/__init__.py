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


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from netsim.apple import *  # noqa: F403
    from netsim.errors import *  # noqa: F403
