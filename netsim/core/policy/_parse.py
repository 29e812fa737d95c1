"""Parsing policy documents (TOML, YAML or a decoded mapping) into a :class:`~netsim.core.policy.Policy`.

Policy text is untrusted (a POLICY_UPDATE arrives over IPC), so the parser is bounded before and while decoding
(`MAX_POLICY_BYTES`, `MAX_POLICY_DEPTH`, `MAX_POLICY_NODES`, `MAX_POLICY_RULES`), refuses YAML aliases and
non-string keys, and lets only `ConfigError` escape (docs/policy.md, "Parser guarantees"). Values are decoded by
type through tables (`TypeTable`): a value of a type with no entry is refused with the same message an
``isinstance`` chain would give.
"""

from __future__ import annotations

import difflib
import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from netsim.core.dns import normalize_name
from netsim.core.policy._model import (
    DOMAIN_RE,
    PORT_PROTOS,
    Action,
    Mechanism,
    Network,
    Policy,
    Rule,
    proto_number,
    short,
)
from netsim.core.policy._table import TypeTable
from netsim.errors import ConfigError

__all__ = ["MAX_POLICY_BYTES", "MAX_POLICY_DEPTH", "MAX_POLICY_NODES", "MAX_POLICY_RULES", "parse_policy"]

#: Bounds on untrusted policy documents (a POLICY_UPDATE arrives over IPC): checked before and while decoding,
#: so no input can exhaust the stack or memory of the process parsing it (docs/policy.md, "Parser guarantees").
MAX_POLICY_BYTES = 1 << 20
MAX_POLICY_DEPTH = 32
MAX_POLICY_NODES = 200_000
MAX_POLICY_RULES = 10_000
_MAX_INT = 1 << 64


# ------------------------------------------------------------------------------------------------ fields
def _listed_one(value: Any, where: str, what: str) -> list[Any]:
    return [value]


def _listed_many(value: list[Any] | tuple[Any, ...], where: str, what: str) -> list[Any]:
    return list(value)


def _listed_refused(value: Any, where: str, what: str) -> list[Any]:
    raise ConfigError(f"{where}: '{what}' must be a string or a list of strings, got {type(value).__name__}")


# Every rule field takes one value or a list of them (a bool is an int here, as isinstance has it).
_AS_LIST: TypeTable[Callable[[Any, str, str], list[Any]]] = TypeTable(
    {str: _listed_one, int: _listed_one, list: _listed_many, tuple: _listed_many}, default=_listed_refused
)


def _as_list(value: Any, where: str, what: str) -> list[Any]:
    return _AS_LIST(value)(value, where, what)


def _parse_action(value: Any, where: str) -> Action:
    if isinstance(value, str) and value.strip().upper() in Action.__members__:
        return Action[value.strip().upper()]
    raise ConfigError(f"{where}: action must be one of 'tunnel', 'bypass', 'drop', got {short(value)}")


def _parse_port(text: str, where: str) -> tuple[int, int]:
    lo_s, sep, hi_s = text.strip().partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
    except ValueError:
        raise ConfigError(
            f"{where}: port {short(text)} must be 'N' or 'LOW-HIGH' (e.g. '443' or '8000-8100')"
        ) from None
    if not 0 <= lo <= hi <= 65535:
        raise ConfigError(f"{where}: port range {short(text)} must satisfy 0 <= LOW <= HIGH <= 65535")
    return lo, hi


_RULE_KEYS = frozenset({"name", "action", "dst", "domain", "proto", "ports"})
_TOP_KEYS = frozenset({"default", "mechanism", "rule"})


