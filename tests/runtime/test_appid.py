"""The /proc/net socket-table parser and owner lookup behind per-app FlowMetaData."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.apple import AppRule, RoutingMethod, TunnelProviderProtocol
from netsim.errors import ConfigError
from netsim.runtime.appid import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    ProcNetOwnerLookup,
    SocketEntry,
    app_rules_by_uid,
    parse_proc_net,
    parse_proc_net_line,
)
from netsim.testing.require import require

# Captured on this project's x86-64 (little-endian) test machine from /proc/net/{udp,udp6,tcp6}.
UDP_HEADER = (
    "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref "
    "pointer drops            "
)
UDP_LINE = (
    " 1737: 0100007F:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 517228 2 "
    "00000000198248fe 0        "
)
UDP6_LINE = (
    " 1738: 00000000000000000000000001000000:14EA 00000000000000000000000000000000:0000 07 00000000:00000000 "
    "00:00000000 00000000     0        0 517229 2 00000000231bdb61 0"
)
TCP6_LISTEN_MAPPED = (
    "   0: 0000000000000000FFFF00000100007F:14EC 00000000000000000000000000000000:0000 0A 00000000:00000000 "
    "00:00000000 00000000     0        0 517231 1 00000000926ad504 100 0 0 10 0"
)
TCP_LISTEN = (
    "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 87 1 "
    "000000006207823b 100 0 0 10 0                        "
)
CAPTURED = [UDP_LINE, UDP6_LINE, TCP6_LISTEN_MAPPED, TCP_LISTEN]
little_endian_only = pytest.mark.skipif(sys.byteorder != "little", reason="captured on a little-endian host")


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def kernel_hex(address: str) -> str:
    """Format an address the way the kernel does: 32-bit words, %08X in host byte order."""
    raw = ip(address)
    return "".join(f"{int.from_bytes(raw[i : i + 4], sys.byteorder):08X}" for i in range(0, len(raw), 4))


def line(local: str, lport: int, uid: int, *, state: int = 7, remote: str | None = None, rport: int = 0) -> str:
    remote = remote or ("0.0.0.0" if ":" not in local else "::")
    return (
        f"   5: {kernel_hex(local)}:{lport:04X} {kernel_hex(remote)}:{rport:04X} {state:02X} 00000000:00000000 "
        f"00:00000000 00000000 {uid:5d}        0 {1000 + uid} 2 0000000000000000 0"
    )


@little_endian_only
def test_captured_lines_parse_to_the_sockets_they_describe() -> None:
    assert parse_proc_net_line(UDP_LINE) == SocketEntry(ip("127.0.0.1"), 5353, bytes(4), 0, 7, 0, 517228)
    assert parse_proc_net_line(UDP6_LINE) == SocketEntry(ip("::1"), 5354, bytes(16), 0, 7, 0, 517229)
    mapped = parse_proc_net_line(TCP6_LISTEN_MAPPED)
    assert mapped is not None and mapped.local_address == ip("::ffff:127.0.0.1") and mapped.state == 0x0A
    assert parse_proc_net_line(TCP_LISTEN) == SocketEntry(bytes(4), 2024, bytes(4), 0, 0x0A, 0, 87)


def test_header_and_blank_lines_are_not_sockets() -> None:
    entries, bad = parse_proc_net(UDP_HEADER + "\n" + UDP_LINE + "\n\n")
    assert len(entries) == 1 and bad == 0
    assert parse_proc_net_line(UDP_HEADER) is None


@pytest.mark.parametrize("captured", CAPTURED)
def test_every_truncation_of_a_real_line_is_skipped_or_parsed_never_raised(captured: str) -> None:
    full = parse_proc_net_line(captured)
    assert full is not None
    for cut in range(len(captured)):
        got = parse_proc_net_line(captured[:cut])
        # A cut inside the trailing columns may still hold every field the parser needs; then it must agree.
        assert got is None or got == full


@settings(max_examples=300)
@given(st.lists(st.text(alphabet="0123456789ABCDEF: \t\x00xyz-", max_size=120), max_size=6))
def test_garbage_never_raises(lines: list[str]) -> None:
    entries, bad = parse_proc_net("\n".join(lines))
    assert len(entries) + bad <= len(lines)


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text: str) -> None:
    parse_proc_net_line(text)


def test_bad_field_shapes_are_rejected() -> None:
    good = line("10.0.0.1", 53, 7)
    assert parse_proc_net_line(good) is not None
    fields = good.split()
    for index, bad in [(1, "0100007F:14E"), (1, "0100007:14E9"), (1, "GG00007F:14E9"), (3, "7"), (7, "-1"), (7, "u")]:
        broken = list(fields)
        broken[index] = bad
        assert parse_proc_net_line(" ".join(broken)) is None, bad
    mixed = list(fields)
    mixed[2] = f"{kernel_hex('::')}:0000"  # local IPv4, remote IPv6: not a real socket
    assert parse_proc_net_line(" ".join(mixed)) is None


def write_tables(tmp_path: Path, **tables: list[str]) -> ProcNetOwnerLookup:
    for name, lines in tables.items():
        (tmp_path / name).write_text(UDP_HEADER + "\n" + "\n".join(lines) + "\n")
    return ProcNetOwnerLookup(tmp_path)


def test_exact_address_beats_wildcard_and_remote_ports_do_not_match(tmp_path: Path) -> None:
    lookup = write_tables(
        tmp_path,
        udp=[
            line("0.0.0.0", 4000, 10),
            line("10.0.0.2", 4000, 11),
            line("10.0.0.3", 5000, 12, remote="10.0.0.9", rport=4001),  # 4001 only as a remote port
        ],
    )
    assert lookup(4, IPPROTO_UDP, ip("10.0.0.2"), 4000) == 11
    assert lookup(4, IPPROTO_UDP, ip("10.0.0.7"), 4000) == 10  # wildcard-bound socket
    assert lookup(4, IPPROTO_UDP, ip("10.0.0.9"), 4001) is None
    assert lookup(4, IPPROTO_TCP, ip("10.0.0.2"), 4000) is None  # no tcp table: unreadable, not found
    stats = lookup.statistics()
    assert stats.lookups == 4 and stats.found == 2 and stats.unreadable >= 2


def test_ipv4_packets_match_dual_stack_sockets_and_time_wait_is_ignored(tmp_path: Path) -> None:
    lookup = write_tables(
        tmp_path,
        tcp=[line("10.0.0.2", 443, 0, state=0x06)],  # TIME_WAIT: listed with uid 0
        tcp6=[line("::ffff:10.0.0.2", 443, 21, state=0x01), line("::", 8080, 22, state=0x0A)],
        udp6=[line("fd00::2", 53, 23)],
    )
    assert lookup(4, IPPROTO_TCP, ip("10.0.0.2"), 443) == 21
    assert lookup(4, IPPROTO_TCP, ip("10.0.0.2"), 8080) == 22
    assert lookup(6, IPPROTO_UDP, ip("fd00::2"), 53) == 23
    assert lookup(6, IPPROTO_UDP, ip("fd00::3"), 53) is None
    assert lookup(4, 1, ip("10.0.0.2"), 0) is None  # ICMP has no socket table


def test_garbled_candidate_lines_are_counted(tmp_path: Path) -> None:
    lookup = write_tables(tmp_path, udp=[line("10.0.0.2", 4000, 5)[:40] + " :0FA0 ", line("10.0.0.2", 4000, 6)])
    assert lookup(4, IPPROTO_UDP, ip("10.0.0.2"), 4000) == 6
    assert lookup.statistics().malformed_lines == 1


def test_real_socket_is_found_in_this_namespace() -> None:
    """Oracle: the kernel's own table for a socket this test bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert ProcNetOwnerLookup()(4, IPPROTO_UDP, ip("127.0.0.1"), port) == os.getuid()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
        try:
            s6.bind(("::1", 0))
        except OSError:
            require(False, "no IPv6 loopback")  # the gate: a skip outside CI, a failure under .ci/run
        port = s6.getsockname()[1]
        assert ProcNetOwnerLookup()(6, IPPROTO_UDP, ip("::1"), port) == os.getuid()


