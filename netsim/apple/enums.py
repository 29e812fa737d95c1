"""Enumerations of the NetworkExtension API, with Apple's raw values.

Raw values come from the macOS SDK headers (NEProvider.h, NEVPNConnection.h, NETunnelProvider.h, NEPacket.h,
NEDNSSettings.h); ``ProviderStopReason.INTERNAL_ERROR`` (macOS 15.1) is 17 as exported by PyObjC's
NetworkExtension bindings. Members are the Swift case names in UPPER_SNAKE_CASE so ``int(member)`` is what an
Objective-C caller would see.
"""

from __future__ import annotations

import enum

__all__ = [
    "DNSProtocol",
    "ProviderStopReason",
    "RoutingMethod",
    "TrafficDirection",
    "TunnelProviderErrorCode",
    "VPNStatus",
]


class ProviderStopReason(enum.IntEnum):
    """Mirrors NEProviderStopReason: why the system stops a provider (Apple: NEProvider.h).

    Differences from Apple: none in values. netsim itself only ever uses NONE (``cancel_tunnel_with_error(None)``),
    USER_INITIATED (``stop_vpn_tunnel``), PROVIDER_FAILED (failed or timed-out start, cancel with an error,
    provider process died), CONFIGURATION_FAILED (settings the host could not apply) and SLEEP
    (``disconnect_on_sleep``); the others exist so ported code that switches on them still runs.
    """

    NONE = 0
    USER_INITIATED = 1
    PROVIDER_FAILED = 2
    NO_NETWORK_AVAILABLE = 3
    UNRECOVERABLE_NETWORK_CHANGE = 4
    PROVIDER_DISABLED = 5
    AUTHENTICATION_CANCELED = 6
    CONFIGURATION_FAILED = 7
    IDLE_TIMEOUT = 8
    CONFIGURATION_DISABLED = 9
    CONFIGURATION_REMOVED = 10
    SUPERCEDED = 11  # sic: Apple's spelling
    USER_LOGOUT = 12
    USER_SWITCH = 13
    CONNECTION_FAILED = 14
    SLEEP = 15
    APP_UPDATE = 16
    INTERNAL_ERROR = 17


class VPNStatus(enum.IntEnum):
    """Mirrors NEVPNStatus: the user-visible state of a VPN connection (Apple: NEVPNConnection.h).

    Differences from Apple: INVALID is reported only before a session is opened; there are no preferences to be
    missing from.
    """

    INVALID = 0
    DISCONNECTED = 1
    CONNECTING = 2
    CONNECTED = 3
    REASSERTING = 4
    DISCONNECTING = 5


class TunnelProviderErrorCode(enum.IntEnum):
    """Mirrors NETunnelProviderError (domain ``NETunnelProviderErrorDomain``, Apple: NETunnelProvider.h).

    Differences from Apple: none in values; netsim raises NETWORK_SETTINGS_INVALID with a message that names the
    offending field and value, which Apple does not.
    """

    NETWORK_SETTINGS_INVALID = 1
    NETWORK_SETTINGS_CANCELED = 2
    NETWORK_SETTINGS_FAILED = 3


class TrafficDirection(enum.IntEnum):
    """Mirrors NETrafficDirection (Apple: NENetworkRule.h; used by NEPacket.direction, macOS 10.15+).

    Differences from Apple: packets read from a netsim flow are tagged OUTBOUND (they left an app towards the
    tunnel), as on macOS; iOS has no ``direction`` at all.
    """

    ANY = 0
    INBOUND = 1
    OUTBOUND = 2


class RoutingMethod(enum.IntEnum):
    """Mirrors NETunnelProviderRoutingMethod (Apple: NETunnelProvider.h).

    Differences from Apple: SOURCE_APPLICATION routes by Linux uid (one ``ip rule uidrange`` per `AppRule`) and
    fills ``Packet.metadata`` from the owning socket (see `AppRule`); NETWORK_RULE is accepted as data and
    routes like DESTINATION_IP.
    """

    DESTINATION_IP = 1
    SOURCE_APPLICATION = 2
    NETWORK_RULE = 3


class DNSProtocol(enum.IntEnum):
    """Mirrors NEDNSProtocol (Apple: NEDNSSettings.h, macOS 11 / iOS 14).

    Differences from Apple: Linux's stub resolver speaks only cleartext; TLS and HTTPS settings are validated and
    recorded but the namespace's resolv.conf can only name the servers (see docs/apple-mapping.md).
    """

    CLEARTEXT = 1
    TLS = 2
    HTTPS = 3
