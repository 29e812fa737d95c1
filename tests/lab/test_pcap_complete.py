"""Captures are complete, or say they are not (issue 14): a bounded burst through the tunnel is in every pcap in
full, and a capture forced to drop (tcpdump stopped with SIGSTOP behind a one-frame ring) reports the drop.

Packets are counted in the files themselves (scapy's reader), never only in tcpdump's own report.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.inet import UDP

from netsim.lab import Lab, read_pcap
from netsim.lab.netns import list_netns
from netsim.lab.pcap import (
    CAPTURE_NICE,
    CAPTURE_SUMMARY,
    DEFAULT_BUFFER_KIB,
    DEFAULT_SNAPLEN,
    CaptureStats,
    read_capture_summary,
)
from netsim.testing.fixtures import LeakCheck, assert_root_unchanged, root_snapshot
from netsim.testing.require import require_binary, require_root

pytestmark = pytest.mark.lab

BURST = 2000
ROUND = 200  # datagrams sent back to back before waiting for their echoes (bounded, under the TUN's queue of 500)
MARK = b"netsim-pcap-burst "


def _gate() -> None:
    require_root()
    require_binary("ip", "nft", "iperf3", "tcpdump", "wireguard-go", "wg")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def warnings_of_lab() -> Iterator[list[logging.LogRecord]]:
    handler = _Records()
    logger = logging.getLogger("netsim.lab")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _markers(path: Path, *, dport: int | None = None, sport: int | None = None) -> int:
    """Burst datagrams in a pcap (raw IP or Ethernet), by destination or source port."""
    n = 0
    for pkt in read_pcap(path):
        if UDP in pkt and bytes(pkt[UDP].payload).startswith(MARK):
            if (dport is None or pkt[UDP].dport == dport) and (sport is None or pkt[UDP].sport == sport):
                n += 1
    return n


def _burst(sock: socket.socket, dst: tuple[str, int], *, echoes: bool) -> int:
    """Send BURST datagrams in rounds of ROUND; with ``echoes``, wait (bounded) for each round's echoes.
    Returns the echoes received."""
    received = 0
    sock.settimeout(1.0)
    for start in range(0, BURST, ROUND):
        for i in range(start, start + ROUND):
            sock.sendto(MARK + b"%06d" % i, dst)
        if echoes:
            got = 0
            deadline = time.monotonic() + 5.0
            while got < ROUND and time.monotonic() < deadline:
                try:
                    sock.recv(2048)
                except TimeoutError:
                    break
                got += 1
            received += got
    return received


def _check_consistent(stats: CaptureStats) -> int:
    """The file holds exactly what tcpdump says it captured; returns that count."""
    assert stats.stats is not None, f"{stats.name}: no statistics ({stats.status})"
    in_file = len(read_pcap(stats.path))
    assert in_file == stats.stats.captured, f"{stats.name}: {in_file} records, tcpdump says {stats.stats.captured}"
    return in_file


def test_burst_through_tunnel_is_captured_in_full(tmp_path: Path, warnings_of_lab: list[logging.LogRecord]) -> None:
    _gate()
    from netsim.lab.tunnel import netsim_tunnel

    before = root_snapshot()
    leaks = LeakCheck()
    pcap = tmp_path / "pcap"
    rec: dict[str, Any] = {}

    async def main() -> None:
        async with Lab(pcap_dir=pcap) as lab, netsim_tunnel(lab) as t:
            rec["run_id"] = lab.run_id
            sock = lab.socket("mac")
            try:
                dst = (str(lab.addr.www_v4), 7)  # the inet echo, through the tunnel
                rec["echoes"] = await trio.to_thread.run_sync(lambda: _burst(sock, dst, echoes=True))
            finally:
                sock.close()
            rec["running"] = set(t.pcaps)
            rec["lab"] = lab
            rec["tunnel"] = t
        rec["stats"] = rec["tunnel"].capture_stats
        rec["pcaps"] = rec["tunnel"].pcaps
        rec["history"] = list(rec["lab"].capture_history)

    trio.run(main)
    leaks.check([rec["run_id"]])
    assert_root_unchanged(before)

    names = {"mac-en0", "isp-wan", "vpn-wan", "vpn-wg", "mac-utun0"}
    assert rec["running"] == names  # LabTunnel.pcaps lists mac-utun0 and vpn-wg beside the lab's links
    assert set(rec["pcaps"]) == names and set(rec["stats"]) == names
    echoes = rec["echoes"]
    assert echoes >= BURST * 0.9, f"only {echoes}/{BURST} echoes came back: the tunnel, not the capture, failed"
    for stats in rec["history"]:
        assert stats.complete, f"{stats.describe()}: a bounded burst must be captured in full"
        assert stats.stats is not None and stats.stats.captured >= BURST
        _check_consistent(stats)
    utun = rec["pcaps"]["mac-utun0"]
    assert _markers(utun, dport=7) == BURST  # every datagram the socket sent entered the utun, and the file
    assert _markers(utun, sport=7) >= echoes  # every echo the socket read came out of the utun
    wg = rec["pcaps"]["vpn-wg"]
    assert _markers(wg, dport=7) >= echoes and _markers(wg, sport=7) >= echoes
    assert not [r for r in warnings_of_lab if "not complete" in r.getMessage()]
    summary = read_capture_summary(pcap, rec["run_id"])
    assert {s.name for s in summary} == names and all(s.complete for s in summary)


def test_forced_drop_is_reported_and_marked(tmp_path: Path, warnings_of_lab: list[logging.LogRecord]) -> None:
    """Positive control: a tcpdump stopped (SIGSTOP) behind a one-frame ring must drop, and say so."""
    _gate()
    before = root_snapshot()
    leaks = LeakCheck()
    pcap = tmp_path / "pcap"
    with Lab(pcap_dir=pcap, services=False) as lab:
        run_id = lab.run_id
        lab.open_tun("mac")  # captured as mac-utun0 until teardown
        tiny = lab.capture("mac", "en0", name="tiny", path=tmp_path / "tiny.pcap", buffer_kib=1)
        tiny.process.send_signal(signal.SIGSTOP)
        try:
            sock = lab.socket("mac")
            try:
                _burst(sock, (str(lab.addr.lan_eth0_v4), 9), echoes=False)  # discard port: nothing answers
            finally:
                sock.close()
            time.sleep(0.2)  # let the last datagrams reach the (full) ring
        finally:
            tiny.process.send_signal(signal.SIGCONT)
        stats = lab.stop_capture("tiny")
        assert "tiny" not in lab.captures and lab.capture_history[-1] is stats
        history_before_teardown = len(lab.capture_history)
    leaks.check([run_id])
    assert_root_unchanged(before)

    assert stats.stats is not None, stats.status
    assert stats.dropped is not None and stats.dropped > 0, stats.describe()
    assert not stats.complete
    assert stats.status == f"PARTIAL: {stats.dropped} dropped"
    assert "PARTIAL" in stats.describe()
    in_file = _check_consistent(stats)
    assert in_file < BURST  # the file really is partial: the report is not a false alarm
    assert stats.stats.received >= BURST  # the kernel saw the whole burst
    warned = [r for r in warnings_of_lab if "tiny" in r.getMessage()]
    assert warned and "PARTIAL" in warned[0].getMessage() and warned[0].levelno == logging.WARNING

    # The lab's own mac-en0 capture (default buffer) saw the same burst on the same link, in full.
    history = lab.capture_history
    assert len(history) == history_before_teardown + 4  # teardown stopped mac-en0, isp-wan, vpn-wan, mac-utun0
    utun = next(s for s in history if s.name == "mac-utun0")
    assert utun.complete and utun.returncode == 0, utun  # stopped before its TUN was closed, so tcpdump exits 0
    en0 = next(s for s in history if s.name == "mac-en0")
    assert en0.complete, en0.describe()
    _check_consistent(en0)
    assert _markers(en0.path, dport=9) == BURST
    body = json.loads((pcap / CAPTURE_SUMMARY).read_text())
    assert body["run_id"] == run_id
    by_name = {c["name"]: CaptureStats.from_json(c) for c in body["captures"]}
    assert by_name["tiny"] == stats and not by_name["tiny"].complete


ROOM = 800  # datagrams a stopped default capture must hold: 2 rounds of ROUND out and back on vpn-wan


def test_default_ring_holds_rounds_while_tcpdump_is_stopped(tmp_path: Path) -> None:
    """Regression (a CI run under load lost 29 packets of the burst above on vpn-wan): the default ring is sized
    in frames for bursts in flight, not only for a tcpdump that keeps up. Stopped with SIGSTOP, a capture with the
    lab's defaults on an offloading veth link (one 64 KiB frame per packet) keeps ROOM datagrams without a drop;
    the 32 MiB ring before it kept 517. And the lab runs tcpdump above its own traffic's priority."""
    _gate()
    before = root_snapshot()
    leaks = LeakCheck()
    with Lab(pcap_dir=tmp_path / "pcap", services=False) as lab:
        run_id = lab.run_id
        cap = lab.capture("mac", "en0", name="stopped", path=tmp_path / "stopped.pcap")
        assert cap.buffer_kib == DEFAULT_BUFFER_KIB and cap.snaplen == DEFAULT_SNAPLEN
        nice = int(Path(f"/proc/{cap.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == CAPTURE_NICE
        cap.process.send_signal(signal.SIGSTOP)
        try:
            sock = lab.socket("mac")
            try:
                for i in range(ROOM):
                    sock.sendto(MARK + b"%06d" % i, (str(lab.addr.lan_eth0_v4), 9))  # discard: nothing answers
            finally:
                sock.close()
            time.sleep(0.2)
        finally:
            cap.process.send_signal(signal.SIGCONT)
        stats = lab.stop_capture("stopped")
    leaks.check([run_id])
    assert_root_unchanged(before)
    assert stats.complete, stats.describe()
    _check_consistent(stats)
    assert _markers(stats.path, dport=9) == ROOM


_CLI = (
    "import sys, click; from netsim.lab.cli import lab_group; g = click.Group('netsim'); "
    "g.add_command(lab_group); g(sys.argv[1:])"
)


def test_cli_lists_captures_with_their_status(tmp_path: Path) -> None:
    """`netsim lab up --pcap` (at exit) and `netsim lab down` list every capture file with its count and status."""
    _gate()
    run_id = "p" + secrets.token_hex(2)
    pcap = tmp_path / "pcap"
    up = subprocess.Popen(
        [sys.executable, "-c", _CLI, "lab", "up", "--run", run_id, "--no-services", "--pcap", str(pcap)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert up.stdout is not None
        assert f"lab {run_id} up" in up.stdout.readline()
        down = subprocess.run(
            [sys.executable, "-c", _CLI, "lab", "down", "--run", run_id],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=30) == 0
        up_out = up.stdout.read()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if up.stdout is not None:
            up.stdout.close()
    assert not list_netns(f"netsim-{run_id}-")
    for out in (down.stdout, up_out):
        assert "captures:" in out, out
        for name in ("mac-en0", "isp-wan", "vpn-wan"):
            line = next(ln for ln in out.splitlines() if f" {name}: " in ln)
            assert str(pcap / f"{name}.pcap") in line and "complete)" in line and "!!" not in line, line
