"""IPv6 through the flow-level providers in the lab (issue 18): the transparent proxy and the DNS proxy on v6 flows.

One lab, two short proxy runs, with captures of ``mac``'s en0 and lo and fixed client source ports:

1. The demo transparent proxy (examples/transparent_proxy.py) claims TCP port 80 and UDP port 7 over IPv6
   (``::/0``) except the LAN printer's port 80 (an excluded rule), and declines the app ``dev.netsim.nobody``
   (uid 65534):
   - claimed (TCP and UDP, to www's IPv6 address): the app's own port appears on lo (TPROXY turned it back into
     the host) and never on en0; the provider's connection from another port carries the download out;
   - declined TCP (decided at the SYN, which the ip6tables side of the queue handed to the host): the app's own
     SYN and the whole download on en0, nothing of it on lo;
   - excluded by a rule (the control): the app's own port on en0, never on lo.
2. The demo DNS proxy (examples/dns_proxy.py) gets ``dig @::1`` over UDP and TCP (the Mac's resolver listens on
   ``[::1]:53``, docs/dns.md): the answers arrive, every query reached the provider, and the UDP answers are raw
   IPv6 datagrams from ``[::1]:53`` (the resolver's socket owns that address) whose UDP checksum scapy verifies.
   The blocked name's query never leaves en0; once the proxy is stopped it resolves and its query is on en0.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from proxy_probes import AS_NOBODY, NOBODY, UDP_SENDER

from netsim.apple import AppRule
from netsim.lab.addressing import ADDR
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tproxy import transparent_proxy
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

TPROXY = "netsim.examples.transparent_proxy:LoggingTransparentProxy"
DNS = "netsim.examples.dns_proxy:LoggingDNSProxy"
WWW, LAN = str(ADDR.www_v6), str(ADDR.lan_eth0_v6)
OPTIONS = {
    "include": ["::/0:80/tcp", "::/0:7/udp"],
    "exclude": [f"{LAN}/128:80/tcp"],
    "decline_apps": ["dev.netsim.nobody"],
}
PORTS = {"tcp_proxied": 40101, "tcp_declined": 40102, "tcp_excluded": 40103, "udp_proxied": 40104}


async def _curl(lab: Lab, host: str, port: int, user: list[str] | None = None) -> str:
    argv = [*(user or []), "curl", "-6", "-g", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
    r = await lab.run("mac", [*argv, "-m", "10", "--local-port", str(port), f"http://[{host}]/"], check=False)
    return r.stdout.decode()


async def _dig(lab: Lab, *args: str) -> str:
    r = await lab.run("mac", ["dig", "+tries=1", "+time=3", "@::1", *args], check=False, timeout=20)
    out = r.stdout.decode()
    status = next((ln.split("status: ")[1].split(",")[0] for ln in out.splitlines() if "status: " in ln), "none")
    answers = [
        ln.split()[-1] for ln in out.split(";; ANSWER SECTION:")[-1].splitlines()[1:] if ln.strip() and "\t" in ln
    ]
    return f"{status} {' '.join(answers) if ';; ANSWER SECTION:' in out else ''}".strip()


async def _captured(lab: Lab, d: Path, phase: str, ifaces: tuple[str, ...]) -> list[Any]:
    caps = []
    for iface in ifaces:
        start = partial(lab.capture, "mac", iface, name=f"v6-{phase}-{iface}", path=d / f"{phase}-{iface}.pcap")
        caps.append(await trio.to_thread.run_sync(start))
    return caps


async def _stop(caps: list[Any]) -> None:
    for cap in caps:
        await trio.to_thread.run_sync(cap.stop_sync)


async def _tproxy(lab: Lab, rec: dict[str, Any], d: Path) -> None:
    caps = await _captured(lab, d, "tproxy", ("en0", "lo"))
    try:
        apps = [AppRule("dev.netsim.nobody", uid=NOBODY)]
        async with transparent_proxy(lab, TPROXY, options=OPTIONS, app_rules=apps) as p:
            rec["ruleset"] = await p.ruleset()
            rec["ip6tables_during"] = (await lab.run("mac", ["ip6tables-save", "-t", "mangle"])).stdout.decode()
            rec["tcp_proxied"] = await _curl(lab, WWW, PORTS["tcp_proxied"])
            rec["tcp_declined"] = await _curl(lab, WWW, PORTS["tcp_declined"], AS_NOBODY)
            rec["tcp_excluded"] = await _curl(lab, LAN, PORTS["tcp_excluded"])
            udp = [sys.executable, "-c", UDP_SENDER, WWW, "7", str(PORTS["udp_proxied"]), "netsim-proxy-v6"]
            rec["udp_proxied"] = (await lab.run("mac", udp, check=False)).stdout.decode().strip()
            rec["stats"] = (await p.stop())["statistics"]
            rec["log"] = p.flow_log()
    finally:
        await _stop(caps)


async def _dns(lab: Lab, rec: dict[str, Any], d: Path) -> None:
    caps = await _captured(lab, d, "dns", ("en0", "lo"))
    try:
        async with transparent_proxy(lab, DNS, dns=True, options={"block": ["isp.lab.test"]}) as p:
            rec["dns_ruleset"] = await p.ruleset()
            rec["dns_udp"] = await _dig(lab, "www.lab.test", "A")
            rec["dns_tcp"] = await _dig(lab, "+tcp", "www.lab.test", "AAAA")
            rec["dns_blocked"] = await _dig(lab, "isp.lab.test", "AAAA")
            rec["dns_stats"] = (await p.stop())["statistics"]
            rec["dns_log"] = p.flow_log()
    finally:
        await _stop(caps)
    after = await _captured(lab, d, "after", ("en0",))
    try:
        rec["dns_unblocked_after"] = await _dig(lab, "isp.lab.test", "AAAA")
    finally:
        await _stop(after)
    rec["tables_after"] = (await lab.run("mac", ["nft", "list", "tables"])).stdout.decode()
    rec["ip6tables_after"] = (await lab.run("mac", ["ip6tables-save", "-t", "mangle"])).stdout.decode()
    rec["rules_after"] = (await lab.run("mac", ["ip", "-6", "rule"])).stdout.decode()


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("proxyv6")

    async def scenario(lab: Lab, r: dict[str, Any]) -> None:
        r["dir"] = str(d)
        await _tproxy(lab, r, d)
        await _dns(lab, r, d)

    yield run_lab_scenario(scenario, "curl", "dig", "tcpdump")


def _ok(rec: dict[str, Any]) -> None:
    assert "error" not in rec, rec.get("error")


def _packets(rec: dict[str, Any], pcap: str) -> list[Any]:
    """The IPv6 TCP/UDP packets of one capture."""
    from scapy.layers.inet import TCP, UDP
    from scapy.layers.inet6 import IPv6

    return [p for p in read_pcap(Path(rec["dir"]) / f"{pcap}.pcap") if IPv6 in p and (TCP in p or UDP in p)]


def _ports(rec: dict[str, Any], pcap: str) -> set[tuple[str, int]]:
    """(proto, source port) of every IPv6 TCP/UDP packet in one capture."""
    from scapy.layers.inet import TCP, UDP

    return {("tcp", int(p[TCP].sport)) if TCP in p else ("udp", int(p[UDP].sport)) for p in _packets(rec, pcap)}


def _tcp(rec: dict[str, Any], pcap: str, port: int) -> tuple[int, int]:
    """(SYNs from ``port``, payload bytes to ``port``) of the IPv6 TCP packets in one capture."""
    from scapy.layers.inet import TCP

    syns = received = 0
    for pkt in _packets(rec, pcap):
        if TCP in pkt:
            tcp = pkt[TCP]
            if int(tcp.sport) == port and int(tcp.flags) & 0x12 == 0x02:
                syns += 1
            if int(tcp.dport) == port:
                received += len(bytes(tcp.payload))
    return syns, received


def _qnames(rec: dict[str, Any], pcap: str) -> list[str]:
    from scapy.layers.dns import DNS as DNSLayer

    out = []
    for pkt in read_pcap(Path(rec["dir"]) / f"{pcap}.pcap"):
        if DNSLayer in pkt and pkt[DNSLayer].qr == 0 and len(pkt[DNSLayer].qd) > 0:
            out.append(pkt[DNSLayer].qd[0].qname.decode().rstrip("."))
    return out


def test_v6_flows_complete_and_reach_the_provider(rec: dict[str, Any]) -> None:
    _ok(rec)
    for key in ("tcp_proxied", "tcp_declined", "tcp_excluded"):
        assert rec[key] == "200 65536", key
    assert rec["udp_proxied"] == "reply netsim-proxy-v6"
    flows = [e for e in rec["log"] if e["event"] == "flow"]
    assert [(e["proto"], e["verdict"], e["app"]) for e in flows] == [
        ("tcp", "proxy", ""),
        ("tcp", "direct", "dev.netsim.nobody"),  # FlowMetaData from the IPv6 SYN's owner (NFQA_UID)
        ("udp", "proxy", ""),
    ]  # the excluded LAN flow never reached the provider
    assert flows[0]["remote"] == f"[{WWW}]:80"
    s = rec["stats"]
    assert (s["flows"], s["claimed"], s["declined"], s["capture_loops"], s["flow_errors"]) == (3, 2, 1, 0, 0)
    assert (s["decided_at_syn"], s["undecided_accepts"]) == (2, 0)  # both TCP SYNs were queued over ip6tables
    assert f"ip6 daddr {LAN} tcp dport 80 return" in rec["ruleset"]
    assert "ip6 daddr != ::1 tcp dport 80 tcp flags syn / syn,ack ct mark set 0x00017470" in rec["ruleset"]
    assert "-j NFQUEUE --queue-num 29808 --queue-bypass" in rec["ip6tables_during"]


def test_claimed_v6_flow_is_intercepted(rec: dict[str, Any]) -> None:
    _ok(rec)
    en0, lo = _ports(rec, "tproxy-en0"), _ports(rec, "tproxy-lo")
    for key in ("tcp_proxied", "udp_proxied"):
        proto = key.split("_")[0]
        assert (proto, PORTS[key]) in lo, f"{key}: TPROXY turned the app's packets back into the host via lo"
        assert (proto, PORTS[key]) not in en0, f"{key}: the app's own port must never reach en0"
    assert _tcp(rec, "tproxy-lo", PORTS["tcp_proxied"])[1] >= 65536  # the download came to the app over lo
    # positive control: the same capture shows the excluded flow's own port on en0, and not on lo
    assert ("tcp", PORTS["tcp_excluded"]) in en0 and ("tcp", PORTS["tcp_excluded"]) not in lo
    # the claimed download left from the provider's own socket: exactly one other TCP port to www:80 on en0
    assert len({p for proto, p in en0 if proto == "tcp"} - {80, *PORTS.values()}) == 1


def test_declined_v6_tcp_flow_leaves_as_the_app(rec: dict[str, Any]) -> None:
    """Decided at its SYN (queued by ip6tables), a declined IPv6 TCP flow is the app's own connection on en0."""
    _ok(rec)
    syns, received = _tcp(rec, "tproxy-en0", PORTS["tcp_declined"])
    assert syns >= 1, "the app's own SYN left en0"
    assert received >= 65536, "the whole download came back to the app's own port on en0"
    assert _tcp(rec, "tproxy-lo", PORTS["tcp_declined"]) == (0, 0), "TPROXY never saw it"
    # positive control: the same measure finds the claimed flow on lo, and the excluded one on en0
    assert _tcp(rec, "tproxy-lo", PORTS["tcp_proxied"])[0] >= 1
    assert _tcp(rec, "tproxy-en0", PORTS["tcp_excluded"])[1] >= 65536


