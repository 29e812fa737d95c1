"""Path change with a second uplink (issue 16; row F16): the Mac's default routes move en0 -> en1 -> en0, and en0
is taken away and brought back, under steady UDP probes through the tunnel (tests/steady_probes.py).

`Lab(second_uplink=True)` gives ``mac`` an ``en1`` behind a second ISP router (``isp2``: 192.168.2.0/24 NATed to
198.18.0.2). `netsim.lab.faults.move_default` moves the main table's IPv4 and IPv6 default routes;
`uplink_down` takes en0 away (the default moves to en1, as macOS promotes the next service) and `uplink_up`
brings it back as the primary. After each move the test waits, bounded, for the first echo of a probe sent after
it (recovery), reads wireguard-go's peer endpoint over its UAPI (the server must follow the client to the new
uplink's public address), and at the end reads captures of en0 and en1: no inner destination (www, dns) and no
probe payload in the clear on either. The positive control for the leak check is one cleartext datagram sent out
of en1 on purpose (`send_control`): the same check must find it, and only it.

The helper binds its WireGuard socket to the primary interface (``SO_BINDTODEVICE``) and re-binds it when the
default route moves (`netsim.runtime.helper.Helper.watch_path`); before that, nothing could leave through en1 and
the tunnel never recovered on it. The provider sees every move as a new ``default_path`` (its statistics keep the
history), as a provider on a Mac observes ``NEProvider.defaultPath``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from steady_probes import SteadyProbes, plaintext_packets, send_control

from netsim.errors import LabError
from netsim.lab import faults, netlink
from netsim.lab.addressing import ADDR
from netsim.lab.lab import Lab
from netsim.lab.tunnel import LabTunnel, netsim_tunnel
from netsim.runtime.netconfig import TUNNEL_TABLE
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
RECOVERY_BOUND = 6.0  # seconds a phase may take to recover before it counts as not recovered (not a goal)


async def _endpoint_host(t: LabTunnel, want: str, *, wait: bool = True) -> str:
    """The server's endpoint host for the client: once it is on ``want`` (with ``wait``, bounded), else now."""
    key = t.client_key.public_key()
    try:
        if not wait:
            raise LabError("not waiting: the tunnel did not recover")
        status = await t.server.wait_endpoint(key, want, timeout=RECOVERY_BOUND)
    except LabError:
        status = (await t.server.show()).peer(key)
    return "" if status.endpoint is None else status.endpoint.host


async def _server_route(lab: Lab) -> str:
    """The tunnel table's route to the VPN server (the server exclusion): ``dev gateway``."""
    r = await lab.run("mac", ["ip", "-j", "-4", "route", "show", "table", str(TUNNEL_TABLE)])
    for route in json.loads(r.stdout):
        if route["dst"] == str(ADDR.vpn_wan_v4):
            return f"{route.get('dev', '')} {route.get('gateway', '')}".strip()
    return ""


async def _phase(lab: Lab, t: LabTunnel, probes: SteadyProbes, rec: dict[str, Any], name: str, fault: Any) -> None:
    mac = lab.netns("mac")
    since = trio.current_time()
    rec[f"{name}_primary"] = await trio.to_thread.run_sync(fault)
    rec[f"{name}_defaults"] = await trio.to_thread.run_sync(netlink.default_routes, mac)
    rec[f"{name}_recovered"] = recovered = await probes.wait_recovered(since, RECOVERY_BOUND)
    primary = rec[f"{name}_defaults"][0][2]
    want = ADDR.isp2_wan_v4 if primary == "en1" else ADDR.isp_wan_v4
    rec[f"{name}_endpoint"] = await _endpoint_host(t, str(want), wait=recovered is not None)
    with trio.move_on_after(RECOVERY_BOUND):  # the provider's path monitor re-applies its settings meanwhile
        while not (await _server_route(lab)).startswith(f"{primary} "):
            await trio.sleep(0.05)
    rec[f"{name}_server_route"] = await _server_route(lab)


