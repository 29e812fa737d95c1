"""The native accelerator (netsim.accel, netsim/_native/accel.c) against the pure-Python path it replaces.

Each accelerated step is run both ways in one process on seeded or hypothesis-made inputs and must give the same
bytes, counters and errors: the extension's AEAD against ``cryptography``, whole WireGuard devices (one built with
the accelerator, a twin without) over random batches with tampered and garbage datagrams, the checksum module with
its native sum switched off, and the batched TUN read/write over a datagram socketpair standing in for the fd.
Bad lengths and arguments must raise, never crash. Without a built accelerator these tests skip (``make test``
requires it in CI: ``NETSIM_NATIVE=1``); the selection tests always run.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

import netsim.accel
from netsim.core import checksum
from netsim.core.packet import PacketView
from netsim.core.wireguard import PeerConfig, PrivateKey, Timers, WireGuardDevice
from netsim.core.wireguard.config import Endpoint
from netsim.errors import BadPacket, TunnelDown
from netsim.transports import tun as tun_module
from netsim.transports.tun import TunDevice

native: Any = netsim.accel.native
needs_native = pytest.mark.skipif(native is None, reason=f"native accelerator not active: {netsim.accel.describe()}")
A_ADDR = ("192.0.2.10", 40000)
B_ADDR = ("192.0.2.20", 51820)
TIMERS = Timers(rekey_after_time=1e9, reject_after_time=1e9, keepalive_timeout=10.0)


# ---------------------------------------------------------------------------------------------- selection
def _accel_in_subprocess(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != netsim.accel.ENV}
    if value is not None:
        env[netsim.accel.ENV] = value
    code = "import netsim.accel as a, json; print(json.dumps(a.describe()))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)


def test_netsim_native_0_forces_pure_python_and_bad_values_are_refused() -> None:
    off = _accel_in_subprocess("0")
    assert off.returncode == 0, off.stderr
    assert '"active": "python"' in off.stdout and '"mode": "0"' in off.stdout, off.stdout
    bad = _accel_in_subprocess("maybe")
    assert bad.returncode == 1 and "NativeUnavailable" in bad.stderr and "'maybe'" in bad.stderr, bad.stderr


@needs_native
def test_netsim_native_1_and_auto_pick_the_extension_when_it_is_built() -> None:
    for value in ("1", "auto", None):
        res = _accel_in_subprocess(value)
        assert res.returncode == 0, res.stderr
        assert '"active": "native"' in res.stdout and "OpenSSL" in res.stdout, (value, res.stdout)


def test_netsim_native_1_without_the_extension_is_an_error() -> None:
    """What a build without a compiler installs (no extension module): auto falls back, 1 refuses."""
    missing = "import sys; sys.modules['netsim._native._accel'] = None\n"  # makes its import raise ImportError
    env = {**os.environ, netsim.accel.ENV: "1"}
    code = missing + "import netsim.accel"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 1 and "NativeUnavailable" in res.stderr and "libssl-dev" in res.stderr, res.stderr
    env[netsim.accel.ENV] = "auto"
    code = missing + "import netsim.accel as a; print(a.ACTIVE, a.describe()['detail'])"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.startswith("python not built"), (res.stdout, res.stderr)


def test_ci_runs_with_the_accelerator_required() -> None:
    """Under CI the main test run sets NETSIM_NATIVE=1 (Makefile), so a broken build cannot pass as pure Python."""
    main_ci_run = os.environ.get("CI") == "true" and os.environ.get("NETSIM_REQUIRE_PRIVILEGED") == "1"
    if main_ci_run and os.environ.get(netsim.accel.ENV) != "0":  # not the lowest/pythons tiers, not nonative
        assert netsim.accel.ACTIVE == "native" and netsim.accel.MODE == "1"
    else:  # outside the CI main run: the mode is what the environment asked for
        assert netsim.accel.MODE == (os.environ.get(netsim.accel.ENV) or "auto")


# ---------------------------------------------------------------------------------------------- AEAD
@needs_native
@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), counter=st.integers(0, 2**64 - 1), data=st.binary(max_size=1600))
def test_aead_matches_cryptography_both_ways(key: bytes, counter: int, data: bytes) -> None:
    nonce = struct.pack("<4xQ", counter)
    ref = ChaCha20Poly1305(key)
    aead = native.Aead(key)
    sealed = aead.encrypt(nonce, data)
    assert sealed == ref.encrypt(nonce, data, None)
    assert aead.decrypt(nonce, sealed) == data
    for pos in {0, len(sealed) // 2, len(sealed) - 1}:  # any flipped bit, tag included, fails authentication
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        assert aead.decrypt(nonce, bytes(bad)) is None
    assert aead.encrypt(nonce, data) == sealed  # the context is reusable: the same message again, the same bytes


@needs_native
def test_aead_refuses_bad_lengths_and_types() -> None:
    for key in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError, match="32 bytes"):
            native.Aead(key)
    with pytest.raises(TypeError):
        native.Aead("x" * 32)
    aead = native.Aead(bytes(32))
    with pytest.raises(ValueError, match="nonce"):
        aead.encrypt(bytes(11), b"x")
    with pytest.raises(ValueError, match="nonce"):
        aead.decrypt(bytes(12), bytes(15))  # shorter than a tag
    with pytest.raises(ValueError):
        aead.encrypt(bytes(12), bytes(65536))


# ---------------------------------------------------------------------------------------------- WireGuard
def _pair(seed: int, *, with_native: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[WireGuardDevice, WireGuardDevice]:
    """A and B with a confirmed session, built with or without the accelerator (keypairs read accel.native)."""
    monkeypatch.setattr(netsim.accel, "native", native if with_native else None)
    rng = random.Random(seed)
    ka, kb = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)

    def device(key: PrivateKey, peer: PeerConfig, s: int) -> WireGuardDevice:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        r = random.Random(s)
        eph = random.Random(s + 100)
        return WireGuardDevice(
            key,
            [peer],
            timers=TIMERS,
            rng=r,
            ephemeral=lambda: X25519PrivateKey.from_private_bytes(eph.randbytes(32)),
        )

    a = device(
        ka,
        PeerConfig(kb.public_key(), endpoint=Endpoint(*B_ADDR), allowed_ips=(ip_network("10.9.0.0/24"),)),
        seed + 1,
    )
    b = device(kb, PeerConfig(ka.public_key(), allowed_ips=(ip_network("10.8.0.0/24"),)), seed + 2)
    a.initiate(a.peers[0], 0.0)
    [(init, _)] = a.datagrams_to_send(0.0)
    b.receive_datagram_untrusted(init, A_ADDR, 0.0)
    [(resp, _)] = b.datagrams_to_send(0.0)
    a.receive_datagram_untrusted(resp, B_ADDR, 0.0)
    for dgram, _ in a.datagrams_to_send(0.0):  # the confirming keepalive
        b.receive_datagram_untrusted(dgram, A_ADDR, 0.0)
    monkeypatch.setattr(netsim.accel, "native", native)
    assert (a.peers[0].current.native_send is not None) is with_native  # type: ignore[union-attr]
    return a, b


def _ipv4(src: int, dst: int, payload: bytes, total: int | None = None) -> bytes:
    n = 20 + len(payload)
    return (
        struct.pack(
            ">BBHHHBBH4s4s", 0x45, 0, n if total is None else total, 0, 0, 64, 17, 0, bytes([10, 8, 0, src]),
            bytes([10, 9, 0, dst]),
        )
        + payload
    )  # fmt: skip


def _outbound(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return rng.randbytes(rng.randrange(0, 20))  # malformed: dropped before routing
    if kind < 0.1:
        return _ipv4(1, 200, b"x")[:12] + bytes([10, 7, 0, 1]) + bytes(4)  # no route
    return _ipv4(1, rng.randrange(1, 250), rng.randbytes(rng.choice([0, 1, 15, 16, 17, 100, 555, 1380])))


def _state(d: WireGuardDevice) -> tuple[object, ...]:
    p = d.peers[0]
    kp = p.current
    assert kp is not None
    return (
        d.statistics(),
        p.tx_bytes,
        p.rx_bytes,
        p.endpoint,
        kp.send_counter,
        kp.replay.highest,
        bytes(kp.replay.ring),
        [bytes(pkt) for _, pkt in d.take_received()],
    )


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_devices_with_and_without_the_accelerator_give_identical_bytes(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random outbound batches (odd sizes, malformed, unroutable, a too-small buffer), then the datagrams back in
    random batches with tampered, truncated, replayed, reordered and garbage ones mixed in: both twins must produce
    the same datagrams and end in the same state, drop counters included (decrypt_failed for every bad tag)."""
    rng = random.Random(seed)
    a_n, b_n = _pair(seed, with_native=True, monkeypatch=monkeypatch)
    a_p, b_p = _pair(seed, with_native=False, monkeypatch=monkeypatch)
    sent: list[bytes] = []
    for _ in range(6):
        packets = [_outbound(rng) for _ in range(rng.randrange(1, 40))]
        outs = []
        for dev in (a_n, a_p):
            bufs = [bytearray(1500) for _ in packets]
            bufs[len(bufs) // 2] = bytearray(40)  # oversize for most packets: a counted drop, no counter used
            sizes, addrs = [0] * len(packets), [None] * len(packets)
            produced = dev.encapsulate(packets, 1.0, bufs, sizes, addrs)  # type: ignore[arg-type]
            outs.append((produced, sizes, addrs, [bytes(b[:s]) for b, s in zip(bufs, sizes, strict=True)]))
        assert outs[0] == outs[1]
        sent += [d for d in outs[0][3] if d]
    assert _state(a_n) == _state(a_p)
    assert sent, "no datagram was produced: the comparison above proved nothing"

    inbound: list[bytes] = []
    for d in sent:
        r = rng.random()
        if r < 0.1:
            bad = bytearray(d)
            bad[rng.randrange(16, len(d))] ^= 1 << rng.randrange(8)  # tampered ciphertext or tag
            inbound.append(bytes(bad))
        elif r < 0.15:
            inbound.append(d[: rng.randrange(0, len(d))])  # truncated
        elif r < 0.2:
            inbound.append(rng.randbytes(rng.randrange(0, 80)))  # garbage
        elif r < 0.25:
            inbound.append(d[:4] + rng.randbytes(4) + d[8:])  # an unknown receiver index
        inbound.append(d)
        if r > 0.9:
            inbound.append(d)  # replayed
    rng.shuffle(inbound)  # reordered, some beyond the window's reach of each other
    tampered_before = b_n.statistics().drops["decrypt_failed"]
    while inbound:
        k = rng.randrange(1, 50)
        chunk, inbound = inbound[:k], inbound[k:]
        views = [memoryview(bytearray(x)) for x in chunk]  # what a driver passes: views of its receive buffers
        b_n.receive_datagrams_untrusted(views, [A_ADDR] * len(chunk), 2.0)
        b_p.receive_datagrams_untrusted(list(chunk), [A_ADDR] * len(chunk), 2.0)
    assert b_n.statistics().drops["decrypt_failed"] > tampered_before or seed, "no tampered datagram was fed"
    assert _state(b_n) == _state(b_p)


@needs_native
def test_seal_and_open_batch_refuse_bad_arguments() -> None:
    aead = native.Aead(bytes(32))
    pkt = [bytes(20)]
    with pytest.raises(ValueError, match="does not fit"):
        native.seal_batch(aead, 1, 0, 1420, pkt, [bytearray(20 + 31)], None)
    with pytest.raises(ValueError, match="out of range"):
        native.seal_batch(aead, 1, 0, 1420, pkt, [bytearray(100)], [1])
    with pytest.raises(ValueError, match="u32"):
        native.seal_batch(aead, 2**32, 0, 1420, pkt, [bytearray(100)], None)
    with pytest.raises(TypeError):
        native.seal_batch(object(), 1, 0, 1420, pkt, [bytearray(100)], None)
    with pytest.raises(BufferError):
        native.seal_batch(aead, 1, 0, 1420, pkt, [bytes(100)], None)
    out = bytearray(100)
    assert native.seal_batch(aead, 7, 41, 1420, pkt, [out], None) == 42
    assert out[:16] == struct.pack("<IIQ", 4, 7, 41)
    assert native.open_batch([bytes(out[:64])], {7: aead}) == [bytes(32)]  # 20 bytes padded to 32
    assert native.open_batch([bytes(out[:64])], {8: aead}) == [None]  # unknown index: not tried
    tampered = bytes(out[:63]) + bytes([out[63] ^ 1])
    assert native.open_batch([bytes(out[:31]), b"", tampered], {7: aead}) == [None, None, False]
    with pytest.raises(TypeError):
        native.open_batch([bytes(out[:64])], {7: "not an Aead"})
    with pytest.raises(TypeError):
        native.open_batch([bytes(out[:64])], [(7, aead)])
    with pytest.raises(TypeError):
        native.open_batch([12345], {7: aead})


@needs_native
@settings(max_examples=150, deadline=None)
@given(
    datagrams=st.lists(
        st.one_of(
            st.binary(max_size=120),
            st.binary(min_size=28, max_size=120).map(lambda b: struct.pack("<II", 4, 7) + b),  # index 7, bad tag
        ),
        max_size=20,
    )
)
def test_open_batch_on_garbage_never_crashes_and_authenticates_nothing(datagrams: list[bytes]) -> None:
    res = native.open_batch(datagrams, {7: native.Aead(bytes(range(32)))})
    assert len(res) == len(datagrams)
    for d, r in zip(datagrams, res, strict=True):
        tried = len(d) >= 32 and d[:8] == struct.pack("<II", 4, 7)
        assert r is (False if tried else None)


# ---------------------------------------------------------------------------------------------- checksums
@needs_native
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), skip=st.integers(-1, 2001))
def test_fold16_matches_its_reference(data: bytes, skip: int) -> None:
    if skip != -1 and not 0 <= skip <= len(data) - 2:
        with pytest.raises(ValueError):
            native.fold16(data, skip)
        with pytest.raises(ValueError):
            netsim.accel.fold16_python(data, skip)
        return
    got = native.fold16(data, skip)
    assert got == netsim.accel.fold16_python(data, skip)
    assert (got == 0) == (not any(b for i, b in enumerate(data) if skip == -1 or i not in (skip, skip + 1)))


