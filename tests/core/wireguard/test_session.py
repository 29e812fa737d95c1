"""Transport session details: nonce layout, counters, padding, and nonce uniqueness across rekeys."""

from __future__ import annotations

import random
import struct
from ipaddress import ip_network

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.wireguard import PeerConfig, PrivateKey, Timers, WireGuardDevice
from netsim.core.wireguard.config import Endpoint
from netsim.core.wireguard.messages import TRANSPORT_HEADER
from netsim.core.wireguard.session import NONCE


def test_nonce_layout() -> None:
    assert NONCE.pack(1) == bytes(4) + (1).to_bytes(8, "little")
    assert NONCE.pack(2**64 - 1) == bytes(4) + b"\xff" * 8


def _pair(timers: Timers) -> tuple[WireGuardDevice, WireGuardDevice]:
    rng = random.Random(7)
    ka, kb = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
    a = WireGuardDevice(
        ka,
        [
            PeerConfig(
                public_key=kb.public_key(), endpoint=Endpoint("192.0.2.2", 1), allowed_ips=(ip_network("10.0.0.2/32"),)
            )
        ],
        timers=timers,
        rng=random.Random(1),
    )
    b = WireGuardDevice(
        kb,
        [PeerConfig(public_key=ka.public_key(), allowed_ips=(ip_network("10.0.0.1/32"),))],
        timers=timers,
        rng=random.Random(2),
    )
    return a, b


def _pkt(n: int) -> bytes:
    return (
        struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + n, 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        + b"p" * n
    )


def _handshake(a: WireGuardDevice, b: WireGuardDevice, now: float) -> None:
    while True:
        moved = False
        for d, _ in a.datagrams_to_send(now):
            b.receive_datagram_untrusted(d, ("192.0.2.1", 2), now)
            moved = True
        for d, _ in b.datagrams_to_send(now):
            a.receive_datagram_untrusted(d, ("192.0.2.2", 1), now)
            moved = True
        if not moved:
            return


def test_counter_is_sent_in_clear_and_decrypts_with_raw_aead() -> None:
    a, b = _pair(Timers())
    a.initiate(a.peers[0], 0.0)
    _handshake(a, b, 0.0)
    kp = a.peers[0].current
    assert kp is not None
    first = kp.send_counter
    bufs = [bytearray(200) for _ in range(3)]
    sizes, addrs = [0] * 3, [None] * 3
    a.encapsulate([_pkt(1), _pkt(2), _pkt(3)], 0.1, bufs, sizes, addrs)  # type: ignore[arg-type]
    recv_key = b.peers[0].current
    assert recv_key is not None
    for i, (buf, n) in enumerate(zip(bufs, sizes, strict=True)):
        typ, receiver, counter = TRANSPORT_HEADER.unpack_from(buf)
        assert typ == 4 and receiver == recv_key.local_index and counter == first + i
        plain = recv_key.recv.decrypt(NONCE.pack(counter), bytes(buf[16:n]), None)
        assert plain[: 21 + i] == _pkt(1 + i) and set(plain[21 + i :]) <= {0} and len(plain) % 16 == 0
    assert isinstance(recv_key.recv, ChaCha20Poly1305)


@pytest.mark.reliability("S6")
@settings(max_examples=30)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12))
def test_nonce_never_repeats_under_a_key_across_rekeys(bursts: list[int]) -> None:
    # S6: (key, counter) pairs are unique even while sessions rotate every few messages
    a, b = _pair(Timers(rekey_after_messages=4, rekey_timeout=1.0))
    seen: set[tuple[int, int]] = set()
    now = 0.0
    for n in bursts:
        now += 1.5
        bufs = [bytearray(200) for _ in range(n)]
        sizes, addrs = [0] * n, [None] * n
        a.encapsulate([_pkt(4)] * n, now, bufs, sizes, addrs)  # type: ignore[arg-type]
        for buf, size in zip(bufs, sizes, strict=True):
            if size:
                _, receiver, counter = TRANSPORT_HEADER.unpack_from(buf)
                assert (receiver, counter) not in seen
                seen.add((receiver, counter))
                b.receive_datagram_untrusted(bytes(buf[:size]), ("192.0.2.1", 2), now)
        for d, _ in a.datagrams_to_send(now):
            if d[0] == 4:
                _, receiver, counter = TRANSPORT_HEADER.unpack_from(d)
                assert (receiver, counter) not in seen
                seen.add((receiver, counter))
            b.receive_datagram_untrusted(d, ("192.0.2.1", 2), now)
        _handshake(a, b, now)
    assert b.statistics().drops["replay"] == 0
