"""Issue 11 item 5: the helper's and the provider's ledgers cannot be falsified from the network, and what the
helper knows about losses is on the books (S12).

* crafted datagrams that mimic WireGuard message types go through the helper's receive path in memory: every
  counter stays >= 0 and nothing is unattributed;
* packets the flow drops as malformed are named drops of the provider's ``tun_read`` stage;
* data sent while the server is gone is ``sent_unconfirmed``, never ``forwarded``; a send with no route is
  ``udp_no_route``;
* malformed and spoofed-source inner packets are dropped before encryption, with or without a policy.
"""

from __future__ import annotations

import errno
import random
import struct
from ipaddress import ip_interface, ip_network
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netsim.core import ipc
from netsim.core.ledger import LedgerSnapshot
from netsim.core.policy import Action, Policy, PolicyEngine, Rule
from netsim.core.wireguard import messages as m
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
from netsim.core.wireguard.device import DATAGRAM_JUNK, WireGuardDevice, classify_datagram
from netsim.core.wireguard.keys import PrivateKey
from netsim.runtime.helper import Helper, UdpTransport
from netsim.testing.memory_tunnel import HELPER_ADDR, SERVER_ADDR, FakeNetwork, icmp_echo, memory_tunnel

WWW4, WWW6 = "203.0.113.10", "2001:db8:113::10"
CLIENT_V4, CLIENT_V6 = "10.66.0.2", "fd00:66::2"


def run_memory(fn: Any) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def stage(stats: dict[str, Any], name: str) -> dict[str, Any]:
    return stats["ledger"]["stages"][name]  # type: ignore[no-any-return]


def balanced(stats: dict[str, Any]) -> None:
    assert LedgerSnapshot.from_json_untrusted(stats["ledger"]).check() == []


# ---------------------------------------------------------------------------------------------- a helper, in memory
class SyncTunnel:
    """A `Helper` (not running its loops) with a handshake-complete session to a netsim server device.

    Datagrams are pushed straight into the helper's receive path (`Helper._receive`, what the network loop calls
    after ``recv_batch``); the clock is a plain number.
    """

    def __init__(self, seed: int = 1) -> None:
        rng = random.Random(seed)
        server_key, client_key = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
        self.now = 1000.0
        cfg = TunnelConfig(
            InterfaceConfig(
                private_key=client_key,
                addresses=(ip_interface(f"{CLIENT_V4}/32"), ip_interface(f"{CLIENT_V6}/128")),
                mtu=1420,
            ),
            (
                PeerConfig(
                    public_key=server_key.public_key(),
                    endpoint=Endpoint(*SERVER_ADDR),
                    allowed_ips=(ip_network("0.0.0.0/0"), ip_network("::/0")),
                ),
            ),
        )
        self.network = FakeNetwork()
        self.server_side = self.network.attach(SERVER_ADDR)  # collects what the helper sends
        self.helper = Helper(cfg, self.network.attach(HELPER_ADDR), clock=lambda: self.now, rng=random.Random(seed))
        self.server = WireGuardDevice(
            server_key,
            [PeerConfig(public_key=client_key.public_key(), allowed_ips=(ip_network(f"{CLIENT_V4}/32"),))],
            rng=random.Random(seed + 1),
        )
        dev = self.helper.device
        dev.initiate(dev.peers[0], self.now)
        self.helper._flush(self.now)
        self.to_server()  # initiation -> response
        self.receive([d for d, _ in self.server.datagrams_to_send(self.now)])
        self.to_server()  # the helper's confirming keepalive: the server's session becomes current
        assert dev.peers[0].current is not None

    def to_server(self) -> None:
        for data in self.sent_to_server():
            self.server.receive_datagram_untrusted(data, HELPER_ADDR, self.now)

    def sent_to_server(self) -> list[bytes]:
        out = [d for d, _ in self.server_side.inbox]
        self.server_side.inbox.clear()
        return out

    def receive(self, datagrams: list[bytes]) -> None:
        h = self.helper
        for start in range(0, len(datagrams), h.batch):
            chunk = datagrams[start : start + h.batch]
            for i, d in enumerate(chunk):
                h._rx_views[i][: len(d)] = d
                h._rx_sizes[i] = len(d)
                h._rx_addrs[i] = SERVER_ADDR
            h._receive(len(chunk), self.now)
            h._flush(self.now)

    def server_data(self, count: int) -> list[bytes]:
        """Real transport datagrams from the server (UDP echo replies to the client)."""
        pkts = [_udp(WWW4, CLIENT_V4, 7, 5000, b"r%d" % i) for i in range(count)]
        bufs, sizes, addrs = [bytearray(2048) for _ in pkts], [0] * count, [None] * count
        self.server.encapsulate(pkts, self.now, bufs, sizes, addrs)  # type: ignore[arg-type]
        return [bytes(b[:s]) for b, s in zip(bufs, sizes, strict=True) if s]

    def outbound(self, packets: list[bytes]) -> None:
        fams = tuple(ipc.AF_INET6 if p and p[0] >> 4 == 6 else ipc.AF_INET for p in packets)
        batch = ipc.PacketBatch(memoryview(b"".join(packets)), fams, tuple(len(p) for p in packets))
        self.helper._outbound(batch)


