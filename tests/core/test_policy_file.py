"""Rule files (TOML and YAML), their error messages, the route mechanism's compilation and `netsim explain`."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from click.testing import CliRunner

from netsim.core.policy import Action, Mechanism, Policy, Rule, excluded_routes_for, parse_policy
from netsim.errors import ConfigError
from netsim.runtime.policy_file import explain_command, load_policy_file

TOML = """
default = "tunnel"
mechanism = "nat"

[[rule]]
name = "printer"
action = "bypass"
dst = ["192.168.1.0/24"]

[[rule]]
name = "video"
action = "bypass"
domain = ["*.video.lab.test"]
proto = "tcp"
ports = ["443", "8000-8100"]

[[rule]]
name = "telnet"
action = "drop"
proto = ["tcp", "udp"]
ports = "23"
"""

YAML = """
default: tunnel
mechanism: nat
rule:
  - name: printer
    action: bypass
    dst: 192.168.1.0/24
  - name: video
    action: bypass
    domain: ["*.Video.Lab.Test."]
    proto: tcp
    ports: [443, "8000-8100"]
  - name: telnet
    action: drop
    proto: [tcp, udp]
    ports: 23
"""


def test_toml_and_yaml_give_the_same_policy(tmp_path: Path) -> None:
    from_toml = parse_policy(TOML)
    assert from_toml == parse_policy(YAML, fmt="yaml")
    assert from_toml.rules[1] == Rule(
        "video", Action.BYPASS, (), ("*.video.lab.test",), frozenset({6}), ((443, 443), (8000, 8100))
    )
    assert from_toml.rules[0].dst == (ipaddress.ip_network("192.168.1.0/24"),)
    (tmp_path / "p.toml").write_text(TOML)
    (tmp_path / "p.yml").write_text(YAML)
    assert load_policy_file(tmp_path / "p.toml") == load_policy_file(tmp_path / "p.yml") == from_toml
    assert parse_policy({"rule": [{"action": "drop"}]}) == Policy((Rule("rule0", Action.DROP),))


@pytest.mark.parametrize(
    ("rule", "expect"),
    [
        ({"name": "x"}, r"rule #0 'x': missing 'action'"),
        ({"name": "x", "action": "allow"}, r"rule #0 'x': action must be one of"),
        ({"name": "x", "action": "bypass", "dst": "10.0.0.1/8"}, r"rule #0 'x': dst '10.0.0.1/8' .*host bits"),
        ({"name": "x", "action": "bypass", "ports": "90-80"}, r"rule #0 'x': ports: port range '90-80'"),
        ({"name": "x", "action": "bypass", "ports": "http"}, r"rule #0 'x': ports: port 'http' must be"),
        ({"name": "x", "action": "bypass", "proto": "icmp", "ports": "1"}, r"rule #0 'x': 'ports' needs proto tcp"),
        ({"name": "x", "action": "bypass", "proto": "gre"}, r"rule #0 'x': proto: unknown protocol 'gre'"),
        ({"name": "x", "action": "bypass", "domain": "*bad*"}, r"rule #0 'x': domain '\*bad\*'"),
        (
            {"name": "x", "action": "bypass", "dport": 1},
            r"rule #0 'x': unknown field 'dport' \(did you mean 'ports'\?\)",
        ),
        ({"name": "x", "action": "bypass", "dst": {"a": 1}}, r"rule #0 'x': 'dst' must be a string or a list"),
    ],
)
def test_rule_errors_name_rule_and_field(rule: dict[str, object], expect: str) -> None:
    with pytest.raises(ConfigError, match=expect) as info:
        parse_policy({"rule": [rule]}, source="p.toml")
    assert info.value.source == "p.toml"


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name already used by rule #0"):
        parse_policy({"rule": [{"name": "a", "action": "drop"}, {"name": "a", "action": "drop"}]})
    with pytest.raises(ConfigError, match="mechanism must be 'route' or 'nat'"):
        parse_policy('mechanism = "magic"')
    with pytest.raises(ConfigError, match="unknown top-level"):
        parse_policy('defualt = "drop"')
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_policy("[[rule]\n", fmt="toml")
    with pytest.raises(ConfigError) as info:
        parse_policy("rule:\n  - name: [unclosed\n", fmt="yaml", source="p.yaml")
    assert info.value.line is not None
    with pytest.raises(ConfigError, match="extension"):
        load_policy_file(tmp_path / "p.json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy_file(tmp_path / "missing.toml")


def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_excluded_routes_for_route_mechanism() -> None:
    policy = Policy(
        (
            Rule("keep-dns", Action.TUNNEL, (_net("203.0.113.53/32"),)),
            Rule("cdn", Action.BYPASS, (_net("203.0.113.0/24"), _net("2001:db8:5::/48"))),
            Rule("printer", Action.BYPASS, (_net("192.168.1.0/24"),)),
            Rule("video", Action.BYPASS, domains=("*.video.test",)),
            Rule("web", Action.BYPASS, (_net("198.51.100.0/24"),), protos=frozenset({6}), ports=((443, 443),)),
            Rule("late", Action.BYPASS, (_net("10.0.0.0/8"),)),
        ),
        mechanism=Mechanism.ROUTE,
    )
    result = excluded_routes_for(policy)
    routes = set(result.routes)
    assert _net("192.168.1.0/24") in routes and _net("2001:db8:5::/48") in routes
    assert _net("203.0.113.53/32") not in routes
    assert not any(r.overlaps(_net("203.0.113.53/32")) for r in routes if r.version == 4)
    covered = sum(
        r.num_addresses for r in routes if isinstance(r, IPv4Network) and r.subnet_of(IPv4Network("203.0.113.0/24"))
    )
    assert covered == 255  # the /24 minus the tunnelled /32
    why = {name: text for _, name, text in result.unsupported}
    assert "stay in the tunnel" in why["cdn"]
    assert "domain" in why["video"] and "port" in why["web"] and "protocol" in why["web"]
    # "late" comes after the domain rule "video", but video is BYPASS too: it does not block the route.
    assert _net("10.0.0.0/8") in routes
    blocked = excluded_routes_for(
        Policy((Rule("vid", Action.TUNNEL, domains=("*.v.test",)), Rule("b", Action.BYPASS, (_net("10.0.0.0/8"),))))
    )
    assert blocked.routes == () and "may claim any address" in blocked.unsupported[0][2]
    everything = excluded_routes_for(Policy(default=Action.BYPASS))
    assert everything.unsupported[0][1] == "default"


def test_explain_cli(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(TOML)
    runner = CliRunner()
    out = runner.invoke(
        explain_command,
        ["--policy", str(path), "--dst", "198.51.100.7", "--proto", "tcp", "--dport", "8050"],
    )
    assert out.exit_code == 0 and out.output.startswith("TUNNEL: no rule matched")
    out = runner.invoke(
        explain_command,
        [
            "--policy",
            str(path),
            "--dst",
            "198.51.100.7",
            "--dport",
            "8050",
            "--bind",
            "a.video.lab.test=198.51.100.7",
            "--routes",
        ],
    )
    assert out.exit_code == 0, out.output
    assert out.output.startswith("BYPASS: rule #1 'video'") and "counter: policy_bypass:video" in out.output
    assert "(DNS: a.video.lab.test -> 198.51.100.7)" in out.output
    assert "excluded routes: 192.168.1.0/24" in out.output
    bad = runner.invoke(explain_command, ["--policy", str(path), "--dst", "not-an-ip"])
    assert bad.exit_code != 0 and "--dst 'not-an-ip'" in bad.output


def test_scenario_policy_equals_examples_policy_file() -> None:
    from pathlib import Path

    from netsim.core.policy import parse_policy
    from netsim.lab.scenarios import BYPASS_POLICY_TOML

    example = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"
    assert parse_policy(BYPASS_POLICY_TOML, fmt="toml") == parse_policy(example.read_text(), fmt="toml")
