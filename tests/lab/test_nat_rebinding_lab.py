"""NAT rebinding and roaming (issue 16; row F11): the home router forgets its mappings or changes its public
address, the WireGuard server follows the client's new endpoint and the client keeps working.

One lab and one tunnel per NAT mode (cone: the lab's default; symmetric: a new outside port per mapping), under
steady UDP probes through it (tests/steady_probes.py):

1. ``conntrack -F`` in the home router (`netsim.lab.faults.nat_flush`): the next datagram gets a new mapping.
2. The home router's public address changes (`netsim.lab.faults.change_public_address`: 198.51.100.2 ->
   198.51.100.3): the server must now send to the new address. wireguard-go's peer endpoint is read over its
   UAPI before and after (`WireGuardGo.show`): it moves, because WireGuard takes the endpoint from the source of
   each authenticated packet (roaming, WireGuard paper §2.1).
3. Idle: the probes stop and the address changes back. Nothing but the client's persistent keepalives
   (`TunnelPlan.keepalive`, 2 s here to keep the test short; the lab's default is 25 s, wg(8)'s "sensible
   interval") reaches the server, yet it learns the new endpoint, and then reaches the idle client from its
   side (a ping from the server's tunnel address): the keepalive made the mapping the server's traffic uses.
   Then the NAT is flushed while idle: the server's ping gets through again once the next keepalive has made a
   new mapping.

Controls: the endpoint before each change is the old address (the fault took effect), and the provider read no
packet from the utun during the idle window (so the keepalives alone did it).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from steady_probes import SteadyProbes

from netsim.core.wireguard.config import parse_config
from netsim.lab import faults
from netsim.lab.addressing import ADDR
from netsim.lab.lab import Lab
from netsim.lab.tunnel import LabTunnel, TunnelPlan, netsim_tunnel
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
KEEPALIVE = 2


async def _endpoint(t: LabTunnel) -> str:
    return str((await t.server.show()).peer(t.client_key.public_key()).endpoint)


async def _tun_reads(t: LabTunnel) -> int:
    return int((await t.provider_stats())["ledger"]["stages"]["tun_read"]["read"])


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    isp = lab.netns("isp")
    a = lab.addr
    async with netsim_tunnel(lab, plan=TunnelPlan(keepalive=KEEPALIVE)) as t:
        rec["client_conf_keepalive"] = parse_config(t.config_path.read_text()).peers[0].persistent_keepalive
        key = t.client_key.public_key()
        try:
            probes = SteadyProbes(lab)
            async with trio.open_nursery() as nursery:
                await nursery.start(probes.run)
                rec["steady"] = await probes.wait_recovered(trio.current_time(), 15)
                rec["endpoint_start"] = await _endpoint(t)
                # 1. the home router forgets its mappings
                since = trio.current_time()
                rec["flushed"] = await trio.to_thread.run_sync(faults.nat_flush, isp)
                rec["flush_recovered"] = await probes.wait_recovered(since, 15)
                rec["endpoint_after_flush"] = await _endpoint(t)
                # 2. its public address changes under traffic
                since = trio.current_time()
                rec["change"] = await trio.to_thread.run_sync(faults.change_public_address, isp)
                rec["change_recovered"] = await probes.wait_recovered(since, 15)
                status = await t.server.wait_endpoint(key, str(a.isp_wan_alt_v4), timeout=15)
                rec["endpoint_after_change"] = str(status.endpoint)
                nursery.cancel_scope.cancel()
            # 3. idle: only keepalives leave the Mac; the address changes back
            await t.wait_quiet()
            reads_before = await _tun_reads(t)
            rec["endpoint_idle_before"] = await _endpoint(t)
            rec["change_back"] = await trio.to_thread.run_sync(faults.change_public_address, isp)
            status = await t.server.wait_endpoint(key, str(a.isp_wan_v4), timeout=10 * KEEPALIVE)
            rec["endpoint_idle_after"] = str(status.endpoint)
            rec["idle_tun_reads"] = await _tun_reads(t) - reads_before
            # the server reaches the idle client through the mapping the keepalive made
            ping = await lab.run("vpn", ["ping", "-n", "-q", "-c", "2", "-W", "2", t.plan.client_v4], check=False)
            rec["server_ping"] = ping.returncode
            # an idle tunnel whose mapping is flushed: the server's packets meet no mapping until a keepalive
            # makes one (ping -w: up to 10 keepalive periods for one echo, one request a second)
            await t.wait_quiet()
            rec["idle_flushed"] = await trio.to_thread.run_sync(faults.nat_flush, isp)
            argv = ["ping", "-n", "-q", "-c", "1", "-w", str(10 * KEEPALIVE), t.plan.client_v4]
            rec["server_ping_after_idle_flush"] = (await lab.run("vpn", argv, check=False, timeout=60)).returncode
            rec["endpoint_after_idle_flush"] = await _endpoint(t)
            rec["wan_addresses"] = (await lab.run("isp", ["ip", "-br", "addr", "show", "dev", "wan"])).stdout.decode()
        except BaseException:
            rec["logs"] = t.logs()
            raise


@pytest.fixture(scope="module", params=["cone", "symmetric"])
def scenario(request: pytest.FixtureRequest) -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "wireguard-go", "wg", "nft", "conntrack", "ping", nat=request.param)
    assert "error" not in rec, rec["error"]
    rec["nat"] = request.param
    return rec


def _host(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0].strip("[]")


def _port(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[1]


@pytest.mark.reliability("F11")
def test_traffic_survives_a_conntrack_flush(scenario: dict[str, Any]) -> None:
    """Cone NAT maps the tunnel's socket to the same outside port again; symmetric NAT (``masquerade random``)
    to a new one, so there the server must follow a port change."""
    assert scenario["steady"] is not None
    assert scenario["flushed"] >= 1  # the tunnel's mapping at least
    assert scenario["flush_recovered"] is not None
    before, after = scenario["endpoint_start"], scenario["endpoint_after_flush"]
    assert _host(after) == _host(before) == str(ADDR.isp_wan_v4)  # same public address
    if scenario["nat"] == "cone":
        assert _port(after) == _port(before)
    else:
        assert _port(after) != _port(before)  # the server followed the new mapping's port


@pytest.mark.reliability("F11")
def test_the_server_follows_a_public_address_change_and_traffic_recovers(scenario: dict[str, Any]) -> None:
    change = scenario["change"]
    assert change.old == ("198.51.100.2/24", "2001:db8:51::2/64") and change.new[0] == "198.51.100.3/24"
    assert _host(scenario["endpoint_start"]) == "198.51.100.2"  # control: the endpoint before the change
    assert _host(scenario["endpoint_after_change"]) == "198.51.100.3"  # roaming: read over wireguard-go's UAPI
    assert scenario["change_recovered"] is not None


@pytest.mark.reliability("F11")
def test_keepalives_alone_move_the_idle_endpoint_and_keep_the_mapping(scenario: dict[str, Any]) -> None:
    assert scenario["client_conf_keepalive"] == KEEPALIVE  # the helper's config has PersistentKeepalive
    assert _host(scenario["endpoint_idle_before"]) == "198.51.100.3"  # control: where the idle endpoint was
    assert _host(scenario["endpoint_idle_after"]) == "198.51.100.2"
    assert scenario["idle_tun_reads"] == 0  # no app packet: the keepalives did it
    assert scenario["server_ping"] == 0  # the server reaches the idle client
    assert scenario["idle_flushed"] >= 1  # the tunnel's mapping was forgotten while idle...
    assert scenario["server_ping_after_idle_flush"] == 0  # ...and the next keepalive made a new one
    if scenario["nat"] == "symmetric":  # a new outside port, learnt by the server from a keepalive alone
        assert _port(scenario["endpoint_after_idle_flush"]) != _port(scenario["endpoint_idle_after"])
    assert "198.51.100.2/24" in scenario["wan_addresses"] and "198.51.100.3" not in scenario["wan_addresses"]


def test_the_lab_tunnel_keeps_nat_mappings_by_default() -> None:
    """The lab's own tunnel config (`TunnelPlan`) has the client send persistent keepalives every 25 s (wg(8):
    "a sensible interval that works with a wide variety of firewalls"), so an idle tunnel keeps its NAT mapping."""
    assert TunnelPlan().keepalive == 25


def test_change_public_address_refuses_what_is_not_a_home_router() -> None:
    with pytest.raises(Exception, match="not a home router"):
        faults.change_public_address("netsim-ab-vpn")
    with pytest.raises(Exception, match="refusing"):
        faults.change_public_address("default", ("192.0.2.9/24",))


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
