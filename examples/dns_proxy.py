"""Example DNS proxy: logs every query and answer readably, answers blocked names itself, forwards the rest.

A `DNSProxyProvider` written only against the public API, for the forum's "capture and log all DNS" use. Every
DNS flow of the Mac comes to `handle_new_flow` (a DNS proxy cannot decline selectively: False terminates the
flow). UDP flows carry one query per datagram; TCP flows carry length-prefixed messages (RFC 1035 §4.2.2). Each
query is parsed (bounded, untrusted: `netsim.core.dns`), logged as one JSON line on stderr with a ``text`` field
such as ``"query www.lab.test A (app dev.example)"`` / ``"answer www.lab.test A NOERROR: 203.0.113.10"``, then
either answered at once with NXDOMAIN (options ``block``: names and their subdomains) or forwarded over UDP to
the first of the system's DNS servers (``system_dns_settings``) from the provider's own socket.

In the lab (root): ``transparent_proxy(lab, "netsim.examples.dns_proxy:LoggingDNSProxy", dns=True,
options={"block": ["blocked.lab.test"]})``, then ``dig @127.0.0.53 www.lab.test`` in ``mac`` (see
tests/lab/test_dns_proxy_lab.py and docs/proxy.md, "DNS proxy").
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from typing import Any

import trio

from netsim.apple.proxy import AppProxyFlow, AppProxyTCPFlow, AppProxyUDPFlow, DNSProxyProvider, HostEndpoint
from netsim.core.dns import TYPE_A, TYPE_AAAA, TYPE_CNAME, parse_dns_query_untrusted, parse_dns_response_untrusted
from netsim.errors import BadPacket

__all__ = ["LoggingDNSProxy", "nxdomain_for"]

_TYPES = {TYPE_A: "A", TYPE_AAAA: "AAAA", TYPE_CNAME: "CNAME", 12: "PTR", 15: "MX", 16: "TXT", 33: "SRV", 65: "HTTPS"}
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
TIMEOUT = 2.0  # seconds to wait for the upstream's answer
MAX_TCP_MESSAGE = 65535


def nxdomain_for(query: bytes) -> bytes:
    """An NXDOMAIN response to ``query`` (its header and question, QR and RA set, RCODE 3, no records)."""
    ident, flags = struct.unpack_from("!HH", query, 0)
    end = 12
    while query[end] != 0:  # the question name (already validated by parse_dns_query_untrusted)
        end += 1 + query[end]
    question = query[12 : end + 5]
    out_flags = 0x8000 | (flags & 0x0100) | 0x0080 | 3  # QR, RD copied, RA, NXDOMAIN
    return struct.pack("!HHHHHH", ident, out_flags, 1, 0, 0, 0) + question


class LoggingDNSProxy(DNSProxyProvider):
    """Logs, blocks or forwards every DNS query (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.block: list[str] = []
        self.log: list[dict[str, Any]] = []

    async def start_proxy(self, options: dict[str, Any] | None) -> None:
        self.block = [n.rstrip(".").lower() for n in (options or {}).get("block", [])]

    def _emit(self, **entry: Any) -> None:
        self.log.append(entry)
        print(json.dumps(entry, sort_keys=True), file=sys.stderr, flush=True)

    def _upstream(self) -> HostEndpoint:
        servers = [s for d in self.system_dns_settings or [] for s in d.servers]
        return HostEndpoint(servers[0], 53)

    def handle_new_flow(self, flow: AppProxyFlow) -> bool:
        self.run_flow(flow, self._serve_udp if isinstance(flow, AppProxyUDPFlow) else self._serve_tcp)
        return True  # a DNS proxy handles every flow: False would terminate it

    def _query(self, data: bytes, proto: str, app: str) -> bytes | None:
        """Log one query; returns the local answer (blocked name), or None to forward it."""
        try:
            q = parse_dns_query_untrusted(data)
        except BadPacket as exc:
            self._emit(event="malformed", proto=proto, reason=exc.reason, text=f"malformed query ({exc.reason})")
            return b""
        qtype = _TYPES.get(q.qtype, str(q.qtype))
        text = f"query {q.question} {qtype}" + (f" (app {app})" if app else "")
        self._emit(event="query", proto=proto, name=q.question, type=qtype, app=app, text=text)
        if any(q.question == b or q.question.endswith("." + b) for b in self.block):
            text = f"answer {q.question} {qtype} NXDOMAIN (blocked by the proxy)"
            self._emit(
                event="answer", proto=proto, name=q.question, type=qtype, rcode="NXDOMAIN", source="proxy", text=text
            )
            return nxdomain_for(data)
        return None

    def _answer(self, data: bytes, proto: str) -> None:
        try:
            r = parse_dns_response_untrusted(data)
        except BadPacket as exc:
            self._emit(event="malformed", proto=proto, reason=exc.reason, text=f"malformed answer ({exc.reason})")
            return
        values = [
            socket.inet_ntop(socket.AF_INET if len(a.data) == 4 else socket.AF_INET6, a.data)
            if isinstance(a.data, bytes)
            else a.data
            for a in r.answers
        ]
        qtype, rcode = _TYPES.get(r.qtype, str(r.qtype)), _RCODES.get(r.rcode, str(r.rcode))
        text = f"answer {r.question} {qtype} {rcode}: {', '.join(values) or '-'}"
        self._emit(event="answer", proto=proto, name=r.question, type=qtype, rcode=rcode, answers=values, text=text)

    async def _serve_udp(self, flow: AppProxyFlow) -> None:
        assert isinstance(flow, AppProxyUDPFlow)
        await flow.open()
        app = flow.meta_data.source_app_signing_identifier
        session = await self.create_udp_session(self._upstream())
        try:
            while True:
                batch: list[tuple[bytes, HostEndpoint]] = []
                with trio.move_on_after(TIMEOUT):
                    batch = await flow.read_datagrams()
                if not batch:
                    return
                for data, remote in batch:
                    local = self._query(data, "udp", app)
                    if local is not None:
                        if local:
                            await flow.write_datagrams([(local, remote)])
                        continue
                    await session.send_datagrams([(data, self._upstream())])
                    with trio.move_on_after(TIMEOUT):
                        for reply, _ in await session.receive_datagrams():
                            self._answer(reply, "udp")
                            await flow.write_datagrams([(reply, remote)])
        finally:
            await session.aclose()

    async def _serve_tcp(self, flow: AppProxyFlow) -> None:
        """Length-prefixed queries from the app, each forwarded over UDP (the lab's resolvers speak UDP only;
        a truncated UDP answer is passed on as it is, and the app may retry)."""
        assert isinstance(flow, AppProxyTCPFlow)
        await flow.open()
        app = flow.meta_data.source_app_signing_identifier
        buf = b""
        session = await self.create_udp_session(self._upstream())
        try:
            while True:
                while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                    chunk = await flow.read_data()
                    if not chunk or len(buf) + len(chunk) > 2 + MAX_TCP_MESSAGE:
                        return
                    buf += chunk
                size = int.from_bytes(buf[:2], "big")
                message, buf = buf[2 : 2 + size], buf[2 + size :]
                answer = self._query(message, "tcp", app)
                if answer is None:
                    await session.send_datagrams([(message, self._upstream())])
                    with trio.move_on_after(TIMEOUT):
                        for reply, _ in await session.receive_datagrams():
                            self._answer(reply, "tcp")
                            answer = reply
                if answer:
                    await flow.write_data(len(answer).to_bytes(2, "big") + answer)
        finally:
            await session.aclose()