def _unknown_keys(keys: Any, allowed: frozenset[str], what: str) -> str | None:
    """The error text for keys outside ``allowed`` (with a did-you-mean per key), or None when all are known.

    docs/policy.md: "unknown fields are errors" -- a misspelt key (``[[rules]]``, ``port``) silently ignored
    would change what the policy does, so every level refuses them.
    """
    unknown = sorted(set(keys) - allowed)
    if not unknown:
        return None
    parts = []
    for key in unknown[:5]:  # bounded: an untrusted document may hold thousands of unknown (and long) keys
        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6) if len(key) <= 40 else []
        parts.append(f"{short(key)} (did you mean {close[0]!r}?)" if close else short(key))
    if len(unknown) > 5:
        parts.append(f"and {len(unknown) - 5} more")
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown {what}{plural} {', '.join(parts)}; allowed: {', '.join(sorted(allowed))}"


def _parse_rule(i: int, raw: Any, source: str | None) -> Rule:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"rule #{i}: must be a table/mapping, got {type(raw).__name__}", source=source)
    name = raw.get("name", f"rule{i}")
    where = f"rule #{i} {short(name)}"
    unknown = _unknown_keys(raw, _RULE_KEYS, "field")
    if unknown:
        raise ConfigError(f"{where}: {unknown}", source=source)
    if "action" not in raw:
        raise ConfigError(f"{where}: missing 'action' (tunnel, bypass or drop)", source=source)
    try:
        return _rule_fields(raw, str(name), where)
    except ConfigError as exc:
        if source is not None and exc.source is None:
            raise ConfigError(str(exc), source=source) from None
        raise


def _rule_fields(raw: Mapping[str, Any], name: str, where: str) -> Rule:
    action = _parse_action(raw["action"], where)
    dst: list[Network] = []
    for text in _as_list(raw.get("dst", []), where, "dst"):
        try:
            dst.append(ipaddress.ip_network(str(text).strip(), strict=True))
        except ValueError as exc:
            raise ConfigError(
                f"{where}: dst {short(text)} is not a prefix with no host bits set ({exc}), e.g. '192.168.1.0/24'"
            ) from None
    domains: list[str] = []
    for text in _as_list(raw.get("domain", []), where, "domain"):
        dom = normalize_name(str(text).strip())
        if not DOMAIN_RE.match(dom):
            raise ConfigError(f"{where}: domain {short(text)} must be a DNS name or '*.suffix' (e.g. '*.example.test')")
        domains.append(dom)
    protos: frozenset[int] | None = None
    if "proto" in raw:
        items = _as_list(raw["proto"], where, "proto")
        if not any(isinstance(p, str) and p.strip().lower() == "any" for p in items):
            protos = frozenset(proto_number(p, f"{where}: proto") for p in items)
    ports = tuple(_parse_port(str(p), f"{where}: ports") for p in _as_list(raw.get("ports", []), where, "ports"))
    if ports and protos is not None and not protos <= PORT_PROTOS:
        raise ConfigError(f"{where}: 'ports' needs proto tcp and/or udp (or omit proto), got proto={raw['proto']!r}")
    return Rule(name, action, tuple(dst), tuple(domains), protos, ports)


def parse_policy(
    text_or_mapping: str | bytes | bytearray | memoryview | Mapping[str, Any],
    *,
    fmt: str | None = None,
    source: str | None = None,
) -> Policy:
    """Parse a policy from TOML or YAML text (or UTF-8 bytes), or from an already decoded mapping.

    Untrusted input is fine: whatever the input (any bytes, bad encodings, non-string or date keys, deep nesting,
    YAML aliases, huge documents), the only exception is `ConfigError` (a hypothesis test over arbitrary TOML
    and YAML documents checks it). Documents are limited to `MAX_POLICY_BYTES` bytes, `MAX_POLICY_DEPTH` levels
    of nesting, `MAX_POLICY_NODES` values and `MAX_POLICY_RULES` rules; YAML aliases are refused (an alias
    expansion, the "billion laughs", is the classic way to make a small document huge).

    Args:
        text_or_mapping: file contents or a mapping with ``default``, ``mechanism`` and ``rule`` (a list).
        fmt: ``"toml"`` or ``"yaml"``; when None, TOML is tried first, then YAML.
        source: file name for error messages.

    Raises:
        ConfigError: naming the rule (index and name), the field and what to fix.
    """
    try:
        return _parse_policy(text_or_mapping, fmt, source)
    except ConfigError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # Safety net for the contract above; reaching it is a parser bug (the hypothesis test fails on this text).
        raise ConfigError(
            f"unexpected parser failure ({type(exc).__name__}): {short(str(exc))}", source=source
        ) from None


