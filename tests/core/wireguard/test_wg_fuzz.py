"""hypothesis: no datagram, random or a mutated real one, makes receive_datagram_untrusted raise or answer."""

from __future__ import annotations

import random
from ipaddress import ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.wireguard import PeerConfig, PrivateKey, WireGuardDevice
from netsim.core.wireguard.config import Endpoint

_rng = random.Random(11)
KA, KB = PrivateKey.generate(_rng.randbytes), PrivateKey.generate(_rng.randbytes)


def _devices() -> tuple[WireGuardDevice, WireGuardDevice]:
    a = WireGuardDevice(
        KA,
        [
            PeerConfig(
                public_key=KB.public_key(), endpoint=Endpoint("192.0.2.2", 1), allowed_ips=(ip_network("10.0.0.0/8"),)
            )
        ],
        rng=random.Random(1),
    )
    b = WireGuardDevice(
        KB, [PeerConfig(public_key=KA.public_key(), allowed_ips=(ip_network("0.0.0.0/0"),))], rng=random.Random(2)
    )
    return a, b


def _real_datagrams() -> list[bytes]:
    """An initiation, a response, a keepalive and a data message from a real exchange."""
    a, b = _devices()
    a.initiate(a.peers[0], 0.0)
    (init,) = [d for d, _ in a.datagrams_to_send(0.0)]
    b.receive_datagram_untrusted(init, ("192.0.2.1", 2), 0.0)
    (resp,) = [d for d, _ in b.datagrams_to_send(0.0)]
    a.receive_datagram_untrusted(resp, ("192.0.2.2", 1), 0.0)
    (ka,) = [d for d, _ in a.datagrams_to_send(0.0)]
    return [init, resp, ka]


REAL = _real_datagrams()
B_STATE = _devices()[1]


@pytest.mark.reliability("B6")
@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_nor_answer(data: bytes) -> None:
    B_STATE.receive_datagram_untrusted(data, ("198.51.100.9", 9), 1.0)
    assert B_STATE.datagrams_to_send(1.0) == []
    assert B_STATE.take_received() == []


@settings(max_examples=400)
@given(
    st.sampled_from(range(3)),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-8, 8),
)
@pytest.mark.reliability("B6")
def test_mutated_real_messages(which: int, flips: list[tuple[int, int]], resize: int) -> None:
    data = bytearray(REAL[which])
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    data = data + bytes(resize) if resize > 0 else data[: len(data) + resize] if resize < 0 else data
    _, b = _devices()
    b.receive_datagram_untrusted(bytes(data), ("198.51.100.9", 9), 1.0)
    out = b.datagrams_to_send(1.0)
    # only an intact initiation may be answered (mac2 is not checked unless under load)
    assert len(out) <= 1
    if out:
        assert len(data) == 148 and bytes(data[:132]) == REAL[0][:132]
    st_ = b.statistics()
    assert st_.rx_datagrams == 1
    assert st_.dropped + st_.rx_packets + st_.rx_keepalives + len(out) == 1


@settings(max_examples=200)
@given(
    st.sampled_from(range(3)),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
)
def test_under_load_only_cookie_replies_go_out(which: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(REAL[which])
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    _, b = _devices()
    b.under_load = True
    b.receive_datagram_untrusted(bytes(data), ("198.51.100.9", 9), 1.0)
    out = b.datagrams_to_send(1.0)
    # a message with a valid mac1 but no mac2 gets a 64-byte cookie reply, nothing else is ever answered
    assert all(d[0] == 3 and len(d) == 64 for d, _ in out)
    assert len(out) <= 1
