"""Unknown keys in a policy document are errors with a did-you-mean (issue 13: `[[rules]]` was accepted)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from netsim.core.policy import parse_policy
from netsim.errors import ConfigError
from netsim.runtime.policy_file import explain_command

RULES_TYPO = """
default = "tunnel"

[[rules]]
name = "printer"
action = "bypass"
dst = "192.168.1.0/24"
"""

BOTH = """
[[rule]]
name = "a"
action = "drop"
dst = "10.0.0.0/8"

[[rules]]
name = "b"
action = "bypass"
dst = "192.168.1.0/24"
"""


@pytest.mark.parametrize("text", [RULES_TYPO, BOTH])
def test_rules_plural_is_an_error_with_did_you_mean(text: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown top-level field 'rules'.*did you mean 'rule'") as info:
        parse_policy(text, fmt="toml", source="p.toml")
    assert info.value.source == "p.toml"


def test_rules_plural_in_yaml_and_mapping() -> None:
    with pytest.raises(ConfigError, match="did you mean 'rule'"):
        parse_policy("rules:\n  - action: drop\n", fmt="yaml")
    with pytest.raises(ConfigError, match="did you mean 'rule'"):
        parse_policy({"rules": []})


@pytest.mark.parametrize(
    ("doc", "expect"),
    [
        ({"defualt": "drop"}, r"unknown top-level field 'defualt'.*did you mean 'default'"),
        ({"mechansim": "nat"}, r"'mechansim'.*did you mean 'mechanism'"),
        ({"rule": [{"action": "drop", "port": "23"}]}, r"rule #0 'rule0': unknown field 'port'.*did you mean 'ports'"),
        ({"rule": [{"action": "drop", "domains": "a.test"}]}, r"unknown field 'domains'.*did you mean 'domain'"),
        ({"rule": [{"action": "drop", "zzz": 1}]}, r"unknown field 'zzz'; allowed: action, domain, dst"),
    ],
)
def test_unknown_keys_at_every_level(doc: dict[str, object], expect: str) -> None:
    with pytest.raises(ConfigError, match=expect):
        parse_policy(doc)


def test_explain_refuses_rules_plural(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(BOTH)
    out = CliRunner().invoke(explain_command, ["--policy", str(path), "--dst", "192.168.1.5"])
    assert out.exit_code != 0
    assert "did you mean 'rule'" in out.output


def test_helper_policy_update_refuses_rules_plural() -> None:
    # The helper parses POLICY_UPDATE payloads (untrusted bytes) with the same parse_policy.
    with pytest.raises(ConfigError, match="did you mean 'rule'"):
        parse_policy(BOTH.encode(), source="POLICY_UPDATE 1")
