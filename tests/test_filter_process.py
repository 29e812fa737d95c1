"""`netsim.lab.filter` without a lab: the rules it writes, what it refuses, the provider loader, and counters read
from another process defensively (the lab behaviour is tests/lab/test_filter_packet_lab.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from netsim.errors import LabError
from netsim.lab.filter import FilterProcessStatistics, PacketFilter, filter_rules, load_filter_provider_class, main
from netsim.runtime.filter import FilterStatistics


def test_rules_queue_both_directions_of_each_interface_and_remove_only_their_own() -> None:
    install, remove = filter_rules("netsim-ab-pf123456", ["en0", "en1"], queue=4242, fail_open=False)
    assert install.splitlines() == [
        "*mangle",
        ":netsim-ab-pf123456 - [0:0]",
        "-A netsim-ab-pf123456 -j NFQUEUE --queue-num 4242",
        "-I PREROUTING -i en0 -j netsim-ab-pf123456",
        "-I POSTROUTING -o en0 -j netsim-ab-pf123456",
        "-I PREROUTING -i en1 -j netsim-ab-pf123456",
        "-I POSTROUTING -o en1 -j netsim-ab-pf123456",
        "COMMIT",
    ]
    assert all("netsim-ab-pf123456" in line for line in remove.splitlines()[1:-1])
    assert "-X netsim-ab-pf123456" in remove and "-F netsim-ab-pf123456" in remove
    opened, _ = filter_rules("netsim-ab-pf123456", ["en0"], queue=7, fail_open=True)
    assert "-j NFQUEUE --queue-num 7 --queue-bypass" in opened  # fail open: no process bound -> accept


def test_refuses_what_is_not_a_lab_namespace_or_a_sane_argument() -> None:
    spec = "netsim.examples.packet_filter:DropHostFilter"
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: PacketFilter("default", spec), "refusing"),
        (lambda: PacketFilter("netsim-ab-mac", spec, interfaces=["en0; reboot"]), "interface"),
        (lambda: PacketFilter("netsim-ab-mac", spec, interfaces=[]), "interface"),
        (lambda: PacketFilter("netsim-ab-mac", "os:system; x"), "must look like"),
        (lambda: PacketFilter("netsim-ab-mac", spec, maxlen=0), "maxlen"),
        (lambda: PacketFilter("netsim-ab-mac", spec, max_duration=7200), "max_duration"),
    ]
    for call, match in cases:
        with pytest.raises(LabError, match=match):
            call()


def test_the_process_checks_what_reaches_its_rules(tmp_path: Path) -> None:
    base = ["--provider", "a.b:C", "--stats", str(tmp_path / "s"), "--log", str(tmp_path / "l")]
    for bad in (
        ["--interfaces", "en0", "--chain", "netsim-ab-pf123456; x"],
        ["--interfaces", "en0 -j ACCEPT", "--chain", "netsim-ab-pf123456"],
        ["--interfaces", "en0", "--chain", "netsim-ab-pf123456", "--maxlen", "0"],
        ["--interfaces", "en0", "--chain", "netsim-ab-pf123456", "--config", "[1]"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(base + bad)
        assert exc.value.code == 2


def test_the_loader_takes_a_filter_provider_and_nothing_else(tmp_path: Path) -> None:
    cls = load_filter_provider_class("netsim.examples.packet_filter:DropHostFilter")
    assert cls.__name__ == "DropHostFilter"
    with pytest.raises(LabError, match="not a FilterPacketProvider"):
        load_filter_provider_class("netsim.runtime.provider:PacketTunnelProvider")
    (tmp_path / "my_filter_mod.py").write_text(
        "from netsim.apple import FilterPacketProvider\nclass Mine(FilterPacketProvider):\n    pass\n"
    )
    assert load_filter_provider_class(f"{tmp_path}/my_filter_mod.py:Mine").__name__ == "Mine"


def test_counters_from_the_process_are_read_defensively() -> None:
    good = '{"filter": {"seen": 2, "allowed": 1, "dropped": 1}, "kernel_dropped": 3, "running": true}'
    assert FilterProcessStatistics.from_json_untrusted(good) == FilterProcessStatistics(
        FilterStatistics(seen=2, allowed=1, dropped=1), 3, True
    )
    for bad in ("", "[]", '{"kernel_dropped": -1, "filter": 5, "running": 1}', "{"):
        assert FilterProcessStatistics.from_json_untrusted(bad) == FilterProcessStatistics()