def test_app_rules_are_validated_and_indexed_by_uid() -> None:
    rules = [AppRule("com.example.browser", uid=1001), AppRule("com.example.mail", uid=1002)]
    assert app_rules_by_uid(rules) == {1001: rules[0], 1002: rules[1]}
    with pytest.raises(ConfigError, match="needs app_rules"):
        app_rules_by_uid([])
    with pytest.raises(ConfigError, match="has no uid"):
        app_rules_by_uid([AppRule("com.example.nouid", executable_path="/usr/bin/curl")])
    with pytest.raises(ConfigError, match="both claim uid 7"):
        app_rules_by_uid([AppRule("a", uid=7), AppRule("b", uid=7)])
    with pytest.raises(ValueError, match="signing_identifier"):
        AppRule("")
    with pytest.raises(ValueError, match="uid"):
        AppRule("x", uid=-1)


def test_app_rules_cross_the_process_boundary() -> None:
    proto = TunnelProviderProtocol(
        routing_method=RoutingMethod.SOURCE_APPLICATION,
        app_rules=[AppRule("com.example.curl", uid=65534, executable_path="/usr/bin/curl")],
    )
    back = TunnelProviderProtocol.from_dict(json.loads(json.dumps(proto.to_dict())))
    assert back == proto and back.app_rules is not None
    rule = back.app_rules[0]
    assert len(rule.unique_identifier) == 20 and rule.unique_identifier == proto.app_rules[0].unique_identifier  # type: ignore[index]
    assert AppRule("a", uid=1).unique_identifier != AppRule("a", uid=2).unique_identifier
    assert AppRule("a").unique_identifier == b""
    assert TunnelProviderProtocol.from_dict(TunnelProviderProtocol().to_dict()).app_rules is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_snapshots_bound_the_table_reads(tmp_path: Path) -> None:
    clock = FakeClock()
    (tmp_path / "udp").write_text(UDP_HEADER + "\n" + line("10.0.0.2", 4000, 11) + "\n")
    lookup = ProcNetOwnerLookup(tmp_path, max_age=0.5, min_refresh=0.01, clock=clock)
    src = ip("10.0.0.2")
    assert lookup(4, IPPROTO_UDP, src, 4000) == 11
    reads = lookup.statistics().table_reads  # udp (found there: udp6 not needed)
    assert reads == 1

    # A new socket appears: a miss re-reads at once if the snapshot is old enough, not within min_refresh.
    (tmp_path / "udp").write_text(UDP_HEADER + "\n" + line("10.0.0.2", 4000, 11) + "\n" + line("10.0.0.2", 4001, 12))
    assert lookup(4, IPPROTO_UDP, src, 4001) is None  # same instant: udp6 read (unreadable), no udp re-read
    assert lookup.statistics().table_reads == 1
    clock.now += 0.02
    assert lookup(4, IPPROTO_UDP, src, 4001) == 12
    assert lookup.statistics().table_reads == 2

    # Found sockets are answered from the snapshot until it is max_age old, then re-read (the port was reused).
    (tmp_path / "udp").write_text(UDP_HEADER + "\n" + line("10.0.0.2", 4000, 21) + "\n")
    clock.now += 0.1
    assert lookup(4, IPPROTO_UDP, src, 4000) == 11
    clock.now += 0.5
    assert lookup(4, IPPROTO_UDP, src, 4000) == 21
    assert lookup.statistics().table_reads == 3
