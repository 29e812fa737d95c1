"""NETunnelProviderProtocol mirror: the configuration the app saves and the provider reads."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from netsim.apple.enums import RoutingMethod

__all__ = ["TunnelProviderProtocol"]


@dataclass
class TunnelProviderProtocol:
    """Mirrors NETunnelProviderProtocol (and the NEVPNProtocol fields it inherits; Apple: R11, R12).

    ``provider_configuration`` is handed to the provider exactly as given (Apple passes the dictionary through
    untouched); it must be JSON-serialisable because it crosses into the provider's process.

    Differences from Apple: no keychain references (``password_reference``, identity); ``provider_bundle_identifier``
    is informational (the controller is given the provider class directly). ``include_all_networks``,
    ``exclude_local_networks`` and ``enforce_routes`` are carried; of them only ``enforce_routes`` changes netsim's
    routing (included/excluded routes then win over the system table). ``disconnect_on_sleep`` makes a simulated
    sleep stop the tunnel with ``ProviderStopReason.SLEEP``.
    """

    provider_bundle_identifier: str = "dev.netsim.provider"
    server_address: str = ""
    provider_configuration: dict[str, Any] | None = None
    username: str | None = None
    include_all_networks: bool = False
    exclude_local_networks: bool = False
    enforce_routes: bool = False
    disconnect_on_sleep: bool = False
    routing_method: RoutingMethod = RoutingMethod.DESTINATION_IP
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the routing method as its raw value)."""
        return {
            "provider_bundle_identifier": self.provider_bundle_identifier,
            "server_address": self.server_address,
            "provider_configuration": copy.deepcopy(self.provider_configuration),
            "username": self.username,
            "include_all_networks": self.include_all_networks,
            "exclude_local_networks": self.exclude_local_networks,
            "enforce_routes": self.enforce_routes,
            "disconnect_on_sleep": self.disconnect_on_sleep,
            "routing_method": int(self.routing_method),
            "extras": copy.deepcopy(self.extras),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunnelProviderProtocol:
        """Inverse of `to_dict`."""
        fields = dict(data)
        fields["routing_method"] = RoutingMethod(fields.get("routing_method", RoutingMethod.DESTINATION_IP))
        return cls(**fields)
