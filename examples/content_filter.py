"""Example content filter (a `FilterDataProvider`): blocks hosts by name and logs every HTTP/HTTPS flow.

Written only against the public API. ``handle_new_flow`` asks to peek at the first outbound bytes (up to 16 KiB)
of every flow to port 80 or 443 (other flows are allowed unseen); ``handle_outbound_data`` reads the host name from
the HTTP ``Host`` header (port 80) or the TLS ClientHello's SNI (port 443) with netsim's bounded parsers
(`netsim.core.hostsniff`: a malformed request never raises), drops the flow when the name is blocked (or a
subdomain of a blocked name) and allows the rest of it otherwise. Each decision is one JSON line on stderr:
``{"event": "flow", "app": ..., "remote": ..., "hostname": ..., "verdict": "allow" | "drop"}``.

Configuration (``filter_configuration.vendor_configuration``): ``{"block": ["blocked.lab.test", ...]}``.

In the lab (root)::

    async with Lab() as lab, data_filter(lab, "netsim.examples.content_filter:ContentFilter",
                                         configuration={"block": ["blocked.lab.test"]}) as f:
        await lab.run("mac", ["curl", "-s", "http://www.lab.test/"])
        print(f.flow_log())

In memory: ``MemoryProxyHost(FilterDataHost(ContentFilter(), configuration=...), tcp_servers=...)`` (see
tests/test_filter_data_memory.py). ``netsim demo filter`` runs it in the lab.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from netsim.apple.filter import (
    FilterDataProvider,
    FilterDataVerdict,
    FilterFlow,
    FilterNewFlowVerdict,
    FilterSocketFlow,
)
from netsim.core.hostsniff import sniff_http_host, sniff_tls_sni

__all__ = ["PEEK", "ContentFilter"]

#: bytes peeked at the start of a flow: a request line and headers, or a ClientHello (even with large key shares), fit
PEEK = 16384


class ContentFilter(FilterDataProvider):
    """Blocks configured host names on ports 80/443 and logs each HTTP/HTTPS flow (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.block: set[str] = set()
        self.log: list[dict[str, Any]] = []

    async def start_filter(self) -> None:
        names = self.filter_configuration.vendor_configuration.get("block", [])
        self.block = {str(n).lower().rstrip(".") for n in names}

    def blocked(self, name: str | None) -> bool:
        """Whether ``name`` is a blocked name or a subdomain of one."""
        return name is not None and any(name == b or name.endswith("." + b) for b in self.block)

    def handle_new_flow(self, flow: FilterFlow) -> FilterNewFlowVerdict:
        if isinstance(flow, FilterSocketFlow) and flow.remote_endpoint.port in (80, 443):
            return FilterNewFlowVerdict.filter_data_verdict(
                filter_inbound=False, peek_inbound_bytes=0, filter_outbound=True, peek_outbound_bytes=PEEK
            )
        return FilterNewFlowVerdict.allow()

    def handle_outbound_data(
        self, flow: FilterFlow, read_bytes_start_offset: int, read_bytes: bytes
    ) -> FilterDataVerdict:
        assert isinstance(flow, FilterSocketFlow)
        sniff = sniff_tls_sni if flow.remote_endpoint.port == 443 else sniff_http_host
        complete, name = sniff(read_bytes)
        if not complete and len(read_bytes) < PEEK:
            return FilterDataVerdict(pass_bytes=0, peek_bytes=PEEK)  # called again when more bytes arrived
        name = name or flow.remote_hostname
        verdict = "drop" if self.blocked(name) else "allow"
        self._emit(
            event="flow",
            app=flow.source_app_identifier or "",
            remote=str(flow.remote_endpoint),
            scheme="https" if flow.remote_endpoint.port == 443 else "http",
            hostname=name,
            verdict=verdict,
        )
        return FilterDataVerdict.drop() if verdict == "drop" else FilterDataVerdict.allow()

    def handle_outbound_data_complete(self, flow: FilterFlow) -> FilterDataVerdict:
        return FilterDataVerdict.allow()  # the app ended its stream before a name was seen: nothing to block

    def _emit(self, **entry: Any) -> None:
        self.log.append(entry)
        print(json.dumps(entry, sort_keys=True), file=sys.stderr, flush=True)