async def _scenario(pcap_dir: Path, lab: Lab, rec: dict[str, Any]) -> None:
    mac = lab.netns("mac")
    caps = {ifname: pcap_dir / f"mac-{ifname}.pcap" for ifname in faults.UPLINKS}
    for ifname, path in caps.items():
        await trio.to_thread.run_sync(partial(lab.capture, "mac", ifname, name=f"uplink-{ifname}", path=path))
    async with netsim_tunnel(lab) as t:
        try:
            probes = SteadyProbes(lab)
            async with trio.open_nursery() as nursery:
                await nursery.start(probes.run)
                rec["steady"] = await probes.wait_recovered(trio.current_time(), 15)
                rec["start_endpoint"] = await _endpoint_host(t, str(ADDR.isp_wan_v4))
                rec["start_server_route"] = await _server_route(lab)
                await _phase(lab, t, probes, rec, "to_en1", partial(faults.move_default, mac, "en1"))
                await trio.to_thread.run_sync(send_control, lab, "en1")  # the leak check's positive control
                await _phase(lab, t, probes, rec, "to_en0", partial(faults.move_default, mac, "en0"))
                await _phase(lab, t, probes, rec, "en0_away", partial(faults.uplink_down, mac, "en0"))
                await _phase(lab, t, probes, rec, "en0_back", partial(faults.uplink_up, mac, "en0", primary=True))
                nursery.cancel_scope.cancel()
            rec["path_history"] = (await t.provider_stats()).get("path_history", [])
        except BaseException:
            rec["logs"] = t.logs()
            raise
    for ifname in caps:
        await trio.to_thread.run_sync(lab.stop_capture, f"uplink-{ifname}")
    rec["plaintext"] = {ifname: plaintext_packets(path) for ifname, path in caps.items()}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pcap_dir = tmp_path_factory.mktemp("uplink")
    rec = run_lab_scenario(partial(_scenario, pcap_dir), "wireguard-go", "wg", "nft", "tcpdump", second_uplink=True)
    assert "error" not in rec, rec["error"]
    return rec


def test_the_faults_move_the_default_routes_of_both_families(scenario: dict[str, Any]) -> None:
    a = ADDR
    en0 = [("0.0.0.0/0", str(a.isp_lan_v4), "en0"), ("::/0", str(a.isp_lan_v6), "en0")]
    en1 = [("0.0.0.0/0", str(a.isp2_lan_v4), "en1"), ("::/0", str(a.isp2_lan_v6), "en1")]
    assert scenario["steady"] is not None and scenario["start_endpoint"] == str(a.isp_wan_v4)
    assert scenario["to_en1_primary"] == "en0" and scenario["to_en1_defaults"] == en1
    assert scenario["to_en0_primary"] == "en1" and scenario["to_en0_defaults"] == en0
    assert scenario["en0_away_primary"] == "en1" and scenario["en0_away_defaults"] == en1  # promoted
    assert scenario["en0_back_primary"] == "en0" and scenario["en0_back_defaults"] == en0


@pytest.mark.reliability("F16")
@pytest.mark.parametrize("phase", ["to_en1", "en0_away"])
def test_the_tunnel_recovers_on_en1_and_the_server_follows(scenario: dict[str, Any], phase: str) -> None:
    assert scenario["plaintext"]["en1"]["to_server"], "no WireGuard datagram ever left through en1"
    assert scenario[f"{phase}_recovered"] is not None
    assert scenario[f"{phase}_endpoint"] == str(ADDR.isp2_wan_v4)  # roamed to the second ISP's address


@pytest.mark.reliability("F16")
def test_the_provider_sees_each_move_as_a_new_default_path(scenario: dict[str, Any]) -> None:
    names = [p["interface_name"] for p in scenario["path_history"] if p["status"] == 1]  # NWPathStatus.satisfied
    deduped = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    assert deduped[-4:] == ["en1", "en0", "en1", "en0"], scenario["path_history"]  # changes only


def test_the_server_exclusion_follows_the_primary_uplink(scenario: dict[str, Any]) -> None:
    """The provider's path monitor re-applies its settings on every move: the route to the VPN server in the
    tunnel table goes through the new primary's router."""
    assert scenario["start_server_route"] == f"en0 {ADDR.isp_lan_v4}"
    assert scenario["to_en1_server_route"] == f"en1 {ADDR.isp2_lan_v4}"
    assert scenario["to_en0_server_route"] == f"en0 {ADDR.isp_lan_v4}"
    assert scenario["en0_away_server_route"] == f"en1 {ADDR.isp2_lan_v4}"
    assert scenario["en0_back_server_route"] == f"en0 {ADDR.isp_lan_v4}"


@pytest.mark.parametrize("phase", ["to_en0", "en0_back"])
def test_the_tunnel_recovers_back_on_en0_and_the_server_follows(scenario: dict[str, Any], phase: str) -> None:
    assert scenario[f"{phase}_recovered"] is not None
    assert scenario[f"{phase}_endpoint"] == str(ADDR.isp_wan_v4)


def test_no_inner_destination_in_the_clear_on_either_uplink(scenario: dict[str, Any]) -> None:
    found = scenario["plaintext"]
    assert found["en1"]["control"], found  # positive control: the check sees a cleartext datagram on en1
    assert not found["en0"]["control"]  # ...on the link it left by, only
    assert found["en0"]["leak"] == [] and found["en1"]["leak"] == [], found


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
