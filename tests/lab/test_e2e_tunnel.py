"""End to end in the lab: utun -> provider -> helper -> wireguard-go -> inet and back (root tier).

One lab and one tunnel serve the whole module (2-core CI): the module fixture runs the scenario once -- probes,
security checks, then the faults -- and records what it saw; each test asserts one property of that record.
Probe payloads carry a per-run token so the captures can be searched for them: zero matches on ``mac/en0``
(nothing in clear leaves the Mac), and matches on the server's decrypted side (the positive control that makes
the zero meaningful, docs/reliability.md K1/K2, S7).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.apple.enums import VPNStatus
from netsim.core.ledger import LedgerSnapshot
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.services import HTTP_SHA256, http_body
from netsim.lab.tunnel import STANDARD_PROBES, LabTunnel, netsim_tunnel
from netsim.testing.fixtures import LeakCheck, assert_root_unchanged, root_snapshot
from netsim.testing.require import require_binary, require_root

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(300)]
DOWNLOAD = 4_000_000  # bytes, at 1 MB/s: about 4 s, across the helper kill

# A UDP probe stream run inside `mac`: sends `count` numbered probes `interval` apart, collects the echoes, and
# prints JSON. Payload: <token>-<seq>. Bounded in count and time.
UDP_STREAM = r"""
import json, socket, sys, time
token, host = sys.argv[1], sys.argv[2]
count, interval, linger = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setblocking(False)
got, sent_at, dups = set(), {}, 0
def drain():
    global dups
    while True:
        try:
            data = s.recv(2048)
        except (BlockingIOError, ConnectionRefusedError):
            return
        if data.startswith(token.encode()):
            seq = int(data.rsplit(b"-", 1)[1])
            dups += seq in got
            got.add(seq)
for seq in range(count):
    try:
        s.sendto(f"{token}-{seq}".encode(), (host, 7))
    except OSError:
        pass
    sent_at[seq] = time.monotonic()
    time.sleep(interval)
    drain()
end = time.monotonic() + linger
while time.monotonic() < end and len(got) < count:
    time.sleep(0.01)
    drain()
print(json.dumps({"sent": count, "received": sorted(got), "duplicates": dups}))
"""

# Connect to the helper socket as uid 65534 (group root, so the 0750 directory lets it reach the socket and
# SO_PEERCRED is the deciding gate), then report what happened.
WRONG_UID = r"""
import os, socket, sys
os.setgroups([]); os.setgid(0); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-failed", e.errno); sys.exit(0)
s.settimeout(5)
try:
    s.sendall(b"NS" + bytes(10))
    data = s.recv(100)
    print("closed" if data == b"" else "answered", len(data))
except OSError as e:
    print("reset", e.errno)
"""

MALFORMED = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.settimeout(5)
try:
    s.sendall(b"\xde\xad\xbe\xef" * 8)
except OSError:
    pass  # the helper may already have closed us (BUSY): that is a rejection too
out = b""
try:
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
except OSError:
    pass
print(out.hex())
"""


