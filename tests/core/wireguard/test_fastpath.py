"""The batched transport fast paths against their slow references, on seeded random traffic.

`WireGuardDevice.receive_datagrams_untrusted` and `encapsulate` work in *runs* (per-peer state in locals,
bookkeeping applied once per run) and inline the in-order replay check. Their references here:

* the same device fed one datagram / one packet per call (every run is one packet, i.e. per-packet updates):
  the end state must be identical -- delivered packets, drop counters, `wg show` byte counters, roaming
  endpoint, timer deadlines, replay window, produced datagrams bytes for bytes;
* the brute-force replay reference of ``test_replay.py``: exactly the authentic datagrams it accepts are
  delivered, in order, and the rest are counted as replays;
* `ReplayWindow.check_and_update` (the slow path the device falls back to) against the brute-force set with
  counters crowded around the ring's wrap points.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import replace
from ipaddress import ip_network

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.wireguard import PeerConfig, PrivateKey, Timers, WireGuardDevice
from netsim.core.wireguard.config import Endpoint
from netsim.core.wireguard.messages import TRANSPORT_HEADER
from netsim.core.wireguard.peer import Peer
from netsim.core.wireguard.replay import RING_SIZE, WINDOW_SIZE, ReplayWindow
from netsim.core.wireguard.timers import REJECT_AFTER_MESSAGES
from netsim.errors import LocalProtocolError

A_ADDR = ("192.0.2.10", 40000)
B_ADDR = ("192.0.2.20", 51820)
ROAM = [A_ADDR, ("198.51.100.7", 1024), ("192.0.2.11", 40001)]
A4, B4, C4 = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2]), bytes([10, 9, 0, 3])
A6 = bytes.fromhex("fd000000000000000000000000000001")
B6 = bytes.fromhex("fd000000000000000000000000000002")
SPOOF4 = bytes([10, 9, 0, 77])
TIMERS = Timers(rekey_after_time=1e9, reject_after_time=1e9, keepalive_timeout=10.0)


class Reference:
    """Accept iff never accepted before, below the limit, and no more than WINDOW_SIZE behind the highest."""

    def __init__(self, limit: int) -> None:
        self.seen: set[int] = set()
        self.highest = -1
        self.limit = limit

    def check(self, c: int) -> bool:
        if c >= self.limit or c in self.seen or (self.highest >= 0 and self.highest - c > WINDOW_SIZE):
            return False
        self.seen.add(c)
        self.highest = max(self.highest, c)
        return True


def ipv4(src: bytes, dst: bytes, payload: bytes, total: int | None = None) -> bytes:
    n = 20 + len(payload)
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, n if total is None else total, 0, 0, 64, 17, 0, src, dst) + payload


def ipv6(src: bytes, dst: bytes, payload: bytes) -> bytes:
    return struct.pack(">IHBB16s16s", 6 << 28, len(payload), 17, 64, src, dst) + payload


def _ephemeral(seed: int) -> Callable[[], X25519PrivateKey]:
    rng = random.Random(seed)
    return lambda: X25519PrivateKey.from_private_bytes(rng.randbytes(32))


def _device(key: PrivateKey, peers: list[PeerConfig], seed: int, timers: Timers) -> WireGuardDevice:
    return WireGuardDevice(key, peers, timers=timers, rng=random.Random(seed), ephemeral=_ephemeral(seed + 100))


def _world(
    seed: int, timers: Timers = TIMERS
) -> tuple[WireGuardDevice, WireGuardDevice, WireGuardDevice, bytes, bytes]:
    """A (initiator) and two identical responders B1, B2 whose `next` keypair is not yet confirmed.

    Returns A, B1, B2, A's initiation and A's confirming keepalive (not delivered yet).
    """
    rng = random.Random(seed)
    ka, kb, kc = (PrivateKey.generate(rng.randbytes) for _ in range(3))
    a = _device(
        ka,
        [
            PeerConfig(
                kb.public_key(),
                endpoint=Endpoint(*B_ADDR),
                allowed_ips=(ip_network("10.9.0.2/32"), ip_network("fd00::/64")),
            ),
            # a second peer with no session: packets for it are staged
            PeerConfig(
                kc.public_key(), endpoint=Endpoint("192.0.2.30", 51820), allowed_ips=(ip_network("10.9.0.3/32"),)
            ),
        ],
        seed + 1,
        timers,
    )
    bs = [
        _device(
            kb,
            [
                PeerConfig(
                    ka.public_key(),
                    persistent_keepalive=25,
                    allowed_ips=(ip_network("10.9.0.1/32"), ip_network("fd00::1/128")),
                )
            ],
            seed + 2,
            timers,
        )
        for _ in range(2)
    ]
    a.initiate(a.peers[0], 0.0)
    [(init, _)] = a.datagrams_to_send(0.0)
    for b in bs:
        b.receive_datagram_untrusted(init, A_ADDR, 0.0)
    [(resp1, _)] = bs[0].datagrams_to_send(0.0)
    [(resp2, _)] = bs[1].datagrams_to_send(0.0)
    assert resp1 == resp2  # the two responders are deterministic twins
    a.receive_datagram_untrusted(resp1, B_ADDR, 0.0)
    [(keepalive, _)] = a.datagrams_to_send(0.0)
    assert bs[0].peers[0].next is not None and bs[0].peers[0].current is None
    return a, bs[0], bs[1], init, keepalive


def _inner(rng: random.Random) -> tuple[str, bytes]:
    """A random inner packet from A to B and what B must do with it."""
    payload = rng.randbytes(rng.choice([0, 1, 15, 16, 17, 44, 100, 555]))
    kind = rng.choices(["ok4", "ok6", "spoof", "malformed"], [8, 2, 1, 1])[0]
    if kind == "ok4":
        return "ok", ipv4(A4, B4, payload)
    if kind == "ok6":
        return "ok", ipv6(A6, B6, payload)
    if kind == "spoof":
        return "spoof", ipv4(SPOOF4, B4, payload)
    return "malformed", ipv4(A4, B4, payload, total=19)  # total length below the header's own size


def _split(rng: random.Random, items: list[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    i = 0
    while i < len(items):
        k = rng.randint(1, 70)
        out.append(items[i : i + k])
        i += k
    return out


def _peer_state(p: Peer) -> tuple[object, ...]:
    kps = [(k.local_index, k.send_counter, k.replay.highest, bytes(k.replay.ring)) for k in p.keypairs()]
    return (
        p.rx_bytes,
        p.tx_bytes,
        p.endpoint,
        p.t_keepalive,
        p.t_new_handshake,
        p.t_persistent,
        p.t_retransmit,
        p.need_another_keepalive,
        p.last_handshake,
        p.current is not None and p.current.local_index,
        p.previous is not None and p.previous.local_index,
        p.next is not None and p.next.local_index,
        kps,
        list(p.staged),
    )


def _device_state(d: WireGuardDevice) -> tuple[object, ...]:
    return (d.statistics(), [_peer_state(p) for p in d.peers], d.datagrams_to_send(0.0), d.get_timer())


def _sender_state(d: WireGuardDevice) -> tuple[object, ...]:
    """`_device_state` minus what depends on the order of draws from the shared RNG.

    Timer jitter and handshake indices come from one RNG; a batch draws B's jitter at its end, one packet
    per call draws it after each packet, so C's handshake index and the jittered deadlines legitimately
    differ (the per-batch order is the design, as before the fast path). Their presence must not.
    """
    b, c = d.peers
    return (
        d.statistics(),
        _peer_state(b)[:4] + _peer_state(b)[5:6] + _peer_state(b)[7:],
        b.t_new_handshake is None,
        b.t_retransmit is None,
        list(c.staged),
        c.tx_bytes,
        c.t_retransmit is None,
        [(len(m), addr) for m, addr in d.datagrams_to_send(0.0)],
    )


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32))
def test_receive_batches_equal_per_datagram_and_replay_reference(seed: int) -> None:
    rng = random.Random(seed)
    a, b1, b2, init, keepalive = _world(seed)
    # A's traffic, in counter order; `meta[i]` is (counter, what B must do) for authentic datagrams
    wire: list[tuple[bytes, tuple[int, str] | None]] = [(keepalive, (0, "keepalive"))]
    buf = [bytearray(700) for _ in range(8)]
    sizes, addrs = [0] * 8, [None] * 8
    for _ in range(rng.randint(1, 40)):
        batch = [_inner(rng) for _ in range(rng.randint(1, 8))]
        assert a.encapsulate([p for _, p in batch], 1.0, buf, sizes, addrs) == len(batch)  # type: ignore[arg-type]
        for (kind, _), b, size in zip(batch, buf, sizes, strict=False):
            counter = TRANSPORT_HEADER.unpack_from(b)[2]
            wire.append((bytes(b[:size]), (counter, kind)))
    # perturb: reorder, duplicate, lose, tamper, junk, a replayed initiation
    stream: list[tuple[bytes, tuple[int, str] | None]] = []
    for item in wire:
        r = rng.random()
        if r < 0.05:
            continue  # lost: the counter jumps
        stream.append(item)
        if r < 0.15:
            stream.insert(rng.randrange(len(stream)), item)  # duplicate, earlier or later
        elif r < 0.2:
            bad = bytearray(item[0])
            bad[rng.randrange(16, len(bad))] ^= 1 << rng.randrange(8)
            stream.append((bytes(bad), None))
        elif r < 0.23:
            stream.append((TRANSPORT_HEADER.pack(4, rng.getrandbits(32), 0) + rng.randbytes(32), None))
        elif r < 0.25:
            stream.append((init, None))
        elif r < 0.27:
            stream.append((rng.randbytes(rng.randint(0, 40)), None))
    if len(stream) > 3 and rng.random() < 0.5:
        i = rng.randrange(len(stream) - 2)
        stream[i], stream[i + 2] = stream[i + 2], stream[i]
    datagrams = [d for d, _ in stream]
    srcs = [rng.choice(ROAM) for _ in datagrams]
    # oracle: the brute-force replay reference decides which authentic datagrams count, in stream order
    ref = Reference(REJECT_AFTER_MESSAGES)
    accepted = [meta is not None and ref.check(meta[0]) for _, meta in stream]
    if rng.random() < 0.5:
        # B has data waiting for the session: it goes out when A's first packet confirms `next`, mid-batch
        for dev in (b1, b2):
            assert dev.encapsulate([ipv4(B4, A4, b"early")], 0.5, [bytearray(100)], [0], [None]) == 0
    # fast: random batches; slow: one datagram per call; the states must agree after every batch
    got1: list[bytes] = []
    last = ("none", 0.0)  # B's last authenticated receive or data send, and when (they drive its timers)
    i = 0
    for chunk in _split(rng, datagrams):
        k, now = len(chunk), 2.0 + i
        b1.receive_datagrams_untrusted(chunk, srcs[i : i + k], now)
        for d, src in zip(chunk, srcs[i : i + k], strict=True):
            b2.receive_datagram_untrusted(d, src, now)
        if any(accepted[i : i + k]):
            last = ("auth", now)
        i += k
        batch1 = [p for _, p in b1.take_received()]
        assert batch1 == [p for _, p in b2.take_received()]
        got1 += batch1
        assert _device_state(b1) == _device_state(b2)
        # B answers now and then (timersDataSent resets the keepalive timer, so timersDataReceived runs again)
        if b1.peers[0].current is not None and rng.random() < 0.5:
            for dev in (b1, b2):
                assert dev.encapsulate([ipv4(B4, A4, b"pong")], now, [bytearray(100)], [0], [None]) == 1
            last = ("sent", now)
        peer = b1.peers[0]
        if last[0] != "none":
            # any authenticated packet re-arms the persistent keepalive (timersAnyAuthenticatedPacket*)
            assert peer.t_persistent == 25 + last[1]
        # timersAnyAuthenticatedPacketReceived stops new_handshake; sending data (re)starts it
        assert (peer.t_new_handshake is None) == (last[0] != "sent")
    expect = {"ok": 0, "spoof": 0, "malformed": 0, "keepalive": 0, "replay": 0}
    endpoint = A_ADDR  # where the initiation came from
    for (_, meta), src, ok in zip(stream, srcs, accepted, strict=True):
        if meta is not None:
            expect[meta[1] if ok else "replay"] += 1
            endpoint = src if ok else endpoint  # roaming: the latest authenticated source
    peer = b1.peers[0]
    assert peer.endpoint == endpoint
    drops = b1.statistics().drops
    assert len(got1) == expect["ok"] == b1.rx_packets
    assert b1.rx_keepalives == expect["keepalive"]
    assert drops["replay"] == expect["replay"]
    assert drops["inner_src_not_allowed"] == expect["spoof"]
    assert drops["inner_malformed"] == expect["malformed"]
    # `wg show` rx: the consumed initiation plus every authentic, accepted transport message (replays excluded)
    assert peer.rx_bytes == len(init) + sum(len(d) for (d, _), ok in zip(stream, accepted, strict=True) if ok)
    if last[0] != "none":
        assert peer.current is not None  # the first authentic datagram confirmed `next` mid-batch


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32))
def test_encapsulate_batches_equal_per_packet(seed: int) -> None:
    rng = random.Random(seed)
    # a low REJECT_AFTER_MESSAGES sometimes: B's session then runs out mid-batch and packets are staged
    timers = TIMERS if rng.random() < 0.5 else replace(TIMERS, reject_after_messages=rng.randint(1, 120))
    (a1, _, _, _, _), (a2, _, _, _, _) = _world(seed, timers), _world(seed, timers)
    packets: list[bytes] = []
    for _ in range(rng.randint(1, 150)):
        r = rng.random()
        payload = rng.randbytes(rng.choice([0, 12, 16, 100, 555, 1380, 1400]))
        if r < 0.7:
            packets.append(ipv4(A4, B4, payload))
        elif r < 0.8:
            packets.append(ipv6(A6, B6, payload))
        elif r < 0.85:
            packets.append(ipv4(A4, C4, payload))  # peer without a session: staged
        elif r < 0.9:
            packets.append(ipv4(A4, bytes([10, 200, 0, 1]), payload))  # no route
        else:
            packets.append(rng.randbytes(rng.randint(0, 30)))  # malformed
    # fast: random batches into memoryviews; slow: one packet per call into bytearrays; compare every batch
    sizes: list[int] = []
    i = 0
    for chunk in _split(rng, packets):
        k = len(chunk)
        lens = [rng.choice([1500, 1500, 1500, 100]) for _ in range(k)]  # some too small: oversize
        bufs1 = [memoryview(bytearray(n)) for n in lens]
        s1, ad1 = [0] * k, [None] * k
        views = [memoryview(bytearray(p)) for p in chunk]  # as the helper passes them (IPC batch slices)
        produced = a1.encapsulate(views, 1.0 + i, bufs1, s1, ad1)  # type: ignore[arg-type]
        bufs2 = [bytearray(n) for n in lens]
        s2, ad2 = [0] * k, [None] * k
        for j, pkt in enumerate(chunk):
            s, ad = [0], [None]
            assert a2.encapsulate([pkt], 1.0 + i, [bufs2[j]], s, ad) == (1 if s[0] else 0)  # type: ignore[arg-type]
            s2[j], ad2[j] = s[0], ad[0]
        assert produced == sum(1 for n in s1 if n)
        assert s1 == s2 and ad1 == ad2
        assert [bytes(b[:n]) for b, n in zip(bufs1, s1, strict=True)] == [
            bytes(b[:n]) for b, n in zip(bufs2, s2, strict=True)
        ]
        assert _sender_state(a1) == _sender_state(a2)
        sizes += s1
        i += k
    if timers is TIMERS:  # (with the low limit, rekey initiations are counted too)
        # `wg show` tx: the initiation, the confirming keepalive, then every datagram produced (all for B)
        assert a1.peers[0].tx_bytes == 148 + 32 + sum(sizes)


# ring wrap points: counters crowd around multiples of RING_SIZE, with jumps of about a window
_near_wrap = st.builds(lambda k, d: max(0, k * RING_SIZE + d), st.integers(0, 6), st.integers(-70, 70)) | st.integers(
    0, 8 * RING_SIZE
)


@settings(max_examples=300)
@given(st.lists(_near_wrap, max_size=200))
def test_replay_ring_matches_reference_at_wrap_points(counters: list[int]) -> None:
    w, ref = ReplayWindow(REJECT_AFTER_MESSAGES), Reference(REJECT_AFTER_MESSAGES)
    for c in counters:
        assert w.check_and_update(c) == ref.check(c), c


@pytest.mark.reliability("S6")
def test_encapsulate_never_reuses_a_counter_when_the_caller_errs() -> None:
    a, _, _, _, _ = _world(7)
    pkts = [ipv4(A4, B4, b"x" * 20)] * 4
    sizes, addrs = [0] * 4, [None] * 4
    with pytest.raises(LocalProtocolError, match="out_bufs"):
        a.encapsulate(pkts, 1.0, [bytearray(100)] * 3, sizes, addrs)  # type: ignore[arg-type]
    # a read-only buffer in the middle makes the AEAD call raise after two packets were encrypted
    bufs: list[object] = [bytearray(100), bytearray(100), bytes(100), bytearray(100)]
    with pytest.raises(TypeError):
        a.encapsulate(pkts, 1.0, bufs, sizes, addrs)  # type: ignore[arg-type]
    good = [bytearray(100) for _ in range(4)]
    assert a.encapsulate(pkts, 1.0, good, sizes, addrs) == 4  # type: ignore[arg-type]
    counters = [TRANSPORT_HEADER.unpack_from(b)[2] for b in bufs[:2] + good]  # type: ignore[arg-type]
    assert counters == sorted(set(counters))  # strictly increasing: the two encrypted before the error kept theirs
    assert a.statistics().tx_packets == 6 and a.peers[0].tx_bytes == 148 + 32 + 6 * 80  # 40-byte packets padded to 48
