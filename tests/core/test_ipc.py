"""The IPC codec: every message fed whole, byte by byte and with trailing bytes; round trips; errors; fuzz."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core import ipc
from netsim.core.ipc import NEED_DATA, Connection, Role
from netsim.errors import ConfigError, LocalProtocolError, RemoteProtocolError

# --- an independent encoder (the wire format as documented in docs/ipc.md), used as an oracle --------------------


def raw_frame(mtype: int, payload: bytes, *, version: int = 1, magic: int = 0x4E53, flags: int = 0) -> bytes:
    return struct.pack("!HBBHHI", magic, version, mtype, flags, 0, len(payload)) + payload


def raw_hello(versions: Iterable[int] = (1,), token: bytes = b"", max_frame: int = 1 << 20, role: int = 1) -> bytes:
    vs = bytes(versions)
    return raw_frame(1, struct.pack("!BBIIH", role, len(vs), 7, max_frame, len(token)) + vs + token)


def raw_batch(packets: list[bytes], families: list[int]) -> bytes:
    n = len(packets)
    head = struct.pack(f"!HH{n}H{n}H", n, 0, *families, *map(len, packets))
    return raw_frame(3, head + b"".join(packets))


def pair(**helper_kw: object) -> tuple[Connection, Connection]:
    """A provider and a helper, handshaken."""
    p, h = Connection(Role.PROVIDER), Connection(Role.HELPER, **helper_kw)  # type: ignore[arg-type]
    deliver(h, p.send(p.hello()))
    deliver(p, h.send(h.hello_ack()))
    assert p.our_state is h.our_state is ipc.SideState.OPEN
    return p, h


def drain(conn: Connection) -> list[ipc.Event]:
    out: list[ipc.Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        assert not isinstance(ev, ipc.NeedData)
        out.append(ev)
        if isinstance(ev, ipc.ConnectionClosed):  # repeated forever after EOF, like h11
            return out


def deliver(conn: Connection, bufs: list[ipc.Buffer]) -> list[ipc.Event]:
    conn.receive_data(b"".join(bytes(b) for b in bufs))
    return drain(conn)


def feed_whole(conn: Connection, data: bytes) -> list[ipc.Event]:
    conn.receive_data(data)
    return drain(conn)


def feed_bytewise(conn: Connection, data: bytes) -> list[ipc.Event]:
    out: list[ipc.Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        out += drain(conn)
    return out


def feed_recv_into(conn: Connection, data: bytes, chunk: int = 7) -> list[ipc.Event]:
    out: list[ipc.Event] = []
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        view = conn.receive_buffer(len(piece))
        view[: len(piece)] = piece
        view.release()
        conn.receive_commit(len(piece))
        out += drain(conn)
    return out


FEEDERS: list[Callable[[Connection, bytes], list[ipc.Event]]] = [feed_whole, feed_bytewise, feed_recv_into]

# --- every message, every feeding mode -----------------------------------------------------------------------------


def provider_messages() -> list[ipc.Event]:
    return [
        ipc.Settings(b'{"mtu": 1280}'),
        ipc.StatsRequest(7),
        ipc.PolicyUpdate(3, b"rules"),
        ipc.Ping(2**64 - 1),
        ipc.Error(ipc.ErrorCode.INTERNAL, "bye ü"),
    ]


def as_comparable(ev: ipc.Event) -> object:
    if isinstance(ev, ipc.PacketBatch):
        return ("batch", ev.families, ev.copy_packets())
    return ev


@pytest.mark.parametrize("feed", FEEDERS)
def test_every_message_every_feeding(feed: Callable[[Connection, bytes], list[ipc.Event]]) -> None:
    p, h = Connection(Role.PROVIDER), Connection(Role.HELPER)
    hello = p.send(p.hello())
    assert feed(h, b"".join(hello)) == [p.hello()]
    ack = h.hello_ack()
    assert feed(p, b"".join(h.send(ack))) == [ack]
    pkts = [b"\x45" + bytes(range(19)), b"\x60" + bytes(39)]
    wire = b"".join(bytes(b) for b in p.send_packets(pkts, [2, 30]))
    (batch,) = feed(h, wire)
    assert as_comparable(batch) == ("batch", (2, 30), pkts)
    for msg in provider_messages():
        assert feed(h, b"".join(p.send(msg))) == [msg]
    # helper -> provider answers
    assert feed(p, b"".join(h.send(ipc.StatsResponse(7, {"a": {"b": [1, 2]}})))) == [
        ipc.StatsResponse(7, {"a": {"b": [1, 2]}})
    ]
    assert feed(p, b"".join(h.send(ipc.Pong(2**64 - 1)))) == [ipc.Pong(2**64 - 1)]
    assert feed(p, b"".join(h.send(ipc.Goodbye(ipc.GoodbyeReason.SHUTDOWN, "done")))) == [
        ipc.Goodbye(ipc.GoodbyeReason.SHUTDOWN, "done")
    ]
    p.receive_data(b"")
    assert p.next_event() == ipc.ConnectionClosed(clean=True)


def test_trailing_bytes_stay_for_the_next_event() -> None:
    p, h = pair()
    a = b"".join(p.send(ipc.Ping(1)))
    b = b"".join(p.send(ipc.Settings(b"xyz")))
    h.receive_data(a + b[:5])
    assert h.next_event() == ipc.Ping(1)
    assert h.next_event() is NEED_DATA
    assert h.buffered == 5
    h.receive_data(b[5:])
    assert h.next_event() == ipc.Settings(b"xyz")
    assert h.next_event() is NEED_DATA


def test_unclean_eof_and_truncated_eof() -> None:
    _, h = pair()
    h.receive_data(b"")
    assert h.next_event() == ipc.ConnectionClosed(clean=False)
    assert h.next_event() == ipc.ConnectionClosed(clean=False)
    p2, h2 = pair()
    h2.receive_data(b"".join(p2.send(ipc.Ping(1)))[:-1])
    h2.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as e:
        h2.next_event()
    assert e.value.reason == "truncated_frame"


# --- hypothesis round trips --------------------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=50)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=10,
)
provider_events = st.one_of(
    st.builds(ipc.Settings, st.binary(max_size=200)),
    st.builds(ipc.StatsRequest, u32),
    st.builds(ipc.PolicyUpdate, u64, st.binary(max_size=200)),
    st.builds(ipc.Ping, u64),
    st.builds(ipc.Error, st.integers(0, 65535), text),
    st.builds(ipc.Goodbye, st.integers(0, 65535), text),
)
packets = st.lists(st.tuples(st.sampled_from([2, 30]), st.binary(min_size=1, max_size=1500)), min_size=1, max_size=70)


@settings(max_examples=300)
@given(provider_events, st.sampled_from(FEEDERS))
def test_control_round_trip(ev: ipc.Event, feed: Callable[[Connection, bytes], list[ipc.Event]]) -> None:
    p, h = pair()
    assert feed(h, b"".join(p.send(ev))) == [ev]


@settings(max_examples=200)
@given(u32, st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_stats_response_round_trip(rid: int, stats: dict[str, object]) -> None:
    p, h = pair()
    deliver(p, h.send(ipc.StatsRequest(rid)))
    (got,) = deliver(h, p.send(ipc.StatsResponse(rid, stats)))
    assert got == ipc.StatsResponse(rid, stats)


@settings(max_examples=300)
@given(packets, st.sampled_from(FEEDERS))
def test_packet_batch_round_trip(
    pkts: list[tuple[int, bytes]], feed: Callable[[Connection, bytes], list[ipc.Event]]
) -> None:
    p, h = pair()
    fams = [f for f, _ in pkts]
    data = [d for _, d in pkts]
    bufs = p.send_packets(data, fams)
    # zero copy on send: the payload objects themselves follow the header
    assert all(a is b for a, b in zip(bufs[1:], data, strict=True))
    # and the header is exactly what the documented format says
    assert bytes(b"".join(bytes(b) for b in bufs)) == raw_batch(data, fams)
    (batch,) = feed(h, b"".join(bytes(b) for b in bufs))
    assert isinstance(batch, ipc.PacketBatch)
    assert [(f, bytes(v)) for f, v in batch] == pkts
    assert len(batch) == len(pkts) and batch.nbytes == sum(map(len, data))


def test_decoded_batch_views_are_into_the_receive_buffer() -> None:
    p, h = pair()
    data = [bytes([i]) * 1400 for i in range(64)]
    h.receive_data(b"".join(bytes(b) for b in p.send_packets(data, 2)))
    (batch,) = drain(h)
    assert isinstance(batch, ipc.PacketBatch)
    views = batch.packets()
    assert all(isinstance(v.obj, bytearray) for v in views)
    assert len({id(v.obj) for v in views}) == 1  # one shared buffer, no per-packet copies


def test_retained_views_survive_buffer_reuse() -> None:
    """Views a caller keeps must never change, however many frames follow (the buffer is swapped, not reused)."""
    p, h = pair()
    first = [bytes([7]) * 1000] * 8
    h.receive_data(b"".join(bytes(b) for b in p.send_packets(first, 2)))
    (kept,) = drain(h)
    assert isinstance(kept, ipc.PacketBatch)
    kept_views = kept.packets()
    for i in range(600):  # several MiB through a 256 KiB buffer: forces compaction/wrap many times
        h.receive_data(b"".join(bytes(b) for b in p.send_packets([bytes([i % 251]) * 1400] * 8, 30)))
        assert len(drain(h)) == 1
    assert [bytes(v) for v in kept_views] == first


def test_receive_buffer_stays_bounded_when_drained() -> None:
    p, h = pair()
    frame = b"".join(bytes(b) for b in p.send_packets([b"E" * 1400] * 64, 2))
    cap0 = h.receive_capacity
    for _ in range(300):
        for i in range(0, len(frame), 4096):
            h.receive_data(frame[i : i + 4096])
            for ev in drain(h):
                assert isinstance(ev, ipc.PacketBatch) and len(ev) == 64
    assert h.receive_capacity == cap0


# --- remote errors ------------------------------------------------------------------------------------------------


def opened_helper(**kw: object) -> Connection:
    h = Connection(Role.HELPER, **kw)  # type: ignore[arg-type]
    h.receive_data(raw_hello())
    assert isinstance(h.next_event(), ipc.Hello)
    h.send(h.hello_ack())
    return h


BAD_FRAMES: list[tuple[str, bytes]] = [
    ("bad_magic", raw_frame(10, bytes(8), magic=0x4E54)),
    ("bad_version", raw_frame(10, bytes(8), version=2)),
    ("bad_flags", raw_frame(10, bytes(8), flags=1)),
    ("unknown_type", raw_frame(99, b"")),
    ("unknown_type", raw_frame(0, b"")),
    ("frame_too_big", struct.pack("!HBBHHI", 0x4E53, 1, 3, 0, 0, (1 << 20) + 1)),
    ("bad_length", raw_frame(10, bytes(7))),
    ("bad_length", raw_frame(5, bytes(5))),
    ("truncated_batch", raw_frame(3, b"\x00")),
    ("truncated_batch", raw_frame(3, struct.pack("!HH", 3, 0) + bytes(8))),
    ("batch_overflow", raw_frame(3, struct.pack("!HHHH", 1, 0, 2, 100) + bytes(99))),
    ("batch_trailing_bytes", raw_frame(3, struct.pack("!HHHH", 1, 0, 2, 100) + bytes(101))),
    ("bad_batch", raw_frame(3, struct.pack("!HH", 0, 0))),
    ("bad_batch", raw_frame(3, struct.pack("!HHHHHH", 2, 0, 2, 2, 0, 4) + bytes(4))),
    ("bad_family", raw_frame(3, struct.pack("!HHHH", 1, 0, 10, 4) + bytes(4))),
    ("out_of_order", raw_hello()),
    ("out_of_order", raw_frame(2, struct.pack("!BBII", 1, 2, 0, 1 << 20))),
    ("unsolicited_response", raw_frame(11, bytes(8))),
    ("unsolicited_response", raw_frame(6, struct.pack("!I", 1) + b"{}")),
    ("bad_utf8", raw_frame(9, b"\x00\x00\xff")),
]


@pytest.mark.reliability("B7")
@pytest.mark.parametrize(("reason", "frame"), BAD_FRAMES)
@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_bad_frames(reason: str, frame: bytes, feed: Callable[[Connection, bytes], list[ipc.Event]]) -> None:
    h = opened_helper()
    with pytest.raises(RemoteProtocolError) as e:
        feed(h, frame)
    assert e.value.reason == reason
    # the connection is dead: more input is refused, only last words may be sent
    with pytest.raises(RemoteProtocolError):
        h.next_event()
    with pytest.raises(LocalProtocolError):
        h.send(ipc.Ping(1))
    last = h.send(ipc.Error(ipc.ErrorCode.PROTOCOL, reason))
    assert b"".join(last).startswith(b"NS")
    with pytest.raises(LocalProtocolError):
        h.send(ipc.Goodbye())


@pytest.mark.reliability("B7")
def test_oversized_frame_rejected_from_header_alone() -> None:
    h = opened_helper()
    h.receive_data(struct.pack("!HBBHHI", 0x4E53, 1, 3, 0, 0, 0xFFFFFFFF))
    with pytest.raises(RemoteProtocolError) as e:
        h.next_event()
    assert e.value.reason == "frame_too_big"


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([raw_batch([b"E" * 20], [2])], "out_of_order"),  # packets before hello
        ([raw_frame(10, bytes(8))], "out_of_order"),
        ([raw_hello(), raw_hello()], "out_of_order"),  # second hello
        ([raw_hello(versions=(2, 3))], "no_common_version"),
        ([raw_hello(role=2)], "bad_role"),
        ([raw_hello(role=9)], "bad_role"),
        ([raw_hello(max_frame=100)], "bad_max_frame"),
        ([raw_frame(1, struct.pack("!BBIIH", 1, 1, 0, 1 << 20, 5) + b"\x01")], "bad_length"),
        ([raw_frame(1, struct.pack("!BBIIH", 1, 0, 0, 1 << 20, 0))], "bad_length"),
        ([raw_frame(9, b"\x00\x00"), raw_frame(10, bytes(8))], "frame_after_goodbye"),  # goodbye before hello is fine
    ],
)
@pytest.mark.reliability("B7")
def test_helper_ordering_errors(frames: list[bytes], reason: str) -> None:
    h = Connection(Role.HELPER)
    h.receive_data(b"".join(frames))
    with pytest.raises(RemoteProtocolError) as e:
        drain(h)
    assert e.value.reason == reason


def test_frame_after_goodbye() -> None:
    h = opened_helper()
    h.receive_data(raw_frame(9, b"\x00\x00") + raw_frame(10, bytes(8)))
    assert h.next_event() == ipc.Goodbye(0, "")
    with pytest.raises(RemoteProtocolError) as e:
        h.next_event()
    assert e.value.reason == "frame_after_goodbye"


def test_token_checked_in_constant_time_compare() -> None:
    h = Connection(Role.HELPER, expected_token=b"secret")
    h.receive_data(raw_hello(token=b"secreT"))
    with pytest.raises(RemoteProtocolError) as e:
        h.next_event()
    assert e.value.reason == "auth_failed"
    h2 = Connection(Role.HELPER, expected_token=b"secret")
    h2.receive_data(raw_hello(token=b"secret"))
    assert isinstance(h2.next_event(), ipc.Hello)
    p = Connection(Role.PROVIDER, token=b"secret")
    assert b"".join(p.send(p.hello())) == raw_hello(token=b"secret")


def test_outstanding_requests_are_bounded() -> None:
    p, h = pair()
    for i in range(64):
        assert deliver(h, p.send(ipc.Ping(i))) == [ipc.Ping(i)]
    with pytest.raises(LocalProtocolError):
        p.send(ipc.Ping(64))
    # and from the receiving side: a peer flooding requests is cut off
    h2 = opened_helper()
    h2.receive_data(b"".join(raw_frame(10, struct.pack("!Q", i)) for i in range(65)))
    with pytest.raises(RemoteProtocolError) as e:
        drain(h2)
    assert e.value.reason == "too_many_outstanding"


# --- local errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "misuse",
    [
        lambda p: p.send_packets([b"E" * 20], 2),  # before the handshake
        lambda p: p.send(ipc.HelloAck(1, Role.HELPER, 0, 1 << 20)),
        lambda p: p.send(ipc.Pong(1)),
    ],
)
def test_local_misuse_before_open(misuse: Callable[[Connection], object]) -> None:
    p = Connection(Role.PROVIDER)
    with pytest.raises(LocalProtocolError):
        misuse(p)


@pytest.mark.parametrize(
    ("packets", "families"),
    [
        ([], 2),
        ([b""], 2),
        ([b"E" * 65536], 2),
        ([b"E" * 20], 10),  # Linux AF_INET6 is not a Darwin family
        ([b"E" * 20, b"E" * 20], [2]),
        ([b"E" * 60000] * 20, 2),  # over the peer's max frame
    ],
)
def test_send_packets_misuse(packets: list[bytes], families: int | list[int]) -> None:
    p, _ = pair()
    with pytest.raises(LocalProtocolError):
        p.send_packets(packets, families)
    with pytest.raises(LocalProtocolError):  # after an error the connection is dead
        p.send(ipc.Ping(1))


def test_helper_cannot_send_policy_and_second_ack() -> None:
    _, h = pair()
    with pytest.raises(LocalProtocolError):
        h.send(ipc.PolicyUpdate(1, b""))
    _, h2 = pair()
    with pytest.raises(LocalProtocolError):
        h2.send(h2.hello_ack())


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        Connection(Role.PROVIDER, max_frame_size=10)
    with pytest.raises(ConfigError):
        Connection(Role.PROVIDER, versions=(9,))
    with pytest.raises(ConfigError):
        Connection(Role.HELPER, token=b"x")
    with pytest.raises(ConfigError):
        Connection(Role.PROVIDER, expected_token=b"x")


@pytest.mark.parametrize("count", [15, 16])
def test_batch_fits_matches_encoder(count: int) -> None:
    p, _ = pair()
    fits = p.batch_fits(count, count * 65535)
    assert fits == (count == 15)  # 16 * 65535 + 4 + 64 > 1 MiB
    try:
        p.send_packets([b"E" * 65535] * count, 2)
        sent = True
    except LocalProtocolError:
        sent = False
    assert sent == fits


# --- fuzz -------------------------------------------------------------------------------------------------------


def _fuzz(conn: Connection, chunks: list[bytes]) -> None:
    try:
        for c in chunks:
            conn.receive_data(c)
            drain(conn)
        conn.receive_data(b"")
        drain(conn)
        conn.next_event()
    except RemoteProtocolError:
        pass


@pytest.mark.reliability("B7")
@settings(max_examples=500)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
def test_fuzz_fresh_helper(chunks: list[bytes]) -> None:
    _fuzz(Connection(Role.HELPER), chunks)


@settings(max_examples=500)
@given(
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=40),
            st.builds(
                lambda t, body, cut: raw_frame(t, body)[: max(1, len(body) + 12 - cut)],
                st.integers(0, 13),
                st.binary(max_size=40),
                st.integers(0, 3),
            ),
            st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=3).map(
                lambda pk: raw_batch(pk, [2] * len(pk))
            ),
        ),
        max_size=6,
    )
)
@pytest.mark.reliability("B7")
def test_fuzz_open_connection_structured(chunks: list[bytes]) -> None:
    """Frame-shaped garbage (valid headers, random bodies) reaches the body decoders, not just the magic check."""
    _fuzz(opened_helper(), chunks)
    p, _ = pair()
    _fuzz(p, chunks)
