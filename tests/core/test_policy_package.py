"""The policy package's shape (issue 12): the public names, and the per-type decoder tables.

The decoders dispatch on value types through `TypeTable` instead of ``isinstance`` chains; these tests pin the
cases where a table and a chain could disagree (bool vs int, subclasses, mappings that are not dicts), so the
parser accepts and refuses exactly what it did before the split.
"""

from __future__ import annotations

import enum
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

import netsim.core.policy as policy
from netsim.core.policy import Mechanism, Policy, Rule, parse_policy, route_exclusions_payload
from netsim.core.policy._table import TypeTable
from netsim.errors import ConfigError

# Everything `from netsim.core.policy import X` offered before the package split (plus the route payload, and
# explain_path/PathExplanation of issue 13).
PUBLIC = (
    "MAX_POLICY_BYTES MAX_POLICY_DEPTH MAX_POLICY_NODES MAX_POLICY_RULES PROTOCOLS Action DnsBindings "
    "DnsBindingsStatistics Explanation FlowFields Mechanism Network PathExplanation Policy PolicyEngine "
    "PolicyStatistics RouteExclusion Rule Verdict excluded_routes_for explain_path parse_policy "
    "route_exclusions_payload"
).split()


def test_every_public_name_is_exported_from_the_package() -> None:
    assert sorted(policy.__all__) == sorted(PUBLIC)
    namespace: dict[str, Any] = {}
    exec(f"from netsim.core.policy import {', '.join(PUBLIC)}", namespace)
    assert all(namespace[name] is getattr(policy, name) for name in PUBLIC)


class _Proto(enum.IntEnum):
    TCP = 6


class _Text(str):
    pass


class _Rules(list[Any]):
    pass


class _Frozen(Mapping[str, Any]):
    """A mapping that is not a dict (only the abstract entry of the tables can see it)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_table_takes_the_most_specific_entry_then_abstract_then_default() -> None:
    table: TypeTable[str] = TypeTable({bool: "bool", int: "int", str: "str"}, abstract=((Mapping, "map"),), default="-")
    assert [table(v) for v in (True, 1, _Proto.TCP, "x", _Text("x"))] == ["bool", "int", "int", "str", "str"]
    assert table(types.MappingProxyType({})) == "map" and table(_Frozen({})) == "map"
    assert table(1.5) == "-" and table(None) == "-" and table(b"x") == "-"


def test_protocol_decoding_keeps_isinstance_semantics() -> None:
    doc = {"rule": [{"name": "a", "action": "drop", "proto": [_Proto.TCP, _Text("udp"), "47"]}]}
    assert parse_policy(doc).rules[0].protos == frozenset({6, 17, 47})
    with pytest.raises(ConfigError, match=r"rule #0 'a': proto: unknown protocol True; use one of"):
        parse_policy({"rule": [{"name": "a", "action": "drop", "proto": True}]})
    with pytest.raises(ConfigError, match=r"proto: unknown protocol 1\.0; use one of"):
        parse_policy({"rule": [{"name": "a", "action": "drop", "proto": [1.0]}]})


def test_field_lists_take_one_value_or_a_list_and_refuse_the_rest() -> None:
    rule = parse_policy({"rule": [{"name": "a", "action": "bypass", "dst": ("10.0.0.0/8", _Text("::/0"))}]}).rules[0]
    assert [str(n) for n in rule.dst] == ["10.0.0.0/8", "::/0"]
    assert parse_policy({"rule": [{"name": "a", "action": "drop", "ports": 443}]}).rules[0].ports == ((443, 443),)
    with pytest.raises(ConfigError, match=r"rule #0 'a': 'dst' must be a string or a list of strings, got dict"):
        parse_policy({"rule": [{"name": "a", "action": "drop", "dst": {"x": 1}}]})


def test_documents_of_every_accepted_type() -> None:
    expected = Policy((Rule("a", policy.Action.DROP),), mechanism=Mechanism.ROUTE)
    doc = {"mechanism": "route", "rule": [{"name": "a", "action": "drop"}]}
    text = 'mechanism = "route"\n[[rule]]\nname = "a"\naction = "drop"\n'
    for given in (
        doc,
        OrderedDict(doc),
        types.MappingProxyType(doc),
        _Frozen(doc),
        {"mechanism": "route", "rule": _Rules(doc["rule"])},
        text,
        _Text(text),
        text.encode(),
        bytearray(text.encode()),
        memoryview(text.encode()),
    ):
        assert parse_policy(given) == expected, given
    with pytest.raises(ConfigError, match="a policy is TOML/YAML text or a mapping, got list"):
        parse_policy([doc])  # type: ignore[arg-type]


def test_shape_check_sees_through_every_container_type() -> None:
    # a non-string key, a too-large integer and deep nesting are refused wherever they hide
    for hide in (
        lambda v: OrderedDict({"x": v}),
        lambda v: types.MappingProxyType({"x": v}),
        lambda v: _Frozen({"x": v}),
        lambda v: {"x": (v,)},
        lambda v: {"x": _Rules([v])},
    ):
        with pytest.raises(ConfigError, match="keys must be strings, got a int key"):
            parse_policy(hide({1: "a"}))
        with pytest.raises(ConfigError, match="policy has an integer of more than 64 bits"):
            parse_policy(hide(1 << 64))
        deep: Any = "leaf"
        for _ in range(policy.MAX_POLICY_DEPTH):
            deep = [deep]
        with pytest.raises(ConfigError, match="nested more than 32 levels deep"):
            parse_policy(hide(deep))
    for hashable in (set, frozenset):
        with pytest.raises(ConfigError, match="policy has an integer of more than 64 bits"):
            parse_policy({"x": hashable({1, 1 << 64})})
    with pytest.raises(ConfigError, match="unknown top-level field"):  # bools, floats, None are plain leaves
        parse_policy({"x": [True, 1.5, None, 2**63]})


def test_route_payload_lives_with_the_policy() -> None:
    route = parse_policy({"mechanism": "route", "rule": [{"name": "lan", "action": "bypass", "dst": "192.0.2.0/24"}]})
    assert route_exclusions_payload(route) == {"excluded_routes": ["192.0.2.0/24"], "bypass_unsupported": []}
    assert route_exclusions_payload(Policy()) == {"excluded_routes": [], "bypass_unsupported": []}