async def _run(lab: Lab, argv: list[str], timeout: float = 20.0) -> tuple[int, bytes, str]:
    r = await lab.run("mac", argv, check=False, timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


async def _probes(lab: Lab, t: LabTunnel, token: str, rec: dict[str, Any]) -> None:
    a = lab.addr
    py = sys.executable
    for fam, flag in (("v4", "-4"), ("v6", "-6")):
        rc, out, err = await _run(
            lab, ["curl", flag, "-sS", "-m", "15", "-H", f"X-Netsim-Probe: {token}-http", "http://www.lab.test/"]
        )
        rec[f"curl_{fam}"] = (rc, hashlib.sha256(out).hexdigest(), err)
        rc, out, err = await _run(lab, ["curl", flag, "-sS", "-m", "15", "http://www.lab.test/whoami"])
        rec[f"whoami_{fam}"] = (rc, out.decode(errors="replace").strip(), err)
        rc, out, err = await _run(
            lab, ["dig", "+short", "+time=3", "+tries=2", "www.lab.test", "A" if fam == "v4" else "AAAA"]
        )
        rec[f"dig_{fam}"] = (rc, out.decode().strip(), err)
        target = str(a.www_v4 if fam == "v4" else a.www_v6)
        pattern = token.encode().hex()[:32]  # ping -p takes up to 16 pattern bytes
        rc, out, err = await _run(lab, ["ping", flag, "-c", "3", "-i", "0.2", "-W", "3", "-p", pattern, target])
        rec[f"ping_{fam}"] = (rc, out.decode(errors="replace"), err)
        rc, out, err = await _run(lab, [py, "-c", UDP_STREAM, f"{token}u{fam}", target, "20", "0.01", "3"])
        rec[f"udp_{fam}"] = (rc, json.loads(out) if rc == 0 else None, err)
        rc, out, err = await _run(lab, ["iperf3", flag, "-c", target, "-t", "1", "-J"], timeout=30)
        rec[f"iperf_{fam}"] = (rc, json.loads(out) if rc == 0 else None, err[-500:])
    rec["stats_after_probes"] = await _quiescent_stats(t)
    label, argv = STANDARD_PROBES[5]
    rec["probe_tunnel"] = await t.run_probe(label, argv)
    rec["probe_direct"] = await t.run_probe("printer on the LAN", ("ping", "-c", "1", "-W", "2", str(a.lan_eth0_v4)))


async def _quiescent_stats(t: LabTunnel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both ledgers once no packet moved between two snapshots (cross-process sums need quiescence)."""
    last: tuple[Any, Any] | None = None
    with trio.move_on_after(10):
        while True:
            p, h = await t.provider_stats(), await t.helper_stats()
            if last is not None and (p["ledger"], h["ledger"]) == last:
                return p, h
            last = (p["ledger"], h["ledger"])
            await trio.sleep(0.3)
    return p, h


async def _security(lab: Lab, t: LabTunnel, rec: dict[str, Any]) -> None:
    py = sys.executable
    rec["wrong_uid"] = await _run(lab, [py, "-c", WRONG_UID, str(t.socket_path)])
    rec["malformed"] = await _run(lab, [py, "-c", MALFORMED, str(t.socket_path)])
    rec["ping_after_rejections"] = (await _run(lab, ["ping", "-c", "2", "-W", "3", str(lab.addr.www_v4)]))[0]
    rec["helper_after_rejections"] = await t.helper_stats()
    rec["socket_modes"] = (os.stat(t.socket_path.parent).st_mode & 0o777, os.stat(t.socket_path).st_mode & 0o777)


async def _restart_provider(lab: Lab, t: LabTunnel, rec: dict[str, Any]) -> None:
    """F3-lite: stop the tunnel (the provider process exits) and start it again: the helper kept its session."""
    before = await t.helper_stats()
    await t.session.stop_vpn_tunnel()
    with trio.fail_after(30):
        await t.session.wait_status(VPNStatus.DISCONNECTED)
    # Apple semantics: a new start may follow DISCONNECTED at once (the old host is reaped in the background).
    await t.session.start_vpn_tunnel()
    with trio.fail_after(30):
        await t.session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
    rec["provider_restart_status"] = t.session.status
    rec["ping_after_provider_restart"] = (await _run(lab, ["ping", "-c", "2", "-W", "3", str(lab.addr.www_v4)]))[0]
    rec["helper_before_provider_restart"] = before
    rec["helper_after_provider_restart"] = await t.helper_stats()


async def _kill_helper(lab: Lab, t: LabTunnel, token: str, rec: dict[str, Any]) -> None:
    """F1: SIGKILL the helper under a UDP stream; the provider reasserts; a new helper resumes the tunnel."""
    py = sys.executable
    before = await t.provider_stats()
    changes = t.session.status_changes()
    argv = [py, "-c", UDP_STREAM, f"{token}k", str(lab.addr.www_v4), "600", "0.01", "3"]
    stream = lab.spawn("mac", argv, name="udp-stream")
    # a TCP download spanning the outage: rate-limited so it is still running when the helper dies
    url = f"http://www.lab.test/bytes/{DOWNLOAD}"
    download = lab.spawn("mac", ["sh", "-c", f"curl -sS -m 90 --limit-rate 1M {url} | sha256sum"], name="dl")
    await trio.sleep(1.0)
    rec["helper_exit"] = await t.kill_helper()
    await trio.sleep(1.0)
    rec["provider_while_down"] = await t.provider_stats()
    await t.start_helper()
    rec["provider_reconnected"] = await t.wait_connected(after_connects=before["connects"], timeout=30)
    rc = await stream.wait(60)
    rec["stream"] = (rc, json.loads(stream.stdout()) if rc == 0 else None, stream.stderr()[-500:])
    rc = await download.wait(90)
    rec["download_across_kill"] = (rc, download.stdout().split()[0] if rc == 0 else "", download.stderr()[-500:])
    statuses = []
    while True:
        try:
            statuses.append(changes.receive_nowait().status)
        except trio.WouldBlock:
            break
    rec["statuses_during_kill"] = statuses
    rc, out, err = await _run(lab, ["curl", "-sS", "-m", "20", "http://www.lab.test/bytes/1000000"])
    rec["curl_after_helper_restart"] = (rc, hashlib.sha256(out).hexdigest(), err)
    rec["provider_after_kill"] = await t.provider_stats()
    rec["helper_after_kill"] = await t.helper_stats()


async def _restart_server(lab: Lab, t: LabTunnel, rec: dict[str, Any]) -> None:
    """F5: restart wireguard-go; the helper notices the silence, handshakes again, traffic resumes."""
    handshakes = (await t.helper_stats())["device"]["handshakes_completed"]
    await t.restart_server()
    ok_after = None
    start = trio.current_time()
    with trio.move_on_after(60):
        while True:
            rc, _, _ = await _run(lab, ["ping", "-c", "1", "-W", "1", str(lab.addr.www_v4)])
            if rc == 0:
                ok_after = trio.current_time() - start
                break
    rec["server_restart_recovered_after"] = ok_after
    rec["handshakes_before_restart"] = handshakes
    rec["helper_after_server_restart"] = await t.helper_stats()
    status = (await t.server.show()).peer(t.client_key.public_key())
    rec["server_handshake_after_restart"] = status.latest_handshake
    rc, out, err = await _run(lab, ["curl", "-6", "-sS", "-m", "15", "http://www.lab.test/"])
    rec["curl_after_server_restart"] = (rc, hashlib.sha256(out).hexdigest(), err)
    rec["provider_final"] = await t.provider_stats()
    rec["helper_final"] = await t.helper_stats()
    rec["status_final"] = t.session.status


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_root()
    require_binary("wireguard-go", "wg", "ip", "nft", "tcpdump", "iperf3", "curl", "dig", "ping")
    pcap_dir = tmp_path_factory.mktemp("e2e-pcap")
    token = f"NSPROBE{secrets.token_hex(4)}"
    rec: dict[str, Any] = {"token": token, "pcap_dir": pcap_dir}
    before = root_snapshot()
    leaks = LeakCheck()

    async def main() -> None:
        async with Lab(pcap_dir=pcap_dir) as lab:
            rec["run_id"] = lab.run_id
            rec["addr"] = lab.addr
            async with netsim_tunnel(lab, group_access=True) as t:
                try:
                    for phase in (_probes, _security):
                        await phase(lab, t, *((token, rec) if phase is _probes else (rec,)))
                    await _restart_provider(lab, t, rec)
                    await _kill_helper(lab, t, token, rec)
                    await _restart_server(lab, t, rec)
                except BaseException:
                    rec["logs"] = t.logs()
                    raise
            rec["helper_logs"] = [p.stderr() for p in t.helpers]  # complete: the helpers have exited

    try:
        trio.run(main)
    except Exception as exc:  # recorded so every test reports the cause instead of an opaque fixture error
        trace = "".join(traceback.format_exception(exc))
        rec["error"] = f"{trace}\n{rec.get('logs', '')}"
    rec["leaks"] = leaks.problems([rec["run_id"]] if "run_id" in rec else [])
    try:
        assert_root_unchanged(before)
        rec["root_changed"] = None
    except AssertionError as exc:
        rec["root_changed"] = str(exc)
    return rec


def _need(rec: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        pytest.fail(f"scenario did not reach {missing}: {rec.get('error', 'no error recorded')}")


def _balanced(snapshot: dict[str, Any]) -> list[str]:
    ledger = LedgerSnapshot.from_json_untrusted(snapshot["ledger"])
    return [str(i) for i in ledger.check()]


# ---------------------------------------------------------------------------------------------- probes
@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_http_by_name_through_tunnel(scenario: dict[str, Any], fam: str) -> None:
    _need(scenario, f"curl_{fam}", f"whoami_{fam}")
    rc, digest, err = scenario[f"curl_{fam}"]
    assert rc == 0, err
    assert digest == HTTP_SHA256
    # the web server saw the VPN server's address (NATed at vpn), not the home router's: the tunnel path
    rc, who, err = scenario[f"whoami_{fam}"]
    addr = scenario["addr"]
    assert rc == 0, err
    assert who.split()[-1] == str(addr.vpn_wan_v4 if fam == "v4" else addr.vpn_wan_v6)


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_dns_through_tunnel_resolver(scenario: dict[str, Any], fam: str) -> None:
    _need(scenario, f"dig_{fam}")
    rc, out, err = scenario[f"dig_{fam}"]
    addr = scenario["addr"]
    assert rc == 0, err
    assert out.splitlines() == [str(addr.www_v4 if fam == "v4" else addr.www_v6)]


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_ping_udp_echo_iperf(scenario: dict[str, Any], fam: str) -> None:
    _need(scenario, f"ping_{fam}", f"udp_{fam}", f"iperf_{fam}")
    rc, out, err = scenario[f"ping_{fam}"]
    assert rc == 0 and " 0% packet loss" in out, out + err
    rc, udp, err = scenario[f"udp_{fam}"]
    assert rc == 0, err
    assert udp["received"] == list(range(udp["sent"])), "every UDP probe echoed (L1)"
    assert udp["duplicates"] == 0, "and none twice (L1)"
    rc, report, err = scenario[f"iperf_{fam}"]
    assert rc == 0, err
    end = report["end"]
    assert end["sum_received"]["bytes"] > 0
    assert end["sum_sent"]["bytes"] >= end["sum_received"]["bytes"]


def test_run_probe_tells_tunnelled_from_direct(scenario: dict[str, Any]) -> None:
    _need(scenario, "probe_direct")
    tunnel, direct = scenario["probe_tunnel"], scenario["probe_direct"]
    assert tunnel.ok and tunnel.path == "tunnel" and tunnel.output == "netsim-probe"
    assert direct.ok and direct.path == "direct"  # the LAN is a connected route: never read by the provider


def test_ledgers_balance_after_probes(scenario: dict[str, Any]) -> None:
    _need(scenario, "stats_after_probes")
    provider, helper = scenario["stats_after_probes"]
    assert _balanced(provider) == []
    assert _balanced(helper) == []
    p = provider["ledger"]["stages"]
    h = helper["ledger"]["stages"]
    # cross-process continuity: what the provider wrote to IPC the helper read, and back
    assert p["ipc_out"]["forwarded"] == h["ipc_in"]["read"]
    assert h["ipc_out"]["forwarded"] == p["ipc_in"]["read"]
    assert h["ipc_in"]["forwarded"] == h["wg_encrypt"]["read"]
    assert h["wg_decrypt"]["forwarded"] == h["ipc_out"]["read"]
    assert p["tun_read"]["dropped"] == {} and h["wg_encrypt"]["dropped"] == {}
    # batching: more than one packet per trio wakeup on the busy paths
    assert provider["flow"]["packets_read"] > provider["read_batches"] > 0


# ---------------------------------------------------------------------------------------------- proof on the wire
def _raw_records(path: Path) -> list[bytes]:
    return [bytes(p) for p in read_pcap(path)]


def test_en0_carries_only_wireguard_to_the_server(scenario: dict[str, Any]) -> None:
    _need(scenario, "stats_after_probes")
    from scapy.layers.inet import ICMP, IP, UDP, UDPerror
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RS, IPv6

    addr = scenario["addr"]
    server, mac, printer = str(addr.vpn_wan_v4), str(addr.mac_en0_v4), str(addr.lan_eth0_v4)
    packets = read_pcap(scenario["pcap_dir"] / "mac-en0.pcap")
    assert packets, "the en0 capture is empty"
    wg = 0
    other = []
    for pkt in packets:
        if IP in pkt:
            ip = pkt[IP]
            if UDP in ip and {ip.src, ip.dst} == {mac, server} and 51820 in (ip[UDP].sport, ip[UDP].dport):
                wg += 1
                continue
            if ICMP in ip and UDPerror in ip and 51820 in (ip[UDPerror].sport, ip[UDPerror].dport):
                continue  # port unreachable for WireGuard datagrams while wireguard-go restarted
            if ICMP in ip and {ip.src, ip.dst} == {mac, printer}:
                continue  # the deliberate direct probe to the LAN printer (a connected route, never tunnelled)
            if ip.proto == 2 and ip.dst.startswith("224.0.0."):
                continue  # IGMP on the link (interfaces joining groups), never routed
            other.append(pkt.summary())
        elif IPv6 in pkt:
            ip6 = pkt[IPv6]
            if ip6.dst.startswith("ff02:") or (ICMPv6ND_NS in ip6 or ICMPv6ND_NA in ip6 or ICMPv6ND_RS in ip6):
                continue  # link-scope multicast (MLD, RS) and neighbour discovery, never routed
            other.append(pkt.summary())
    assert wg > 100
    assert other == [], other[:10]


@pytest.mark.reliability("S7")
def test_no_probe_payload_in_clear_on_en0_but_decrypted_at_vpn(scenario: dict[str, Any]) -> None:
    _need(scenario, "stats_after_probes")
    token = scenario["token"].encode()
    en0 = b"".join(_raw_records(scenario["pcap_dir"] / "mac-en0.pcap"))
    wg = b"".join(_raw_records(scenario["pcap_dir"] / "vpn-wg.pcap"))
    ping_pattern = token[:16]
    for needle in (token, ping_pattern, b"X-Netsim-Probe", http_body(64)):
        assert en0.count(needle) == 0, f"{needle!r} seen in clear on en0"
    # positive control: the same probes are visible decrypted on the server's tunnel interface
    assert wg.count(token + b"-http") >= 2  # the HTTP header, IPv4 and IPv6
    assert wg.count(token + b"uv4-") >= 20 and wg.count(token + b"uv6-") >= 20
    assert wg.count(ping_pattern) >= 6
    assert wg.count(http_body(64)) >= 2


# ---------------------------------------------------------------------------------------------- security
@pytest.mark.reliability("S1", "B7")
def test_wrong_uid_and_malformed_clients_are_rejected(scenario: dict[str, Any]) -> None:
    _need(scenario, "helper_after_rejections")
    rc, out, err = scenario["wrong_uid"]
    assert rc == 0, err
    assert out.split()[0] in (b"closed", b"reset"), out  # accepted by the kernel, closed unread by the helper
    rc, out, err = scenario["malformed"]
    assert rc == 0, err
    server = scenario["helper_after_rejections"]["server"]
    assert server["rejected_uid"] == 1
    assert server["rejected_busy"] + server["protocol_errors"] + server["handshake_failed"] == 1
    assert server["active"] == 1  # the real provider's session survived both
    assert scenario["ping_after_rejections"] == 0
    assert scenario["socket_modes"] == (0o750, 0o660)


# ---------------------------------------------------------------------------------------------- faults
def test_provider_restart_reuses_the_helpers_wireguard_session(scenario: dict[str, Any]) -> None:
    _need(scenario, "helper_after_provider_restart")
    assert scenario["provider_restart_status"] is VPNStatus.CONNECTED
    assert scenario["ping_after_provider_restart"] == 0
    before, after = scenario["helper_before_provider_restart"], scenario["helper_after_provider_restart"]
    assert after["sessions"] == before["sessions"] + 1
    assert after["device"]["handshakes_completed"] == before["device"]["handshakes_completed"]
    assert _balanced(after) == []


@pytest.mark.reliability("F1")
def test_helper_killed_mid_transfer_provider_reasserts_and_resumes(scenario: dict[str, Any]) -> None:
    _need(scenario, "stream", "provider_after_kill")
    assert scenario["helper_exit"] == -9
    down = scenario["provider_while_down"]
    assert down["reasserting"] is True
    assert VPNStatus.REASSERTING in scenario["statuses_during_kill"]
    assert scenario["statuses_during_kill"][-1] is VPNStatus.CONNECTED
    rc, stream, err = scenario["stream"]
    assert rc == 0, err
    got = stream["received"]
    assert got and got[-1] == stream["sent"] - 1, "traffic resumed: the last probes were echoed"
    assert len(got) < stream["sent"], "some probes fell in the outage (else the kill hit nothing)"
    assert stream["duplicates"] == 0, "no probe delivered twice (L2)"
    rc, digest, err = scenario["download_across_kill"]
    assert rc == 0, err
    assert digest == hashlib.sha256(http_body(DOWNLOAD)).hexdigest(), "the TCP stream survived the outage intact"
    rc, digest, err = scenario["curl_after_helper_restart"]
    assert rc == 0, err
    assert digest == hashlib.sha256(http_body(1_000_000)).hexdigest()
    after = scenario["provider_after_kill"]
    assert after["disconnects"] == 1 and after["connects"] == 2
    assert _balanced(after) == []  # every packet read from the utun is forwarded or a named drop
    dropped = after["ledger"]["stages"]["tun_read"]["dropped"]
    outage = dropped.get("helper_down", 0) + after["ledger"]["stages"]["ipc_out"]["dropped"].get("ipc_closed", 0)
    assert outage > 0
    assert _balanced(scenario["helper_after_kill"]) == []
    assert scenario["helper_after_kill"]["sessions"] == 1  # a fresh helper process


@pytest.mark.reliability("F5")
def test_wireguard_go_restart_new_handshake_and_traffic_resumes(scenario: dict[str, Any]) -> None:
    _need(scenario, "helper_final")
    assert scenario["server_restart_recovered_after"] is not None, "no ping answered within 60 s after restart"
    assert scenario["server_handshake_after_restart"] is not None
    final = scenario["helper_final"]
    assert final["device"]["handshakes_completed"] > scenario["handshakes_before_restart"]
    rc, digest, err = scenario["curl_after_server_restart"]
    assert rc == 0, err
    assert digest == HTTP_SHA256
    assert _balanced(final) == []
    assert _balanced(scenario["provider_final"]) == []
    assert scenario["status_final"] is VPNStatus.CONNECTED


def test_structured_logs_and_clean_teardown(scenario: dict[str, Any]) -> None:
    _need(scenario, "helper_logs")
    events = [
        json.loads(line)["event"] for log in scenario["helper_logs"] for line in log.splitlines() if "event" in line
    ]
    assert events.count("ready") == 2  # the first helper and its replacement
    assert "handshake" in events and "session_open" in events and "final_stats" in events
    assert scenario["leaks"] == []
    assert scenario["root_changed"] is None
