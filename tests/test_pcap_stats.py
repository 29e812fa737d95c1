"""tcpdump's end-of-capture statistics, parsed and reported (no root: the lab tests run real tcpdumps).

The stderr samples are tcpdump 4.99's own output (captured from real runs: a clean stop, a stop after kernel
drops, and one with the "dropped by interface" line it prints only when that count is non-zero).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netsim.errors import LabError
from netsim.lab.lab import Lab
from netsim.lab.pcap import (
    CAPTURE_SUMMARY,
    DEFAULT_BUFFER_KIB,
    DEFAULT_SNAPLEN,
    Capture,
    CaptureStats,
    TcpdumpStats,
    capture_report_lines,
    parse_tcpdump_stats,
    read_capture_summary,
    write_capture_summary,
)

CLEAN = (
    "tcpdump: listening on en0, link-type EN10MB (Ethernet), snapshot length 65535 bytes\n"
    "10 packets captured\n10 packets received by filter\n0 packets dropped by kernel\n"
)
LOOPBACK = (  # on lo the kernel shows each packet twice and libpcap discards the outgoing copy
    "tcpdump: listening on lo, link-type EN10MB (Ethernet), snapshot length 65535 bytes\n"
    "10 packets captured\n20 packets received by filter\n0 packets dropped by kernel\n"
)
DROPPED = (
    "tcpdump: listening on utun0, link-type RAW (Raw IP), snapshot length 65535 bytes\n"
    "3792 packets captured\n16616 packets received by filter\n12824 packets dropped by kernel\n"
)
IFDROP = (
    "tcpdump: listening on en0, link-type EN10MB (Ethernet), snapshot length 65535 bytes\n"
    "1 packet captured\n1 packet received by filter\n0 packets dropped by kernel\n7 packets dropped by interface\n"
)


def test_clean_stop() -> None:
    assert parse_tcpdump_stats(CLEAN) == TcpdumpStats(captured=10, received=10, dropped_kernel=0)


def test_kernel_drops() -> None:
    stats = parse_tcpdump_stats(DROPPED)
    assert stats == TcpdumpStats(captured=3792, received=16616, dropped_kernel=12824)
    assert stats is not None and stats.dropped == 12824


def test_singular_and_interface_drops() -> None:
    stats = parse_tcpdump_stats(IFDROP)
    assert stats == TcpdumpStats(captured=1, received=1, dropped_kernel=0, dropped_interface=7)
    assert stats is not None and stats.dropped == 7


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tcpdump: listening on lo, link-type EN10MB (Ethernet), snapshot length 65535 bytes\n",  # killed
        "10 packets captured\n20 packets received by filter\n",  # truncated before the drop line
        "tcpdump: pcap_loop: The interface disappeared\n",
        "x10 packets captured\n20 packets received by filter\n0 packets dropped by kernel suffix\n",
        "99999999999999999999999 packets captured\n1 packets received by filter\n0 packets dropped by kernel\n",
    ],
)
def test_no_statistics(text: str) -> None:
    assert parse_tcpdump_stats(text) is None


def test_last_summary_wins_and_noise_is_ignored() -> None:
    text = CLEAN + "tcpdump: some warning\n" + DROPPED + "\x00\xff garbage\n"
    assert parse_tcpdump_stats(text) == TcpdumpStats(3792, 16616, 12824)


def test_only_the_tail_is_read() -> None:
    assert parse_tcpdump_stats(CLEAN + "x" * 100_000) is None  # the summary is always last
    assert parse_tcpdump_stats("x" * 1_000_000 + CLEAN) == TcpdumpStats(10, 10, 0)


def _stats(name: str, text: str, rc: int | None = 0) -> CaptureStats:
    return CaptureStats(name, Path(f"/tmp/{name}.pcap"), parse_tcpdump_stats(text), rc, 1024, 2048)


def test_status_marks_partial_and_unknown() -> None:
    ok, partial, unknown = (
        _stats("a", CLEAN),
        _stats("b", DROPPED),
        _stats("c", "", rc=-9),
    )
    assert ok.complete and ok.status == "complete" and ok.dropped == 0
    assert not partial.complete and partial.status == "PARTIAL: 12824 dropped" and partial.dropped == 12824
    assert not unknown.complete and unknown.dropped is None and unknown.status.startswith("UNKNOWN")
    assert "-9" in unknown.status
    lines = capture_report_lines([ok, partial, unknown])
    assert lines[0] == "  a: /tmp/a.pcap (10 packets, complete)"
    assert lines[1] == "  !! b: /tmp/b.pcap (3792 packets, PARTIAL: 12824 dropped)"
    assert lines[2].startswith("  !! c: /tmp/c.pcap (? packets, UNKNOWN")


# A real stop of tcpdump 4.99 (SIGSTOP behind a 32 MiB ring, 800 datagrams, SIGCONT, SIGTERM at once): 512
# packets still sat in the ring and never reached the file; "received" counts them, and the drops.
UNREAD = "1 packet captured\n810 packets received by filter\n298 packets dropped by kernel\n"


def test_packets_left_in_the_ring_at_stop_are_missing_from_the_file() -> None:
    """Regression: a capture that lost packets at stop, with no kernel drop, read as complete."""
    stats = parse_tcpdump_stats(UNREAD)
    assert stats is not None and stats.unread == 511 and stats.dropped == 298
    capture = _stats("u", UNREAD)
    assert not capture.complete and capture.dropped == 809
    assert capture.status == "PARTIAL: 809 dropped (511 unread at stop)"
    only_unread = _stats("v", "5 packets captured\n9 packets received by filter\n0 packets dropped by kernel\n")
    assert not only_unread.complete and only_unread.status == "PARTIAL: 4 dropped (4 unread at stop)"
    assert _stats("d", DROPPED).stats.unread == 0  # type: ignore[union-attr]  # 3792 + 12824 == 16616
    # On lo libpcap drops the outgoing copy of each packet itself: "received" is twice "captured" there.
    lo = CaptureStats("lo", Path("/tmp/lo.pcap"), parse_tcpdump_stats(LOOPBACK), 0, 1024, 2048, loopback=True)
    assert lo.complete and lo.dropped == 0
    assert CaptureStats.from_json(lo.to_json()) == lo


def test_summary_round_trip(tmp_path: Path) -> None:
    history = [_stats("a", CLEAN), _stats("b", DROPPED), _stats("c", "", rc=None)]
    path = write_capture_summary(tmp_path, "ab12", history)
    assert path == tmp_path / CAPTURE_SUMMARY
    assert json.loads(path.read_text())["run_id"] == "ab12"
    assert read_capture_summary(tmp_path, "ab12") == history
    assert read_capture_summary(tmp_path) == history
    assert read_capture_summary(tmp_path, "other") == []  # a stale file of another run is not reported
    assert read_capture_summary(tmp_path / "missing") == []
    path.write_text("{not json")
    assert read_capture_summary(tmp_path) == []
    for body in ('{"captures": [{"name": "a"}]}', '{"captures": [1]}', '{"captures": 5}', "[]"):
        path.write_text(body)
        assert read_capture_summary(tmp_path) == [], body


def test_argv_sets_buffer_and_snaplen() -> None:
    argv = Capture.argv("utun0", Path("/tmp/x.pcap"))
    assert argv[argv.index("-B") + 1] == str(DEFAULT_BUFFER_KIB)
    assert argv[argv.index("-s") + 1] == str(DEFAULT_SNAPLEN)
    argv = Capture.argv("utun0", Path("/tmp/x.pcap"), buffer_kib=64, snaplen=96)
    assert argv[argv.index("-B") + 1] == "64" and argv[argv.index("-s") + 1] == "96"
    for bad in ({"buffer_kib": 0}, {"snaplen": 0}, {"snaplen": 262145}):
        with pytest.raises(LabError):
            Capture.argv("utun0", Path("/tmp/x.pcap"), **bad)
    with pytest.raises(LabError, match="buffer_kib"):
        Lab(capture_buffer_kib=0)  # refused before anything starts
    with pytest.raises(LabError, match="snaplen"):
        Lab(capture_snaplen=10**6)


def test_defaults_leave_tun_captures_room() -> None:
    """On a TUN (raw IP) libpcap's ring frame is the snap length: tcpdump's defaults (2 MiB, 262144) gave 8
    frames, and a 1 s iperf3 lost 12,824 of 16,616 packets. The defaults must leave hundreds."""
    assert DEFAULT_BUFFER_KIB * 1024 // DEFAULT_SNAPLEN >= 256


@pytest.mark.parametrize("role", ["mac", "isp", "vpn", "inet", "lan"])
def test_every_role_gets_a_lab_resolver(role: str) -> None:
    lab = Lab("t1")
    text = lab.resolv_conf(role)
    servers = [line.split()[1] for line in text.splitlines() if line.startswith("nameserver ")]
    lab_resolvers = {str(lab.addr.isp_lan_v4), str(lab.addr.isp_lan_v6), str(lab.addr.dns_v4), str(lab.addr.dns_v6)}
    if role == "mac":
        # with services, the Mac's own resolver (docs/dns.md), which forwards to the router's or the tunnel's
        assert servers == ["127.0.0.53"]
        bare = Lab("t1", services=False).resolv_conf(role)
        assert [line.split()[1] for line in bare.splitlines() if line.startswith("nameserver ")] == [
            str(lab.addr.isp_lan_v4),
            str(lab.addr.isp_lan_v6),
        ]
    else:
        assert servers and set(servers) <= lab_resolvers
    assert f"search {lab.domain}" in text


def test_demo_marks_partial_captures() -> None:
    from rich.console import Console

    from netsim.demo import print_captures

    console = Console(record=True, width=200, color_system=None)
    print_captures(console, [_stats("mac-en0", CLEAN), _stats("mac-utun0", DROPPED)])
    out = console.export_text()
    assert "mac-en0: /tmp/mac-en0.pcap (10 packets, complete)" in out
    assert "mac-utun0: /tmp/mac-utun0.pcap (3792 packets, PARTIAL: 12824 dropped)" in out
    assert "1 capture(s) not complete" in out
    console = Console(record=True, width=200, color_system=None)
    print_captures(console, [_stats("mac-en0", CLEAN)])
    assert "not complete" not in console.export_text()