def _udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    from netsim.testing.memory_tunnel import udp_packet

    return udp_packet(src, dst, sport, dport, payload)


def assert_books(t: SyncTunnel, fed: int) -> None:
    snap = t.helper.statistics().ledger
    assert snap.check() == [], snap.check()
    for s in snap.stages:
        assert min(s.read, s.forwarded, s.queued, *(n for _, n in s.dropped)) >= 0, s
    assert snap["wg_decrypt"].read == fed
    assert all(v >= 0 for v in t.helper.device.statistics().drops.values())


# ---------------------------------------------------------------------------------------------- S12: crafted datagrams
MIMICS = (
    b"\x04\x01\x00\x00",  # first byte 4, u32 LE 0x104: not a transport message
    b"\x04\x00\x00\x01",
    b"\x01\x00\x00\x01",  # first byte 1, reserved byte set
    b"\x01\x00\x00\x00",
    b"\x02\x00\x00\x00",
    b"\x03\x00\x00\x00",
    b"\x04\x00\x00\x00",
    b"\x00\x00\x00\x04",
)
SIZES = (0, 1, 3, 4, 16, 31, 32, 33, 48, 64, 92, 148, 149, 200)


@pytest.mark.reliability("S12")
def test_datagram_04_01_00_00_cannot_drive_a_counter_negative() -> None:
    """The attack from the issue: the old helper took ``04 01 00 00 ...`` for transport data (first byte 4)
    while the device read a u32 type 0x104 and dropped it as bad_type, so ``dropped["control"]`` went to -1000
    and the ledger showed 1000 phantom unattributed packets."""
    t = SyncTunnel()
    before = t.helper.statistics().ledger["wg_decrypt"].read
    crafted = [b"\x04\x01\x00\x00" + bytes(28 + (i % 40)) for i in range(1000)]
    for i in range(0, 1000, 50):  # one short datagram per 50: the old helper counted it as "control"
        crafted.insert(i, b"\x01")
    t.receive(crafted)
    assert_books(t, before + 1020)
    st_ = t.helper.statistics().ledger["wg_decrypt"]
    assert st_.dropped_for("bad_type") == 1000 and st_.dropped_for("short") == 20
    assert st_.dropped_for("control") == 1  # the handshake response at setup, nothing from the attack


@pytest.mark.reliability("S12")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.tuples(st.sampled_from(MIMICS), st.sampled_from(SIZES), st.binary(min_size=200, max_size=200)).map(
                lambda t: (t[0] + t[2])[: t[1]]
            ),
            st.integers(0, 7).map(lambda i: ("real", i)),
            st.tuples(st.integers(0, 7), st.integers(0, 200)).map(lambda t: ("flip", t[0], t[1])),
        ),
        max_size=150,
    )
)
def test_any_datagram_mix_keeps_every_counter_nonnegative_and_the_ledger_exact(items: list[Any]) -> None:
    t = SyncTunnel()
    real = t.server_data(8)
    datagrams: list[bytes] = []
    for item in items:
        if isinstance(item, bytes):
            datagrams.append(item)
        elif item[0] == "real":  # genuine transport (delivered once; a repeat is a replay)
            datagrams.append(real[item[1]])
        else:  # a genuine datagram with one byte flipped (header, counter, ciphertext or tag)
            d = bytearray(real[item[1]])
            d[item[2] % len(d)] ^= 0x5A
            datagrams.append(bytes(d))
    before = t.helper.statistics().ledger["wg_decrypt"].read
    t.receive(datagrams)
    assert_books(t, before + len(datagrams))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=160), st.tuples(st.sampled_from(MIMICS), st.binary(max_size=156)).map(b"".join)))
