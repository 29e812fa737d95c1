"""One scenario body for both tunnel backends (issue 13): the user's provider, its configuration, both stats.

`TaggedProvider` is a provider of "the user's own" (a `HelperForwardingProvider` subclass given to the backends
as the spec ``"tunnel_scenario:TaggedProvider"``) that must see the key ``tag`` from ``provider_configuration``
and answers the app message ``b"tag"`` with it. `scenario` runs against `memory_tunnel` (no root,
tests/runtime/test_tunnel_backends.py) and `netsim_tunnel` (root, tests/lab/test_tunnel_backends.py) unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from netsim.apple import IPv4Route, IPv4Settings, PacketTunnelNetworkSettings
from netsim.apple.enums import VPNStatus
from netsim.runtime.forwarding import HelperForwardingProvider
from netsim.runtime.provider import PacketTunnelProvider

SPEC = "tunnel_scenario:TaggedProvider"
TAG = "user-config-4711"


class TaggedProvider(HelperForwardingProvider):
    """The built-in forwarding plus one app message that proves the user's configuration arrived."""

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        conf = self.protocol_configuration.provider_configuration or {}
        if conf.get("tag") != TAG:  # the user's key must reach the provider next to netsim's helper_socket
            raise ValueError(f"provider_configuration lacks the user's tag: {sorted(conf)}")
        await super().start_tunnel(options)

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"tag":
            return str((self.protocol_configuration.provider_configuration or {})["tag"]).encode()
        return await super().handle_app_message(data)


async def scenario(t: Any, tunnel_works: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
    """The shared body; returns what it saw (the caller asserts backend-specific things on top).

    ``t`` is a `LabTunnel` or a `MemoryTunnel`; ``tunnel_works`` sends traffic through the first tunnel and says
    whether it came back through it.
    """
    seen: dict[str, Any] = {}
    assert t.session.status is VPNStatus.CONNECTED
    assert await t.send_provider_message(b"tag") == TAG.encode()
    assert t.provider_configuration["tag"] == TAG and "helper_socket" in t.provider_configuration
    provider = await t.provider_stats()
    assert provider["connects"] == 1 and "ledger" in provider
    helper = await t.helper_stats()
    assert helper["sessions"] == 1 and helper["connected"] is True and "ledger" in helper
    assert await tunnel_works()

    # A second provider on the same Mac / namespace is refused and changes nothing of the first tunnel.
    async with t.another_manager().open_session() as other:
        await other.start_vpn_tunnel()
        with trio.fail_after(60):
            await other.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
        seen["second_status"] = other.status
        seen["second_error"] = other.last_disconnect_error
    assert seen["second_status"] is VPNStatus.DISCONNECTED, seen
    assert t.session.status is VPNStatus.CONNECTED
    assert (await t.helper_stats())["connected"] is True
    assert await tunnel_works()
    return seen


class Quiet(HelperForwardingProvider):
    """The built-in forwarding, but it answers no app message (a user's provider: no stats, no helper-stats)."""

    async def handle_app_message(self, data: bytes) -> bytes | None:
        return None


class SecondVpn(PacketTunnelProvider):
    """A second VPN app on the same Mac: it claims a prefix of its own and a DNS server (no helper at all)."""

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        settings = PacketTunnelNetworkSettings("192.0.2.99")
        settings.ipv4_settings = IPv4Settings(["10.99.0.2"], ["255.255.255.255"])
        settings.ipv4_settings.included_routes = [IPv4Route("10.99.0.0", "255.255.0.0")]
        await self.set_tunnel_network_settings(settings)
