"""`FilterDataProvider` in the lab (docs/filters.md, "Data filters"): the content_filter example blocks a host by
name on real curl flows, HTTP and HTTPS, with captures on the Mac's en0 and on the server side (inet's link to the
ISP) proving what was filtered.

One lab for the module; ``www`` also gets an HTTPS server (a self-signed certificate made with openssl in a tmp
dir; curl ``-k``), and curl maps a second name, ``blocked.lab.test``, to the same address (``--resolve``), so one
name is blocked and another allowed on the same server. Phases:

1. control (no filter): the blocked name's HTTP request and TLS ClientHello reach the server: the captures hold
   ``Host: blocked.lab.test`` and the SNI bytes (the positive control: the captures would see them);
2. filter: the allowed flows complete with the right bytes; the blocked ones fail, and neither capture holds the
   blocked name (the filter decided on the peeked bytes, before any of them left the Mac); the provider's log
   names every flow;
3. beside a transparent proxy (its own table, marks and rule priority): both run at once, the filter still blocks,
   the proxy still proxies its UDP echo;
4. after: the filter's nftables table, policy rule and route table are gone; nothing changed in the root namespace.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.lab.addressing import ADDR
from netsim.lab.filter_data import HTTPS_BODY, data_filter, https_server
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tproxy import transparent_proxy
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

DEMO = "netsim.examples.content_filter:ContentFilter"
WWW = str(ADDR.www_v4)
BLOCKED = "blocked.lab.test"


async def _curl(lab: Lab, url: str) -> str:
    resolve = [a for port in (80, 443) for a in ("--resolve", f"{BLOCKED}:{port}:{WWW}")]
    argv = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-m", "10", *resolve, url]
    r = await lab.run("mac", argv, check=False, timeout=20)
    return f"{r.returncode} {r.stdout.decode()}"


async def _requests(lab: Lab) -> dict[str, str]:
    return {
        "http_www": await _curl(lab, "http://www.lab.test/"),
        "http_blocked": await _curl(lab, f"http://{BLOCKED}/"),
        "https_www": await _curl(lab, "https://www.lab.test/"),
        "https_blocked": await _curl(lab, f"https://{BLOCKED}/"),
    }


async def _captured(lab: Lab, rec: dict[str, Any], phase: str, body: Any) -> None:
    caps = []
    for role, iface in (("mac", "en0"), ("inet", "isp")):
        path = Path(rec["dir"]) / f"{phase}-{role}-{iface}.pcap"
        start = partial(lab.capture, role, iface, name=f"fd-{phase}-{role}", path=path)
        caps.append(await trio.to_thread.run_sync(start))
    try:
        await body()
    finally:
        for cap in caps:
            await trio.to_thread.run_sync(cap.stop_sync)


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    d = Path(rec["dir"])

    async def control() -> None:
        rec["control"] = await _requests(lab)

    async def filtered() -> None:
        async with data_filter(lab, DEMO, configuration={"block": [BLOCKED]}, ports=(80, 443)) as f:
            rec["ruleset"] = await f.ruleset()
            rec["filtered"] = await _requests(lab)
            result = await f.stop()
            rec["stats"], rec["proxy_stats"] = result["statistics"], result["proxy"]
            rec["log"] = f.flow_log()

    async with https_server(lab, d) as server:
        await _captured(lab, rec, "control", control)
        await _captured(lab, rec, "filter", filtered)
        rec["server_log"] = server.stdout()
        await _beside_a_proxy(lab, rec)
    rec["tables_after"] = (await lab.run("mac", ["nft", "list", "tables"])).stdout.decode()
    rec["rules_after"] = (await lab.run("mac", ["ip", "rule"])).stdout.decode()
    rec["routes_after"] = (await lab.run("mac", ["ip", "route", "show", "table", str(0x7474)], check=False)).stdout


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(b"netsim-both", (sys.argv[1], 7))
print(s.recvfrom(100)[0].decode())
"""


async def _beside_a_proxy(lab: Lab, rec: dict[str, Any]) -> None:
    proxy_spec = "netsim.examples.transparent_proxy:LoggingTransparentProxy"
    async with (
        transparent_proxy(lab, proxy_spec, options={"include": ["0.0.0.0/0:7/udp"]}) as proxy,
        data_filter(lab, DEMO, configuration={"block": [BLOCKED]}, ports=(80, 443)) as f,
    ):
        rec["both_http_www"] = await _curl(lab, "http://www.lab.test/")
        rec["both_http_blocked"] = await _curl(lab, f"http://{BLOCKED}/")
        echo = await lab.run("mac", [sys.executable, "-c", UDP_ECHO, WWW], check=False)
        rec["both_udp"] = echo.stdout.decode().strip()
        rec["both_filter"] = (await f.stop())["statistics"]
        rec["both_proxy"] = (await proxy.stop())["statistics"]


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("filterdata")

    async def scenario(lab: Lab, r: dict[str, Any]) -> None:
        r["dir"] = str(d)
        await _scenario(lab, r)

    yield run_lab_scenario(scenario, "curl", "tcpdump", "openssl")