def test_the_device_takes_the_path_classify_datagram_names(data: bytes) -> None:
    """The device's hot loop inlines the transport test; it must agree with `classify_datagram` for any input."""
    dev = WireGuardDevice(PrivateKey.generate(random.Random(3).randbytes), rng=random.Random(3))
    dev.receive_datagram_untrusted(data, ("192.0.2.9", 1), 0.0)
    moved = {k for k, v in dev.statistics().drops.items() if v}
    kind = classify_datagram(data)
    assert len(moved) == 1  # one outcome per datagram (no session: nothing is consumed)
    if kind == m.MSG_TRANSPORT:
        assert moved == {"unknown_receiver"}
    elif kind == DATAGRAM_JUNK:
        assert moved <= {"short", "bad_length", "bad_type"}
    else:
        assert moved <= {"bad_mac1", "unexpected_response"}


# ---------------------------------------------------------------------------------------------- flow malformed drops
@pytest.mark.reliability("B5")
def test_packets_the_flow_drops_are_named_drops_in_the_provider_ledger() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            good = icmp_echo(t.client_v4, WWW4, 1)
            bad = [bytes(20), b"\x50" + good[1:], b"\x00", b"\xf5" * 40]  # version 0, 5, 0, 15
            got = await t.exchange([*bad, good], expect=1)
            assert len(got) == 1
            p = await t.provider_stats()
            tun = stage(p, "tun_read")
            assert tun["read"] == 5 and tun["forwarded"] == 1
            assert tun["dropped"] == {"malformed": 4}
            assert t.provider.packet_flow.statistics().read_dropped_malformed == 4
            balanced(p)

    run_memory(main)


# ---------------------------------------------------------------------------------------------- inner validation
def _ipv4(src: str, dst: str, *, ihl: int = 5, total: int | None = None) -> bytes:
    from ipaddress import ip_address

    body = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"probe"
    hl = ihl * 4 if ihl >= 5 else 20
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total if total is not None else hl + len(body),
        0,
        0,
        64,
        1,
        0,
        ip_address(src).packed,
        ip_address(dst).packed,
    )
    return head + bytes(max(0, hl - 20)) + body


def _ipv6_ext_chain(src: str, dst: str, count: int) -> bytes:
    from ipaddress import ip_address

    exts = b"".join(bytes([60 if i < count - 1 else 59, 0]) + bytes(6) for i in range(count))
    return struct.pack("!IHBB16s16s", 6 << 28, len(exts), 60, 64, ip_address(src).packed, ip_address(dst).packed) + exts


def crafted_inner(v4: str, v6: str) -> tuple[list[bytes], dict[str, int]]:
    bad = [
        _ipv4(v4, WWW4, ihl=4),  # IHL < 5
        _ipv4(v4, WWW4, ihl=15, total=33),  # 60-byte header, total length 33
        _ipv4(v4, WWW4, total=400),  # total length past the buffer
        _ipv4(v4, WWW4, total=12),  # total length below the header
        _ipv6_ext_chain(v6, WWW6, 40),  # 40 extension headers
        b"\x45" + bytes(10),  # truncated
        icmp_echo("10.66.0.99", WWW4, 7),  # spoofed source (a neighbour's tunnel address)
        icmp_echo("192.168.1.10", WWW4, 8),  # spoofed source (the Mac's LAN address)
        icmp_echo("fd00:66::99", WWW6, 9),  # spoofed IPv6 source
    ]
    return bad, {"malformed": 6, "inner_src_not_allowed": 3}


@pytest.mark.reliability("B2")
@pytest.mark.parametrize("with_policy", [False, True], ids=["no-policy", "policy"])
def test_malformed_and_spoofed_inner_packets_drop_the_same_way_with_or_without_a_policy(with_policy: bool) -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            if with_policy:
                t.helper.policy = PolicyEngine(
                    Policy((Rule("lan", Action.BYPASS, dst=(ip_network("198.51.100.0/24"),)),))
                )
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            server_before = t.server.device.statistics()
            tx_before = t.helper.device.tx_packets
            bad, expected = crafted_inner(t.client_v4, t.client_v6)
            good = [icmp_echo(t.client_v4, WWW4, 2), icmp_echo(t.client_v6, WWW6, 3)]
            replies = await t.exchange([*bad, *good], expect=2, timeout=3.0)
            assert len(replies) == 2  # positive control: the valid packets still go through
            h = await t.helper_stats()
            assert stage(h, "ipc_in")["dropped"] == expected
            assert t.helper.device.tx_packets - tx_before == 2, "only the valid packets were encrypted"
            server = t.server.device.statistics()
            assert server.rx_packets - server_before.rx_packets == 2  # nothing else reached the network side
            assert server.drops == server_before.drops
            balanced(h)

    run_memory(main)


