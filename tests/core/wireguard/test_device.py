"""The WireGuard state machine between two sans-IO devices, driven by hand with an explicit clock."""

from __future__ import annotations

import itertools
import random
import struct
from ipaddress import ip_network

import pytest

from netsim.core.wireguard import (
    HandshakeCompleted,
    HandshakeTimeout,
    KeysZeroed,
    PeerConfig,
    PresharedKey,
    PrivateKey,
    Timers,
    WireGuardDevice,
)
from netsim.core.wireguard.config import Endpoint
from netsim.core.wireguard.messages import INITIATION_SIZE, MSG_COOKIE_REPLY, RESPONSE_SIZE

A_ADDR = ("192.0.2.10", 40000)
B_ADDR = ("192.0.2.20", 51820)
A_TUN, B_TUN = "10.9.0.1", "10.9.0.2"
WALL = 1_700_000_000.0


def ipv4(src: str, dst: str, payload: bytes = b"hello", proto: int = 17) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        proto,
        0,
        bytes(map(int, src.split("."))),
        bytes(map(int, dst.split("."))),
    )
    return hdr + payload


class Pair:
    """Device A (initiator, knows B's endpoint) and B (responder); datagrams moved by `pump`."""

    def __init__(self, timers: Timers | None = None, psk: bool = False, seed: int = 1, **b_kwargs: object) -> None:
        rng = random.Random(seed)
        self.ka, self.kb = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
        shared = PresharedKey.generate(rng.randbytes) if psk else None
        self.a = WireGuardDevice(
            self.ka,
            [
                PeerConfig(
                    public_key=self.kb.public_key(),
                    preshared_key=shared,
                    endpoint=Endpoint(*B_ADDR),
                    allowed_ips=(ip_network(f"{B_TUN}/32"),),
                )
            ],
            timers=timers,
            rng=random.Random(seed + 1),
            wall_offset=WALL,
        )
        self.b = WireGuardDevice(
            self.kb,
            [
                PeerConfig(
                    public_key=self.ka.public_key(), preshared_key=shared, allowed_ips=(ip_network(f"{A_TUN}/32"),)
                )
            ],
            timers=timers,
            rng=random.Random(seed + 2),
            wall_offset=WALL,
            **b_kwargs,  # type: ignore[arg-type]
        )
        self.wire: list[tuple[str, bytes]] = []  # every datagram moved, for replay tests

    def pump(self, now: float, *, drop: bool = False) -> int:
        """Move queued control datagrams both ways until quiet; returns how many moved."""
        moved = 0
        while True:
            batch = [("a", d) for d, _ in self.a.datagrams_to_send(now)] + [
                ("b", d) for d, _ in self.b.datagrams_to_send(now)
            ]
            if not batch:
                return moved
            for src, d in batch:
                moved += 1
                self.wire.append((src, d))
                if drop:
                    continue
                if src == "a":
                    self.b.receive_datagram_untrusted(d, A_ADDR, now)
                else:
                    self.a.receive_datagram_untrusted(d, B_ADDR, now)

    def send(self, src: str, packets: list[bytes], now: float) -> list[bytes]:
        dev = self.a if src == "a" else self.b
        bufs = [bytearray(2048) for _ in packets]
        sizes = [0] * len(packets)
        addrs: list[object] = [None] * len(packets)
        dev.encapsulate(packets, now, bufs, sizes, addrs)  # type: ignore[arg-type]
        return [bytes(b[:n]) for b, n in zip(bufs, sizes, strict=True) if n]

    def deliver(self, src: str, datagrams: list[bytes], now: float) -> None:
        dst, addr = (self.b, A_ADDR) if src == "a" else (self.a, B_ADDR)
        for d in datagrams:
            self.wire.append((src, d))
            dst.receive_datagram_untrusted(d, addr, now)

    def connect(self, now: float = 0.0) -> None:
        """Handshake via a staged packet; B is confirmed by A's first packet."""
        assert self.send("a", [ipv4(A_TUN, B_TUN, b"first")], now) == []
        self.pump(now)
        assert [p for _, p in self.b.take_received()] == [ipv4(A_TUN, B_TUN, b"first")]