@needs_native
@settings(max_examples=200, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=600), st.lists(st.sampled_from([0, 0xFF]), max_size=64).map(bytes)),
    initial=st.integers(0, 0xFFFE),
    field=st.integers(-2, 64),
)
def test_checksum_module_gives_the_same_results_with_and_without_the_accelerator(
    data: bytes, initial: int, field: int
) -> None:
    def results() -> tuple[object, ...]:
        out: list[object] = [checksum.ones_complement_sum(data), checksum.internet_checksum(data, initial)]
        try:
            out.append(checksum._checksum_without_field(data, field, initial))
        except Exception as exc:  # the same error both ways (a field outside the data)
            out.append(type(exc))
        return tuple(out)

    with_native = results()
    saved = checksum._fold16
    checksum._fold16 = None
    try:
        assert results() == with_native
    finally:
        checksum._fold16 = saved


@needs_native
@settings(max_examples=150, deadline=None)
@given(
    proto=st.sampled_from([1, 6, 17, 58]),
    v6=st.booleans(),
    payload=st.binary(max_size=300),
    csum=st.integers(0, 0xFFFF),
)
def test_l4_and_header_checksums_agree_on_random_packets(proto: int, v6: bool, payload: bytes, csum: int) -> None:
    l4 = bytearray(struct.pack(">HH", 1234, 80) + payload.ljust(20, b"\x07"))
    off = {6: 16, 17: 6, 1: 2, 58: 2}[proto]
    l4[off : off + 2] = csum.to_bytes(2, "big")
    if proto == 17:
        l4[4:6] = len(l4).to_bytes(2, "big")
    if v6:
        pkt = struct.pack(">IHBB16s16s", 6 << 28, len(l4), proto, 64, bytes(15) + b"\1", bytes(15) + b"\2") + l4
    else:
        pkt = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, csum, b"\n\0\0\1", b"\n\0\0\2") + l4
    try:
        view = PacketView.parse_untrusted(bytearray(pkt))
    except BadPacket:
        return

    def results() -> tuple[object, ...]:
        out: list[object] = []
        for fn in (checksum.compute_l4_checksum, checksum.verify_l4_checksum):
            try:
                out.append(fn(view))
            except Exception as exc:
                out.append(type(exc))
        if not v6:
            out += [checksum.compute_ipv4_header_checksum(pkt), checksum.verify_ipv4_header_checksum(pkt)]
        return tuple(out)

    with_native = results()
    saved = checksum._fold16
    checksum._fold16 = None
    try:
        assert results() == with_native
    finally:
        checksum._fold16 = saved


