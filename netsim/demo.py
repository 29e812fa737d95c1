"""`netsim demo`: the README's main command.

Real backend (root, ``/dev/net/tun``, wireguard-go): brings up the lab, the wireguard-go server, the helper and
the provider (`HelperForwardingProvider`), runs the end-to-end probes from the simulated Mac, and prints each
probe's path (tunnel, bypass or direct, read from the provider's and the helper's ledgers), latency and result,
then both ledgers. Without those it says why and runs the in-memory backend of the same scenario.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from rich.console import Console
from rich.table import Table

from netsim.console import make_console

if TYPE_CHECKING:
    from netsim.lab.pcap import CaptureStats

__all__ = ["DemoRow", "real_backend_missing", "run_demo", "run_filter_demo", "run_packet_filter_demo"]

log = logging.getLogger("netsim.demo")

_RTT = re.compile(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/")


def _latency(output: str, elapsed: float) -> float:
    """A probe's latency as the tables show it: a ping's own average RTT, else the whole command's time."""
    rtt = _RTT.search(output)
    return float(rtt.group(1)) / 1000 if rtt else elapsed


_BINARIES = ("wireguard-go", "wg", "nft", "iperf3", "tcpdump", "curl", "dig", "ping")


@dataclass(frozen=True)
class DemoRow:
    """One probe's outcome as the demo prints it."""

    probe: str
    path: str
    seconds: float
    ok: bool
    detail: str


def real_backend_missing() -> str | None:
    """Why the real (lab) backend cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "not running as root (the lab needs network namespaces, veth and /dev/net/tun)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (modprobe tun)"
    missing = [b for b in _BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing binaries: {', '.join(missing)} (run `make demo` as root to install them)"
    return None


def run_demo(*, pcap_dir: str | None = None, force_memory: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when every probe succeeded)."""
    console = make_console()
    why = "--memory was given" if force_memory else real_backend_missing()
    if why is None:
        log.info("the real backend (lab, wireguard-go, helper and provider processes)")
        return trio.run(_real_demo, console, pcap_dir)
    log.info("the in-memory backend (%s)", why)
    console.print(f"[yellow]Using the in-memory backend:[/] {why}.")
    console.print("Same provider, helper and WireGuard code; MemoryTun and a fake network instead of the lab.\n")
    return trio.run(_memory_demo, console)