def _ok(rec: dict[str, Any]) -> None:
    assert "error" not in rec, rec.get("error")


def _payload(rec: dict[str, Any], phase: str, role: str, iface: str, port: int) -> bytes:
    """Every TCP payload byte to or from ``port`` in one capture, concatenated."""
    from scapy.layers.inet import TCP

    out = bytearray()
    for pkt in read_pcap(Path(rec["dir"]) / f"{phase}-{role}-{iface}.pcap"):
        if TCP in pkt and port in (pkt[TCP].sport, pkt[TCP].dport):
            out += bytes(pkt[TCP].payload)
    return bytes(out)


CAPTURES = [("mac", "en0"), ("inet", "isp")]


def test_control_every_request_completes(rec: dict[str, Any]) -> None:
    _ok(rec)
    c = rec["control"]
    assert c["http_www"] == c["http_blocked"] == "0 200 65536"
    assert c["https_www"] == c["https_blocked"] == f"0 200 {len(HTTPS_BODY) + 1}"


@pytest.mark.parametrize(("role", "iface"), CAPTURES)
def test_positive_control_the_captures_see_the_blocked_name(rec: dict[str, Any], role: str, iface: str) -> None:
    """Without the filter the blocked name's request (HTTP Host) and ClientHello (SNI) cross both links."""
    _ok(rec)
    assert b"Host: blocked.lab.test" in _payload(rec, "control", role, iface, 80)
    assert BLOCKED.encode() in _payload(rec, "control", role, iface, 443)


def test_filter_allowed_flows_complete_blocked_fail(rec: dict[str, Any]) -> None:
    _ok(rec)
    f = rec["filtered"]
    assert f["http_www"] == "0 200 65536"
    assert f["https_www"] == f"0 200 {len(HTTPS_BODY) + 1}"
    for key in ("http_blocked", "https_blocked"):
        code, http_code, _ = f[key].split()
        assert code != "0" and http_code == "000", (key, f[key])  # reset before any response


@pytest.mark.parametrize(("role", "iface"), CAPTURES)
def test_blocked_bytes_never_leave_the_mac(rec: dict[str, Any], role: str, iface: str) -> None:
    _ok(rec)
    http, https = _payload(rec, "filter", role, iface, 80), _payload(rec, "filter", role, iface, 443)
    assert b"Host: www.lab.test" in http and b"www.lab.test" in https  # the allowed flows are there...
    assert BLOCKED.encode() not in http and BLOCKED.encode() not in https  # ...the blocked name is not
    assert len(http) > 65536  # the allowed HTTP response crossed this link whole


def test_server_saw_only_allowed_requests(rec: dict[str, Any]) -> None:
    _ok(rec)
    hosts = [line.split()[1] for line in rec["server_log"].splitlines() if line.startswith("REQ ")]
    assert hosts == ["www.lab.test", BLOCKED, "www.lab.test"]  # control: both; filter: www only


def test_log_names_every_flow(rec: dict[str, Any]) -> None:
    _ok(rec)
    flows = [(e["scheme"], e["hostname"], e["verdict"]) for e in rec["log"] if e.get("event") == "flow"]
    assert flows == [
        ("http", "www.lab.test", "allow"),
        ("http", BLOCKED, "drop"),
        ("https", "www.lab.test", "allow"),
        ("https", BLOCKED, "drop"),
    ]
    assert all(e["remote"] in (f"{WWW}:80", f"{WWW}:443") for e in rec["log"])
    s = rec["stats"]
    assert (s["flows"], s["filtered"], s["dropped"], s["handler_errors"], s["stalled"]) == (4, 4, 2, 0, 0)
    assert rec["proxy_stats"]["capture_loops"] == 0


def test_runs_beside_a_transparent_proxy(rec: dict[str, Any]) -> None:
    _ok(rec)
    assert rec["both_http_www"] == "0 200 65536" and not rec["both_http_blocked"].startswith("0 ")
    assert rec["both_udp"] == "netsim-both"
    assert (rec["both_filter"]["flows"], rec["both_filter"]["dropped"]) == (2, 1)
    assert (rec["both_proxy"]["flows"], rec["both_proxy"]["claimed"]) == (1, 1)  # the proxy saw only its UDP flow


def test_ruleset_and_cleanup(rec: dict[str, Any]) -> None:
    _ok(rec)
    assert "table inet netsim_filterdata" in rec["ruleset"] and "tcp dport 443" in rec["ruleset"]
    assert "netsim_filterdata" not in rec["tables_after"]
    assert "5980" not in rec["rules_after"] and "lookup 29812" not in rec["rules_after"]
    assert rec["routes_after"].strip() == b""


def test_no_leaks(rec: dict[str, Any]) -> None:
    _ok(rec)
    assert rec["leaks"] == [] and rec["root_changed"] is None
