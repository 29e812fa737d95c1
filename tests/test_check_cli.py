"""`netsim check leaks`: option parsing and validation (no root needed), and the root gate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from netsim.checkcli import parse_protocol_options
from netsim.cli import main
from netsim.errors import ConfigError


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["check", "leaks", *args])
    return r.exit_code, r.output


def test_help_lists_the_options() -> None:
    code, out = run("--help")
    assert code == 0
    for opt in ("--provider", "--include-all-networks", "--expect", "--json", "--pcap-dir", "--states", "--protocol"):
        assert opt in out


def test_protocol_flags_and_pairs() -> None:
    fields = parse_protocol_options({"include_all_networks": True}, ("exclude_local_networks=true",))
    assert fields["include_all_networks"] is True and fields["exclude_local_networks"] is True
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_protocol_options({}, ("include_all_networks",))
    with pytest.raises(ConfigError, match="contradicts"):
        parse_protocol_options({"include_all_networks": True}, ("include_all_networks=false",))
    with pytest.raises(ConfigError):
        parse_protocol_options({}, ("no_such_field=1",))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--protocol", "bogus_field=1"), "bogus_field"),
        (("--states", "nope"), "unknown state"),
        (("--provider-configuration", "{"), "not JSON"),
        (("--provider-configuration", "[1]"), "JSON object"),
    ],
)
def test_bad_options_exit_2_before_any_lab(args: tuple[str, ...], needle: str) -> None:
    code, out = run(*args)
    assert code == 2 and needle in out


def test_bad_expect_file(tmp_path: Path) -> None:
    bad = tmp_path / "e.toml"
    bad.write_text('allow = ["nosuch:*"]\n')
    code, out = run("--expect", str(bad))
    assert code == 2 and "e.toml" in out and "no state" in out


def test_without_root_a_privilege_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, out = run("--states", "connected")
    assert code == 2 and "needs root" in out and "sudo" in out
