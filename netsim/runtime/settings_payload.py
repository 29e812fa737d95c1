"""The SETTINGS payload the helper sends the provider: the tunnel configuration minus its keys."""

from __future__ import annotations

from typing import Any

from netsim.core.wireguard.config import TunnelConfig

__all__ = ["SETTINGS_VERSION", "tunnel_settings_payload"]

SETTINGS_VERSION = 1


def tunnel_settings_payload(config: TunnelConfig, server: str | None) -> dict[str, Any]:
    """What the helper tells the provider in its SETTINGS frame: everything but the keys.

    The provider turns it into ``PacketTunnelNetworkSettings`` (addresses, DNS, AllowedIPs as included routes,
    MTU, the server as ``tunnel_remote_address``). The private key never crosses the IPC.
    """
    i = config.interface
    routes: list[str] = []
    for peer in config.peers:
        routes += [str(n) for n in peer.allowed_ips if str(n) not in routes]
    return {
        "v": SETTINGS_VERSION,
        "addresses": [str(a) for a in i.addresses],
        "dns": [str(s) for s in i.dns_servers],
        "dns_search": list(i.dns_search),
        "routes": routes,
        "mtu": i.mtu,
        "server": server,
    }
