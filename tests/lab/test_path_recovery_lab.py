"""After en0 flaps, the tunnel's own kernel state comes back without user code (issue 16; row F8 in part).

Linux drops every route through a link that goes down: in the tunnel's table that is the server exclusion (via
the home router), and with ``exclude_local_networks`` the LAN's on-link route. Before the path monitor nothing
put them back: after the flap the tunnel table lacked them for good. Now the provider host sees the physical path
change (netlink route events), re-applies its settings and the table is whole again; traffic flows through the
tunnel, and the LAN is direct again. The network's part (en0's addresses and default routes, DHCP's job) is given
back by `netsim.lab.faults.link_up`'s plan.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from netsim.lab import faults
from netsim.lab.lab import Lab
from netsim.lab.tunnel import netsim_tunnel
from netsim.runtime.netconfig import TUNNEL_TABLE
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]


async def _table(lab: Lab) -> set[str]:
    out = set()
    for fam in ("-4", "-6"):
        r = await lab.run("mac", ["ip", "-j", fam, "route", "show", "table", str(TUNNEL_TABLE)])
        out |= {f"{x['dst']} {x.get('dev', '')} {x.get('gateway', '')}".strip() for x in json.loads(r.stdout)}
    return out


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    protocol = {"enforce_routes": True, "exclude_local_networks": True}
    async with netsim_tunnel(lab, protocol=protocol) as t:
        rec["before"] = await _table(lab)
        mac = lab.netns("mac")
        await faults.flap(mac, "en0", down_for=1.0, plan=faults.link_plan("mac", "en0"))
        rec["right_after"] = await _table(lab)
        start = trio.current_time()
        with trio.move_on_after(5):
            while await _table(lab) != rec["before"]:
                await trio.sleep(0.05)
        rec["restored_after"] = trio.current_time() - start
        rec["after"] = await _table(lab)
        ping = await lab.run("mac", ["ping", "-c", "1", "-W", "3", str(lab.addr.www_v4)], check=False, timeout=30)
        rec["ping_www"] = ping.returncode
        lan = await lab.run("mac", ["ping", "-c", "1", "-W", "2", str(lab.addr.lan_eth0_v4)], check=False)
        rec["ping_lan"] = lan.returncode
        rec["reapplied"] = t.session.applied_settings


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "wireguard-go", "nft", "ping")
    assert "error" not in rec, rec["error"]
    return rec


def test_the_tunnel_table_comes_back_after_an_en0_flap(scenario: dict[str, Any]) -> None:
    before, after = scenario["before"], scenario["after"]
    via_en0 = {r for r in before if " en0" in r}
    assert via_en0, before  # the server exclusion and the LAN's on-link route go through en0
    assert not (via_en0 & scenario["right_after"]) or scenario["right_after"] == before  # the kernel dropped them
    assert after == before, (before, after)
    assert scenario["restored_after"] < 5


def test_traffic_flows_through_the_tunnel_and_the_lan_is_direct_again(scenario: dict[str, Any]) -> None:
    assert scenario["ping_www"] == 0
    assert scenario["ping_lan"] == 0
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
