"""docs/apple-mapping.md stays true: every netsim name it lists exists, every enum value matches."""

from __future__ import annotations

import enum
import importlib
import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "apple-mapping.md"
ROW = re.compile(r"^\|(.+)\|\s*$")
NAME = re.compile(r"`(netsim\.[A-Za-z0-9_.]+)`")


def resolve(dotted: str) -> Any:
    """Import the longest module prefix of ``dotted`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def rows() -> list[list[str]]:
    out = []
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m and not set(line) <= set("|- "):
            out.append([c.strip() for c in m.group(1).split("|")])
    return out


def test_every_listed_netsim_name_exists() -> None:
    names = [n for row in rows() for n in NAME.findall(row[1] if len(row) == 3 and not row[1].isdigit() else "")]
    names += [n for row in rows() if len(row) == 3 and row[1].isdigit() for n in NAME.findall(row[2])]
    assert len(names) > 60
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert missing == []


def test_enum_values_match_the_table() -> None:
    checked = 0
    for apple, raw, netsim_cell in (r for r in rows() if len(r) == 3 and r[1].isdigit()):
        (name,) = NAME.findall(netsim_cell)
        member = resolve(name)
        assert isinstance(member, enum.Enum), name
        assert member.value == int(raw), (apple, name)
        checked += 1
    assert checked == 18 + 6 + 3 + 3 + 3 + 3 + 4 + 5 + 3 + 3 + 10 + 5 + 4  # ... + flow errors + filter actions, reports


def test_every_enum_member_is_in_the_table() -> None:
    import netsim.apple as apple

    listed = {NAME.findall(r[2])[0] for r in rows() if len(r) == 3 and r[1].isdigit()}
    for cls in (apple.ProviderStopReason, apple.VPNStatus, apple.TunnelProviderErrorCode, apple.TrafficDirection,
                apple.RoutingMethod, apple.DNSProtocol):  # fmt: skip
        for member in cls:
            assert f"netsim.apple.{cls.__name__}.{member.name}" in listed
    from netsim.apple import proxy

    for pcls in (proxy.NetworkRuleProtocol, proxy.AppProxyFlowError):
        for pmember in pcls:
            assert f"netsim.apple.proxy.{pcls.__name__}.{pmember.name}" in listed


def test_every_filter_packet_verdict_is_in_the_table() -> None:
    from netsim.apple import FilterPacketProviderVerdict

    listed = {NAME.findall(r[2])[0] for r in rows() if len(r) == 3 and r[1].isdigit()}
    assert {f"netsim.apple.FilterPacketProviderVerdict.{m.name}" for m in FilterPacketProviderVerdict} <= listed