def test_dns_proxy_answers_queries_to_v6_loopback(rec: dict[str, Any]) -> None:
    """``dig @::1`` over UDP and TCP goes to the provider; the UDP answers are raw IPv6 datagrams from [::1]:53."""
    _ok(rec)
    assert rec["dns_udp"] == "NOERROR 203.0.113.10"
    assert rec["dns_tcp"] == "NOERROR 2001:db8:113::10"
    assert rec["dns_blocked"].startswith("NXDOMAIN")
    texts = [e["text"] for e in rec["dns_log"]]
    assert "answer www.lab.test A NOERROR: 203.0.113.10" in texts
    assert "answer www.lab.test AAAA NOERROR: 2001:db8:113::10" in texts
    assert "answer isp.lab.test AAAA NXDOMAIN (blocked by the proxy)" in texts
    assert {("query", "udp"), ("query", "tcp")} <= {(e["event"], e["proto"]) for e in rec["dns_log"]}
    s = rec["dns_stats"]
    assert (s["flows"], s["claimed"], s["flow_errors"], s["capture_loops"]) == (3, 3, 0, 0)
    assert s["udp_queue_full"] == 0 and s["udp_reply_errors"] == 0  # no reply dropped
    assert "ip6 daddr ::1 udp dport 53 meta mark set 0x00007472" in rec["dns_ruleset"]


