"""`parse_policy` on hostile input: whatever arrives (a POLICY_UPDATE is untrusted IPC bytes), only `ConfigError`.

The property tests generate arbitrary YAML and TOML documents (any shape: non-string keys, dates, floats, huge
integers, nesting), policy-shaped documents whose fields hold arbitrary values, and raw bytes. The safety net in
`parse_policy` turns any other exception into a ConfigError saying "unexpected parser failure"; the tests fail on
that message too, so the net can never hide a parser bug from them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netsim.core.policy import (
    MAX_POLICY_BYTES,
    MAX_POLICY_DEPTH,
    Policy,
    parse_policy,
)
from netsim.errors import ConfigError

pytestmark = pytest.mark.reliability("S11")


def only_config_error(doc: Any, **kw: Any) -> Policy | None:
    """Parse ``doc``; return the Policy or None on ConfigError. Anything else (or the safety net) fails."""
    try:
        return parse_policy(doc, **kw)
    except ConfigError as exc:
        assert "unexpected parser failure" not in str(exc), str(exc)
        return None


# --- strategies ---------------------------------------------------------------------------------------------------
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["tcp", "udp", "icmp", "any", "²", "٣", "443", "1-2", "8000-8100", "192.0.2.0/24", "::/0"]),
    st.dates(),
    st.datetimes(),
)
keys = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["default", "mechanism", "rule", "rules", "name", "action", "dst", "domain", "proto", "ports"]),
    st.integers(),
    st.booleans(),
    st.dates(),
    st.none(),
    st.floats(allow_nan=False),
)
documents = st.recursive(
    leaves,
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.dictionaries(keys, kids, max_size=5)),
    max_leaves=40,
)
rule_values = st.one_of(
    leaves,
    st.sampled_from(["tunnel", "bypass", "drop", "TUNNEL", " drop "]),
    st.lists(leaves, max_size=4),
    documents,
)
rules = st.dictionaries(
    st.sampled_from(["name", "action", "dst", "domain", "proto", "ports", "dport", 7]), rule_values, max_size=6
)
policies = st.fixed_dictionaries(
    {},
    optional={
        "default": rule_values,
        "mechanism": st.one_of(st.sampled_from(["nat", "route", "NAT"]), rule_values),
        "rule": st.one_of(st.lists(rules, max_size=4), rule_values),
    },
)


def yaml_text(doc: Any) -> str:
    return yaml.safe_dump(doc, allow_unicode=True)


def _toml_key(key: Any) -> str:
    return json.dumps(str(key))  # a TOML basic string is a JSON string (with \uXXXX escapes)


def _toml_value(v: Any) -> str:
    """Render a value as TOML (inline tables and arrays); None, which TOML lacks, becomes an empty table."""
    if v is None:
        return "{}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, dt.datetime | dt.date):
        return v.isoformat()
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def toml_text(doc: Any) -> str:
    if not isinstance(doc, dict):
        return f"x = {_toml_value(doc)}\n"
    lines = []
    for k, v in doc.items():
        if k == "rule" and isinstance(v, list) and all(isinstance(r, dict) for r in v):
            for r in v:
                lines.append("[[rule]]")
                lines += [f"{_toml_key(rk)} = {_toml_value(rv)}" for rk, rv in r.items()]
            continue
        lines.insert(0, f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


# --- properties ---------------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(documents, policies))
def test_any_yaml_document_raises_only_config_error(doc: Any) -> None:
    text = yaml_text(doc)
    only_config_error(text, fmt="yaml")
    only_config_error(text)
    only_config_error(text.encode())
    if isinstance(doc, dict):
        only_config_error(doc)  # the already-decoded mapping path too


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(documents, policies))
def test_any_toml_document_raises_only_config_error(doc: Any) -> None:
    text = toml_text(doc)
    only_config_error(text, fmt="toml")
    only_config_error(text)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_raise_only_config_error(data: bytes) -> None:
    only_config_error(data)
    only_config_error(data, fmt="toml")
    only_config_error(data, fmt="yaml")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="[]{}:-,=\"'\n *&!|>%#.01aZ\t", max_size=60))
def test_syntax_soup_raises_only_config_error(text: str) -> None:
    only_config_error(text)
    only_config_error(text, fmt="yaml")


def test_valid_documents_still_parse() -> None:
    """Positive control: the generators' renderings of a real policy parse to the same Policy."""
    doc = {"default": "tunnel", "mechanism": "nat", "rule": [{"name": "p", "action": "bypass", "dst": "192.0.2.0/24"}]}
    a = only_config_error(yaml_text(doc), fmt="yaml")
    b = only_config_error(toml_text(doc), fmt="toml")
    assert a is not None and a == b and a.rules[0].name == "p"


# --- the attacks, one by one (each crashed the helper before the fix) --------------------------------------------
HOSTILE = {
    "yaml int key": "1: tunnel\n",
    "yaml mixed keys": "default: tunnel\n1: x\n",
    "yaml date key": "2026-01-01: tunnel\nfoo: bar\n",
    "yaml rule int key": "rule:\n  - {action: drop, 7: x, 8: y}\n",
    "yaml null key": "~: x\nrule: []\n",
    "yaml deep list": "[" * 5000 + "]" * 5000,
    "yaml deep map": "a: " + "{a: " * 3000 + "1" + "}" * 3000,
    "toml deep array": "a = " + "[" * 5000 + "]" * 5000,
    "toml deep inline table": "a = " + "{a = " * 3000 + "1" + "}" * 3000,
    "yaml huge int": "rule:\n  - {action: drop, dst: 1" + "0" * 5000 + "}\n",
    "toml huge int": "x = 1" + "0" * 5000 + "\n",
    "unicode digit proto": "rule:\n  - {action: drop, proto: '²'}\n",
    # 9**6 leaves behind six anchors (kept small: on the unfixed parser it became a 2.6 MB error message)
    "yaml billion laughs": "default: [&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(5))
    + "]\n",
    "yaml python tag": "!!python/object/apply:os.system ['true']\n",
    "yaml bad timestamp": "default: 2026-13-45\n",
}


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_documents_raise_config_error(text: str) -> None:
    for fmt in (None, "yaml", "toml"):
        for doc in (text, text.encode()):
            with pytest.raises(ConfigError) as info:
                parse_policy(doc, fmt=fmt)
            message = str(info.value)
            assert "unexpected parser failure" not in message
            assert len(message) < 1000  # bounded: an error message must not carry the document back


def test_limits() -> None:
    with pytest.raises(ConfigError, match="limit"):
        parse_policy(b"#" * (MAX_POLICY_BYTES + 1))
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_policy(b"default = '\xff'")
    nested: Any = "tunnel"
    for _ in range(MAX_POLICY_DEPTH + 1):
        nested = [nested]
    with pytest.raises(ConfigError, match="nested"):
        parse_policy({"default": nested})
    cyclic: dict[str, Any] = {"rule": []}
    cyclic["rule"].append(cyclic)
    with pytest.raises(ConfigError):
        parse_policy(cyclic)
    with pytest.raises(ConfigError, match="aliases"):
        parse_policy("a: &x tunnel\ndefault: *x\n", fmt="yaml")
    with pytest.raises(ConfigError, match="TOML/YAML text or a mapping"):
        parse_policy(42)  # type: ignore[arg-type]