# ---------------------------------------------------------------------------------------------- TUN batches
@pytest.fixture
def fake_tun() -> Iterator[tuple[TunDevice, TunDevice, socket.socket, socket.socket]]:
    """Two TunDevice objects over the two ends of non-blocking datagram socketpairs (packet boundaries kept)."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    devs = []
    for mine, theirs in pairs:
        mine.setblocking(False)
        theirs.setblocking(False)
        dev = object.__new__(TunDevice)
        dev.__dict__.update(
            _owner=mine, _fd=mine.fileno(), _name="fake0", _netns=None, _ctl=None, utun_framing=False, _hdr=0,
            _mtu=1400, packets_read=0, bytes_read=0, packets_written=0, bytes_written=0, _dropped={},
            _kernel_tx_dropped=None,
        )  # fmt: skip
        devs.append(dev)
    try:
        yield devs[0], devs[1], pairs[0][1], pairs[1][1]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def _io_state(dev: TunDevice) -> tuple[object, ...]:
    return dev.packets_read, dev.bytes_read, dev.packets_written, dev.bytes_written, dict(dev._dropped)


@needs_native
@pytest.mark.parametrize("framing", [False, True])
def test_tun_batches_read_and_write_the_same_with_and_without_the_accelerator(
    framing: bool,
    fake_tun: tuple[TunDevice, TunDevice, socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dev_n, dev_p, peer_n, peer_p = fake_tun
    for dev in (dev_n, dev_p):
        dev.utun_framing, dev._hdr = framing, 4 if framing else 0
    rng = random.Random(7)
    packets = [bytes([0x45 if rng.random() < 0.5 else 0x60]) + rng.randbytes(rng.randrange(0, 1500)) for _ in range(40)]
    packets += [b"", bytes(1400), bytes(1401)]  # empty (a 0-byte read), exactly the MTU, one byte over (truncated)
    results = []
    for dev, peer, use in ((dev_n, peer_n, native), (dev_p, peer_p, None)):
        monkeypatch.setattr(tun_module, "_native", use)
        for p in packets:
            peer.send(p)
        got = dev.read_packets(10) + dev.read_packets(1000) + dev.read_packets(5)  # limits, then EAGAIN
        hdr = b"\0\0\0\x1e" if framing else b""
        writes: list[bytes] = [*(p if not framing else hdr + p for p in packets[:20]), b"\0\0\0\x09junk", b""]
        accepted = [dev.write_packets(writes), dev.write_packets(writes[:5], validated=True)]
        accepted.append(dev.write_packets([bytearray(3) + w for w in writes[:5]], offset=3))
        written = []
        while True:
            try:
                written.append(peer.recv(2000))
            except BlockingIOError:
                break
        results.append((got, accepted, written, _io_state(dev)))
    assert results[0] == results[1]
    drops = dev_n._dropped
    assert drops.get("truncated", 0) >= 1 and drops.get("empty", 0) >= 1 and drops.get("too_big", 0) >= 1, drops


@needs_native
def test_tun_batches_report_a_vanished_fd_as_tunnel_down(
    fake_tun: tuple[TunDevice, TunDevice, socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    dev_n, dev_p, peer_n, peer_p = fake_tun
    for dev, peer, use in ((dev_n, peer_n, native), (dev_p, peer_p, None)):
        monkeypatch.setattr(tun_module, "_native", use)
        peer.send(b"\x45" + bytes(30))
        r, w = os.pipe()  # an fd that is closed under the device: reads and writes answer EBADF
        os.close(r)
        os.close(w)
        dev._fd = r
        with pytest.raises(TunnelDown):
            dev.read_packets(8)
        with pytest.raises(TunnelDown):
            dev.write_packets([b"\x45" + bytes(30)])
        dev._fd = dev._owner.fileno()  # type: ignore[attr-defined]
    assert _io_state(dev_n) == _io_state(dev_p)


@needs_native
def test_tun_read_and_write_refuse_bad_arguments_and_return_errno() -> None:
    with pytest.raises(ValueError):
        native.tun_read(0, 8, 1, b"", b"")  # size < 2
    with pytest.raises(ValueError):
        native.tun_read(0, 8, 70000, b"", b"")
    with pytest.raises(ValueError):
        native.tun_read(0, 8, 1500, b"\0\0\0\2", b"")  # headers of different lengths
    with pytest.raises(ValueError):
        native.tun_write(0, [], -1, b"", b"", 1500, True)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert native.tun_read(r, 8, 1500, b"", b"") == ([], 0, 0, 0, errno.EBADF)
    assert native.tun_write(w, [b"x"], 0, b"", b"", 1500, False) == (0, 0, (0, 0, 0, 0, 0), errno.EBADF)
    with pytest.raises(TypeError):
        native.tun_write(w, [123], 0, b"", b"", 1500, False)
