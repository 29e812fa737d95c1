"""The lab's one netlink path (pyroute2): `Lab.add_address`, `add_route`, `del_route`, `set_link`, `links`.

The ``ip`` command is used here only as a read-only witness of what the kernel holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from netsim.errors import LabError
from netsim.lab import Lab
from netsim.lab.netns import run_in_netns
from netsim.testing.fixtures import checked_lab, root_snapshot
from netsim.testing.require import require_binary, require_root

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    require_root()
    require_binary("ip", "nft")
    with checked_lab(services=False) as lab:
        yield lab


def _ip_json(lab: Lab, role: str, *args: str) -> Any:
    return json.loads(lab.run_sync(role, ["ip", "-j", *args]).stdout or b"[]")


def test_add_address_v4_and_v6(bare_lab: Lab) -> None:
    bare_lab.add_address("inet", "203.0.113.77/32", "lo")
    bare_lab.add_address("inet", "2001:db8:113::77", "lo")  # bare: a host address
    [lo] = _ip_json(bare_lab, "inet", "addr", "show", "dev", "lo")
    have = {(a["local"], a["prefixlen"]) for a in lo["addr_info"]}
    assert {("203.0.113.77", 32), ("2001:db8:113::77", 128)} <= have
    with pytest.raises(LabError, match=re.escape("address add 203.0.113.77/32 dev lo")):
        bare_lab.add_address("inet", "203.0.113.77/32", "lo")  # EEXIST, named
    with pytest.raises(LabError, match="interface nosuch0 missing"):
        bare_lab.add_address("inet", "203.0.113.78/32", "nosuch0")


def test_route_add_and_delete(bare_lab: Lab) -> None:
    dst = "198.18.7.0/24"
    bare_lab.add_route("mac", dst, dev="en0", via=str(bare_lab.addr.isp_lan_v4))
    [route] = _ip_json(bare_lab, "mac", "route", "show", dst)
    assert route["dev"] == "en0" and route["gateway"] == str(bare_lab.addr.isp_lan_v4)
    assert bare_lab.del_route("mac", dst) is True
    assert _ip_json(bare_lab, "mac", "route", "show", dst) == []
    assert bare_lab.del_route("mac", dst, missing_ok=True) is False
    with pytest.raises(LabError, match=re.escape(f"route del {dst}")):
        bare_lab.del_route("mac", dst)


def test_set_link_and_links(bare_lab: Lab) -> None:
    bare_lab.set_link("lan", "eth0", mtu=1400, txqueuelen=777)
    [link] = _ip_json(bare_lab, "lan", "link", "show", "dev", "eth0")
    assert link["mtu"] == 1400 and link["txqlen"] == 777 and "UP" in link["flags"]
    bare_lab.set_link("lan", "eth0", mtu=1500)
    assert set(bare_lab.links("isp", "veth")) == {"mac", "lan", "wan"}
    assert bare_lab.links("isp", "bridge") == ["br-lan"]
    assert "lo" in bare_lab.links("isp") and bare_lab.links("mac", "tun") == []
    tun = bare_lab.open_tun("mac")
    assert bare_lab.links("mac", "tun") == [tun.name]


def test_snapshot_over_netlink_sees_what_ip_sees(bare_lab: Lab) -> None:
    """`root_snapshot` (pyroute2) taken inside a lab namespace: it matches ``ip -j`` and sees every change."""
    ns = bare_lab.netns("lan")
    before = run_in_netns(ns, root_snapshot)
    by_ip = {
        f"{link['ifname']} {a['local']}/{a['prefixlen']}"
        for link in _ip_json(bare_lab, "lan", "addr", "show")
        for a in link["addr_info"]
    }
    assert set(before.addresses) == by_ip
    assert {json.loads(x)["ifname"] for x in before.links} == {"lo", "eth0"}
    bare_lab.add_address("lan", "10.123.0.1/24", "eth0")
    bare_lab.add_route("lan", "10.124.0.0/16", via="10.123.0.2")
    diff = before.diff(run_in_netns(ns, root_snapshot))
    assert "addresses added: eth0 10.123.0.1/24" in diff
    assert any(d.startswith("routes added: ") and '"RTA_DST": "10.124.0.0"' in d for d in diff), diff
    bare_lab.del_route("lan", "10.124.0.0/16")
