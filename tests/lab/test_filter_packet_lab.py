"""`FilterPacketProvider` on the lab Mac's physical interfaces through NFQUEUE (docs/filters.md), with real pings
and UDP, and captures on mac-en0 / mac-en1 proving what was allowed, dropped and delayed.

One lab for the module (with the second uplink, so en1 is filtered too). Phases:

1. control: the same traffic with no filter: the LAN host, www (v4 and v6) and isp2's router answer, and the
   capture on en0 holds the LAN host's packets; a held-then-marker UDP pair leaves in the order it was sent;
2. drop: `DropHostFilter` dropping the LAN host (en0) and isp2's router (en1): they do not answer and are absent
   from the captures, www answers and is present; the provider's log names each verdict;
3. delay: a provider holding UDP to port 7 until a trigger to port 9: no echo reply until the trigger, and in the
   capture the held request leaves after a marker sent after it (the control shows the opposite order);
4. the provider killed: fail closed, the Mac has no network until the rules are removed; fail open, it has;
5. a full queue (``maxlen`` 4, every echo request held): fail closed, the kernel drops the rest (counted) and
   nothing answers; fail open, the kernel accepts the rest and they are answered.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from netsim.errors import LabError
from netsim.lab.addressing import ADDR
from netsim.lab.filter import packet_filter, running_filters
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
DROP = "netsim.examples.packet_filter:DropHostFilter"
HOLD = f"{Path(__file__).parent}/filter_delay_provider.py:HoldUntilTrigger"
FULL = f"{Path(__file__).parent}/filter_delay_provider.py:HoldEchoForever"
MAXLEN, SENT = 4, 10
LAN, WWW, ISP2 = str(ADDR.lan_eth0_v4), str(ADDR.www_v4), str(ADDR.isp2_lan_v4)
LAN6, WWW6 = str(ADDR.lan_eth0_v6), str(ADDR.www_v6)


async def _ping(lab: Lab, dst: str, count: int = 2) -> bool:
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", "2", "-W", "1", dst]
    return (await lab.run("mac", argv, check=False, timeout=10)).returncode == 0


async def _reach(lab: Lab) -> dict[str, bool]:
    hosts = {"lan": LAN, "lan6": LAN6, "www": WWW, "www6": WWW6, "isp2": ISP2}
    return {name: await _ping(lab, dst) for name, dst in hosts.items()}


def _ips(path: Path) -> set[str]:
    """Every IPv4/IPv6 address in a capture (sources and destinations)."""
    out: set[str] = set()
    for pkt in read_pcap(path):
        for layer in (IP, IPv6):
            if layer in pkt:
                out |= {pkt[layer].src, pkt[layer].dst}
    return out


def _udp_order(path: Path) -> list[int]:
    """The destination ports of the UDP packets to www in a capture, in capture order."""
    return [p[UDP].dport for p in read_pcap(path) if IP in p and UDP in p and p[IP].dst == WWW]


async def _held_pair(lab: Lab, trigger: bool) -> dict[str, Any]:
    """Send an echo request (port 7), then a marker (port 5000); wait for the reply; then (if ``trigger``) the
    trigger (port 9) and wait again."""
    sock = trio.socket.from_stdlib_socket(lab.socket("mac"))
    got: dict[str, Any] = {}
    with sock:
        await sock.sendto(b"netsim-held", (WWW, 7))
        await sock.sendto(b"marker", (WWW, 5000))
        with trio.move_on_after(1.0):
            got["before_trigger"] = await sock.recv(100)
        if trigger:
            await sock.sendto(b"trigger", (WWW, 9))
            with trio.move_on_after(5.0):
                got["after_trigger"] = await sock.recv(100)
    return got


async def _echoes(lab: Lab, count: int) -> int:
    """Send ``count`` UDP echo requests to www at once; how many distinct replies come back within 2 s."""
    sock = trio.socket.from_stdlib_socket(lab.socket("mac"))
    got: set[bytes] = set()
    with sock:
        for i in range(count):
            await sock.sendto(b"echo-%d" % i, (WWW, 7))
        with trio.move_on_after(2.0):
            while len(got) < count:
                got.add(await sock.recv(100))
    return len(got)


async def _capture(lab: Lab, rec: dict[str, Any], key: str, tmp: Path, run: Any) -> None:
    paths = {ifname: tmp / f"{key}-{ifname}.pcap" for ifname in ("en0", "en1")}
    for ifname, path in paths.items():
        lab.capture("mac", ifname, name=f"{key}-{ifname}", path=path)
    try:
        rec[key] = await run()
    finally:
        for ifname in paths:
            lab.stop_capture(f"{key}-{ifname}")
    rec[f"{key}_ips"] = {ifname: _ips(path) for ifname, path in paths.items()}
    rec[f"{key}_udp"] = _udp_order(paths["en0"])


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="netsim-pf-test-"))
    await _capture(lab, rec, "control", tmp, lambda: _reach(lab))
    await _capture(lab, rec, "control_pair", tmp, lambda: _held_pair(lab, trigger=False))

    config = {"drop_hosts": [LAN, LAN6, ISP2]}
    with packet_filter(lab, DROP, vendor_configuration=config) as pf:
        rec["interfaces"] = pf.interfaces
        await _capture(lab, rec, "drop", tmp, lambda: _reach(lab))
    rec["drop_stats"] = pf.statistics()
    rec["drop_log"] = pf.log_text()
    rec["after_drop"] = await _reach(lab)

    with packet_filter(lab, HOLD, max_delayed=8) as pf:
        await _capture(lab, rec, "hold", tmp, lambda: _held_pair(lab, trigger=True))
    rec["hold_stats"] = pf.statistics()

    quiet = {"log": False}
    with packet_filter(lab, DROP, vendor_configuration={**quiet, "drop_hosts": [LAN]}) as first:
        try:
            with packet_filter(lab, DROP, vendor_configuration=quiet):
                rec["second"] = "started"
        except LabError as exc:
            rec["second"] = str(exc)
        rec["first_still"] = (await _ping(lab, LAN), await _ping(lab, WWW), running_filters(lab.netns("mac")))
    rec["first_chain"] = first.chain
    for fail_open in (False, True):
        key = "open" if fail_open else "closed"
        with packet_filter(lab, DROP, fail_open=fail_open, vendor_configuration={"log": False}) as pf:
            rec[f"{key}_alive"] = await _ping(lab, WWW)
            pf.kill()  # the provider dies; its rules stay
            rec[f"{key}_dead"] = await _ping(lab, WWW)
        rec[f"{key}_stopped"] = await _ping(lab, WWW)  # stop() removed the dead filter's rules
    for fail_open in (False, True):  # a full queue: the held echo requests fill it, the rest meet the choice
        key = "full_open" if fail_open else "full_closed"
        with packet_filter(lab, FULL, fail_open=fail_open, maxlen=MAXLEN, max_delayed=64) as pf:
            rec[key] = await _echoes(lab, SENT)
        rec[f"{key}_stats"] = pf.statistics()
    saved = await lab.run("mac", ["iptables-save", "-t", "mangle"])
    saved6 = await lab.run("mac", ["ip6tables-save", "-t", "mangle"])
    rec["rules_after"] = saved.stdout.decode() + saved6.stdout.decode()


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "ping", "tcpdump", "iptables-restore", second_uplink=True)
    assert "error" not in rec, rec["error"]
    return rec


def test_control_without_a_filter_everything_answers_and_is_captured(scenario: dict[str, Any]) -> None:
    assert scenario["control"] == dict.fromkeys(("lan", "lan6", "www", "www6", "isp2"), True)
    assert {LAN, LAN6, WWW, WWW6} <= scenario["control_ips"]["en0"]
    assert ISP2 in scenario["control_ips"]["en1"]


def test_a_dropped_host_is_absent_from_the_capture_and_an_allowed_one_present(scenario: dict[str, Any]) -> None:
    assert scenario["interfaces"] == ("en0", "en1")  # a lab with a second uplink: both physical interfaces
    assert scenario["drop"] == {"lan": False, "lan6": False, "www": True, "www6": True, "isp2": False}
    assert {LAN, LAN6} & scenario["drop_ips"]["en0"] == set() and {WWW, WWW6} <= scenario["drop_ips"]["en0"]
    assert ISP2 not in scenario["drop_ips"]["en1"]
    stats = scenario["drop_stats"].filter
    assert stats.dropped >= 2 and stats.allowed >= 2 and stats.seen >= stats.dropped + stats.allowed
    assert stats.handler_errors == stats.bad_verdicts == stats.bad_messages == 0
    log = scenario["drop_log"]
    assert f"drop outbound en0 icmp {ADDR.mac_en0_v4} -> {LAN}" in log
    assert f"drop outbound en1 icmp {ADDR.mac_en1_v4} -> {ISP2}" in log
    assert f"allow inbound en0 icmp {WWW} -> {ADDR.mac_en0_v4}" in log
    assert scenario["after_drop"] == scenario["control"]  # the filter's rules are gone


def test_a_delayed_packet_waits_for_allow(scenario: dict[str, Any]) -> None:
    # control: the echo answers at once, and the request leaves before the marker sent after it
    assert scenario["control_pair"]["before_trigger"] == b"netsim-held"
    assert scenario["control_pair_udp"][:2] == [7, 5000]
    # filtered: no answer until the trigger; the held request leaves after the marker, the trigger before it
    assert "before_trigger" not in scenario["hold"]
    assert scenario["hold"]["after_trigger"] == b"netsim-held"
    assert scenario["hold_udp"][:3] == [5000, 7, 9] or scenario["hold_udp"][:3] == [5000, 9, 7]
    stats = scenario["hold_stats"].filter
    assert stats.delayed >= 1 and stats.released_allowed == stats.delayed and stats.held == 0


def test_a_dead_provider_fails_closed_or_open_as_configured(scenario: dict[str, Any]) -> None:
    assert scenario["closed_alive"] and scenario["open_alive"]
    assert scenario["closed_dead"] is False  # fail closed: no provider, no network
    assert scenario["open_dead"] is True  # fail open (--queue-bypass): the kernel accepts
    assert scenario["closed_stopped"] and scenario["open_stopped"]
    assert "-pf" not in scenario["rules_after"] and "NFQUEUE" not in scenario["rules_after"]


def test_one_filter_at_a_time_and_a_refused_one_leaves_the_running_one_alone(scenario: dict[str, Any]) -> None:
    assert "already running" in scenario["second"] and scenario["first_chain"] in scenario["second"]
    assert scenario["first_still"] == (False, True, [scenario["first_chain"]])


def test_a_full_queue_drops_fail_closed_and_accepts_fail_open(scenario: dict[str, Any]) -> None:
    closed, opened = scenario["full_closed_stats"], scenario["full_open_stats"]
    # fail closed: the queue holds at most MAXLEN (delayed by the provider), the kernel drops the rest; no reply
    assert 1 <= closed.filter.delayed <= MAXLEN and closed.kernel_dropped >= SENT - closed.filter.delayed
    assert scenario["full_closed"] == 0
    assert closed.filter.finished == closed.filter.delayed  # dropped (fail closed) when the filter stopped
    # fail open: what does not fit is accepted by the kernel (not counted as dropped) and answered
    assert 1 <= opened.filter.delayed <= MAXLEN and opened.kernel_dropped == 0
    assert scenario["full_open"] >= SENT - opened.filter.delayed >= 1


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == [], json.dumps(scenario["leaks"])
    assert scenario["root_changed"] is None, scenario["root_changed"]