@pytest.mark.parametrize("psk", [False, True])
def test_handshake_and_data_both_ways(psk: bool) -> None:
    p = Pair(psk=psk)
    p.connect(0.0)
    assert isinstance(p.a.next_event(), HandshakeCompleted)
    ev = p.b.next_event()
    assert isinstance(ev, HandshakeCompleted) and not ev.initiator
    for i in range(5):
        p.deliver("b", p.send("b", [ipv4(B_TUN, A_TUN, bytes([i]) * (i * 37))], 0.1), 0.1)
        p.deliver("a", p.send("a", [ipv4(A_TUN, B_TUN, bytes([i]) * i)], 0.1), 0.1)
    got_a = [pkt for _, pkt in p.a.take_received()]
    got_b = [pkt for _, pkt in p.b.take_received()]
    assert got_a == [ipv4(B_TUN, A_TUN, bytes([i]) * (i * 37)) for i in range(5)]
    assert got_b == [ipv4(A_TUN, B_TUN, bytes([i]) * i) for i in range(5)]
    # byte counters agree across the wire, as `wg show` on either side would
    (pa,), (pb,) = p.a.peers, p.b.peers
    assert pa.tx_bytes == pb.rx_bytes and pb.tx_bytes == pa.rx_bytes
    assert pa.last_handshake == WALL + 0.0


def test_transport_layout_padding_and_sizes() -> None:
    p = Pair()
    p.connect()
    for n in (0, 1, 15, 16, 17, 100):
        pkt = ipv4(A_TUN, B_TUN, b"x" * n)
        (d,) = p.send("a", [pkt], 1.0)
        assert d[:4] == b"\x04\0\0\0"
        assert (len(d) - 32) % 16 == 0 and len(d) - 32 >= len(pkt)
        p.deliver("a", [d], 1.0)
        assert [x for _, x in p.b.take_received()] == [pkt]  # padding trimmed by the IPv4 total length


def test_responder_keeps_next_until_confirmed() -> None:
    p = Pair()
    p.a.initiate(p.a.peers[0], 0.0)
    init = [d for d, _ in p.a.datagrams_to_send(0.0)]
    assert len(init[0]) == INITIATION_SIZE
    p.deliver("a", init, 0.0)
    (resp,) = [d for d, _ in p.b.datagrams_to_send(0.0)]
    assert len(resp) == RESPONSE_SIZE
    peer_b = p.b.peers[0]
    assert peer_b.next is not None and peer_b.current is None
    # B has no confirmed session: its outbound data is staged, not sent on `next`
    assert p.send("b", [ipv4(B_TUN, A_TUN)], 0.0) == []
    p.deliver("b", [resp], 0.0)
    # A confirms with its staged data or a keepalive; B rotates next -> current and flushes its staged packet
    p.pump(0.0)
    assert peer_b.current is not None and peer_b.next is None
    assert [x for _, x in p.a.take_received()] == [ipv4(B_TUN, A_TUN)]


@pytest.mark.reliability("B6", "S4")
def test_replayed_and_tampered_datagrams_dropped_without_reply() -> None:
    p = Pair()
    p.connect()
    ds = p.send("a", [ipv4(A_TUN, B_TUN, b"once")], 1.0)
    p.deliver("a", ds, 1.0)
    p.deliver("a", ds, 1.1)  # replay
    bad = bytearray(ds[0])
    bad[-1] ^= 0x80
    p.deliver("a", [bytes(bad)], 1.2)
    unknown = bytearray(ds[0])
    unknown[4:8] = b"\xde\xad\xbe\xef"
    p.deliver("a", [bytes(unknown)], 1.3)
    assert [x for _, x in p.b.take_received()] == [ipv4(A_TUN, B_TUN, b"once")]
    drops = p.b.statistics().drops
    assert drops["replay"] == 1 and drops["decrypt_failed"] == 1 and drops["unknown_receiver"] == 1
    assert p.b.datagrams_to_send(1.3) == []  # no oracle: nothing answered


def test_replayed_initiation_rejected_by_timestamp() -> None:
    p = Pair()
    p.connect(0.0)
    (init,) = [d for s, d in p.wire if len(d) == INITIATION_SIZE]
    p.deliver("a", [init], 5.0)
    assert p.b.statistics().drops["stale_timestamp"] == 1
    assert p.b.datagrams_to_send(5.0) == []


