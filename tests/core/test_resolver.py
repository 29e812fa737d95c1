"""Apple's resolver selection (netsim.core.resolver): the decision table and the untrusted state-file parsers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.resolver import (
    MAX_STATE_BYTES,
    ResolverState,
    ResolverStateError,
    SystemDns,
    TunnelDns,
    Upstream,
    name_matches,
    select_upstream,
)

SYSTEM = SystemDns(("10.0.0.1", "fd00::1"), ("lab.test",))
TUN = ("10.8.0.1",)


def _tunnel(**kw: object) -> TunnelDns:
    base: dict[str, object] = {"servers": TUN, "interface": "utun0", "owner_pid": 4242}
    base.update(kw)
    return TunnelDns(**base)  # type: ignore[arg-type]


def test_no_tunnel_uses_the_system_resolver() -> None:
    assert select_upstream(ResolverState(SYSTEM), "www.lab.test") == Upstream(SYSTEM.servers, False, None)
    assert select_upstream(ResolverState(), "x.test") == Upstream((), False, None)  # nothing known: SERVFAIL


def test_default_route_makes_the_tunnel_the_default_resolver_and_ignores_match_domains() -> None:
    # Apple: "If the VPN tunnel becomes the network's default route ... the matchDomains list is ignored."
    state = ResolverState(SYSTEM, _tunnel(match_domains=("corp.example",), claims_default_route=True))
    for name in ("www.lab.test", "a.corp.example", "corp.example"):
        assert select_upstream(state, name) == Upstream(TUN, True, "utun0")


def test_empty_match_domain_is_the_default_domain() -> None:
    state = ResolverState(SYSTEM, _tunnel(match_domains=("corp.example", "")))
    assert select_upstream(state, "www.lab.test").via_tunnel


def test_no_match_domains_keeps_the_no_leak_reading() -> None:
    assert select_upstream(ResolverState(SYSTEM, _tunnel()), "www.lab.test") == Upstream(TUN, True, "utun0")


def test_split_dns_sends_only_match_domains_to_the_tunnel() -> None:
    state = ResolverState(SYSTEM, _tunnel(match_domains=("corp.example",)))
    assert select_upstream(state, "corp.example").via_tunnel
    assert select_upstream(state, "Wiki.CORP.example.").servers == TUN  # case and root dot do not matter
    assert select_upstream(state, "www.lab.test") == Upstream(SYSTEM.servers, False, None)
    assert not select_upstream(state, "notcorp.example").via_tunnel  # a suffix match is label-wise
    assert not select_upstream(state, "example").via_tunnel


def test_stale_tunnel_restores_the_system_resolver_but_never_leaks_private_names() -> None:
    full = ResolverState(SYSTEM, _tunnel(claims_default_route=True))
    assert select_upstream(full, "www.lab.test", tunnel_alive=False) == Upstream(SYSTEM.servers, False, None)
    split = ResolverState(SYSTEM, _tunnel(match_domains=("corp.example",)))
    assert select_upstream(split, "a.corp.example", tunnel_alive=False) == Upstream((), True, "utun0")
    assert select_upstream(split, "www.lab.test", tunnel_alive=False).servers == SYSTEM.servers


def test_tunnel_without_servers_is_no_tunnel() -> None:
    state = ResolverState(SYSTEM, _tunnel(servers=(), claims_default_route=True))
    assert not select_upstream(state, "a.test").via_tunnel


def test_name_matches() -> None:
    assert name_matches("a.b.c", "b.c") and name_matches("b.c", "B.C.") and name_matches("x", "")
    assert not name_matches("ab.c", "b.c") and not name_matches("c", "b.c")


def test_json_round_trip() -> None:
    t = _tunnel(
        servers=("10.8.0.1", "fd10::1"),
        match_domains=("corp.example", ""),
        match_domains_no_search=True,
        search_domains=("corp.example",),
        claims_default_route=True,
    )
    assert TunnelDns.from_json(t.to_json()) == t
    assert SystemDns.from_json(SYSTEM.to_json().encode()) == SYSTEM


def _tunnel_obj(**kw: object) -> dict[str, object]:
    obj: dict[str, object] = json.loads(_tunnel().to_json())
    obj.update(kw)
    return obj


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (_tunnel_obj(version=2), "state_bad_version"),
        (_tunnel_obj(kind="system"), "state_bad_kind"),
        (_tunnel_obj(servers="10.8.0.1"), "state_bad_servers"),
        (_tunnel_obj(servers=["not-an-ip"]), "state_bad_servers"),
        (_tunnel_obj(servers=["0.0.0.0"]), "state_bad_servers"),
        (_tunnel_obj(servers=["10.0.0.1"] * 17), "state_bad_servers"),
        (_tunnel_obj(servers=[1]), "state_bad_servers"),
        (_tunnel_obj(match_domains=["bad domain"]), "state_bad_domain"),
        (_tunnel_obj(match_domains=["a" * 64 + ".test"]), "state_bad_domain"),
        (_tunnel_obj(match_domains=["x.test"] * 65), "state_bad_domain"),
        (_tunnel_obj(search_domains=[""]), "state_bad_domain"),
        (_tunnel_obj(interface="../etc"), "state_bad_field"),
        (_tunnel_obj(interface="a" * 16), "state_bad_field"),
        (_tunnel_obj(owner_pid=0), "state_bad_field"),
        (_tunnel_obj(owner_pid=True), "state_bad_field"),
        (_tunnel_obj(owner_pid="1"), "state_bad_field"),
        (_tunnel_obj(claims_default_route="yes"), "state_bad_field"),
        ([], "state_bad_json"),
    ],
)
def test_bad_tunnel_state_is_refused_with_a_named_reason(obj: object, reason: str) -> None:
    with pytest.raises(ResolverStateError) as info:
        TunnelDns.from_json(json.dumps(obj))
    assert info.value.reason == reason


def test_oversized_and_garbage_state_is_refused() -> None:
    with pytest.raises(ResolverStateError, match="state_too_big"):
        SystemDns.from_json(b" " * (MAX_STATE_BYTES + 1))
    for junk in (b"", b"\xff\xfe", b"{", b"[" * 5000 + b"]" * 5000, b"null", b'{"version":1}'):
        with pytest.raises(ResolverStateError):
            SystemDns.from_json(junk)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | st.text(max_size=512).map(str.encode))
def test_parsers_raise_only_resolver_state_error(data: bytes) -> None:
    for parse in (SystemDns.from_json, TunnelDns.from_json):
        try:
            parse(data)
        except ResolverStateError:
            pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(_tunnel_obj())), _json_values, max_size=8))
def test_structured_junk_fields_raise_only_resolver_state_error(fields: dict[str, object]) -> None:
    obj = _tunnel_obj(**fields)
    try:
        parsed = TunnelDns.from_json(json.dumps(obj))
    except ResolverStateError:
        return
    assert TunnelDns.from_json(parsed.to_json()) == parsed  # whatever is accepted round-trips


_label = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=3).map(".".join)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_domain, max_size=3),
    _domain,
    st.booleans(),
    st.booleans(),
)
def test_selection_matches_apples_rule(matches: list[str], qname: str, default_route: bool, alive: bool) -> None:
    tunnel = _tunnel(match_domains=tuple(matches), claims_default_route=default_route)
    up = select_upstream(ResolverState(SYSTEM, tunnel), qname, tunnel_alive=alive)
    everything = default_route or not matches
    in_match = any(qname == d or qname.endswith("." + d) for d in matches)
    if alive:
        assert up.via_tunnel == (everything or in_match)
        assert up.servers == (TUN if up.via_tunnel else SYSTEM.servers)
    else:
        # a dead tunnel's servers are never used; only a dead split tunnel's private names are refused
        assert TUN[0] not in up.servers
        assert up.servers == (() if (in_match and not everything) else SYSTEM.servers)
