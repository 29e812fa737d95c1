"""The handshake rate limiter: wireguard-go's ratelimiter_test.go sequence on a fake clock, keys, bounds, GC."""

from __future__ import annotations

import pytest

from netsim.core.wireguard.ratelimiter import (
    GARBAGE_COLLECT_TIME,
    PACKETS_BURSTABLE,
    PACKETS_PER_SECOND,
    RateLimiter,
    source_key,
)

NS = 1e-9
COST = 1.0 / PACKETS_PER_SECOND

# The addresses of wireguard-go's TestRatelimiter (distinct /64s for the IPv6 ones).
IPS = [
    "127.0.0.1",
    "192.168.1.1",
    "172.167.2.3",
    "97.231.252.215",
    "248.97.91.167",
    "188.208.233.47",
    "104.2.183.179",
    "72.129.46.120",
    "2001:0db8:0a0b:12f0:0000:0000:0000:0001",
    "f5c2:818f:c052:655a:9860:b136:6894:25f0",
    "b2d7:15ab:48a7:b07c:a541:f144:a9fe:54fc",
    "a47b:786e:1671:a22b:d6f9:4ab0:abc7:c918",
    "ea1e:d155:7f7a:98fb:2bf5:9483:80f6:5445",
    "3f0e:54a2:f5b4:cd19:a21d:58e1:3746:84c4",
]

# (allowed, wait before, what) -- the expected results of TestRatelimiter, in order
SEQUENCE = [
    *[(True, 0.0, "initial burst")] * PACKETS_BURSTABLE,
    (False, 0.0, "after burst"),
    (True, COST, "filling tokens for single packet"),
    (False, 0.0, "not having refilled enough"),
    (True, 2 * COST, "filling tokens for two packet burst"),
    (True, 0.0, "second packet in 2 packet burst"),
    (False, 0.0, "packet following 2 packet burst"),
]


def test_wireguard_go_sequence() -> None:
    rate = RateLimiter()
    now = 1000.0
    for i, (want, wait, what) in enumerate(SEQUENCE):
        now += wait + NS  # the Go test sleeps d + 1 ns and runs the collector
        rate.handle_timer(now)
        for ip in IPS:
            assert rate.allow(ip, now) is want, f"{i}: {what}: allow({ip}) != {want}"


def test_sources_are_independent_and_ipv6_is_keyed_by_64() -> None:
    rate = RateLimiter()
    for i in range(PACKETS_BURSTABLE):
        assert rate.allow("2001:db8:1:2::1", i * NS)
    # same /64, another host: the same bucket (Linux kernel ratelimiter.c), so it is empty too
    assert not rate.allow("2001:db8:1:2:ffff::9", 5 * NS)
    assert rate.allow("2001:db8:1:3::1", 0.0)  # the next /64 is another source
    assert rate.allow("192.0.2.1", 0.0)
    assert source_key("::ffff:192.0.2.1") == source_key("192.0.2.1")
    assert source_key("fe80::1%en0") == source_key("fe80::2")
    assert source_key("not-an-address") == "not-an-address"


def test_steady_rate_is_packets_per_second() -> None:
    rate = RateLimiter()
    now = 0.0
    allowed = 0
    for _ in range(10_000):  # 10 s at 1000 attempts per second from one source
        allowed += rate.allow("198.51.100.7", now)
        now += 0.001
    assert PACKETS_PER_SECOND * 10 <= allowed <= PACKETS_PER_SECOND * 10 + PACKETS_BURSTABLE


def test_idle_entries_collected_by_timer() -> None:
    rate = RateLimiter()
    assert rate.get_timer() is None
    rate.allow("192.0.2.1", 0.0)
    t = rate.get_timer()
    assert t == pytest.approx(GARBAGE_COLLECT_TIME)
    assert t is not None
    rate.allow("192.0.2.2", 0.9)
    rate.handle_timer(t)  # neither is idle for more than a second yet
    assert len(rate) == 2
    rate.handle_timer(2.0)  # .1 idle 2.0 s, .2 idle 1.1 s
    assert len(rate) == 0
    assert rate.get_timer() is None


def test_table_is_bounded_and_new_sources_denied_when_full() -> None:
    rate = RateLimiter(max_entries=8)
    hosts = [f"10.0.{i // 256}.{i % 256}" for i in range(1000)]
    results = [rate.allow(h, 0.5) for h in hosts]  # a spoofed-looking rotation, all within one second
    assert len(rate) == 8
    assert results[:8] == [True] * 8 and not any(results[8:])
    assert rate.table_full == 992
    # a rotation over max_entries + 1 sources gets nothing more than the table's buckets hold
    again = [rate.allow(h, 0.6) for h in hosts[:9]]
    assert again == [True] * 8 + [False]
    # after a second of idleness the table is collected on access, and a new source gets in
    assert rate.allow("10.9.9.9", 1.7)
    assert len(rate) == 1


def test_max_entries_validated() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        RateLimiter(max_entries=0)