def _rows_table(title: str, rows: list[DemoRow]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("probe")
    table.add_column("path")
    table.add_column("latency*", justify="right")
    table.add_column("result")
    colours = {"tunnel": "cyan", "bypass": "magenta", "direct": "green", "dropped": "red"}
    for r in rows:
        colour = colours.get(r.path, "white")
        result = f"[green]ok[/] {r.detail}" if r.ok else f"[red]FAIL[/] {r.detail}"
        table.add_row(r.probe, f"[{colour}]{r.path}[/]", f"{r.seconds * 1000:.1f} ms", result)
    table.caption = "*ping: average RTT; other probes: time for the whole command"
    return table


def _ledger_table(title: str, ledger: dict[str, Any]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("stage", "read", "forwarded", "queued", "dropped"):
        table.add_column(col, justify="left" if col in ("stage", "dropped") else "right")
    for name, st in ledger.get("stages", {}).items():
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(st.get("dropped", {}).items()) if v) or "-"
        table.add_row(name, str(st["read"]), str(st["forwarded"]), str(st["queued"]), dropped)
    return table


def _detail(output: str, width: int = 60) -> str:
    line = output.strip().splitlines()[-1] if output.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


async def _real_demo(console: Console, pcap_dir: str | None) -> int:
    from netsim.lab import Lab
    from netsim.lab.scenarios import BYPASS_POLICY_TOML, add_bypass_hosts
    from netsim.lab.tunnel import netsim_tunnel

    rows: list[DemoRow] = []
    async with AsyncExitStack() as stack:
        with console.status("bringing up the lab (mac, isp, vpn, inet, lan namespaces)"):
            lab = await stack.enter_async_context(Lab(pcap_dir=pcap_dir))
            await trio.to_thread.run_sync(add_bypass_hosts, lab)
        roles = ", ".join(lab.netns(r) for r in ("mac", "isp", "vpn", "inet", "lan"))
        console.print(f"lab [bold]{lab.run_id}[/] up: {roles}")
        log.info("lab %s up, starting the tunnel", lab.run_id)
        with console.status("starting wireguard-go (vpn), the helper and the provider (mac)"):
            t = await stack.enter_async_context(netsim_tunnel(lab, policy=BYPASS_POLICY_TOML))
        console.print("tunnel connected: utun → provider → UDS → helper → WireGuard → wireguard-go → inet")
        log.info("tunnel connected, %d probes", len(demo_probes(str(lab.addr.lan_eth0_v4))))
        console.print("bypass policy (mechanism nat): 203.0.113.20, TCP 8080, isp.lab.test bypass; UDP 9 dropped\n")
        for label, argv in demo_probes(str(lab.addr.lan_eth0_v4)):
            with console.status(f"probe: {label}"):
                r = await t.run_probe(label, argv)
            seconds = _latency(r.output, r.seconds)
            expect_fail = r.path == "dropped"
            ok = (not r.ok) if expect_fail else r.ok
            detail = f"dropped by policy ({r.policy_dropped} packets)" if expect_fail else _detail(r.output)
            rows.append(DemoRow(label, r.path, seconds, ok, detail))
            log.debug("probe %r path %s ok %s (%.1f ms)", label, r.path, ok, seconds * 1000)
            mark = "[green]ok[/]" if ok else "[red]FAIL[/]"
            console.print(f"  {mark} {label} ({r.path}, {seconds * 1000:.1f} ms)")
        provider = await t.provider_stats()
        helper = await t.helper_stats()
        console.print("stopping provider, helper, wireguard-go and the lab")
        log.info("probes done, stopping the tunnel and the lab")
    console.print()
    console.print(_rows_table("Probes from the simulated Mac", rows))
    console.print(_ledger_table("Provider ledger (read = forwarded + dropped + queued)", provider.get("ledger", {})))
    console.print(_ledger_table("Helper ledger", helper.get("ledger", {})))
    print_captures(console, lab.capture_history)  # stopped at teardown, so tcpdump's drop counts are known
    return _verdict(console, rows, "the lab is gone (nothing left in the root namespace)")


def print_captures(console: Console, history: list[CaptureStats]) -> None:
    """One line per pcap with its packet count; a capture tcpdump could not keep up with says ``PARTIAL: N
    dropped`` (docs/lab.md, Captures), in red, with what to change."""
    if not history:
        return
    console.print("pcaps (open with Wireshark):", highlight=False)
    for stats in history:
        console.print(f"  {stats.describe()}", markup=False, highlight=False, style=None if stats.complete else "red")
    partial = [s for s in history if not s.complete]
    if partial:
        console.print(
            f"[red]{len(partial)} capture(s) not complete[/]: tcpdump could not keep up; raise the buffer "
            "(Lab(capture_buffer_kib=...)) or lower the snap length (docs/lab.md, Captures)"
        )


def demo_probes(lan_host: str) -> list[tuple[str, tuple[str, ...]]]:
    """The demo's probes: the issue's tunnel probes, then bypassed, dropped and LAN flows."""
    from netsim.lab.scenarios import BYPASS_PORT, DIRECT_V4, DIRECT_V6, DROP_PORT
    from netsim.lab.tunnel import STANDARD_PROBES, udp_echo_argv

    curl = ("curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}")
    ping = ("ping", "-c", "3", "-i", "0.2", "-W", "2", "-q")
    return [
        *STANDARD_PROBES,
        ("bypass: curl 203.0.113.20 (host rule)", (*curl, f"http://{DIRECT_V4}/")),
        ("bypass: curl [2001:db8:113::20] (host rule)", (*curl, f"http://[{DIRECT_V6}]/")),
        ("bypass: ping 203.0.113.20", (*ping, DIRECT_V4)),
        ("bypass: udp echo 203.0.113.20", udp_echo_argv(DIRECT_V4)),
        (f"bypass: curl www.lab.test:{BYPASS_PORT} (port rule)", (*curl, f"http://203.0.113.10:{BYPASS_PORT}/")),
        ("bypass: curl isp.lab.test (domain rule)", (*curl, "http://isp.lab.test/")),
        (f"drop: udp to port {DROP_PORT} (no-discard rule)", udp_echo_argv("203.0.113.10", DROP_PORT)),
        ("direct: ping LAN printer (connected network)", (*ping, lan_host)),
    ]


def _verdict(console: Console, rows: list[DemoRow], tail: str) -> int:
    failed = [r.probe for r in rows if not r.ok]
    log.info("%d of %d probes succeeded", len(rows) - len(failed), len(rows))
    if failed:
        console.print(f"[red]{len(failed)} probe(s) failed:[/] {', '.join(failed)}")
        return 1
    console.print(f"[green]all {len(rows)} probes succeeded[/]; {tail}")
    return 0


async def _memory_demo(console: Console) -> int:
    from netsim.core.packet import PacketView
    from netsim.testing.memory_tunnel import icmp_echo, memory_tunnel, udp_packet

    rows: list[DemoRow] = []
    async with AsyncExitStack() as stack:
        with console.status("starting provider, helper and a WireGuard server peer in memory"):
            t = await stack.enter_async_context(memory_tunnel())
        log.info("in-memory tunnel connected")
        probes = [
            ("ping v4 203.0.113.10", icmp_echo(t.client_v4, "203.0.113.10", 1)),
            ("ping v6 2001:db8:113::10", icmp_echo(t.client_v6, "2001:db8:113::10", 1)),
            ("udp echo v4", udp_packet(t.client_v4, "203.0.113.10", 40000, 7, b"netsim-probe")),
            ("udp echo v6", udp_packet(t.client_v6, "2001:db8:113::10", 40001, 7, b"netsim-probe")),
        ]
        for label, pkt in probes:
            before = (await t.provider_stats())["ledger"]["stages"]["tun_read"]["read"]
            start = trio.current_time()
            with console.status(f"probe: {label}"):
                replies = await t.exchange([pkt], timeout=5.0)
            seconds = trio.current_time() - start
            after = (await t.provider_stats())["ledger"]["stages"]["tun_read"]["read"]
            ok = False
            detail = "no reply"
            if replies:
                view = PacketView.parse_untrusted(replies[0])
                ok = view.src == PacketView.parse_untrusted(pkt).dst
                detail = f"reply from {view.src_address}, {len(replies[0])} bytes"
            rows.append(DemoRow(label, "tunnel" if after > before else "direct", seconds, ok, detail))
            log.debug("probe %r ok %s (%.1f ms)", label, ok, seconds * 1000)
        provider = await t.provider_stats()
        helper = await t.helper_stats()
    console.print(_rows_table("Probes through the in-memory tunnel", rows))
    console.print(_ledger_table("Provider ledger", provider.get("ledger", {})))
    console.print(_ledger_table("Helper ledger", helper.get("ledger", {})))
    return _verdict(console, rows, "in memory (run as root for the real lab)")


# ---- proxy providers (`netsim demo proxy`, `netsim demo dns`; docs/proxy.md) ----
_PROXY_OPTIONS = {
    "include": ["0.0.0.0/0:80/tcp", "0.0.0.0/0:7/udp"],
    "exclude": ["192.168.1.20/32:80/tcp"],
    "decline": ["203.0.113.20/32"],
}


def run_proxy_demo(what: str, *, pcap_dir: str | None = None, force_memory: bool = False) -> int:
    """``netsim demo proxy`` (the transparent proxy) or ``netsim demo dns`` (the DNS proxy); exit code."""
    console = make_console()
    why = "--memory was given" if force_memory else real_backend_missing()
    if why is None:
        return trio.run(_proxy_lab_demo, console, what, pcap_dir)
    console.print(f"[yellow]Using the in-memory backend:[/] {why}.")
    return trio.run(_proxy_memory_demo, console)


_FLOW_TITLE = "What the provider logged (one line per flow, query or answer)"


def _flow_rows(entries: list[dict[str, Any]], title: str = _FLOW_TITLE) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("event")
    table.add_column("what")
    for e in entries:
        what = e.get("text") or " ".join(f"{k}={v}" for k, v in sorted(e.items()) if k != "event")
        table.add_row(str(e.get("event")), str(what))
    return table


async def _run_probes(
    lab: Any, probes: Sequence[tuple[str, Sequence[str]]], judge: Callable[[str, int, str], tuple[str, bool, str]]
) -> list[DemoRow]:
    """Run each probe command in ``mac``, timed; ``judge(label, returncode, stdout)`` gives (path, ok, detail)."""
    rows: list[DemoRow] = []
    for label, argv in probes:
        start = trio.current_time()
        r = await lab.run("mac", list(argv), check=False, timeout=30)
        out = r.stdout.decode(errors="replace").strip()
        path, ok, detail = judge(label, r.returncode, out)
        rows.append(DemoRow(label, path, _latency(out, trio.current_time() - start), ok, detail))
    return rows


def _print_counters(console: Console, name: str, stats: dict[str, Any]) -> None:
    console.print(f"{name} counters: " + ", ".join(f"{k}={v}" for k, v in stats.items()), highlight=False)


def _flow_demo_report(
    console: Console,
    lab: Any,
    entries: Any,
    rows: list[DemoRow],
    *,
    counters: tuple[str, dict[str, Any]],
    tail: str,
    title: str = _FLOW_TITLE,
) -> int:
    """The flow-level demos' report: the flow log, the probes, the host's counters, the captures, the verdict."""
    console.print(_flow_rows(entries, title))
    console.print(_rows_table("Probes from the simulated Mac", rows))
    _print_counters(console, *counters)
    print_captures(console, lab.capture_history)
    return _verdict(console, rows, tail)


async def _proxy_lab_demo(console: Console, what: str, pcap_dir: str | None) -> int:
    from netsim.apple import AppRule
    from netsim.lab import Lab
    from netsim.lab.scenarios import add_bypass_hosts
    from netsim.lab.tproxy import transparent_proxy
    from netsim.lab.tunnel import udp_echo_argv

    curl = ("curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}")
    dig = ("dig", "+short", "+tries=1", "+time=3", "@127.0.0.53")
    if what == "dns":
        spec, options = "netsim.examples.dns_proxy:LoggingDNSProxy", {"block": ["isp.lab.test"]}
        probes = [
            ("dig www.lab.test A (udp)", (*dig, "www.lab.test", "A")),
            ("dig +tcp www.lab.test AAAA", (*dig, "+tcp", "www.lab.test", "AAAA")),
            ("dig isp.lab.test (blocked: NXDOMAIN, no answer)", (*dig, "isp.lab.test", "A")),
        ]
    else:
        spec, options = "netsim.examples.transparent_proxy:LoggingTransparentProxy", _PROXY_OPTIONS
        probes = [
            ("proxied: curl www.lab.test", (*curl, "http://203.0.113.10/")),
            ("proxied: udp echo www.lab.test", udp_echo_argv("203.0.113.10")),
            ("declined by the provider (direct): curl 203.0.113.20", (*curl, "http://203.0.113.20/")),
            ("excluded by a rule (never intercepted): curl LAN printer", (*curl, "http://192.168.1.20/")),
        ]
    async with AsyncExitStack() as stack:
        with console.status("bringing up the lab"):
            lab = await stack.enter_async_context(Lab(pcap_dir=pcap_dir))
            await trio.to_thread.run_sync(add_bypass_hosts, lab)
        with console.status(f"starting {spec} in mac (nftables TPROXY)"):
            proxy = await stack.enter_async_context(
                transparent_proxy(lab, spec, options=options, dns=what == "dns", app_rules=[AppRule("root", uid=0)])
            )
        console.print(f"lab [bold]{lab.run_id}[/] up; {spec} running in mac\n")

        def judge(label: str, returncode: int, out: str) -> tuple[str, bool, str]:
            ok = returncode == 0 and (out == "" if "blocked" in label else bool(out))
            return (label.partition(":")[0] if ":" in label and what != "dns" else "dns proxy"), ok, _detail(out)

        rows = await _run_probes(lab, probes, judge)
        await trio.sleep(2.5)  # idle UDP flows close after 2 s and are logged
        stats = (await proxy.stop())["statistics"]
        entries = proxy.flow_log()
    return _flow_demo_report(
        console,
        lab,
        entries,
        rows,
        counters=("host", stats),
        tail="the proxy's nftables table and routes are gone with the lab",
    )


async def _proxy_memory_demo(console: Console) -> int:
    from netsim.apple.proxy import HostEndpoint
    from netsim.examples.transparent_proxy import LoggingTransparentProxy
    from netsim.runtime.proxy_memory import MemoryProxyHost, echo_tcp_server

    class Demo(LoggingTransparentProxy):
        async def start_proxy(self, options: dict[str, Any] | None) -> None:
            await super().start_proxy(_PROXY_OPTIONS)

    www, direct, lan = (HostEndpoint(h, 80) for h in ("203.0.113.10", "203.0.113.20", "192.168.1.20"))
    rows: list[DemoRow] = []
    async with MemoryProxyHost(Demo(), tcp_servers=dict.fromkeys((www, direct, lan), echo_tcp_server)) as host:
        for label, endpoint in (("proxied", www), ("declined (direct)", direct), ("excluded by a rule", lan)):
            stream = await host.connect_tcp(endpoint)
            await stream.send_all(b"netsim")
            await stream.send_eof()
            got = b""
            while chunk := await stream.receive_some(100):
                got += chunk
            sender = host.contacts[-1].sender
            rows.append(DemoRow(f"{label}: tcp {endpoint}", f"server saw the {sender}", 0.0, got == b"netsim", ""))
        rows_t = _rows_table("Flows in memory", rows)
        entries = list(host.provider.log)  # type: ignore[attr-defined]
    console.print(_flow_rows(entries))
    console.print(rows_t)
    return _verdict(console, rows, "in memory (run as root for the lab)")


_FILTER_BLOCK = "blocked.lab.test"


def run_filter_demo(*, pcap_dir: str | None = None, force_memory: bool = False) -> int:
    """``netsim demo filter``: the content filter example (a `FilterDataProvider`) blocks a host by name and
    logs every HTTP/HTTPS flow; exit code 0 when every probe did what it should."""
    console = make_console()
    why = "--memory was given" if force_memory else real_backend_missing()
    if why is None and shutil.which("openssl") is None:
        why = "openssl is missing (it makes the HTTPS server's certificate)"
    if why is None:
        return trio.run(_filter_lab_demo, console, pcap_dir)
    console.print(f"[yellow]Using the in-memory backend:[/] {why}.")
    return trio.run(_filter_memory_demo, console)


async def _filter_lab_demo(console: Console, pcap_dir: str | None) -> int:
    import tempfile
    from pathlib import Path

    from netsim.lab import Lab
    from netsim.lab.filter_data import data_filter, https_server

    spec = "netsim.examples.content_filter:ContentFilter"
    resolve = [a for port in (80, 443) for a in ("--resolve", f"{_FILTER_BLOCK}:{port}:203.0.113.10")]
    curl = ("curl", "-sSk", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", *resolve)
    probes = [
        ("allowed: curl http://www.lab.test/", (*curl, "http://www.lab.test/")),
        ("allowed: curl https://www.lab.test/", (*curl, "https://www.lab.test/")),
        (f"blocked: curl http://{_FILTER_BLOCK}/", (*curl, f"http://{_FILTER_BLOCK}/")),
        (f"blocked: curl https://{_FILTER_BLOCK}/", (*curl, f"https://{_FILTER_BLOCK}/")),
    ]
    with tempfile.TemporaryDirectory(prefix="netsim-filter-demo-") as tmp:
        async with AsyncExitStack() as stack:
            with console.status("bringing up the lab"):
                lab = await stack.enter_async_context(Lab(pcap_dir=pcap_dir))
                await stack.enter_async_context(https_server(lab, Path(tmp)))
            with console.status(f"starting {spec} in mac (TPROXY, table netsim_filterdata)"):
                running = await stack.enter_async_context(
                    data_filter(lab, spec, configuration={"block": [_FILTER_BLOCK]}, ports=(80, 443))
                )
            console.print(f"lab [bold]{lab.run_id}[/] up; {spec} filtering mac's TCP ports 80 and 443\n")

            def judge(label: str, returncode: int, out: str) -> tuple[str, bool, str]:
                blocked = label.startswith("blocked")
                ok = (returncode != 0 and out in ("", "000")) if blocked else (returncode == 0 and out == "200")
                return ("dropped" if blocked else "direct"), ok, f"curl exit {returncode}, HTTP {out or '-'}"

            rows = await _run_probes(lab, probes, judge)
            stats = (await running.stop())["statistics"]
            entries = running.flow_log()
    return _flow_demo_report(
        console,
        lab,
        entries,
        rows,
        counters=("filter", stats),
        tail="the filter's nftables table and routes are gone with the lab",
    )


async def _filter_memory_demo(console: Console) -> int:
    import ssl

    from netsim.apple.proxy import HostEndpoint
    from netsim.examples.content_filter import ContentFilter
    from netsim.runtime.filter_data import FilterDataHost
    from netsim.runtime.proxy_memory import MemoryProxyHost

    def hello(name: str) -> bytes:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return outgoing.read()

    received: list[bytes] = []

    async def server(stream: trio.abc.HalfCloseableStream) -> None:
        got = b""
        while chunk := await stream.receive_some(65536):
            got += chunk
        received.append(got)
        await stream.send_all(b"ok")
        await stream.send_eof()

    http, https = HostEndpoint("203.0.113.10", 80), HostEndpoint("203.0.113.10", 443)
    cases = [
        ("allowed: http www.lab.test", http, b"GET / HTTP/1.1\r\nHost: www.lab.test\r\n\r\n", True),
        ("allowed: https www.lab.test (SNI)", https, hello("www.lab.test"), True),
        (f"blocked: http {_FILTER_BLOCK}", http, f"GET / HTTP/1.1\r\nHost: {_FILTER_BLOCK}\r\n\r\n".encode(), False),
        (f"blocked: https {_FILTER_BLOCK} (SNI)", https, hello(_FILTER_BLOCK), False),
    ]
    cf = ContentFilter()
    fhost = FilterDataHost(cf, configuration={"block": [_FILTER_BLOCK]})
    rows: list[DemoRow] = []
    async with MemoryProxyHost(fhost, tcp_servers={http: server, https: server}) as host:
        for label, endpoint, data, allowed in cases:
            stream = await host.connect_tcp(endpoint)
            await stream.send_all(data)
            await stream.send_eof()
            got = b""
            try:
                while chunk := await stream.receive_some(100):
                    got += chunk
            except trio.BrokenResourceError:
                got = b""
            reached = any(r == data for r in received)
            ok = (got == b"ok" and reached) if allowed else (got == b"" and not reached)
            detail = "the server got the bytes" if reached else "the server never saw the bytes"
            rows.append(DemoRow(label, "direct" if allowed else "dropped", 0.0, ok, detail))
    console.print(_flow_rows(list(cf.log)))
    console.print(_rows_table("Flows in memory", rows))
    return _verdict(console, rows, "in memory (run as root for the lab)")


_PF_TITLE = "What the filter logged (one line per distinct packet line, with its count)"
_PF_LINE = re.compile(r"\b(allow|drop) (inbound|outbound|any) (\S+) (\S+) (\S+) -> (\S+)")


def run_packet_filter_demo(*, pcap_dir: str | None = None, force_memory: bool = False) -> int:
    """``netsim demo packet-filter``: the packet filter example (a `FilterPacketProvider`) drops every packet to
    or from the LAN printer on the Mac's en0 and allows and logs the rest; exit code 0 when every probe did what
    it should."""
    console = make_console()
    why = "--memory was given" if force_memory else real_backend_missing()
    if why is None:
        return trio.run(_packet_filter_lab_demo, console, pcap_dir)
    console.print(f"[yellow]Using the in-memory backend:[/] {why}.")
    return trio.run(_packet_filter_memory_demo, console)


def _packet_log_rows(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The filter's per-packet log lines, one entry per distinct line with how many times it was logged."""
    counts: dict[str, int] = {}
    for line in lines:
        if match := _PF_LINE.search(line):
            counts[match[0]] = counts.get(match[0], 0) + 1
    return [{"event": text.split(" ", 1)[0], "text": f"{text.split(' ', 1)[1]}  (x{n})"} for text, n in counts.items()]


async def _packet_filter_lab_demo(console: Console, pcap_dir: str | None) -> int:
    from netsim.lab import Lab
    from netsim.lab.filter import packet_filter

    spec = "netsim.examples.packet_filter:DropHostFilter"
    async with Lab(pcap_dir=pcap_dir) as lab:
        printer, www = str(lab.addr.lan_eth0_v4), str(lab.addr.www_v4)
        curl = ("curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}")
        probes = [
            ("allowed: ping www.lab.test", ("ping", "-c", "2", "-i", "0.2", "-W", "1", www)),
            ("allowed: curl http://www.lab.test/", (*curl, f"http://{www}/")),
            ("dropped: ping the LAN printer", ("ping", "-c", "2", "-i", "0.2", "-W", "1", printer)),
            ("dropped: curl the LAN printer (http)", (*curl, f"http://{printer}/")),
        ]
        console.print(f"lab [bold]{lab.run_id}[/] up; starting {spec} on mac's en0 (NFQUEUE), dropping {printer}\n")

        def judge(label: str, returncode: int, out: str) -> tuple[str, bool, str]:
            dropped = label.startswith("dropped")
            ok = returncode != 0 if dropped else returncode == 0 and (out == "200" if "curl" in label else True)
            return (
                ("dropped" if dropped else "allowed"),
                ok,
                f"exit {returncode}" + (f", {_detail(out)}" if out else ""),
            )

        with packet_filter(lab, spec, vendor_configuration={"drop_hosts": [printer]}) as pf:
            rows = await _run_probes(lab, probes, judge)
        stats = pf.statistics().filter
        entries = _packet_log_rows(pf.log_text().splitlines())
    counters = {k: v for k, v in vars(stats).items() if v}
    return _flow_demo_report(
        console,
        lab,
        entries,
        rows,
        counters=("filter", counters),
        tail="the filter's iptables chains and queue are gone with it",
        title=_PF_TITLE,
    )


async def _packet_filter_memory_demo(console: Console) -> int:
    from netsim.examples.packet_filter import DropHostFilter
    from netsim.runtime.filter import PacketFilterEngine
    from netsim.testing.memory_tunnel import icmp_echo, udp_packet
    from netsim.transports.nfqueue import NF_ACCEPT, NF_DROP, QueuedPacket

    mac, www, printer = "192.168.1.10", "203.0.113.10", "192.168.1.20"
    post, pre = 4, 0  # the netfilter hooks: outbound after routing, inbound as it arrives
    cases = [
        ("allowed: ping www.lab.test", icmp_echo(mac, www, 1), post, NF_ACCEPT),
        ("allowed: its reply", icmp_echo(www, mac, 1), pre, NF_ACCEPT),
        ("allowed: udp to www.lab.test", udp_packet(mac, www, 40000, 7, b"hello"), post, NF_ACCEPT),
        ("dropped: ping the LAN printer", icmp_echo(mac, printer, 2), post, NF_DROP),
        ("dropped: udp from the LAN printer", udp_packet(printer, mac, 631, 40001, b"status"), pre, NF_DROP),
    ]
    sent: list[tuple[int, int]] = []
    provider = DropHostFilter()
    handler = logging.getLogger("netsim.examples.packet_filter")
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    collect = _Collect()
    handler.addHandler(collect)
    handler.setLevel(logging.INFO)
    try:
        engine = PacketFilterEngine(
            provider,
            lambda pid, verdict: sent.append((pid, verdict)),
            lambda: None,
            interfaces={2: "en0"},
            configuration={"drop_hosts": [printer]},
        )
        await provider.start_filter()
        batch = [
            QueuedPacket(i, 0x0800, hook, pkt, **({"outdev": 2} if hook == post else {"indev": 2}))
            for i, (_, pkt, hook, _) in enumerate(cases, 1)
        ]
        engine.handle_batch(batch)  # one batch, one wakeup: every verdict goes back at once
    finally:
        handler.removeHandler(collect)
    verdicts = dict(sent)
    names = {NF_ACCEPT: "NF_ACCEPT", NF_DROP: "NF_DROP"}
    rows = [
        DemoRow(
            label,
            "dropped" if want == NF_DROP else "allowed",
            0.0,
            verdicts.get(i) == want,
            f"verdict {names.get(verdicts.get(i, -1), 'none')}",
        )
        for i, (label, _, _, want) in enumerate(cases, 1)
    ]
    console.print(_flow_rows(_packet_log_rows(lines), _PF_TITLE))
    console.print(_rows_table("Packets in memory (PacketFilterEngine, no kernel)", rows))
    _print_counters(console, "filter", {k: v for k, v in vars(engine.statistics()).items() if v})
    return _verdict(console, rows, "in memory (run as root for the lab: NFQUEUE on the Mac's en0)")
