"""Ledger arithmetic: read = forwarded + dropped[reason] + queued, and every unattributed packet is reported."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.ledger import Imbalance, Ledger, LedgerSnapshot
from netsim.errors import BadPacket

REASONS = ["queue_full", "malformed", "policy_block", "ipc_closed"]
# one operation: a packet count entering, then how it leaves
ops = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(1, 50),
        st.sampled_from(["forward", "queue", "drain", *REASONS]),
    ),
    max_size=60,
)


def run(ledger: Ledger, script: list[tuple[str, int, str]]) -> dict[str, int]:
    """Apply the script with a real queue per stage; returns the real queue lengths."""
    queues = {"a": 0, "b": 0, "c": 0}
    for name, n, fate in script:
        stage = ledger.stage(name)
        if fate == "drain":
            k = min(n, queues[name])
            queues[name] -= k
            stage.count_queued(-k)
            stage.count_forwarded(k)
            continue
        stage.count_read(n)
        if fate == "forward":
            stage.count_forwarded(n)
        elif fate == "queue":
            queues[name] += n
            stage.set_queued(queues[name])
        else:
            stage.count_dropped(fate, n)
    return queues


@settings(max_examples=300)
@given(ops)
def test_attributed_books_balance(script: list[tuple[str, int, str]]) -> None:
    ledger = Ledger("proc")
    queues = run(ledger, script)
    assert ledger.check() == []
    snap = ledger.snapshot()
    for s in snap.stages:
        assert s.read == s.forwarded + s.dropped_total + s.queued
        assert s.queued == queues[s.name]
        assert s.dropped_total == sum(n for name, n, fate in script if name == s.name and fate in REASONS)
    quiescent = ledger.check(quiescent=True)
    assert [i.stage for i in quiescent] == [s.name for s in snap.stages if s.queued]


@settings(max_examples=300)
@given(ops, st.sampled_from(["a", "b", "c"]), st.integers(1, 9))
def test_an_uncounted_loss_is_reported(script: list[tuple[str, int, str]], stage: str, lost: int) -> None:
    ledger = Ledger("proc")
    run(ledger, script)
    ledger.stage(stage).count_read(lost)  # read, then vanished without a counter
    assert Imbalance(stage, "unattributed", lost) in ledger.check()


@settings(max_examples=200)
@given(ops)
def test_json_round_trip(script: list[tuple[str, int, str]]) -> None:
    ledger = Ledger("helper")
    run(ledger, script)
    snap = ledger.snapshot()
    wire = json.loads(json.dumps(snap.to_json()))
    assert LedgerSnapshot.from_json_untrusted(wire) == snap


def test_snapshot_is_frozen_and_independent() -> None:
    ledger = Ledger("p", stages=("tun_read", "ipc_out"))
    st_ = ledger.stage("tun_read")
    st_.count_read(3)
    st_.count_dropped("malformed")
    snap = ledger.snapshot()
    st_.count_read(5)
    assert snap["tun_read"].read == 3 and snap["tun_read"].dropped_for("malformed") == 1
    assert snap["ipc_out"].read == 0
    assert [str(i) for i in snap.check()] == ["tun_read: unattributed +2"]
    with pytest.raises(AttributeError):
        snap["tun_read"].read = 9  # type: ignore[misc]
    with pytest.raises(KeyError):
        snap["nope"]
    assert "ipc_out" in ledger and "nope" not in ledger


def test_negative_counters_are_reported() -> None:
    ledger = Ledger("p")
    ledger.stage("s").count_queued(-1)
    ledger.stage("s").count_forwarded(-1)
    kinds = {i.kind for i in ledger.check()}
    assert "negative" in kinds


@settings(max_examples=300)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
        max_leaves=12,
    )
)
def test_from_json_untrusted_raises_only_badpacket(obj: object) -> None:
    try:
        snap = LedgerSnapshot.from_json_untrusted(obj)
    except BadPacket as exc:
        assert exc.reason == "bad_ledger"
    else:
        assert snap.to_json()["name"] == snap.name


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "x", "stages": {"s": {"read": True, "forwarded": 0, "queued": 0}}},
        {"name": "x", "stages": {"s": {"read": 1, "forwarded": 0, "queued": 0, "dropped": {"r": "1"}}}},
        {"name": "x", "stages": []},
        {"stages": {}},
    ],
)
def test_from_json_untrusted_rejects(bad: object) -> None:
    with pytest.raises(BadPacket):
        LedgerSnapshot.from_json_untrusted(bad)