def test_bad_mac1_dropped() -> None:
    p = Pair()
    p.a.initiate(p.a.peers[0], 0.0)
    (init,) = [d for d, _ in p.a.datagrams_to_send(0.0)]
    bad = bytearray(init)
    bad[120] ^= 1
    p.deliver("a", [bytes(bad)], 0.0)
    assert p.b.statistics().drops["bad_mac1"] == 1
    assert p.b.datagrams_to_send(0.0) == []


@pytest.mark.reliability("S5")
def test_inner_source_must_be_allowed() -> None:
    p = Pair()
    p.connect()
    p.deliver("a", p.send("a", [ipv4("10.9.9.9", B_TUN)], 1.0), 1.0)
    garbage = b"\x45" + bytes(30)  # IPv4 with total length 0
    p.deliver(
        "a", p.send("a", [garbage[:1] + b"\0" + bytes(14) + bytes(map(int, B_TUN.split("."))) + bytes(11)], 1.0), 1.0
    )
    drops = p.b.statistics().drops
    assert drops["inner_src_not_allowed"] == 1 and drops["inner_malformed"] == 1
    assert p.b.take_received() == []


def test_outbound_no_route_and_staged_overflow() -> None:
    p = Pair(Timers(max_staged_packets=4))
    assert p.send("a", [ipv4(A_TUN, "10.200.0.1")], 0.0) == []
    assert p.a.statistics().drops["no_route"] == 1
    p.send("a", [ipv4(A_TUN, B_TUN, bytes([i])) for i in range(6)], 0.0)
    st = p.a.statistics()
    assert st.staged == 4 and st.drops["staged_overflow"] == 2
    p.pump(0.0)
    assert len(p.b.take_received()) == 4


def test_rekey_after_messages_with_previous_kept_for_in_flight() -> None:
    p = Pair(Timers(rekey_after_messages=5))
    p.connect(0.0)
    old = p.a.peers[0].current
    in_flight = p.send("a", [ipv4(A_TUN, B_TUN, bytes([i])) for i in range(3)], 0.5)
    now = 6.0  # past REKEY_TIMEOUT since the first initiation (rate limit)
    p.deliver("a", p.send("a", [ipv4(A_TUN, B_TUN, bytes([i])) for i in range(3, 9)], now), now)
    assert p.a.statistics().handshakes_initiated == 2
    p.pump(now)
    assert p.a.peers[0].current is not old and p.a.peers[0].previous is old
    p.deliver("a", in_flight, now)  # late packets of the old session still decrypt
    got = sorted(x[-1] for _, x in p.b.take_received())
    assert got == list(range(9))  # each exactly once, across both sessions
    assert p.b.statistics().handshakes_completed == 2


def test_rekey_after_time_and_reject_after_time() -> None:
    t = Timers(rekey_after_time=3.0, reject_after_time=5.0, keepalive_timeout=100.0, rekey_timeout=1.0)
    p = Pair(t)
    p.connect(0.0)
    p.deliver("a", p.send("a", [ipv4(A_TUN, B_TUN)], 3.5), 3.5)  # older than REKEY_AFTER_TIME: rekey
    assert p.a.statistics().handshakes_initiated == 2
    p.pump(3.5)
    assert p.a.statistics().handshakes_completed == 2
    # a keypair older than REJECT_AFTER_TIME is refused on receipt
    p2 = Pair(t)
    p2.connect(0.0)
    ds = p2.send("a", [ipv4(A_TUN, B_TUN)], 1.0)
    p2.deliver("a", ds, 5.5)
    assert p2.b.statistics().drops["expired_keypair"] == 1


def test_passive_keepalive_after_received_data() -> None:
    p = Pair()
    p.connect(0.0)
    assert p.b.get_timer() == pytest.approx(10.0)  # B received data and has not answered yet
    p.b.handle_timer(10.0)
    (ka,) = p.b.datagrams_to_send(10.0)
    assert len(ka[0]) == 32  # empty plaintext + tag + header
    p.deliver("b", [ka[0]], 10.0)
    assert p.a.statistics().rx_keepalives == 1 and p.a.take_received() == []


def test_persistent_keepalive() -> None:
    rng = random.Random(3)
    ka, kb = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
    a = WireGuardDevice(
        ka,
        [PeerConfig(public_key=kb.public_key(), endpoint=Endpoint(*B_ADDR), persistent_keepalive=25)],
        rng=random.Random(1),
    )
    peer = a.peers[0]
    a.initiate(peer, 0.0)
    a.datagrams_to_send(0.0)
    assert peer.t_persistent == 25.0