def test_dns_proxy_v6_udp_replies_carry_a_valid_checksum(rec: dict[str, Any]) -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6

    _ok(rec)
    replies = [p for p in _packets(rec, "dns-lo") if UDP in p and p[IPv6].src == "::1" and int(p[UDP].sport) == 53]
    assert len(replies) >= 2, "the A answer and the NXDOMAIN, from [::1]:53"
    for pkt in replies:
        ip = pkt[IPv6]
        stored = int(ip[UDP].chksum)
        fresh = ip.copy()
        del fresh[UDP].chksum
        assert stored != 0 and stored == int(IPv6(bytes(fresh))[UDP].chksum)  # RFC 8200 §8.1: mandatory


def test_dns_capture_shows_forwarded_not_blocked(rec: dict[str, Any]) -> None:
    _ok(rec)
    assert "www.lab.test" in _qnames(rec, "dns-en0")  # forwarded by the proxy to the system DNS
    assert "isp.lab.test" not in _qnames(rec, "dns-en0")  # answered by the proxy: never left the Mac
    assert rec["dns_unblocked_after"] == "NOERROR 2001:db8:51::2"  # control: the name exists...
    assert "isp.lab.test" in _qnames(rec, "after-en0")  # ...and without the proxy its query leaves en0


def test_kernel_state_removed_and_no_leaks(rec: dict[str, Any]) -> None:
    _ok(rec)
    assert "netsim_tproxy" not in rec["tables_after"] and "netsim_dnsproxy" not in rec["tables_after"]
    assert "netsim_" not in rec["ip6tables_after"]
    assert "0x7470" not in rec["rules_after"] and "0x7472" not in rec["rules_after"]
    assert "netsim_tproxy_syn" in rec["ip6tables_during"]  # ...and would have been seen
    assert rec["leaks"] == [] and rec["root_changed"] is None
