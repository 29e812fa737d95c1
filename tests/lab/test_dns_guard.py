"""Forged DNS answers cannot pull destinations out of the tunnel (root tier; issue 11 item 4, reliability S9).

For each bypass mechanism (route, NAT) a fresh tunnel with the example policy (domain rule ``isp.lab.test``)
comes up in one lab with a capture on ``mac/en0``. An attacker in ``inet`` then sends forged DNS answers
through the VPN server to the client's tunnel address (inet gets a route to 10.66.0.0/24 via the server, which
forwards it into wg0 like any packet for its client; conntrack is skipped for them so a forgery that reuses a
live query's ports is not dropped as a conntrack clash). Each forgery names ``isp.lab.test`` -- bypassed -- at a
target address of its own:

* **unsolicited**: from the tunnel's resolver address (spoofed), nobody asked: target 203.0.113.61;
* **question mismatch**: the client asked ``www.lab.test`` (id and port known to the attacker), the forgery
  answers ``isp.lab.test``: target 203.0.113.62;
* **wrong source**: the client asked 203.0.113.54 for ``isp.lab.test``, the forgery comes from the tunnel's
  resolver 203.0.113.53 with the right id, port and question: target 203.0.113.63;
* **own address**: a forgery that matches the query in every field names the tunnel's own resolver
  (203.0.113.53) as ``isp.lab.test``.

203.0.113.54 answers nothing, so the forgery is the only answer (the attacker has won the race); the real
resolver would answer 203.0.113.53's queries at once and consume them.

Then each target is probed: its ``/whoami`` must name the VPN server (tunnelled), the helper must not have
learned it, and the en0 capture must hold no packet to or from it in clear, nor DNS to the tunnel's resolver.
Positive control: ``isp.lab.test`` resolved for real does leave by en0 (its flows are in the capture in clear).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.scenarios import BYPASS_DOMAIN, BYPASS_POLICY_TOML, add_bypass_hosts
from netsim.testing.fixtures import run_captured_tunnel, run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(400)]

MECHANISMS = ("route", "nat")
CLIENT = "10.66.0.2"
RESOLVER, SILENT = "203.0.113.53", "203.0.113.54"
TARGETS = {"unsolicited": "203.0.113.61", "question_mismatch": "203.0.113.62", "wrong_source": "203.0.113.63"}
VPN_WAN, ISP_WAN, EN0 = "192.0.2.2", "198.51.100.2", "192.168.1.10"

# Sends one raw IPv4 packet (hex in argv[1]) from the attacker's namespace: IP_HDRINCL keeps the forged source.
_SEND_RAW = (
    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW); "
    "p = bytes.fromhex(sys.argv[1]); s.sendto(p, (socket.inet_ntoa(p[16:20]), 0))"
)
# A stub resolver in the Mac: one query (hex) from a fixed port to argv[3], prints SENT, then what came back.
_ASK = (
    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    "s.bind(('0.0.0.0', int(sys.argv[2]))); s.settimeout(8); s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[3], 53)); "
    "print('SENT', flush=True)\n"
    "try:\n    print('GOT', s.recv(4096).hex())\nexcept OSError:\n    print('NOTHING')"
)


def _query(name: str, ident: int) -> bytes:
    from scapy.layers.dns import DNS, DNSQR

    return bytes(DNS(id=ident, rd=1, qd=DNSQR(qname=name, qtype="A")))


def _forged(src: str, dport: int, ident: int, question: str, answer: str) -> bytes:
    """An IPv4/UDP DNS answer from ``src``:53 to the client: ``question`` A ``answer``, TTL one day."""
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP

    dns = DNS(
        id=ident, qr=1, aa=1, rd=1, ra=1, qd=DNSQR(qname=question), an=DNSRR(rrname=question, ttl=86400, rdata=answer)
    )
    return bytes(IP(src=src, dst=CLIENT, ttl=64) / UDP(sport=53, dport=dport) / dns)


async def _inject(lab: Lab, packet: bytes) -> None:
    await lab.run("inet", [sys.executable, "-c", _SEND_RAW, packet.hex()])


async def _ask_and_forge(lab: Lab, name: str, ident: int, port: int, resolver: str, forged: bytes) -> str:
    """The client asks ``resolver``; once the query is out, the attacker sends ``forged``; what the client got."""
    proc = lab.spawn("mac", [sys.executable, "-c", _ASK, _query(name, ident).hex(), str(port), resolver], name="ask")
    await proc.wait_output(r"^SENT", timeout=10.0)
    await trio.sleep(0.5)  # the query crosses provider and helper in well under this
    await _inject(lab, forged)
    await proc.wait(timeout=15.0)
    return proc.stdout().strip().splitlines()[-1]


async def _whoami(lab: Lab, host: str) -> str:
    r = await lab.run("mac", ["curl", "-sS", "-m", "10", f"http://{host}/whoami"], check=False, timeout=20)
    return r.stdout.decode(errors="replace").strip() or f"curl failed: {r.stderr.decode(errors='replace')}"


async def _attack(lab: Lab, t: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    # positive control: the bypassed domain, resolved for real through the tunnel, leaves by en0
    rec["control"] = await _whoami(lab, BYPASS_DOMAIN)
    rec["before"] = await t.helper_stats()
    # 1. unsolicited, from the tunnel's resolver address
    await _inject(lab, _forged(RESOLVER, 40053, 0x5151, BYPASS_DOMAIN, TARGETS["unsolicited"]))
    # 2. the client asked another question; id, port and resolver are right
    rec["ask_mismatch"] = await _ask_and_forge(
        lab,
        "www.lab.test",
        0x1111,
        40061,
        SILENT,
        _forged(SILENT, 40061, 0x1111, BYPASS_DOMAIN, TARGETS["question_mismatch"]),
    )
    # 3. the client asked 203.0.113.54; the forgery comes from the tunnel's resolver
    rec["ask_wrong_source"] = await _ask_and_forge(
        lab,
        BYPASS_DOMAIN,
        0x2222,
        40062,
        SILENT,
        _forged(RESOLVER, 40062, 0x2222, BYPASS_DOMAIN, TARGETS["wrong_source"]),
    )
    # 4. matches the query in every field, but names the tunnel's own resolver
    rec["ask_own"] = await _ask_and_forge(
        lab, BYPASS_DOMAIN, 0x3333, 40063, SILENT, _forged(SILENT, 40063, 0x3333, BYPASS_DOMAIN, RESOLVER)
    )
    await trio.sleep(1.0)  # a route push (if any) lands before the probes
    rec["after"] = await t.helper_stats()
    rec["routes"] = {}
    for addr in (*TARGETS.values(), RESOLVER):  # the path the Mac's kernel picks for an app's packet
        route = await lab.run("mac", ["ip", "-4", "route", "get", addr], check=False)
        rec["routes"][addr] = route.stdout.decode().strip()
    rec["probe"] = {case: await _whoami(lab, addr) for case, addr in TARGETS.items()}
    dig = await lab.run("mac", ["dig", "+short", "+time=2", "+tries=1", f"@{RESOLVER}", "www.lab.test"], check=False)
    rec["dig"] = dig.stdout.decode().strip()
    rec["final"] = await t.helper_stats()
    return rec


def _add_targets(lab: Lab) -> None:
    for addr in TARGETS.values():
        lab.run_sync("inet", ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
    http = [arg for addr in TARGETS.values() for arg in ("--http", f"{addr}:80")]
    proc = lab.spawn("inet", [sys.executable, "-m", "netsim.lab.services", "--label", "target", *http], name="svc-tgt")
    proc.wait_output_sync(r"^READY$", timeout=20.0)
    # the attacker's path to the client's tunnel address: through the VPN server, like any reply would go
    lab.run_sync("inet", ["ip", "route", "add", "10.66.0.0/24", "via", VPN_WAN])
    lab.nft(
        "vpn",
        "table ip netsim_forge {\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority raw; policy accept;\n"
        f"    ip daddr {CLIENT} udp sport 53 notrack\n"
        "  }\n"
        "}\n",
    )


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pcap_dir = tmp_path_factory.mktemp("dnsguard-pcap")

    async def main(lab: Lab, rec: dict[str, Any]) -> None:
        await trio.to_thread.run_sync(add_bypass_hosts, lab)
        await trio.to_thread.run_sync(_add_targets, lab)
        for mech in MECHANISMS:
            text = BYPASS_POLICY_TOML.replace('mechanism = "nat"', f'mechanism = "{mech}"')
            await run_captured_tunnel(lab, rec, mech, _attack, pcap=pcap_dir / f"{mech}-en0.pcap", policy=text)

    rec = run_lab_scenario(main, "wireguard-go", "wg", "ip", "nft", "tcpdump", "curl", "dig")
    for mech in MECHANISMS:  # the attack figures (docs/helper.md), visible with -s
        if mech in rec:
            r = rec[mech]
            print(f"[dnsguard {mech}] probe={json.dumps(r['probe'])} control={r['control']!r}")
            print(f"[dnsguard {mech}] dns_guard={json.dumps(r['final'].get('dns_guard'))}")
            print(f"[dnsguard {mech}] dns={json.dumps((r['final'].get('policy') or {}).get('dns'))}")
            print(f"[dnsguard {mech}] en0 in clear per remote={json.dumps(_clear_remotes(rec[f'{mech}_pcap']))}")
    return rec


def _get(attack: dict[str, Any], mech: str) -> dict[str, Any]:
    if mech not in attack:
        pytest.fail(f"the {mech} phase did not complete: {attack.get('error', 'no error recorded')}")
    return attack[mech]  # type: ignore[no-any-return]


def _clear_remotes(path: Path) -> dict[str, int]:
    """Packets on en0 per remote address that are not the tunnel itself (WireGuard to the server) or the LAN."""
    from scapy.layers.inet import IP, UDP

    out: dict[str, int] = {}
    for pkt in read_pcap(path):
        if IP not in pkt:
            continue
        ip = pkt[IP]
        remote = ip.dst if ip.src == EN0 else ip.src if ip.dst == EN0 else None
        if remote is None or remote.startswith("192.168.1."):
            continue
        if remote == VPN_WAN and UDP in ip and 51820 in (ip[UDP].sport, ip[UDP].dport):
            continue
        out[remote] = out.get(remote, 0) + 1
    return out


@pytest.mark.reliability("S9")
@pytest.mark.parametrize("mech", MECHANISMS)
def test_forged_answers_leave_their_targets_in_the_tunnel(attack: dict[str, Any], mech: str) -> None:
    r = _get(attack, mech)
    assert r["probe"] == {case: f"target {VPN_WAN}" for case in TARGETS}  # the server saw the VPN's address
    assert r["dig"] == "203.0.113.10"  # the tunnel's resolver still answers ...
    clear = _clear_remotes(attack[f"{mech}_pcap"])
    for addr in (*TARGETS.values(), RESOLVER):  # ... through the tunnel: none of these in clear on en0
        assert clear.get(addr, 0) == 0, (addr, clear)


@pytest.mark.reliability("S9")
@pytest.mark.parametrize("mech", MECHANISMS)
def test_positive_control_the_real_answer_bypasses(attack: dict[str, Any], mech: str) -> None:
    r = _get(attack, mech)
    assert r["control"] == f"isp {EN0}"  # the router's own address: straight across the LAN, not the tunnel
    assert _clear_remotes(attack[f"{mech}_pcap"]).get(ISP_WAN, 0) > 0  # and in clear on en0


@pytest.mark.reliability("S9")
@pytest.mark.parametrize("mech", MECHANISMS)
def test_forged_answers_are_refused_and_counted(attack: dict[str, Any], mech: str) -> None:
    r = _get(attack, mech)
    # the stub resolvers got the forgeries (they did cross the tunnel to the Mac) ...
    for key in ("ask_mismatch", "ask_wrong_source", "ask_own"):
        assert r[key].startswith("GOT "), (key, r[key])
    # ... and the helper refused each for its reason
    refused = r["after"]["dns_guard"]["refused"]
    before = r["before"]["dns_guard"]["refused"]
    for reason in ("unsolicited", "question_mismatch", "wrong_source", "own_address"):
        assert refused[reason] - before[reason] >= 1, (reason, refused)
    learned = r["after"]["policy"]["dns"]["learned"] - r["before"]["policy"]["dns"]["learned"]
    assert learned == 0  # the control's binding was learned before "before"
    for addr, route in r["routes"].items():  # no host route out of the tunnel was pushed for any of them
        assert " dev en0 " not in f"{route} ", (addr, route)


def test_lab_left_nothing_behind(attack: dict[str, Any]) -> None:
    assert attack["leaks"] == []
    assert attack["root_changed"] is None