def _parse_policy(text_or_mapping: Any, fmt: str | None, source: str | None) -> Policy:
    data = _DOCUMENT(text_or_mapping)(text_or_mapping, fmt, source)
    _check_shape(data, source)
    if not isinstance(data, Mapping):
        raise ConfigError("a policy must be a table/mapping with 'default', 'mechanism' and 'rule'", source=source)
    unknown = _unknown_keys(data, _TOP_KEYS, "top-level field")
    if unknown:
        raise ConfigError(unknown, source=source)
    default = _parse_action(data.get("default", "tunnel"), "default")
    mech_raw = data.get("mechanism", "nat")
    try:
        mechanism = Mechanism(str(mech_raw).strip().lower())
    except ValueError:
        raise ConfigError(f"mechanism must be 'route' or 'nat', got {short(mech_raw)}", source=source) from None
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ConfigError("'rule' must be a list of rules ([[rule]] in TOML, 'rule:' list in YAML)", source=source)
    if len(raw_rules) > MAX_POLICY_RULES:
        raise ConfigError(f"{len(raw_rules)} rules; the limit is {MAX_POLICY_RULES}", source=source)
    rules = tuple(_parse_rule(i, r, source) for i, r in enumerate(raw_rules))
    try:
        return Policy(rules, default, mechanism)
    except ConfigError as exc:
        raise ConfigError(str(exc), source=source) from None


# ------------------------------------------------------------------------------------------------ bounds
_Stack = list[tuple[Any, int]]  # (value, depth) still to check


def _shape_leaf(value: Any, depth: int, stack: _Stack, source: str | None) -> None:
    return None


def _shape_int(value: int, depth: int, stack: _Stack, source: str | None) -> None:
    if not -_MAX_INT < value < _MAX_INT:
        raise ConfigError("policy has an integer of more than 64 bits", source=source)


def _shape_depth(depth: int, source: str | None) -> None:
    if depth >= MAX_POLICY_DEPTH:
        raise ConfigError(f"policy is nested more than {MAX_POLICY_DEPTH} levels deep", source=source)


def _shape_mapping(value: Mapping[Any, Any], depth: int, stack: _Stack, source: str | None) -> None:
    _shape_depth(depth, source)
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got a {type(key).__name__} key (quote it in YAML)", source=source)
    stack.extend((v, depth + 1) for v in value.values())


def _shape_sequence(value: Any, depth: int, stack: _Stack, source: str | None) -> None:
    _shape_depth(depth, source)
    stack.extend((v, depth + 1) for v in value)


# _check_shape per value type: containers are descended into, integers bounded, other leaves (str, float, None,
# dates) pass. bool has its own entry so it is not taken for an int.
_SHAPE: TypeTable[Callable[[Any, int, _Stack, str | None], None]] = TypeTable(
    {
        bool: _shape_leaf,
        int: _shape_int,
        str: _shape_leaf,
        float: _shape_leaf,
        type(None): _shape_leaf,
        dict: _shape_mapping,
        list: _shape_sequence,
        tuple: _shape_sequence,
        set: _shape_sequence,
        frozenset: _shape_sequence,
    },
    abstract=((Mapping, _shape_mapping),),
    default=_shape_leaf,
)


def _check_shape(data: Any, source: str | None) -> None:
    """Bound a decoded document: nesting depth, value count, string keys only, integers below 2**64.

    Iterative (an explicit stack), so a deep or cyclic mapping handed in by a caller cannot exhaust the stack
    either; the node budget also ends a cycle. After it, every ``repr``/``str`` of a value is bounded.
    """
    stack: _Stack = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_POLICY_NODES:
            raise ConfigError(f"policy has more than {MAX_POLICY_NODES} values", source=source)
        _SHAPE(value)(value, depth, stack, source)


