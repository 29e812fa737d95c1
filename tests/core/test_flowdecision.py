"""The SYN-time decision table: keyed by 5-tuple, bounded, expiring on an injected clock; checked against a model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.flowdecision import DecisionTable
from netsim.errors import LocalProtocolError


def _key(port: int, dport: int = 80) -> tuple[int, int, bytes, bytes, int, int]:
    return (4, 6, bytes([192, 168, 1, 10]), bytes([203, 0, 113, 10]), port, dport)


def test_get_keeps_take_removes() -> None:
    t: DecisionTable[str] = DecisionTable(capacity=4, ttl=10.0)
    t.put(_key(40001), "claimed", now=0.0)
    assert t.get(_key(40001), now=1.0) == "claimed"  # a retransmitted SYN: still there
    assert t.get(_key(40001, dport=81), now=1.0) is None  # another 5-tuple
    assert t.take(_key(40001), now=2.0) == "claimed"  # the accepted socket: matched once
    assert t.take(_key(40001), now=2.0) is None
    s = t.statistics()
    assert (s.inserted, s.taken, s.expired, s.evicted, s.size) == (1, 1, 0, 0, 0)


def test_entries_expire_after_ttl() -> None:
    t: DecisionTable[str] = DecisionTable(capacity=4, ttl=10.0)
    t.put(_key(1), "direct", now=0.0)
    t.put(_key(2), "direct", now=5.0)
    assert t.get_timer() == 10.0
    assert t.get(_key(1), now=9.999) == "direct"
    assert t.get(_key(1), now=10.0) is None  # ttl reached
    assert t.get(_key(2), now=10.0) == "direct" and len(t) == 1
    assert t.expire(now=15.0) == 1 and len(t) == 0 and t.get_timer() is None
    assert t.statistics().expired == 2


def test_a_full_table_evicts_the_oldest() -> None:
    t: DecisionTable[int] = DecisionTable(capacity=2, ttl=10.0)
    t.put(_key(1), 1, now=0.0)
    t.put(_key(2), 2, now=1.0)
    t.put(_key(3), 3, now=2.0)
    assert len(t) == 2 and t.get(_key(1), now=2.0) is None and t.get(_key(3), now=2.0) == 3
    assert t.statistics().evicted == 1


def test_replacing_re_ages_and_does_not_evict() -> None:
    t: DecisionTable[int] = DecisionTable(capacity=2, ttl=10.0)
    t.put(_key(1), 1, now=0.0)
    t.put(_key(2), 2, now=1.0)
    t.put(_key(1), 11, now=8.0)  # same key: replaced, now the youngest
    assert t.statistics().evicted == 0
    assert t.get(_key(2), now=11.0) is None and t.get(_key(1), now=11.0) == 11


@pytest.mark.parametrize(("capacity", "ttl"), [(0, 1.0), (1 << 21, 1.0), (4, 0.0), (4, -1.0)])
def test_misuse_raises(capacity: int, ttl: float) -> None:
    with pytest.raises(LocalProtocolError):
        DecisionTable(capacity, ttl)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["put", "get", "take"]), st.integers(0, 5), st.floats(0.0, 3.0)), max_size=60)
)
def test_against_a_slow_model(ops: list[tuple[str, int, float]]) -> None:
    """Same answers as a list scanned in full, never more than ``capacity`` entries, counters add up."""
    cap, ttl = 3, 4.0
    t: DecisionTable[int] = DecisionTable(cap, ttl)
    model: list[tuple[int, float, int]] = []  # (port, inserted at, value), oldest first
    now = 0.0
    for i, (op, port, step) in enumerate(ops):
        now += step
        model = [e for e in model if e[1] > now - ttl]
        found = next((e for e in model if e[0] == port), None)
        if op == "put":
            t.put(_key(port), i, now)
            if found is not None:
                model.remove(found)
            elif len(model) >= cap:
                model.pop(0)
            model.append((port, now, i))
        elif op == "get":
            assert t.get(_key(port), now) == (found[2] if found else None)
        else:
            assert t.take(_key(port), now) == (found[2] if found else None)
            if found is not None:
                model.remove(found)
        assert len(t) == len(model) <= cap
    s = t.statistics()
    assert s.size == len(model)