@pytest.mark.reliability("S5")
def test_spoofed_source_is_not_encrypted_in_the_sync_helper() -> None:
    t = SyncTunnel()
    t.sent_to_server()
    t.outbound([icmp_echo("10.66.0.3", WWW4, 1), icmp_echo(CLIENT_V4, WWW4, 2)])
    t.helper._flush(t.now)
    assert len(t.sent_to_server()) == 1
    assert t.helper.statistics().ledger["ipc_in"].dropped_for("inner_src_not_allowed") == 1


# ---------------------------------------------------------------------------------------------- confirmed sessions
def test_forwarded_means_answered_by_the_peer() -> None:
    """A live session: data waits in the queue gauge until the server's next authenticated transport message."""
    t = SyncTunnel()
    t.outbound([icmp_echo(CLIENT_V4, WWW4, i) for i in range(3)])
    snap = t.helper.statistics().ledger["wg_encrypt"]
    assert (snap.read, snap.forwarded, snap.queued) == (3, 0, 3)
    t.now += 1
    t.receive(t.server_data(1))  # the answer
    snap = t.helper.statistics().ledger["wg_encrypt"]
    assert (snap.read, snap.forwarded, snap.queued, snap.dropped) == (3, 3, 0, ())


@pytest.mark.reliability("S12")
def test_data_to_a_vanished_server_is_sent_unconfirmed_not_forwarded() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 0)])) == 1
            h0 = await t.helper_stats()
            assert stage(h0, "wg_encrypt")["forwarded"] == 1
            t.server.transport.close()  # the server vanishes: datagrams to it disappear, nothing comes back
            sent = 0
            for seq in range(1, 31):  # 30 s of one probe a second
                assert await t.exchange([icmp_echo(t.client_v4, WWW4, seq)], timeout=1.0) == []
                sent += 1
            await trio.sleep(16)  # past the no-reply time of the last probe
            h = await t.helper_stats()
            enc = stage(h, "wg_encrypt")
            assert enc["forwarded"] == 1, "nothing sent to the vanished server counts as forwarded"
            assert enc["dropped"].get("sent_unconfirmed") == sent
            assert enc["queued"] == 0
            assert stage(h, "udp_out")["forwarded"] >= sent  # the datagrams did leave: the network ate them
            balanced(h)

    run_memory(main)


@pytest.mark.reliability("F5")
def test_probes_lost_in_a_server_restart_land_in_sent_unconfirmed() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 0)])) == 1
            enc0 = stage(await t.helper_stats(), "wg_encrypt")
            t.restart_server()
            sent = answered = 0
            for seq in range(1, 61):  # 2 probes a second for 30 s: the session is back after ~15 s
                got = await t.exchange([icmp_echo(t.client_v4, WWW4, seq)], timeout=0.5)
                sent += 1
                answered += len(got)
            await trio.sleep(16)
            h = await t.helper_stats()
            enc = stage(h, "wg_encrypt")
            lost = sent - answered
            assert 0 < lost < sent and h["device"]["handshakes_completed"] == 2
            assert enc["forwarded"] - enc0["forwarded"] == answered
            assert enc["dropped"].get("sent_unconfirmed", 0) == lost
            balanced(h)

    run_memory(main)