# ------------------------------------------------------------------------------------------------ documents
def _decode(text: str, fmt: str | None, source: str | None) -> Any:
    if fmt not in (None, "toml", "yaml"):
        raise ConfigError(f"unknown policy format {fmt!r}; use 'toml' or 'yaml'", source=source)
    if len(text) > MAX_POLICY_BYTES:  # characters: at least as many bytes in UTF-8
        raise ConfigError(f"policy is {len(text)} characters; the limit is {MAX_POLICY_BYTES} bytes", source=source)
    if fmt in (None, "toml"):
        try:
            return tomllib.loads(text)
        # tomllib recurses per nested array/inline table (RecursionError) and int()s digit strings past the
        # conversion limit (ValueError); both are bad documents here. TOMLDecodeError is a ValueError.
        except (ValueError, RecursionError) as exc:
            if fmt == "toml":
                what = "nested too deeply" if isinstance(exc, RecursionError) else short(str(exc), 200)
                raise ConfigError(f"not valid TOML: {what}", source=source) from None
    import yaml

    try:
        return yaml.load(text, Loader=_bounded_yaml_loader())  # a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(str(exc), source=source or "<policy>") from None
    except yaml.YAMLError as exc:
        line = None
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        what = "YAML" if fmt == "yaml" else "TOML or YAML"
        raise ConfigError(f"not valid {what}: {short(str(exc), 300)}", source=source or "<policy>", line=line) from None
    except (ValueError, OverflowError) as exc:  # e.g. a timestamp out of range, an int past the conversion limit
        raise ConfigError(f"not valid YAML: {short(str(exc), 200)}", source=source or "<policy>") from None


def _document_of_bytes(raw: bytes | bytearray | memoryview, fmt: str | None, source: str | None) -> Any:
    if len(raw) > MAX_POLICY_BYTES:
        raise ConfigError(f"policy is {len(raw)} bytes; the limit is {MAX_POLICY_BYTES}", source=source)
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"policy is not UTF-8 (byte {exc.start})", source=source) from None
    return _decode(text, fmt, source)


def _document_of_mapping(data: Mapping[Any, Any], fmt: str | None, source: str | None) -> Any:
    return data


def _document_refused(value: Any, fmt: str | None, source: str | None) -> Any:
    raise ConfigError(f"a policy is TOML/YAML text or a mapping, got {type(value).__name__}")


# What parse_policy accepts: UTF-8 bytes, text, or an already decoded mapping.
_DOCUMENT: TypeTable[Callable[[Any, str | None, str | None], Any]] = TypeTable(
    {
        bytes: _document_of_bytes,
        bytearray: _document_of_bytes,
        memoryview: _document_of_bytes,
        str: _decode,
        dict: _document_of_mapping,
    },
    abstract=((Mapping, _document_of_mapping),),
    default=_document_refused,
)


_YAML_LOADER: Any = None


def _bounded_yaml_loader() -> Any:
    """A `yaml.SafeLoader` that refuses aliases and bounds depth and node count while composing.

    Bounding in the composer (before any Python object exists) keeps the constructor's recursion shallow and
    makes alias expansion impossible rather than merely expensive.
    """
    global _YAML_LOADER
    if _YAML_LOADER is not None:
        return _YAML_LOADER
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._depth = 0
            self._nodes = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise ConfigError("YAML aliases (*name) are not allowed in a policy")
            self._nodes += 1
            if self._nodes > MAX_POLICY_NODES:
                raise ConfigError(f"policy has more than {MAX_POLICY_NODES} values")
            self._depth += 1
            try:
                if self._depth > MAX_POLICY_DEPTH:
                    raise ConfigError(f"policy is nested more than {MAX_POLICY_DEPTH} levels deep")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    _YAML_LOADER = BoundedSafeLoader
    return BoundedSafeLoader
