"""Bypass, proven on the wire: the same policy under the route and the NAT mechanism, side by side (needs root).

Run: ``sudo .venv/bin/python examples/bypass_tunnel.py [--policy examples/policy.toml] [--pcap DIR]``

For each mechanism it brings up a lab and the whole tunnel (wireguard-go server, helper, provider) with
``examples/policy.toml``, then from the simulated Mac: ``curl``, a UDP echo and ``ping`` to the bypassed internet
host, the bypassed port and the bypassed domain, the same to a tunnelled host, the LAN printer, and datagrams to
the dropped port. ``/whoami`` on each server answers with the client address it saw, which tells the path apart
without a capture: the ISP's address (198.51.100.2) means the packet left by ``en0`` through the home router,
the VPN server's (192.0.2.2) means it went through the tunnel. It prints what each mechanism did with each flow,
the provider's and helper's counters, and a small latency/throughput comparison (docs/bypass.md).

The lab additions (`prepare_lab`): ``direct.lab`` hosts 203.0.113.20 / 2001:db8:113::20 on ``inet`` (HTTP and UDP
echo), an HTTP server on port 8080 of the ``www`` host, and HTTP/UDP echo on the ISP router's WAN address, which
``isp.lab.test`` resolves to (the domain rule).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from netsim.core.policy import Policy, parse_policy
from netsim.lab.lab import Lab
from netsim.lab.scenarios import BYPASS_DOMAIN, BYPASS_PORT, DIRECT_V4, DIRECT_V6, DROP_PORT, add_bypass_hosts
from netsim.lab.services import http_body

PORT = BYPASS_PORT
DOMAIN = BYPASS_DOMAIN
POLICY = Path(__file__).with_name("policy.toml")
TRANSFER_BYTES = 4_000_000

# A bounded UDP echo client run in `mac`: `count` datagrams to host:port, prints how many came back.
UDP_ECHO = r"""
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
if not host.replace(".", "").isdigit() and ":" not in host:
    fam, _, _, _, sa = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0]
    host = sa[0]
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(0.5)
got = 0
for i in range(count):
    s.sendto(b"netsim-bypass-%d" % i, (host, port))
    try:
        if s.recv(2048) == b"netsim-bypass-%d" % i:
            got += 1
    except (TimeoutError, ConnectionRefusedError):
        pass
print(json.dumps({"sent": count, "received": got, "local_port": s.getsockname()[1]}))
"""


def prepare_lab(lab: Lab) -> None:
    """Add the bypass scenario's hosts and services to a running lab (`netsim.lab.scenarios.add_bypass_hosts`)."""
    add_bypass_hosts(lab)


def load_policy(path: Path, mechanism: str) -> tuple[str, Policy]:
    """The policy file's text with its ``mechanism`` replaced, and the parsed policy."""
    text = re.sub(r"(?m)^mechanism\s*=.*$", f'mechanism = "{mechanism}"', path.read_text())
    return text, parse_policy(text, source=str(path))


async def _run(lab: Lab, argv: list[str], timeout: float = 30.0) -> tuple[int, str, str]:
    r = await lab.run("mac", argv, check=False, timeout=timeout)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


async def _whoami(lab: Lab, url: str) -> str:
    rc, out, err = await _run(lab, ["curl", "-sS", "-m", "10", url])
    return out.strip() if rc == 0 else f"curl failed ({rc}): {err.strip()}"


async def _ping(lab: Lab, host: str, count: int = 3, interval: float = 0.2) -> dict[str, Any]:
    rc, out, _ = await _run(lab, ["ping", "-c", str(count), "-i", str(interval), "-W", "3", host])
    m = re.search(r"(\d+) received", out)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    return {"rc": rc, "received": int(m.group(1)) if m else 0, "avg_ms": float(rtt.group(1)) if rtt else None}


async def _udp(lab: Lab, host: str, port: int = 7, count: int = 5) -> dict[str, Any]:
    rc, out, err = await _run(lab, [sys.executable, "-c", UDP_ECHO, host, str(port), str(count)])
    return json.loads(out) if rc == 0 else {"error": err[-500:], "received": 0, "sent": count}


async def _transfer(lab: Lab, url: str) -> dict[str, Any]:
    """Download ``url`` in ``mac``: sha256 of what arrived and curl's own rate figure (bytes/s)."""
    fd, name = tempfile.mkstemp(prefix=f"netsim-{lab.run_id}-download-")
    os.close(fd)
    try:
        rc, out, err = await _run(
            lab, ["curl", "-sS", "-m", "60", "-o", name, "-w", "%{speed_download} %{size_download}", url], timeout=90
        )
        if rc != 0:
            return {"error": err[-500:], "sha256": None}
        speed, size = out.split()
        digest = hashlib.sha256(await trio.Path(name).read_bytes()).hexdigest()
    finally:
        os.unlink(name)
    return {"sha256": digest, "bytes_per_s": float(speed), "size": int(float(size))}


async def _iperf(lab: Lab, host: str, seconds: int = 2) -> float | None:
    """TCP upload throughput to the lab's iperf3 server (it listens on every inet address), bits/s as received.

    iperf3 serves one test at a time and refuses the next while it tears the last one down ("server is busy"),
    so a refused run is retried a few times; None if it never ran.
    """
    for _ in range(5):
        _rc, out, _ = await _run(lab, ["iperf3", "-c", host, "-t", str(seconds), "-J"], timeout=seconds + 20)
        try:
            return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])
        except (ValueError, KeyError, TypeError):
            await trio.sleep(0.5)
    return None