# ---------------------------------------------------------------------------------------------- no route
class _NoRouteSocket:
    """A UDP socket stand-in whose sendto fails as Linux does when the egress has no route."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.sent = 0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendto(self, data: Any, addr: Any) -> int:
        raise OSError(self.err, "no route")

    def sendmsg(self, buffers: Any, ancdata: Any, flags: int, addr: Any) -> int:  # a GSO send: the same error
        raise OSError(self.err, "no route")

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errno.ENETUNREACH, "udp_no_route"),
        (errno.EHOSTUNREACH, "udp_no_route"),
        (errno.ENETDOWN, "udp_no_route"),
        (errno.EPERM, "udp_error"),
    ],
)
def test_udp_send_without_a_route_is_its_own_named_drop(err: int, reason: str) -> None:
    transport = UdpTransport(_NoRouteSocket(err))  # type: ignore[arg-type]
    assert transport.send(b"x", ("192.0.2.2", 51820)) == reason


def test_helper_counts_sends_with_no_route_as_udp_no_route() -> None:
    t = SyncTunnel()
    before = t.helper.statistics().ledger["udp_out"]
    t.helper.transport = UdpTransport(_NoRouteSocket(errno.ENETUNREACH))  # type: ignore[arg-type]
    t.outbound([icmp_echo(CLIENT_V4, WWW4, i) for i in range(5)])
    snap = t.helper.statistics().ledger
    assert snap["udp_out"].dropped_for("udp_no_route") == 5
    assert snap["udp_out"].forwarded == before.forwarded and snap["udp_out"].read == before.read + 5
    assert snap.check() == []


# ---------------------------------------------------------------------------------------------- the ledger itself
def test_a_negative_drop_counter_is_reported_with_its_name_and_value() -> None:
    """The old check reported a negative drop reason as ``negative +0`` (the minimum of read/forwarded/queued)."""
    from netsim.core.ledger import Ledger

    ledger = Ledger("helper")
    s = ledger.stage("wg_decrypt")
    s.count_read(3)
    s.count_forwarded(3)
    s.count_dropped("control", -5)
    s.count_dropped("bad_type", 5)
    assert [str(i) for i in ledger.check()] == ["wg_decrypt: negative dropped[control] -5"]


def test_with_two_peers_each_datagram_is_booked_to_its_own_peer() -> None:
    t = SyncTunnel()
    other = PrivateKey.generate(random.Random(9).randbytes).public_key()
    t.helper.device.add_peer(
        PeerConfig(public_key=other, endpoint=Endpoint("192.0.2.3", 51820), allowed_ips=(ip_network("10.99.0.0/16"),))
    )
    t.outbound([icmp_echo(CLIENT_V4, WWW4, 1), icmp_echo(CLIENT_V4, "10.99.0.1", 2), icmp_echo(CLIENT_V4, WWW4, 3)])
    snap = t.helper.statistics().ledger["wg_encrypt"]
    assert (snap.read, snap.forwarded, snap.queued) == (3, 0, 3)  # 2 awaiting the server's answer, 1 staged
    t.now += 1
    t.receive(t.server_data(1))  # the server answers; the other peer never does
    snap = t.helper.statistics().ledger["wg_encrypt"]
    assert (snap.forwarded, snap.queued, snap.dropped) == (2, 1, ())
    assert t.helper.statistics().ledger.check() == []


# ---------------------------------------------------------------------------------------------- UDP GSO grouping
class _GsoRecorder:
    """Wraps the fake network's transport with a `send_segments` (as `UdpTransport` has), recording each run."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.runs: list[list[int]] = []

    def send(self, data: Any, addr: Any) -> str | None:
        self.runs.append([len(data)])
        return self.inner.send(data, addr)  # type: ignore[no-any-return]

    def send_segments(self, segments: Any, addr: Any) -> str | None:
        self.runs.append([len(s) for s in segments])
        for s in segments:
            self.inner.send(s, addr)
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_helper_sends_runs_of_equal_sizes_as_one_gso_send_and_every_datagram_arrives() -> None:
    t = SyncTunnel()
    recorder = _GsoRecorder(t.helper.transport)
    t.helper.transport = recorder
    sizes = [64] * 10 + [32] + [64] * 5 + [200, 200, 16]  # three runs: 10+1 shorter, 5, 2+1 shorter
    t.outbound([icmp_echo(CLIENT_V4, WWW4, i, b"p" * n) for i, n in enumerate(sizes)])
    runs = recorder.runs
    assert len(runs) == 3, runs
    for run in runs:
        assert all(n == run[0] for n in run[:-1]) and run[-1] <= run[0], run  # what the kernel can cut right
    assert sum(len(r) for r in runs) == len(sizes)
    received = t.sent_to_server()
    assert len(received) == len(sizes)
    for data in received:  # every datagram decrypts to one of the echoes, whole
        t.server.receive_datagram_untrusted(data, HELPER_ADDR, t.now)
    assert t.helper.statistics().ledger["udp_out"].forwarded >= len(sizes)
