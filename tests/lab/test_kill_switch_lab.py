"""The includeAllNetworks kill switch in the kernel (root tier): nothing leaves mac's en0 in the clear while engaged.

One lab and one tunnel for the module (``include_all_networks``, ``wait_connected=False``); a capture on mac/en0
from before the tunnel starts. Probes from mac carry a marker per phase (a UDP datagram to the internet host's
echo port, a ping with a payload pattern) and a marked UDP datagram from the ``lan`` host is routed through mac
(K7). Phases:

* connecting: the provider host is frozen (SIGSTOP) as soon as it is launched, so the session stays CONNECTING
  (the kill switch was engaged before the launch); then it is resumed;
* connected: the blackhole is lifted; the probe is tunnelled (it comes back through the tunnel);
* helperdown / reconnected: the helper is stopped (SIGTERM) and respawned (F2): nothing in the clear while it is
  down, and the tunnel works again through the block once the provider reconnected;
* crashed: the provider host is SIGKILLed; the session is DISCONNECTED and the block stays (fail closed);
* released: the user stops the tunnel; the same probes now **are** seen on en0 (the positive control).

While engaged no marker may appear on en0 and the kill switch's drop counters must rise.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import pytest
import trio

from netsim.apple import VPNStatus
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tunnel import netsim_tunnel
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(240)]

PHASES = ("connecting", "connected", "helperdown", "reconnected", "crashed", "released")
#: K5 (TunnelCrack LocalNet): the ISP router claims a public /24 is on-link; mac has an address in it. Not a prefix
#: the lab uses (198.51.100.0/24 is the ISP's WAN: on br-lan too, it broke the NAT's return path).
PUBLIC_ONLINK_NET, PUBLIC_ONLINK_MAC, PUBLIC_ONLINK_PEER = "198.18.7.0/24", "198.18.7.10/24", "198.18.7.1"
_SEND = (  # argv[3] tries of 2 s (a fresh WireGuard session handshakes first); EPERM (the block) ends it at once
    "import socket, sys; a, m = sys.argv[1], sys.argv[2].encode(); r = 'TimeoutError'\n"
    "s = socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
    "for _ in range(int(sys.argv[3])):\n"
    " try:\n  s.sendto(m, (a, 7)); r = 'echo' if s.recv(64) == m else 'other'; break\n"
    " except TimeoutError:\n  continue\n"
    " except OSError as e:\n  r = type(e).__name__; break\n"
    "print(r)"
)


def marker(kind: str, phase: str) -> str:
    return f"netsim-ks-{kind}-{phase}"


def ping_pattern(phase: str) -> str:
    return f"6b73{PHASES.index(phase) + 1:02x}aa" * 2  # 8 bytes, repeated by ping through the payload


async def _probe(lab: Lab, phase: str, rec: dict[str, Any], *, tries: int = 1) -> None:
    """Marked probes; ``tries`` > 1 retries the echo to the internet host (after a reconnect, a stop)."""
    a = lab.addr
    for family, host in (("v4", a.www_v4), ("v6", a.www_v6)):
        argv = [sys.executable, "-c", _SEND, str(host), marker(f"udp{family}", phase), str(tries)]
        r = await lab.run("mac", argv, check=False)
        rec[f"{phase}_udp{family}"] = r.stdout.decode().strip()
    r = await lab.run(
        "mac", ["ping", "-c", "1", "-W", "1", "-p", ping_pattern(phase), str(a.www_v4)], check=False, timeout=10
    )
    rec[f"{phase}_ping"] = r.returncode
    r = await lab.run("lan", [sys.executable, "-c", _SEND, str(a.www_v4), marker("fwd", phase), "1"], check=False)
    rec[f"{phase}_fwd"] = r.stdout.decode().strip()
    for kind, dst in (("lan", str(a.lan_eth0_v4)), ("onlink", PUBLIC_ONLINK_PEER)):
        r = await lab.run("mac", [sys.executable, "-c", _SEND, dst, marker(kind, phase), "1"], check=False)
        rec[f"{phase}_{kind}"] = r.stdout.decode().strip()


async def _drops(t: Any) -> dict[str, int]:
    counters = await t.session.kill_switch_counters()
    return {name: c.packets for name, c in counters.items()}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pcap_dir = tmp_path_factory.mktemp("ks-pcap")

    async def main(lab: Lab, rec: dict[str, Any]) -> None:
        a = lab.addr
        started = trio.current_time()
        # K7: lan sends the internet host's traffic through mac (a router for it), forwarding without redirects.
        await lab.run("mac", ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0"])
        await lab.run("mac", ["sysctl", "-qw", "net.ipv4.conf.en0.send_redirects=0"])
        await lab.run("lan", ["ip", "route", "add", f"{a.www_v4}/32", "via", str(a.mac_en0_v4)])
        await lab.run("isp", ["ip", "addr", "add", f"{PUBLIC_ONLINK_PEER}/24", "dev", "br-lan"])
        await lab.run("mac", ["ip", "addr", "add", PUBLIC_ONLINK_MAC, "dev", "en0"])
        rec["mac_hw"] = (await lab.run("mac", ["cat", "/sys/class/net/en0/address"])).stdout.decode().strip()
        async with netsim_tunnel(
            lab, protocol={"include_all_networks": True, "exclude_local_networks": True}, wait_connected=False
        ) as t:
            try:
                s = t.session
                # Hold the tunnel in CONNECTING: freeze the provider host before its interpreter is even up.
                t.signal_provider(signal.SIGSTOP)
                rec["engaged_at_start"] = s.kill_switch_engaged
                await _probe(lab, "connecting", rec)
                rec["connecting_status"] = s.status.name
                rec["connecting_drops"] = await _drops(t)
                t.signal_provider(signal.SIGCONT)
                with trio.fail_after(40):
                    await s.wait_status(VPNStatus.CONNECTED)
                await t.wait_connected()
                rec["connected_engaged"] = s.kill_switch_engaged
                await _probe(lab, "connected", rec)
                rec["connected_drops"] = await _drops(t)
                # F2: the helper (the tunnel's transport) is stopped with SIGTERM and respawned under the block.
                rec["helper_exit"] = await t.stop_helper()
                rec["helperdown_engaged"] = s.kill_switch_engaged
                await _probe(lab, "helperdown", rec)
                rec["helperdown_drops"] = await _drops(t)
                await t.start_helper()
                await t.wait_connected(after_connects=1)
                rec["reconnected_engaged"] = s.kill_switch_engaged
                await _probe(lab, "reconnected", rec, tries=3)
                t.signal_provider(signal.SIGKILL)
                with trio.fail_after(20):
                    await s.wait_status(VPNStatus.DISCONNECTED)
                rec["crash_reason"] = s.stop_reason.name if s.stop_reason else None
                await trio.sleep(0.5)  # the utun goes with the provider's fd
                rec["crashed_engaged"] = s.kill_switch_engaged
                links = (await lab.run("mac", ["ip", "-o", "link", "show"])).stdout.decode()
                rec["crashed_utuns"] = [line.split(":")[1].strip() for line in links.splitlines() if "utun" in line]
                await _probe(lab, "crashed", rec)
                rec["crashed_drops"] = await _drops(t)
                switch = t.launcher.kill_switch if t.launcher else None
                rec["refused_prefixes"] = getattr(switch, "refused_prefixes", None)
                rec["local_prefixes"] = getattr(getattr(switch, "config", None), "local_prefixes", None)
                await s.stop_vpn_tunnel()
                rec["released_engaged"] = s.kill_switch_engaged
                rec["tables_after_release"] = (await lab.run("mac", ["nft", "list", "tables"])).stdout.decode()
                await _probe(lab, "released", rec, tries=3)
                rec["released_drops"] = await _drops(t)  # the values read just before the release
            except BaseException:
                rec["logs"] = t.logs()
                raise
        lab.stop_capture("mac-en0")
        packets = [bytes(p) for p in read_pcap(pcap_dir / "mac-en0.pcap")]
        hw = bytes.fromhex(rec["mac_hw"].replace(":", ""))
        seen: dict[str, int] = {}
        for phase in PHASES:
            for kind in ("udpv4", "udpv6"):
                m = marker(kind, phase).encode()
                seen[f"{phase}_{kind}"] = sum(m in p for p in packets)
            pattern = bytes.fromhex(ping_pattern(phase))
            seen[f"{phase}_ping"] = sum(pattern in p for p in packets)
            for kind in ("lan", "onlink"):
                m = marker(kind, phase).encode()
                seen[f"{phase}_{kind}"] = sum(m in p and p[6:12] == hw for p in packets)
            m = marker("fwd", phase).encode()
            seen[f"{phase}_fwd_out"] = sum(m in p and p[6:12] == hw for p in packets)  # sent by mac (Ether src)
            seen[f"{phase}_fwd_in"] = sum(m in p and p[6:12] != hw for p in packets)  # lan's original
        rec["seen"] = seen
        rec["seconds"] = trio.current_time() - started

    rec = run_lab_scenario(main, "wireguard-go", "wg", "ip", "nft", "ping", "tcpdump", pcap_dir=pcap_dir)
    print(f"[kill switch] seen={rec.get('seen')} seconds={rec.get('seconds')}")
    return rec


def _need(rec: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        pytest.fail(f"scenario did not reach {missing}: {rec.get('error', 'no error recorded')}")


@pytest.mark.reliability("K9")
def test_nothing_leaves_en0_while_connecting(scenario: dict[str, Any]) -> None:
    _need(scenario, "seen", "connecting_drops")
    assert scenario["engaged_at_start"] is True
    assert scenario["connecting_status"] == "CONNECTING"
    seen = scenario["seen"]
    assert (seen["connecting_udpv4"], seen["connecting_udpv6"], seen["connecting_ping"]) == (0, 0, 0), seen
    assert scenario["connecting_udpv4"] == "PermissionError", scenario  # dropped in output: the sender sees EPERM
    assert scenario["connecting_drops"]["out_drop"] >= 3


def test_the_tunnel_itself_works_through_the_kill_switch(scenario: dict[str, Any]) -> None:
    _need(scenario, "seen", "connected_drops")
    assert scenario["connected_engaged"] is True
    assert scenario["connected_udpv4"] == "echo" and scenario["connected_ping"] == 0, scenario
    seen = scenario["seen"]
    assert (seen["connected_udpv4"], seen["connected_ping"]) == (0, 0), "tunnelled probes are never in the clear"
    drops = scenario["connected_drops"]
    assert drops["out_tunnel"] > 0 and drops["out_bypass"] > 0, drops


@pytest.mark.reliability("F3")
@pytest.mark.reliability("K9")
def test_a_crashed_provider_leaves_the_block_in_place(scenario: dict[str, Any]) -> None:
    _need(scenario, "seen", "crashed_drops")
    assert scenario["crash_reason"] == "PROVIDER_FAILED"
    assert scenario["crashed_engaged"] is True
    assert scenario["crashed_utuns"] == [], "the crashed provider's utun must not linger"
    seen = scenario["seen"]
    assert (seen["crashed_udpv4"], seen["crashed_udpv6"], seen["crashed_ping"]) == (0, 0, 0), seen
    assert scenario["crashed_udpv4"] == "PermissionError", scenario
    assert scenario["crashed_drops"]["out_drop"] >= scenario["connected_drops"]["out_drop"] + 3


@pytest.mark.reliability("F2")
def test_a_helper_restart_has_no_window_without_the_block(scenario: dict[str, Any]) -> None:
    _need(scenario, "seen", "reconnected_udpv4")
    assert scenario["helperdown_engaged"] is True and scenario["reconnected_engaged"] is True
    seen = scenario["seen"]
    down = (seen["helperdown_udpv4"], seen["helperdown_udpv6"], seen["helperdown_ping"], seen["helperdown_onlink"])
    assert down == (0, 0, 0, 0), seen
    assert (seen["reconnected_udpv4"], seen["reconnected_ping"]) == (0, 0), seen
    assert scenario["reconnected_udpv4"] == "echo" and scenario["reconnected_ping"] == 0, scenario


@pytest.mark.reliability("K7")
def test_traffic_routed_through_mac_is_blocked_too(scenario: dict[str, Any]) -> None:
    _need(scenario, "seen", "crashed_drops")
    seen = scenario["seen"]
    assert seen["crashed_fwd_in"] >= 1, "lan's datagram must reach mac (else the probe proves nothing)"
    assert seen["crashed_fwd_out"] == 0 and seen["connecting_fwd_out"] == 0, seen
    assert scenario["crashed_drops"]["fwd_drop"] >= 1
    assert seen["released_fwd_out"] >= 1, "positive control: without the block mac forwards it out of en0"


@pytest.mark.reliability("K2")
def test_stop_releases_the_block_and_the_same_probes_are_seen(scenario: dict[str, Any]) -> None:
    """The positive control: the probes that were never seen while engaged are seen once the user stops."""
    _need(scenario, "seen", "released_drops")
    assert scenario["released_engaged"] is False
    assert "netsim_killswitch" not in scenario["tables_after_release"]
    assert scenario["released_udpv4"] == "echo" and scenario["released_ping"] == 0, scenario
    seen = scenario["seen"]
    assert seen["released_udpv4"] >= 1 and seen["released_udpv6"] >= 1 and seen["released_ping"] >= 1, seen
    assert scenario["released_drops"]["out_drop"] >= scenario["crashed_drops"]["out_drop"]


@pytest.mark.reliability("K5")
def test_local_networks_stay_reachable_but_a_public_on_link_prefix_does_not(scenario: dict[str, Any]) -> None:
    """exclude_local_networks exempts the private LAN only: the public /24 the ISP calls on-link stays blocked."""
    _need(scenario, "seen", "crashed_drops")
    assert "192.168.1.0/24" in scenario["local_prefixes"] and PUBLIC_ONLINK_NET not in scenario["local_prefixes"]
    assert PUBLIC_ONLINK_NET in scenario["refused_prefixes"]
    seen = scenario["seen"]
    assert scenario["crashed_lan"] == "echo" and seen["crashed_lan"] >= 1, (scenario["crashed_lan"], seen)
    assert seen["crashed_onlink"] == 0 and seen["connecting_onlink"] == 0, seen
    assert scenario["crashed_onlink"] == "PermissionError"
    assert scenario["crashed_drops"]["out_local"] >= 1
    assert seen["released_onlink"] >= 1, "positive control: without the block the on-link probe leaves en0"
    # While connected the routes agree (IAN implies enforce-routes order, and with it the configurator keeps the
    # private connected prefixes direct): the LAN probe leaves en0, the public on-link one goes into the tunnel.
    assert seen["connected_lan"] >= 1 and seen["connected_onlink"] == 0, seen


def test_no_leaks_and_root_namespace_untouched(scenario: dict[str, Any]) -> None:
    _need(scenario, "seen")
    assert not scenario["leaks"], scenario["leaks"]
    assert scenario["root_changed"] is None, scenario["root_changed"]
    assert scenario["seconds"] < 60, scenario["seconds"]
