"""The anti-replay window against a brute-force reference (a set of every counter ever accepted)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.wireguard.replay import WINDOW_SIZE, ReplayWindow
from netsim.core.wireguard.timers import REJECT_AFTER_MESSAGES


class Reference:
    """Accept iff never accepted before, below the limit, and no more than WINDOW_SIZE behind the highest."""

    def __init__(self, limit: int) -> None:
        self.seen: set[int] = set()
        self.limit = limit

    def check(self, c: int) -> bool:
        if c >= self.limit or c in self.seen:
            return False
        if self.seen and max(self.seen) - c > WINDOW_SIZE:
            return False
        self.seen.add(c)
        return True


def test_window_size_is_wireguards() -> None:
    assert WINDOW_SIZE == 2048 - 64


@pytest.mark.reliability("S4")
@settings(max_examples=400)
@given(st.lists(st.integers(0, 6000), max_size=300))
def test_matches_reference(counters: list[int]) -> None:
    w, ref = ReplayWindow(REJECT_AFTER_MESSAGES), Reference(REJECT_AFTER_MESSAGES)
    for c in counters:
        assert w.check_and_update(c) == ref.check(c), c


@pytest.mark.reliability("S4")
@settings(max_examples=200)
@given(st.permutations(list(range(200))), st.integers(0, 2**40))
def test_reordered_within_window_all_accepted_once(order: list[int], base: int) -> None:
    w = ReplayWindow(REJECT_AFTER_MESSAGES)
    assert all(w.check_and_update(base + c) for c in order)
    assert not any(w.check_and_update(base + c) for c in order)


def test_edges() -> None:
    w = ReplayWindow(100_000)
    assert w.check_and_update(0)
    assert not w.check_and_update(0)
    assert w.check_and_update(5000)
    assert w.check_and_update(5000 - WINDOW_SIZE)  # oldest still inside
    assert not w.check_and_update(5000 - WINDOW_SIZE - 1)  # too old
    assert not w.check_and_update(100_000)  # at the limit: refused
    assert w.check_and_update(99_999)
    assert w.highest == 99_999