async def provider_read(t: Any) -> int:
    """Packets the provider has read from the utun so far (its ledger's ``tun_read``)."""
    stats = await t.provider_stats()
    return int(stats["ledger"]["stages"]["tun_read"]["read"])


async def run_flows(lab: Lab, t: Any, *, measure: bool = True) -> dict[str, Any]:
    """Every flow of the scenario, with the provider's read counter around the bypassed ones."""
    a = lab.addr
    rec: dict[str, Any] = {}
    before = await provider_read(t)
    rec["direct_http"] = await _whoami(lab, f"http://{DIRECT_V4}/whoami")
    rec["direct_udp"] = await _udp(lab, DIRECT_V4)
    rec["direct_ping"] = await _ping(lab, DIRECT_V4)
    rec["direct_read"] = await provider_read(t) - before
    rec["direct6_http"] = await _whoami(lab, f"http://[{DIRECT_V6}]/whoami")
    rec["direct6_ping"] = await _ping(lab, DIRECT_V6)
    before = await provider_read(t)
    rec["port_http"] = await _whoami(lab, f"http://{a.www_v4}:{PORT}/whoami")
    rec["port_read"] = await provider_read(t) - before
    rec["domain_http"] = await _whoami(lab, f"http://{DOMAIN}/whoami")
    rec["domain_udp"] = await _udp(lab, DOMAIN)
    rec["domain_ping"] = await _ping(lab, DOMAIN)
    rec["tunnel_http"] = await _whoami(lab, f"http://{a.www_v4}/whoami")
    rec["tunnel_udp"] = await _udp(lab, str(a.www_v4))
    rec["tunnel_ping"] = await _ping(lab, str(a.www_v4))
    before = await provider_read(t)
    rec["lan_http"] = await _whoami(lab, f"http://{a.lan_eth0_v4}/whoami")
    rec["lan_ping"] = await _ping(lab, str(a.lan_eth0_v4))
    rec["lan_read"] = await provider_read(t) - before
    rec["drop_udp"] = await _udp(lab, str(a.www_v4), DROP_PORT, count=4)
    if measure:
        rec["rtt"] = {
            "tunnel": await _ping(lab, str(a.www_v4), 20, 0.05),
            "bypass": await _ping(lab, DIRECT_V4, 20, 0.05),
        }
        rec["rate"] = {
            "tunnel": await _transfer(lab, f"http://{a.www_v4}/bytes/{TRANSFER_BYTES}"),
            "bypass": await _transfer(lab, f"http://{DIRECT_V4}/bytes/{TRANSFER_BYTES}"),
            "port": await _transfer(lab, f"http://{a.www_v4}:{PORT}/bytes/{TRANSFER_BYTES}"),
        }
        rec["iperf"] = {
            "tunnel": await _iperf(lab, str(a.www_v4)),
            "bypass": await _iperf(lab, DIRECT_V4),
        }
    rec["expected_sha256"] = hashlib.sha256(http_body(TRANSFER_BYTES)).hexdigest()
    rec["provider"] = await t.provider_stats()
    rec["helper"] = await t.helper_stats()
    return rec


async def _mechanism(mechanism: str, policy_path: Path, pcap: Path | None) -> dict[str, Any]:
    from netsim.lab.tunnel import netsim_tunnel

    text, _ = load_policy(policy_path, mechanism)
    pcap_dir = pcap / mechanism if pcap is not None else None
    async with Lab(pcap_dir=pcap_dir) as lab:
        await trio.to_thread.run_sync(prepare_lab, lab)
        async with netsim_tunnel(lab, policy=text) as t:
            return await run_flows(lab, t)


def _summary(mechanism: str, rec: dict[str, Any]) -> str:
    rate = rec.get("rate", {})
    rtt = rec.get("rtt", {})
    lines = [f"== mechanism: {mechanism}"]
    for key in ("direct_http", "direct6_http", "port_http", "domain_http", "tunnel_http", "lan_http"):
        lines.append(f"  {key:12} -> {rec[key]}")
    lines.append(f"  provider read during bypass-host flows: {rec['direct_read']}, LAN flows: {rec['lan_read']}")
    h = rec["helper"]
    lines.append(f"  helper verdicts: {h.get('verdicts')}  rule hits: {h.get('policy', {}).get('rule_hits')}")
    if h.get("bypass"):
        b = h["bypass"]
        lines.append(f"  NAT: sent {b['sent']}, captured {b['captured']}, delivered {b['delivered']}")
    for path in ("tunnel", "bypass", "port"):
        if path in rate and rate[path].get("bytes_per_s"):
            ok = rate[path]["sha256"] == rec["expected_sha256"]
            lines.append(
                f"  {path:7} {rate[path]['bytes_per_s'] * 8 / 1e6:8.1f} Mbit/s  sha256 {'ok' if ok else 'BAD'}"
            )
    for path, bps in rec.get("iperf", {}).items():
        if bps:
            lines.append(f"  {path:7} iperf3 {bps / 1e6:8.1f} Mbit/s")
    for path in ("tunnel", "bypass"):
        if path in rtt:
            lines.append(f"  {path:7} ping avg {rtt[path]['avg_ms']} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, default=POLICY)
    parser.add_argument("--pcap", type=Path, default=None, help="write per-mechanism captures here")
    parser.add_argument("--mechanism", choices=["route", "nat", "both"], default="both")
    args = parser.parse_args()
    mechs = ["route", "nat"] if args.mechanism == "both" else [args.mechanism]
    for mech in mechs:
        start = time.monotonic()
        rec = trio.run(_mechanism, mech, args.policy, args.pcap)
        print(_summary(mech, rec))
        print(f"  ({time.monotonic() - start:.1f} s)")


if __name__ == "__main__":
    main()
