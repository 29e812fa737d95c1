"""The DNS proxy demo's pure parts: readable logs, NXDOMAIN for blocked names, malformed queries dropped."""

from __future__ import annotations

import struct

from examples.dns_proxy import LoggingDNSProxy, nxdomain_for
from netsim.apple.proxy import DNSProxyProvider, TransparentProxyProvider
from netsim.core.dns import parse_dns_response_untrusted


def _query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def test_a_dns_proxy_cannot_decline_to_direct() -> None:
    """Apple DTS: returning False from a DNS proxy's handleNewFlow terminates the flow."""
    assert DNSProxyProvider.declines_go_direct is False
    assert TransparentProxyProvider.declines_go_direct is True


def test_blocked_names_answer_nxdomain_and_are_logged() -> None:
    proxy = LoggingDNSProxy()
    proxy.block = ["isp.lab.test"]
    answer = proxy._query(_query("www.isp.lab.test"), "udp", "dev.app")
    assert answer is not None
    r = parse_dns_response_untrusted(answer)
    assert (r.id, r.rcode, r.question, r.answers) == (0x1234, 3, "www.isp.lab.test", ())
    assert [e["text"] for e in proxy.log] == [
        "query www.isp.lab.test A (app dev.app)",
        "answer www.isp.lab.test A NXDOMAIN (blocked by the proxy)",
    ]
    assert proxy._query(_query("notisp.lab.test", 28), "tcp", "") is None  # not a subdomain: forwarded
    assert proxy.log[-1]["text"] == "query notisp.lab.test AAAA"


def test_malformed_queries_are_dropped_and_counted_in_the_log() -> None:
    proxy = LoggingDNSProxy()
    for junk in (b"", b"\x00" * 5, _query("x.test")[:15], b"\xff" * 40):
        assert proxy._query(junk, "udp", "") == b""  # dropped: nothing forwarded, nothing answered
    assert [e["event"] for e in proxy.log] == ["malformed"] * 4


def test_nxdomain_keeps_the_question_and_rd() -> None:
    q = _query("a.b.test", 16, 7)
    resp = nxdomain_for(q)
    ident, flags = struct.unpack_from("!HH", resp)
    assert ident == 7 and flags & 0x8000 and flags & 0x0100 and flags & 0xF == 3
    assert resp[12:] == q[12:]