def test_handshake_retransmission_with_jitter_then_timeout() -> None:
    p = Pair()
    p.send("a", [ipv4(A_TUN, B_TUN)], 0.0)
    sent_at = []
    now = 0.0
    for _ in range(40):
        if p.a.datagrams_to_send(now):
            sent_at.append(now)
        t = p.a.get_timer()
        if t is None:
            break
        now = t
        p.a.handle_timer(now)
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert all(5.0 <= g <= 5.0 + 0.334 for g in gaps), gaps
    assert len({round(g, 6) for g in gaps}) > 1  # jittered, not a fixed period
    assert len(sent_at) == 1 + 18 + 1 or len(sent_at) == 20  # first + MAX_TIMER_HANDSHAKES retries
    events = []
    while (e := p.a.next_event()) is not None:
        events.append(e)
    assert any(isinstance(e, HandshakeTimeout) for e in events)
    assert p.a.statistics().drops["handshake_timeout"] == 1
    assert sent_at[-1] <= 90.0 + 20 * 0.334 + 5.0


def test_keys_zeroed_after_three_reject_times() -> None:
    p = Pair(Timers(reject_after_time=10.0))
    p.connect(0.0)
    now = 0.0
    while (t := p.a.get_timer()) is not None and t <= 31.0:
        now = t
        p.a.handle_timer(now)
        p.a.datagrams_to_send(now)
    evs = []
    while (e := p.a.next_event()) is not None:
        evs.append(e)
    assert any(isinstance(e, KeysZeroed) for e in evs)
    assert p.a.peers[0].current is None


def test_cookie_reply_under_load() -> None:
    p = Pair()
    p.b.under_load = True
    p.send("a", [ipv4(A_TUN, B_TUN, b"data")], 0.0)
    (init,) = [d for d, _ in p.a.datagrams_to_send(0.0)]
    p.deliver("a", [init], 0.0)
    (cookie,) = [d for d, _ in p.b.datagrams_to_send(0.0)]
    assert cookie[0] == MSG_COOKIE_REPLY and len(cookie) == 64
    assert p.b.statistics().drops["bad_mac2"] == 1
    p.deliver("b", [cookie], 0.0)
    assert p.a.statistics().cookie_replies_received == 1
    # the retransmission carries mac2 and is accepted despite the load
    p.a.handle_timer(p.a.get_timer() or 0.0)
    p.pump(6.0)
    assert [x for _, x in p.b.take_received()] == [ipv4(A_TUN, B_TUN, b"data")]
    assert p.b.statistics().cookie_replies_sent == 1


def test_load_threshold_triggers_cookie_mode() -> None:
    p = Pair(load_threshold=0)
    p.a.initiate(p.a.peers[0], 0.0)
    p.pump(0.0)
    assert p.b.statistics().cookie_replies_sent == 1


def test_config_errors_are_clear() -> None:
    k = PrivateKey.generate()
    with pytest.raises(ValueError, match="own public key"):
        WireGuardDevice(k, [PeerConfig(public_key=k.public_key())])
    with pytest.raises(ValueError, match="32 bytes"):
        WireGuardDevice(b"short")
    with pytest.raises(ValueError, match="host name"):
        WireGuardDevice(
            PrivateKey.generate(), [PeerConfig(public_key=k.public_key(), endpoint=Endpoint("vpn.example", 1))]
        )


def test_low_order_ephemeral_with_valid_mac1_is_dropped() -> None:
    # an attacker knowing B's public key can compute mac1; a zero (low-order) ephemeral must not crash B
    from netsim.core.wireguard import noise
    from netsim.core.wireguard.messages import INITIATION

    p = Pair()
    body = INITIATION.pack(1, 1234, bytes(32), bytes(48), bytes(28), bytes(16), bytes(16))
    mac1 = noise.mac(noise.hash_(noise.LABEL_MAC1, bytes(p.kb.public_key())), body[:116])
    p.deliver("a", [body[:116] + mac1 + bytes(16)], 0.0)
    assert p.b.statistics().drops["handshake_failed"] == 1
    assert p.b.datagrams_to_send(0.0) == []
