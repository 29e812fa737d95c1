"""The leak matrix model: verdicts against Apple's semantics, the expect file, the state list (unit, no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsim.core.leakmodel import (
    PROBES,
    Evidence,
    LeakConfig,
    State,
    Verdict,
    blind_probes,
    classify,
    parse_expectation,
    parse_states,
)
from netsim.errors import ConfigError

P = {p.name: p for p in PROBES}
IAN = LeakConfig(include_all_networks=True)
OFF = LeakConfig()
SEEN = Evidence(physical=2, physical_dsts=frozenset({"203.0.113.10"}))
TUN = Evidence(tunnel=3)


def verdict(state: State, probe: str, config: LeakConfig, ev: Evidence, **kw: object) -> Verdict:
    return classify(state, P[probe], config, ev, **kw).verdict  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "state", [State.CONNECTING, State.REASSERTING_HELPER, State.REASSERTING_LINK, State.AFTER_CRASH]
)
def test_ian_fails_closed_while_the_tunnel_is_down(state: State) -> None:
    assert verdict(state, "tcp4_inet", IAN, SEEN) is Verdict.LEAKED
    assert verdict(state, "tcp4_inet", IAN, Evidence()) is Verdict.BLOCKED
    assert verdict(state, "tcp4_inet", OFF, SEEN) is Verdict.ALLOWED  # without IAN: direct while down


def test_connected_tunnel_routes_and_lan() -> None:
    assert verdict(State.CONNECTED, "udp4_inet", OFF, TUN) is Verdict.TUNNELLED
    assert verdict(State.CONNECTED, "udp4_inet", OFF, SEEN) is Verdict.LEAKED
    assert verdict(State.CONNECTED, "tcp4_lan", OFF, SEEN) is Verdict.ALLOWED
    assert verdict(State.CONNECTED, "tcp4_lan", IAN, SEEN) is Verdict.LEAKED
    local = LeakConfig(include_all_networks=True, exclude_local_networks=True)
    assert verdict(State.CONNECTED, "tcp4_lan", local, SEEN) is Verdict.ALLOWED
    assert verdict(State.AFTER_CRASH, "dns_isp", local, SEEN) is Verdict.ALLOWED


def test_enforce_routes_claims_the_lan_unless_local_networks_are_excluded() -> None:
    enforce = LeakConfig(enforce_routes=True)
    assert verdict(State.CONNECTED, "tcp4_lan", enforce, SEEN) is Verdict.LEAKED
    assert verdict(State.CONNECTED, "dns_isp", enforce, SEEN) is Verdict.LEAKED
    both = LeakConfig(enforce_routes=True, exclude_local_networks=True)
    assert verdict(State.CONNECTED, "tcp4_lan", both, SEEN) is Verdict.ALLOWED
    # excludeLocalNetworks alone changes nothing (it needs includeAllNetworks or enforceRoutes, R43)
    assert verdict(State.CONNECTED, "tcp4_lan", LeakConfig(exclude_local_networks=True), SEEN) is Verdict.ALLOWED


def test_ipv6_with_a_v4_only_tunnel() -> None:
    v4only = LeakConfig(tunnel_ipv6=False)
    assert verdict(State.CONNECTED, "tcp6_inet", v4only, SEEN) is Verdict.ALLOWED
    assert (
        verdict(State.CONNECTED, "tcp6_inet", LeakConfig(include_all_networks=True, tunnel_ipv6=False), SEEN)
        is Verdict.LEAKED
    )
    assert verdict(State.CONNECTED, "tcp6_inet", OFF, SEEN) is Verdict.LEAKED


def test_cve_2019_14899_is_always_a_leak_but_its_control() -> None:
    for state in State:
        want = Verdict.ALLOWED if state is State.BEFORE_START else Verdict.LEAKED
        assert verdict(state, "cve_2019_14899", OFF, SEEN) is want
        assert verdict(state, "cve_2019_14899", IAN, SEEN) is want


def test_system_dns_after_the_tunnel_must_use_the_system_resolver() -> None:
    stale = Evidence(physical=1, physical_dsts=frozenset({"203.0.113.53"}))
    restored = Evidence(physical=1, physical_dsts=frozenset({"192.168.1.1"}))
    kw = {"system_resolvers": ("192.168.1.1",)}
    for state in (State.AFTER_CRASH, State.AFTER_STOP, State.DISABLED):
        assert verdict(state, "dns_system", OFF, stale, **kw) is Verdict.LEAKED
        assert verdict(state, "dns_system", OFF, restored, **kw) is Verdict.ALLOWED


def test_kept_connection() -> None:
    assert verdict(State.CONNECTED, "tcp_kept", OFF, SEEN) is Verdict.ALLOWED
    assert verdict(State.CONNECTED, "tcp_kept", IAN, SEEN) is Verdict.LEAKED
    assert verdict(State.REASSERTING_SERVER, "tcp_kept", IAN, SEEN) is Verdict.LEAKED


def test_every_cell_has_a_reason_and_apple_flag() -> None:
    for state in State:
        for probe in PROBES:
            for config in (IAN, OFF):
                cell = classify(state, probe, config, Evidence())
                assert cell.reason and isinstance(cell.apple_allows, bool)
                assert cell.to_json()["verdict"] == "blocked"


def test_blind_probes() -> None:
    assert blind_probes({"tcp4_inet": SEEN, "udp4_inet": Evidence()}) == ("udp4_inet",)


def test_expect_allow_and_verdicts_toml_and_json() -> None:
    e = parse_expectation(
        'allow = ["connected:udp4_*"]\n[verdicts]\n"connected:tcp4_inet" = "tunnelled"\n', source="x.toml"
    )
    assert verdict(State.CONNECTED, "udp4_inet", OFF, SEEN, expect=e) is Verdict.ALLOWED
    cell = classify(State.CONNECTED, P["tcp4_inet"], OFF, Evidence(), expect=e)
    assert cell.verdict is Verdict.BLOCKED and cell.unexpected
    assert not classify(State.CONNECTED, P["tcp4_inet"], OFF, TUN, expect=e).unexpected
    j = parse_expectation('{"allow": ["*:dns_isp"]}', source="x.json")
    assert j.allows("after_crash:dns_isp") and not j.allows("after_crash:dns_tunnel")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("allow = 3", "'allow'"),
        ('allow = ["connected"]', "STATE:PROBE"),
        ('allow = ["nosuch:*"]', "no state"),
        ('allow = ["*:nosuch"]', "no probe"),
        ('[verdicts]\n"*:tcp4_inet" = "fine"', "not one of"),
        ("bogus = 1", "unknown key"),
        ("allow = [", "not valid TOML"),
        ("x" * 70000, "limit"),
    ],
)
def test_bad_expect_files_name_file_and_field(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"e\.toml") as info:
        parse_expectation(text, source="e.toml")
    assert needle in str(info.value)


def test_bad_json_expect() -> None:
    with pytest.raises(ConfigError, match=r"e\.json: not valid JSON"):
        parse_expectation("{", source="e.json")
    with pytest.raises(ConfigError, match="top level"):
        parse_expectation("[]", source="e.json")


def test_parse_states() -> None:
    assert parse_states("after_crash,connected") == (State.BEFORE_START, State.CONNECTED, State.AFTER_CRASH)
    assert parse_states(None) == tuple(State)
    with pytest.raises(ConfigError, match="unknown state 'nope'"):
        parse_states("nope")


# ------------------------------------------------------------------ capture matching (netsim.testing.leaks)
def _frame(sport: int, dport: int, payload: bytes) -> bytes:
    import struct

    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 1000, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, bytes([192, 168, 1, 10]), bytes([203, 0, 113, 10])
    )
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp


def test_pcap_round_trip_and_matching(tmp_path: Path) -> None:
    from netsim.testing.leakprobes import KEPT_PORT, probe_specs
    from netsim.testing.leaks import Frame, match_frames, read_frames, write_frames

    specs = {s.name: s for s in probe_specs("abc123", State.CONNECTED)}
    tcp, kept = specs["tcp4_inet"], specs["tcp_kept"]
    raws = [_frame(tcp.sport, 80, b""), _frame(tcp.sport + 1, 80, b""), _frame(KEPT_PORT, 80, kept.marker.encode())]
    frames = [Frame(i, 1.5 + i, r, 1) for i, r in enumerate(raws)]
    path = write_frames(tmp_path / "x.pcap", 1, frames)
    linktype, back = read_frames(path)
    assert linktype == 1 and [f.raw for f in back] == raws
    assert back[0].src == "192.168.1.10" and back[0].dst == "203.0.113.10" and back[0].sport == tcp.sport
    assert [f.index for f in match_frames(tcp, back)] == [0]
    assert [f.index for f in match_frames(kept, back)] == [2]
    # a truncated last record (a capture still being written) is ignored, garbage is refused
    path.write_bytes(path.read_bytes()[:-5])
    assert len(read_frames(path)[1]) == 2
    path.write_bytes(b"not a pcap at all, not at all")
    with pytest.raises(ConfigError, match="not a pcap"):
        read_frames(path)


def test_markers_and_ports_are_unique_per_state_and_probe() -> None:
    from netsim.testing.leakprobes import probe_specs

    specs = [s for state in State for s in probe_specs("abc123", state)]
    assert len({s.marker for s in specs}) == len(specs)
    ports = [s.sport for s in specs if s.kind != "kept"]
    assert len(set(ports)) == len(ports)
    assert all(s.marker.isascii() and s.marker.isalnum() and len(s.marker) < 64 for s in specs)  # a DNS label


def test_judge_counts_the_kept_connection_only_inside_its_state_window(tmp_path: Path) -> None:
    """Regression: a retransmission of the kept connection's bytes after its state (same marker) was counted as
    physical evidence but cut out of the cell's pcap, and judging crashed (StopIteration)."""
    from types import SimpleNamespace

    from netsim.lab.addressing import ADDR
    from netsim.testing.leakprobes import KEPT_PORT, Targets, probe_specs
    from netsim.testing.leaks import Frame, _judge, _Run, write_frames

    run = _Run(SimpleNamespace(addr=ADDR), "abc123", Targets(), tmp_path / "m")
    for state in (State.BEFORE_START, State.CONNECTED):
        run.specs[state] = probe_specs("abc123", state)
    run.windows[State.CONNECTED] = (100.0, 101.0)
    kept = next(s for s in run.specs[State.CONNECTED] if s.kind == "kept")
    late = Frame(0, 200.0, _frame(KEPT_PORT, 80, kept.marker.encode()), 1)  # retransmitted 99 s later
    write_frames(tmp_path / "mac-en0.pcap", 1, [late])
    config = LeakConfig(include_all_networks=True)
    report = _judge(run, (State.BEFORE_START, State.CONNECTED), config, None, tmp_path)
    assert report.cell(State.CONNECTED, "tcp_kept").verdict is Verdict.BLOCKED
    write_frames(tmp_path / "mac-en0.pcap", 1, [Frame(0, 100.5, late.raw, 1)])  # sent during the state: a leak
    report = _judge(run, (State.BEFORE_START, State.CONNECTED), config, None, tmp_path)
    assert report.cell(State.CONNECTED, "tcp_kept").verdict is Verdict.LEAKED
    assert report.leaked_pcaps["connected:tcp_kept"].exists()
    assert report.exit_status == 1 and "tcp_kept" in report.blind  # before_start saw nothing here: blind
    table = report.table()
    assert "LEAK connected:tcp_kept: 1 packet(s) to 203.0.113.10" in table and "BLIND" in table
    data = report.to_json()
    assert data["leaked"] == ["connected:tcp_kept"] and data["exit_status"] == 1
    assert data["windows"]["connected"] == [100.0, 101.0]
