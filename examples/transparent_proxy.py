"""Example transparent proxy: logs every flow, forwards the ones it claims, declines the rest (they go direct).

A `TransparentProxyProvider` written only against the public API. `start_proxy` sets the claim rules from its
options (``include`` / ``exclude``: lists of ``"ADDRESS/PREFIX:PORT/PROTO"``, e.g. ``"203.0.113.0/24:0/tcp"``;
port 0 = any; proto ``any``, ``tcp`` or ``udp``); `handle_new_flow` logs one JSON line per flow on stderr and
declines flows to the networks in ``decline`` (and from the app labels in ``decline_apps``), which Apple's
transparent proxy then sends directly to their destination. Claimed flows are forwarded with the provider's own
connections (`create_tcp_connection`, `create_udp_session`), which its rules never capture again.

In the lab (root)::

    async with Lab() as lab, transparent_proxy(lab, "netsim.examples.transparent_proxy:LoggingTransparentProxy",
                                               options={"include": ["203.0.113.0/24:0/any"]}) as proxy:
        await lab.run("mac", ["curl", "-s", "http://203.0.113.10/"])
        print(proxy.flow_log())

In memory: ``async with MemoryProxyHost(LoggingTransparentProxy(), tcp_servers=...) as host: ...`` (see
tests/runtime/test_proxy_memory.py). ``netsim demo proxy`` runs it in the lab.
"""

from __future__ import annotations

import json
import sys
from ipaddress import ip_address, ip_network
from typing import Any

from netsim.apple.proxy import (
    AppProxyFlow,
    AppProxyTCPFlow,
    AppProxyUDPFlow,
    HostEndpoint,
    NetworkRule,
    NetworkRuleProtocol,
    TransparentProxyNetworkSettings,
    TransparentProxyProvider,
)
from netsim.runtime.proxy import relay_tcp, relay_udp

__all__ = ["LoggingTransparentProxy", "parse_rule"]

_PROTOCOLS = {"any": NetworkRuleProtocol.ANY, "tcp": NetworkRuleProtocol.TCP, "udp": NetworkRuleProtocol.UDP}


def parse_rule(text: str) -> NetworkRule:
    """``"ADDRESS/PREFIX:PORT/PROTO"`` as a `NetworkRule` (IPv6 too: ``"::/0:443/tcp"``; the port follows the last
    colon)."""
    net, _, rest = text.rpartition(":")
    port, _, proto = rest.partition("/")
    address, _, prefix = net.partition("/")
    bits = 128 if ":" in address else 32
    endpoint = HostEndpoint(address, int(port or 0))
    return NetworkRule.destination_network(endpoint, int(prefix or bits), _PROTOCOLS[proto or "any"])


class LoggingTransparentProxy(TransparentProxyProvider):
    """Logs flows as JSON lines; forwards claimed flows, declines the configured ones (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.decline: list[Any] = []
        self.decline_apps: set[str] = set()
        self.log: list[dict[str, Any]] = []

    async def start_proxy(self, options: dict[str, Any] | None) -> None:
        options = options or {}
        self.decline = [ip_network(n, strict=False) for n in options.get("decline", [])]
        self.decline_apps = set(options.get("decline_apps", []))
        settings = TransparentProxyNetworkSettings(
            "127.0.0.1",
            included_network_rules=[parse_rule(r) for r in options.get("include", ["0.0.0.0/0:80/tcp"])],
            excluded_network_rules=[parse_rule(r) for r in options.get("exclude", [])],
        )
        await self.set_tunnel_network_settings(settings)

    def _emit(self, **entry: Any) -> None:
        self.log.append(entry)
        print(json.dumps(entry, sort_keys=True), file=sys.stderr, flush=True)

    def handle_new_flow(self, flow: AppProxyFlow) -> bool:
        app = flow.meta_data.source_app_signing_identifier
        if isinstance(flow, AppProxyTCPFlow):
            proto, where, remote = "tcp", "remote", str(flow.remote_endpoint)
            address = flow.remote_endpoint.hostname
        else:
            assert isinstance(flow, AppProxyUDPFlow)
            proto, where, remote = "udp", "local", str(flow.local_endpoint)
            address = flow.initial_remote_endpoint.hostname if flow.initial_remote_endpoint else ""
        declined = app in self.decline_apps or (
            bool(address) and any(ip_address(address) in net for net in self.decline)
        )
        self._emit(event="flow", proto=proto, **{where: remote}, app=app, verdict="direct" if declined else "proxy")
        if declined:
            return False  # Apple: the flow proceeds directly to its destination
        self.run_flow(flow, self._forward)
        return True

    async def _forward(self, flow: AppProxyFlow) -> None:
        moved = [0]

        def add(n: int) -> None:
            moved[0] += n

        if isinstance(flow, AppProxyTCPFlow):
            await relay_tcp(flow, await self.create_tcp_connection(flow.remote_endpoint), count=add)
            self._emit(event="closed", proto="tcp", remote=str(flow.remote_endpoint), bytes=moved[0])
        elif isinstance(flow, AppProxyUDPFlow):
            await relay_udp(flow, self.create_udp_session, idle=2.0, count=add)
            self._emit(event="closed", proto="udp", local=str(flow.local_endpoint), bytes=moved[0])
