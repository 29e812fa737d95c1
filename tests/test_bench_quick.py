"""Keeps the benchmark suite working: ``netsim bench --quick`` on a tiny case, and the pieces it relies on.

No timing assertions: only that cases run, report what they claim (medians of >= 5 runs, machine details), and
that the loops being compared do the same job (the C floor and the naive loop reflect packets exactly as
netsim's loop does, checked against scapy).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from netsim.bench.bench_e2e import build_tools
from netsim.bench.bench_loop import reflect
from netsim.bench.bench_micro import udp4_packet
from netsim.bench.naive_loop import _swap, careful_swap
from netsim.bench.runner import selector
from netsim.benchcli import bench_command
from netsim.core import ipc
from netsim.testing.require import require_binary, require_root, require_tun


def test_bench_quick_tiny_case_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    md = tmp_path / "report.md"
    png = tmp_path / "report.png"
    argv = ["--quick", "--only", "micro/ipc-encode/64", "--json", str(out), "--markdown", str(md), "--plot", str(png)]
    result = CliRunner().invoke(bench_command, argv)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {"python", "kernel", "cpu_model", "cpu_count", "load_average"} <= doc["machine"].keys()
    [rec] = doc["results"]
    assert rec["case"] == "micro/ipc-encode/64" and rec["group"] == "micro"
    assert rec["reps"] >= 5
    assert 0 < rec["ns_min"] <= rec["ns_median"] <= rec["ns_max"]
    assert rec["params"]["alloc_bytes_per_pkt"] >= 0
    assert doc["skipped"] == [] and doc["quick"] is True
    assert "micro/ipc-encode 64B" in md.read_text()
    assert "micro/ipc-encode 64B" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_where_every_selected_case_is_skipped_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(bench_command, ["--quick", "--only", "micro/tun-read/64"])
    assert result.exit_code == 1
    assert "skipped micro/tun-read/64: needs root" in result.output
    assert "no benchmark case ran (each selected case was skipped; the reasons are above)" in result.output


def test_selector_globs_substrings_and_alternatives() -> None:
    sel = selector("micro/*,e2e/c-floor/*")
    assert sel("micro/uds/64") and sel("e2e/c-floor/udp64")
    assert not sel("loop/uds/b64") and not sel("e2e/naive/udp64")
    assert selector("uds")("loop/uds/b64") and selector(None)("anything")


addresses4 = st.tuples(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
ports = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(addresses4, ports, ports, st.integers(28, 1400))
def test_reflect_swaps_addresses_and_ports_and_keeps_checksums_valid(
    addrs: tuple[bytes, bytes], sport: int, dport: int, size: int
) -> None:
    src, dst = socket.inet_ntoa(addrs[0]), socket.inet_ntoa(addrs[1])
    raw = bytearray(bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / bytes(size - 28)))
    reflect(memoryview(raw))
    got = IP(bytes(raw))
    assert (got.src, got.dst) == (dst, src)
    assert (got[UDP].sport, got[UDP].dport) == (dport, sport)
    rebuilt = IP(bytes(raw))
    del rebuilt.chksum
    del rebuilt[UDP].chksum
    assert bytes(rebuilt) == bytes(raw)  # scapy recomputes the same checksums: the swap is checksum-neutral


def test_naive_and_netsim_reflect_produce_the_same_packet() -> None:
    for pkt in (
        bytes(IP(src="10.77.0.2", dst="10.77.0.9", id=7) / UDP(sport=40000, dport=9) / (b"x" * 36)),
        bytes(IPv6(src="fd00::2", dst="fd00::9") / UDP(sport=40000, dport=9) / (b"y" * 20)),
    ):
        ours = bytearray(pkt)
        reflect(memoryview(ours))
        assert bytes(ours) == _swap(pkt)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.sampled_from([4, 6]), st.sampled_from([6, 17, 1]))
def test_the_careful_loop_swaps_exactly_as_netsim_reflect_does(tail: bytes, version: int, proto: int) -> None:
    """``naive-careful`` does the reflectors' job byte for byte, at an offset in its reused buffer, also on
    packets too short for their headers (left alone by both)."""
    if version == 4:
        pkt = bytes(IP(src="10.76.0.2", dst="10.76.0.9", proto=proto)) + tail
    else:
        pkt = bytes(IPv6(src="fd00::2", dst="fd00::9", nh=proto)) + tail
    for raw in (pkt, pkt[: len(tail) % 45]):
        if not raw:
            continue
        ours = bytearray(raw)
        reflect(memoryview(ours))
        buf = bytearray(b"\xee\xee" + raw + b"\xff" * 8)
        careful_swap(buf, 2, len(raw))
        assert bytes(buf) == b"\xee\xee" + bytes(ours) + b"\xff" * 8


def test_c_floor_helper_speaks_the_netsim_frame_format_and_reflects(tmp_path: Path) -> None:
    require_binary("cc")
    tools = build_tools()
    path = tmp_path / "floor.sock"
    proc = subprocess.Popen([str(tools["floor"]), "helper", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("READY")
        prov = ipc.Connection(ipc.Role.PROVIDER)
        helper = ipc.Connection(ipc.Role.HELPER)  # only to open the provider's state machine
        helper.receive_data(b"".join(map(bytes, prov.send(prov.hello()))))
        helper.next_event()
        prov.receive_data(b"".join(map(bytes, helper.send(helper.hello_ack()))))
        prov.next_event()
        packets = [udp4_packet(bytes([10, 77, 0, 2]), bytes([10, 77, 0, 9]), 40000 + i, 9, 28 + i) for i in range(33)]
        packets.append(bytes(IPv6(src="fd00::2", dst="fd00::9") / UDP(sport=1, dport=2) / b"z"))
        frame = b"".join(map(bytes, prov.send_packets(packets, [ipc.AF_INET] * 33 + [ipc.AF_INET6])))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(frame)
            got = b""
            while len(got) < len(frame):
                chunk = s.recv(65536)
                assert chunk, "C helper closed early"
                got += chunk
        assert len(got) == len(frame)
        prov.receive_data(got)
        batch = prov.next_event()
        assert isinstance(batch, ipc.PacketBatch)
        expected = []
        for p in packets:
            b = bytearray(p)
            reflect(memoryview(b))
            expected.append(bytes(b))
        assert batch.copy_packets() == expected
        assert batch.families == (ipc.AF_INET,) * 33 + (ipc.AF_INET6,)
    finally:
        proc.terminate()
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_without_root_lab_and_tun_cases_are_reported_skipped_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from netsim.bench import bench_e2e, runner

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    e2e = bench_e2e.run_e2e(quick=True, only="e2e/direct/udp64,e2e/c-floor/*")
    assert e2e["results"] == []
    assert {s["name"] for s in e2e["skipped"]} == {"e2e/direct/*", "e2e/c-floor/*"}
    assert all("needs root" in s["reason"] for s in e2e["skipped"])
    doc = runner.run_bench(quick=True, only="micro/tun-read/64", log=lambda line: None)
    assert doc["results"] == []
    assert doc["skipped"] == [
        {"name": "micro/tun-read/64", "reason": "needs root (a TUN device in a private namespace)"}
    ]


@pytest.mark.lab
@pytest.mark.tun
@pytest.mark.slow
def test_bench_e2e_paths_carry_traffic() -> None:
    """The end-to-end harness still drives every loop path and netsim's real stack (functional, not timing)."""
    require_root()
    require_tun()
    require_binary("cc", "ip", "nft", "iperf3", "wireguard-go", "wg", "ping")
    from netsim.bench import bench_e2e

    cases = ["e2e/c-floor/udp64", "e2e/netsim-loop/udp64", "e2e/naive/udp64", "e2e/naive-careful/udp64"]
    cases += ["e2e/netsim/udp64", "e2e/netsim-nogso/udp64"]
    out = bench_e2e.run_e2e(quick=True, only=",".join(cases))
    assert out["skipped"] == []
    by_name = {r["name"]: r for r in out["results"]}
    assert sorted(by_name) == sorted(cases)
    assert by_name["e2e/netsim-nogso/udp64"]["lever_env"] == {"NETSIM_UDP_GSO": "0"}  # what the report names
    assert "lever_env" not in by_name["e2e/netsim/udp64"]
    for r in by_name.values():
        assert r["reps"] >= 5
        assert all(run["received"] > 0 for run in r["runs"]), r["runs"]
        assert r["cpu_s_per_packet"]["provider"] > 0 and r["cpu_s_per_packet"]["helper"] >= 0


def test_profile_summary_counts_self_and_inclusive_samples() -> None:
    from netsim.bench.profile_e2e import summarize

    raw = (
        "main (a.py:1);loop (a.py:5);write (tun.py:9) 30\n"
        "main (a.py:1);loop (a.py:5);read (tun.py:3) 10\n"
        "main (a.py:1);wait (io.py:2) 60\n"
    )
    text = summarize(raw)
    assert "100 samples" in text
    assert " 60.0%  wait (io.py)" in text and " 30.0%  write (tun.py)" in text
    assert " 40.0%  loop (a.py)" in text and "100.0%  main (a.py)" in text
