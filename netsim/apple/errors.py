"""The error a tunnel provider's settings call fails with (Apple: NETunnelProvider.h)."""

from __future__ import annotations

from netsim.apple.enums import TunnelProviderErrorCode
from netsim.errors import NetsimError

__all__ = ["TUNNEL_PROVIDER_ERROR_DOMAIN", "TunnelProviderError"]

TUNNEL_PROVIDER_ERROR_DOMAIN = "NETunnelProviderErrorDomain"


class TunnelProviderError(NetsimError):
    """Mirrors NSError in NETunnelProviderErrorDomain with a `TunnelProviderErrorCode`.

    Apple hands this error to the ``setTunnelNetworkSettings`` completion handler; netsim raises it from
    ``await set_tunnel_network_settings(...)``, and the message names the field and value that were rejected.

    Differences from Apple: an exception instead of an ``NSError`` argument; ``domain`` is a constant string.

    Attributes:
        code: the `TunnelProviderErrorCode`.
        domain: always ``"NETunnelProviderErrorDomain"``.
        message: what was wrong and what to change.
    """

    domain = TUNNEL_PROVIDER_ERROR_DOMAIN

    def __init__(self, code: TunnelProviderErrorCode, message: str = "") -> None:
        text = f"{TunnelProviderErrorCode(code).name} ({int(code)})"
        super().__init__(f"{text}: {message}" if message else text)
        self.code = TunnelProviderErrorCode(code)
        self.message = message
