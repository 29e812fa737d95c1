"""NETunnelProviderProtocol and NEAppRule mirrors: the configuration the app saves and the provider reads."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

from netsim.apple.enums import RoutingMethod

__all__ = ["AppRule", "TunnelProviderProtocol"]


@dataclass(frozen=True)
class AppRule:
    """Mirrors NEAppRule: one app whose traffic a per-app VPN carries (Apple: NEAppRule.h, R5).

    Apple identifies an app by its code-signing identifier (plus a designated requirement on macOS) and the
    system attributes each socket to the app that opened it. Linux has no code signing, so netsim identifies an
    app by the **uid** it runs as: give every app under test its own uid, and the kernel then routes by it
    (``ip rule uidrange U-U lookup <tunnel table>``) and the flow recovers it for `FlowMetaData` from the socket
    tables in ``/proc/net``.

    Differences from Apple: ``signing_identifier`` is a free label (copied into
    ``FlowMetaData.source_app_signing_identifier``) and is not verified against anything; ``uid`` is what selects
    traffic, and is required when the protocol's routing method is ``SOURCE_APPLICATION``. ``executable_path``
    does not select traffic (a path does not survive exec/interpreters reliably and the kernel cannot route by
    it); it only seeds ``unique_identifier``, netsim's stand-in for Apple's per-build
    ``sourceAppUniqueIdentifier``. ``designated_requirement`` is carried as data. Apple's ``matchDomains``,
    ``matchPath`` and ``matchTools`` are not mirrored.
    """

    signing_identifier: str
    uid: int | None = None
    executable_path: str | None = None
    designated_requirement: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.signing_identifier, str) or not self.signing_identifier:
            raise ValueError(f"AppRule.signing_identifier must be a non-empty string, got {self.signing_identifier!r}")
        if self.uid is not None and (
            isinstance(self.uid, bool) or not isinstance(self.uid, int) or not 0 <= self.uid < 2**32 - 1
        ):
            raise ValueError(f"AppRule.uid must be an integer uid in 0..4294967294, got {self.uid!r}")

    @property
    def unique_identifier(self) -> bytes:
        """20 stable bytes naming the app's binary: SHA-256 of the executable path (else of the uid), truncated.

        Apple's ``sourceAppUniqueIdentifier`` identifies one build of the binary; a path hash is the closest
        Linux analogue that needs no file access on the hot path. Empty when neither is known (Apple: may be empty).
        """
        if self.executable_path:
            seed = "path:" + self.executable_path
        elif self.uid is not None:
            seed = f"uid:{self.uid}"
        else:
            return b""
        return hashlib.sha256(seed.encode()).digest()[:20]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "signing_identifier": self.signing_identifier,
            "uid": self.uid,
            "executable_path": self.executable_path,
            "designated_requirement": self.designated_requirement,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppRule:
        """Inverse of `to_dict`."""
        return cls(**data)


@dataclass
class TunnelProviderProtocol:
    """Mirrors NETunnelProviderProtocol (and the NEVPNProtocol fields it inherits; Apple: R11, R12).

    ``provider_configuration`` is handed to the provider exactly as given (Apple passes the dictionary through
    untouched); it must be JSON-serialisable because it crosses into the provider's process.

    Differences from Apple: no keychain references (``password_reference``, identity); ``provider_bundle_identifier``
    is informational (the controller is given the provider class directly). ``enforce_routes``: the provider
    host hands it to its network configurator before ``start_tunnel``, and included/excluded routes then win
    over the system table (Apple: enforceRoutes, R47) for the whole session. ``include_all_networks``
    (includeAllNetworks, R11) is enforced by the system, not the provider: the session engages a kernel kill
    switch (an nftables table in the provider's namespace, docs/kill-switch.md) before the provider starts, so
    only the utun, the tunnel's own marked transport, loopback and the network control plane (DHCP, ICMPv6
    ND) get out until the user stops the tunnel, even across a provider crash; it also implies
    ``enforce_routes``' rule order (IAN overrides enforceRoutes). ``exclude_local_networks`` (R43) counts only
    with ``include_all_networks`` or ``enforce_routes``: the configurator then keeps the private connected
    prefixes out of the tunnel and the kill switch lets them out (a public on-link prefix gets neither,
    docs/reliability.md K5). ``exclude_apns``,
    ``exclude_cellular_services`` and ``exclude_device_communication`` (R44-R46; Apple's default YES) are
    data only: the lab has no push service, cellular services or tethered devices to exempt.
    ``disconnect_on_sleep`` makes a simulated sleep stop the tunnel with ``ProviderStopReason.SLEEP``.
    ``app_rules`` lives here rather than on a manager (Apple keeps it on ``NETunnelProviderManager``, R5); with
    ``routing_method == SOURCE_APPLICATION`` only the
    listed apps' traffic (selected by uid, see `AppRule`) enters the tunnel and read packets carry
    `FlowMetaData`; with ``DESTINATION_IP`` the rules are ignored, as Apple ignores them.
    """

    provider_bundle_identifier: str = "dev.netsim.provider"
    server_address: str = ""
    provider_configuration: dict[str, Any] | None = None
    username: str | None = None
    include_all_networks: bool = False
    exclude_local_networks: bool = False
    enforce_routes: bool = False
    exclude_apns: bool = True
    exclude_cellular_services: bool = True
    exclude_device_communication: bool = True
    disconnect_on_sleep: bool = False
    routing_method: RoutingMethod = RoutingMethod.DESTINATION_IP
    app_rules: list[AppRule] | None = None
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
            "exclude_apns": self.exclude_apns,
            "exclude_cellular_services": self.exclude_cellular_services,
            "exclude_device_communication": self.exclude_device_communication,
            "disconnect_on_sleep": self.disconnect_on_sleep,
            "routing_method": int(self.routing_method),
            "app_rules": None if self.app_rules is None else [r.to_dict() for r in self.app_rules],
            "extras": copy.deepcopy(self.extras),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunnelProviderProtocol:
        """Inverse of `to_dict`."""
        fields = dict(data)
        fields["routing_method"] = RoutingMethod(fields.get("routing_method", RoutingMethod.DESTINATION_IP))
        rules = fields.get("app_rules")
        if rules is not None:
            fields["app_rules"] = [r if isinstance(r, AppRule) else AppRule.from_dict(r) for r in rules]
        return cls(**fields)
