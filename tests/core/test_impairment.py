"""The impairment model (netsim.core.impairment): spec validation, determinism, and the properties a link must keep.

A small driver (`_run`) plays the I/O adapter: it hands packets in at their arrival times and pulls releases at
the model's own timers, late by a random amount when asked (a busy process polls late), which must change no
decision and no release time.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.impairment import (
    Action,
    Impairment,
    ImpairmentStatistics,
    Release,
    parse_duration,
    parse_probability,
    parse_rate,
)
from netsim.errors import ConfigError


def _run(
    spec: Impairment, packets: list[tuple[float, int]], lateness: list[float] | None = None
) -> tuple[list[Release], ImpairmentStatistics]:
    """Feed ``(arrival gap, length)`` packets; return every release in the order given, and the counters."""
    model = spec.model()
    out: list[Release] = []
    now = 0.0
    late = iter(lateness or [])
    for handle, (gap, length) in enumerate(packets):
        arrival = now + gap
        while (timer := model.next_timer()) is not None and timer <= arrival:
            now = min(arrival, max(now, timer) + next(late, 0.0))
            out += model.release_due(now)
        now = arrival
        model.packet_in(handle, length, now)
        out += model.release_due(now)
    while (timer := model.next_timer()) is not None:
        now = max(now, timer) + next(late, 0.0)
        out += model.release_due(now)
    return out, model.statistics()


def _arrivals(packets: list[tuple[float, int]]) -> list[float]:
    now, out = 0.0, []
    for gap, _ in packets:
        now += gap
        out.append(now)
    return out


def _fates(releases: list[Release]) -> dict[int, list[Action]]:
    fates: dict[int, list[Action]] = {}
    for r in releases:
        fates.setdefault(r.handle, []).append(r.action)
    return fates


@st.composite
def specs(draw: st.DrawFn) -> Impairment:
    delay = draw(st.floats(0, 0.2))
    return Impairment(
        loss=draw(st.floats(0, 1)),
        delay=delay,
        jitter=draw(st.floats(0, 0.05)),
        reorder=draw(st.floats(0, 1)) if delay else 0.0,
        duplicate=draw(st.floats(0, 1)),
        rate=draw(st.one_of(st.just(0), st.integers(8000, 10**8))),
        limit=draw(st.integers(1, 2000)),
        seed=draw(st.integers(0, 2**64 - 1)),
    )


traffic = st.lists(st.tuples(st.floats(0, 0.01), st.integers(20, 1500)), max_size=200)


@pytest.mark.reliability("F10")
@settings(max_examples=150)
@given(spec=specs(), packets=traffic)
def test_same_seed_same_decisions(spec: Impairment, packets: list[tuple[float, int]]) -> None:
    assert _run(spec, packets) == _run(spec, packets)


@settings(max_examples=100)
@given(
    spec=specs().filter(lambda s: s.limit >= 200),
    packets=traffic,
    lateness=st.lists(st.floats(0, 0.05), max_size=50),
)
def test_a_late_poll_changes_no_decision_and_no_release_time(
    spec: Impairment, packets: list[tuple[float, int]], lateness: list[float]
) -> None:
    assert _run(spec, packets, lateness)[0] == _run(spec, packets)[0]  # limit >= packets: no overflow


@settings(max_examples=150)
@given(spec=specs(), packets=traffic)
def test_every_packet_has_one_fate_and_the_counters_add_up(spec: Impairment, packets: list[tuple[float, int]]) -> None:
    releases, stats = _run(spec, packets)
    fates = _fates(releases)
    assert sorted(fates) == list(range(len(packets)))
    for actions in fates.values():
        assert actions in ([Action.DROP], [Action.ACCEPT], [Action.ACCEPT, Action.COPY])
    assert stats.seen == len(packets) == stats.passed + stats.dropped + stats.overflow + stats.held
    assert stats.held == 0
    assert stats.duplicated == sum(a == [Action.ACCEPT, Action.COPY] for a in fates.values())
    assert stats.passed == sum(a[0] == Action.ACCEPT for a in fates.values())


@pytest.mark.reliability("F10")
@settings(max_examples=150)
@given(spec=specs(), packets=traffic)
def test_never_released_before_arrival_and_the_delay_is_kept(
    spec: Impairment, packets: list[tuple[float, int]]
) -> None:
    arrivals = _arrivals(packets)
    releases, _ = _run(spec, packets)
    for r in releases:
        assert r.at >= arrivals[r.handle]
        if r.action == Action.ACCEPT and not spec.reorder:
            assert r.at >= arrivals[r.handle] + spec.delay - spec.jitter - 1e-9


@pytest.mark.reliability("F10")
@settings(max_examples=150)
@given(
    spec=specs().filter(lambda s: s.rate > 0),
    packets=st.lists(st.tuples(st.floats(0, 0.001), st.integers(20, 1500)), min_size=1, max_size=200),
)
def test_the_rate_is_never_exceeded(spec: Impairment, packets: list[tuple[float, int]]) -> None:
    releases, _ = _run(spec, packets)
    sent = [(r.at, packets[r.handle][1]) for r in releases if r.action != Action.DROP]
    bucket, per_second = spec.bucket, spec.rate / 8
    times = [t for t, _ in sent]
    assert times == sorted(times)  # one FIFO out of the delay line
    for i in range(len(sent)):
        total = 0
        for j in range(i, len(sent)):
            total += sent[j][1]
            assert total <= bucket + per_second * (sent[j][0] - sent[i][0]) + 1e-6, (i, j)


@pytest.mark.reliability("F10")
@settings(max_examples=30)
@given(loss=st.floats(0.02, 0.98), seed=st.integers(0, 2**32))
def test_the_observed_drop_fraction_converges_on_loss(loss: float, seed: int) -> None:
    n = 4000
    _, stats = _run(Impairment(loss=loss, seed=seed), [(0.0, 100)] * n)
    sigma = math.sqrt(loss * (1 - loss) / n)
    assert abs(stats.dropped / n - loss) < 6 * sigma


def test_the_same_packet_gets_the_same_fate_whatever_else_is_configured() -> None:
    packets = [(0.001, 100)] * 500
    plain = _fates(_run(Impairment(loss=0.2, duplicate=0.1, seed=7), packets)[0])
    delayed = _fates(_run(Impairment(loss=0.2, duplicate=0.1, delay=0.05, jitter=0.01, seed=7), packets)[0])
    assert plain == delayed
    other = _fates(_run(Impairment(loss=0.2, duplicate=0.1, seed=8), packets)[0])
    assert other != plain  # the control: the seed is what decides


def test_no_impairment_passes_everything_at_once_in_order() -> None:
    packets = [(0.001, 100)] * 50
    releases, stats = _run(Impairment(), packets)
    assert [r.handle for r in releases] == list(range(50))
    assert stats == ImpairmentStatistics(seen=50, passed=50)


def test_reorder_is_counted_as_a_receiver_sees_it() -> None:
    packets = [(0.001, 100)] * 400
    releases, stats = _run(Impairment(delay=0.05, reorder=0.25, seed=3), packets)
    order = [r.handle for r in releases if r.action == Action.ACCEPT]
    seen_late = sum(1 for i, h in enumerate(order) if any(x < h for x in order[i + 1 :]))
    assert stats.reordered == seen_late > 0
    arrivals = _arrivals(packets)
    skipped = sum(1 for r in releases if r.at == arrivals[r.handle])
    assert stats.delayed == 400 - skipped and 50 < skipped < 150  # about a quarter skip the delay


def test_jitter_alone_reorders_and_the_count_matches() -> None:
    releases, stats = _run(Impairment(delay=0.02, jitter=0.02, seed=5), [(0.001, 100)] * 300)
    order = [r.handle for r in releases]
    seen_late = sum(1 for i, h in enumerate(order) if any(x < h for x in order[i + 1 :]))
    assert stats.reordered == seen_late > 0


def test_a_copy_follows_its_original() -> None:
    releases, stats = _run(Impairment(duplicate=1.0), [(0.001, 100)] * 10)
    assert [(r.handle, r.action) for r in releases] == [(h, a) for h in range(10) for a in (Action.ACCEPT, Action.COPY)]
    assert stats.duplicated == 10


def test_the_queue_limit_drops_as_overflow() -> None:
    _, stats = _run(Impairment(delay=1.0, limit=10), [(0.0, 100)] * 25)
    assert (stats.overflow, stats.passed) == (15, 10)


def test_a_rate_paces_a_burst() -> None:
    # 80 kbit/s = 10 000 B/s, bucket 3028 B: 1000-byte packets leave 0.1 s apart once the bucket is spent
    releases, _ = _run(Impairment(rate=80_000), [(0.0, 1000)] * 10)
    times = [r.at for r in releases]
    assert times[:3] == [0.0, 0.0, 0.0]
    gaps = [b - a for a, b in itertools.pairwise(times[3:])]
    assert all(abs(g - 0.1) < 1e-9 for g in gaps), gaps


def test_flush_releases_everything_held() -> None:
    model = Impairment(delay=5.0, duplicate=1.0).model()
    for h in range(3):
        model.packet_in(h, 100, 0.0)
    assert model.release_due(1.0) == []
    out = model.flush(1.0)
    assert [(r.handle, r.action) for r in out] == [(h, a) for h in range(3) for a in (Action.ACCEPT, Action.COPY)]
    assert model.next_timer() is None and model.statistics().held == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss": 1.5},
        {"loss": -0.1},
        {"loss": float("nan")},
        {"delay": 61.0},
        {"jitter": -1.0},
        {"reorder": 0.5},  # without a delay
        {"duplicate": True},
        {"rate": 100},
        {"burst": 3000},  # without a rate
        {"rate": 10**6, "burst": 10},
        {"limit": 0},
        {"seed": -1},
        {"rate": 1.5},
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Impairment(**kwargs)


def test_dict_round_trip_and_unknown_fields() -> None:
    spec = Impairment(loss=0.1, delay=0.05, rate=10**6, seed=9)
    assert Impairment.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="unknown"):
        Impairment.from_dict({"los": 0.1})
    with pytest.raises(ConfigError):
        Impairment.from_dict([1])
    assert spec.describe() == "loss 10% delay 50ms rate 1mbit burst 3028B seed 9"
    assert Impairment().describe() == "none"


def test_statistics_from_another_process_are_checked() -> None:
    good = ImpairmentStatistics(seen=3, passed=2, dropped=1)
    assert ImpairmentStatistics.from_dict_untrusted(good.to_dict()) == good
    assert (
        ImpairmentStatistics.from_dict_untrusted({"seen": -1, "passed": "2", "dropped": True}) == ImpairmentStatistics()
    )
    assert ImpairmentStatistics.from_dict_untrusted("x") == ImpairmentStatistics()


def test_parsers() -> None:
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("1.5s") == 1.5 and parse_duration("2") == 2.0
    assert parse_duration("200us") == pytest.approx(2e-4)
    assert parse_rate("10mbit") == 10**7 and parse_rate("512kbit") == 512_000 and parse_rate("8000") == 8000
    assert parse_probability("10%") == pytest.approx(0.1) and parse_probability("0.25") == 0.25
    for bad, parse in (("fast", parse_duration), ("-1ms", parse_duration), ("1 tb", parse_rate)):
        with pytest.raises(ConfigError):
            parse(bad)
    for bad in ("lots", "150%", "-0.1"):
        with pytest.raises(ConfigError):
            parse_probability(bad)
