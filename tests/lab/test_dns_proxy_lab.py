"""The DNS proxy in the lab: every query to the Mac's resolver goes to the provider, which logs, blocks or forwards.

The demo (examples/dns_proxy.py) blocks ``isp.lab.test`` (a name that exists: the control resolves it once the
proxy is gone) and forwards the rest to the system DNS (the home router). dig runs over UDP and TCP, once as an
app with its own uid (so the log names the app). The en0 capture during the proxy phase holds the forwarded
queries and never the blocked one; after the proxy stops, the blocked name resolves again and its query is on en0.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.apple import AppRule
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tproxy import transparent_proxy
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

DEMO = "netsim.examples.dns_proxy:LoggingDNSProxy"
NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]


async def _dig(lab: Lab, *args: str, user: list[str] | None = None) -> str:
    argv = [*(user or []), "dig", "+tries=1", "+time=3", "@127.0.0.53", *args]
    r = await lab.run("mac", argv, check=False, timeout=20)
    out = r.stdout.decode()
    status = next((ln.split("status: ")[1].split(",")[0] for ln in out.splitlines() if "status: " in ln), "none")
    answers = [
        ln.split()[-1] for ln in out.split(";; ANSWER SECTION:")[-1].splitlines()[1:] if ln.strip() and "\t" in ln
    ]
    return f"{status} {' '.join(answers) if ';; ANSWER SECTION:' in out else ''}".strip()


def _qnames(pcap: Path) -> list[str]:
    from scapy.layers.dns import DNS

    out = []
    for pkt in read_pcap(pcap):
        if DNS in pkt and pkt[DNS].qr == 0 and len(pkt[DNS].qd) > 0:
            out.append(pkt[DNS].qd[0].qname.decode().rstrip("."))
    return out


async def _scenario(lab: Lab, rec: dict[str, Any], d: Path) -> None:
    cap = await trio.to_thread.run_sync(partial(lab.capture, "mac", "en0", name="dns-proxy", path=d / "proxy.pcap"))
    try:
        apps = [AppRule("dev.netsim.nobody", uid=NOBODY)]
        async with transparent_proxy(lab, DEMO, dns=True, options={"block": ["isp.lab.test"]}, app_rules=apps) as p:
            rec["ruleset"] = await p.ruleset()
            rec["udp"] = await _dig(lab, "www.lab.test", "A", user=AS_NOBODY)
            rec["tcp"] = await _dig(lab, "+tcp", "www.lab.test", "AAAA")
            rec["blocked"] = await _dig(lab, "isp.lab.test", "A")
            await trio.sleep(2.5)  # the demo closes idle UDP flows after 2 s
            rec["stats"] = (await p.stop())["statistics"]
            rec["log"] = p.flow_log()
    finally:
        await trio.to_thread.run_sync(cap.stop_sync)
    after = await trio.to_thread.run_sync(partial(lab.capture, "mac", "en0", name="dns-after", path=d / "after.pcap"))
    try:
        rec["unblocked_after"] = await _dig(lab, "isp.lab.test", "A")
    finally:
        await trio.to_thread.run_sync(after.stop_sync)
    rec["tables_after"] = (await lab.run("mac", ["nft", "list", "tables"])).stdout.decode()
    rec["proxy_qnames"], rec["after_qnames"] = _qnames(d / "proxy.pcap"), _qnames(d / "after.pcap")


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("dnsproxy")
    yield run_lab_scenario(lambda lab, r: _scenario(lab, r, d), "dig", "tcpdump")


def _ok(rec: dict[str, Any]) -> None:
    assert "error" not in rec, rec.get("error")


def test_answers_through_the_proxy(rec: dict[str, Any]) -> None:
    _ok(rec)
    assert rec["udp"] == "NOERROR 203.0.113.10"
    assert rec["tcp"] == "NOERROR 2001:db8:113::10"
    assert rec["blocked"].startswith("NXDOMAIN")
    assert rec["unblocked_after"] == "NOERROR 198.51.100.2"  # control: the name exists; only the proxy blocked it


def test_every_query_and_answer_logged_readably(rec: dict[str, Any]) -> None:
    _ok(rec)
    texts = [e["text"] for e in rec["log"]]
    assert "query www.lab.test A (app dev.netsim.nobody)" in texts  # FlowMetaData from the socket owner
    assert "answer www.lab.test A NOERROR: 203.0.113.10" in texts
    assert "answer www.lab.test AAAA NOERROR: 2001:db8:113::10" in texts
    assert "answer isp.lab.test A NXDOMAIN (blocked by the proxy)" in texts
    protos = {(e["event"], e["proto"]) for e in rec["log"]}
    assert {("query", "udp"), ("query", "tcp"), ("answer", "tcp")} <= protos
    s = rec["stats"]
    assert s["flows"] == s["claimed"] == 3 and s["flow_errors"] == 0 and s["capture_loops"] == 0


def test_capture_shows_forwarded_not_blocked(rec: dict[str, Any]) -> None:
    _ok(rec)
    assert "www.lab.test" in rec["proxy_qnames"]  # forwarded by the proxy to the system DNS
    assert "isp.lab.test" not in rec["proxy_qnames"]  # answered by the proxy: never left the Mac
    assert "isp.lab.test" in rec["after_qnames"]  # positive control: without the proxy it does


def test_kernel_state_is_the_dns_proxys_own_and_removed(rec: dict[str, Any]) -> None:
    _ok(rec)
    assert "table inet netsim_dnsproxy" in rec["ruleset"] and "127.0.0.53" in rec["ruleset"]
    assert "netsim_dnsproxy" not in rec["tables_after"]
    assert rec["leaks"] == [] and rec["root_changed"] is None
