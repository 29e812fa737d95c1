"""The sans-IO pass/peek accounting (netsim.core.filterdata) and the bounded host-name parsers (hostsniff)."""

from __future__ import annotations

import itertools
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netsim.core import filterdata as fd
from netsim.core.hostsniff import MAX_SNIFF, sniff_http_host, sniff_tls_sni
from netsim.errors import LocalProtocolError

K = fd.VerdictKind


def drive(
    df: fd.DirectionFilter, chunks: list[bytes], decide: object
) -> tuple[bytes, list[tuple[str, int, bytes]], bool]:
    """Feed ``chunks`` (respecting room), answer each Peek/Complete with ``decide``; returns (delivered bytes,
    calls, dropped)."""
    pending = list(chunks)
    buf = b""
    out = bytearray()
    calls: list[tuple[str, int, bytes]] = []
    for _ in range(100_000):
        ev = df.next_event()
        if isinstance(ev, fd.Deliver):
            out += ev.data
        elif isinstance(ev, fd.Peek):
            calls.append(("peek", ev.offset, ev.data))
            df.verdict(*decide(ev.offset, ev.data))  # type: ignore[operator]
        elif isinstance(ev, fd.Complete):
            calls.append(("complete", df.received, b""))
            df.verdict(*decide(-1, b""))  # type: ignore[operator]
        elif isinstance(ev, fd.End):
            return bytes(out), calls, False
        elif isinstance(ev, fd.Drop):
            return bytes(out), calls, True
        elif ev is fd.NEED_DATA:
            if not buf and pending:
                buf = pending.pop(0)
            if not buf:
                df.receive_eof()
                continue
            room = df.room()
            assert room > 0, "the filter asks for data but has no room"
            df.receive_data(buf[:room])
            buf = buf[room:]
        else:
            raise AssertionError(ev)
    raise AssertionError("no progress")


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


BLOCK = 7


def block_scanner(offset: int, data: bytes) -> tuple[K, int, int]:
    """Drops when a block of BLOCK bytes contains b"X", passes clean blocks one by one; allows at the end."""
    if offset < 0:
        return (K.ALLOW, 0, 0)
    if b"X" in data[:BLOCK]:
        return (K.DROP, 0, 0)
    if len(data) < BLOCK:
        return (K.FILTER, 0, BLOCK)
    return (K.FILTER, BLOCK, BLOCK)


@given(
    st.binary(max_size=200).map(lambda b: b.replace(b"X", b"x")), st.integers(-1, 199), st.lists(st.integers(0, 300))
)
def test_any_chunking_delivers_the_same_bytes_and_verdict(clean: bytes, marker: int, cuts: list[int]) -> None:
    """Oracle: everything before the block holding the first X passes, nothing after; no X: all of it."""
    data = clean if marker < 0 else clean[: marker % (len(clean) + 1)] + b"X" + clean[marker % (len(clean) + 1) :]
    out, calls, dropped = drive(fd.DirectionFilter(True, BLOCK), chunked(data, cuts), block_scanner)
    if b"X" in data:
        assert dropped
        assert out == data[: data.index(b"X") // BLOCK * BLOCK]
    else:
        assert not dropped and out == data
    decisive = [off for kind, off, seen in calls if kind == "peek" and len(seen) == BLOCK]
    assert decisive == sorted(set(decisive)) and all(o % BLOCK == 0 for o in decisive)  # offsets advance by pass


@given(st.binary(max_size=300), st.lists(st.integers(0, 400)), st.integers(1, 50))
def test_the_buffer_never_exceeds_the_peek_window(data: bytes, cuts: list[int], peek: int) -> None:
    df = fd.DirectionFilter(True, peek)
    seen_max = [0]

    def decide(offset: int, got: bytes) -> tuple[K, int, int]:
        seen_max[0] = max(seen_max[0], len(got))
        return (K.ALLOW, 0, 0) if offset < 0 else (K.FILTER, max(1, len(got) // 2), peek)

    out, _, dropped = drive(df, chunked(data, cuts), decide)
    assert out == data and not dropped and seen_max[0] <= peek


def test_pass_bytes_beyond_what_was_seen_pass_unseen() -> None:
    df = fd.DirectionFilter(True, 4)
    calls: list[tuple[int, bytes]] = []

    def decide(offset: int, data: bytes) -> tuple[K, int, int]:
        calls.append((offset, data))
        return (K.ALLOW, 0, 0) if offset < 0 else (K.FILTER, 10, 4)

    out, _, _ = drive(df, [b"abcd", b"efghij", b"klmnop"], decide)
    assert out == b"abcdefghijklmnop"
    assert calls[:2] == [(0, b"abcd"), (10, b"klmn")]  # bytes 4..9 passed without a call


def test_an_unfiltered_direction_passes_without_calls() -> None:
    out, calls, dropped = drive(fd.DirectionFilter(False, 0), [b"one", b"two"], lambda o, d: (K.DROP, 0, 0))
    assert (out, calls, dropped) == (b"onetwo", [], False)


def test_short_data_is_shown_at_once_and_again_when_more_arrives() -> None:
    seen: list[bytes] = []

    def decide(offset: int, data: bytes) -> tuple[K, int, int]:
        seen.append(data)
        return (K.ALLOW, 0, 0) if b"\n" in data or offset < 0 else (K.FILTER, 0, 100)

    out, _, _ = drive(fd.DirectionFilter(True, 100), [b"GET", b" /", b"\nrest"], decide)
    assert seen == [b"GET", b"GET /", b"GET /\nrest"] and out == b"GET /\nrest"


def test_a_verdict_without_progress_drops_the_flow() -> None:
    df = fd.DirectionFilter(True, 3)
    df.receive_data(b"abc")
    assert isinstance(df.next_event(), fd.Peek)
    df.verdict(K.FILTER, 0, 3)  # saw all 3 bytes, wants the same 3: can never be answered
    assert df.next_event() == fd.Drop("stalled") and df.stalled == 1


def test_need_rules_drops_and_drop_discards() -> None:
    df = fd.DirectionFilter(True, 8)
    df.receive_data(b"x")
    df.next_event()
    df.verdict(K.NEED_RULES)
    assert df.next_event() == fd.Drop("need_rules") and df.room() == 0
    df.receive_data(b"more")  # ignored once dropped
    assert df.next_event() == fd.Drop("need_rules")


def test_pause_and_resume() -> None:
    df = fd.DirectionFilter(True, 8)
    df.receive_data(b"hello")
    assert df.next_event() == fd.Peek(0, b"hello")
    df.verdict(K.PAUSE)
    assert df.next_event() is fd.PAUSED and df.room() == 0
    df.resume(K.FILTER, 5, 8)
    assert df.next_event() == fd.Deliver(b"hello")
    with pytest.raises(LocalProtocolError):
        df.resume(K.ALLOW)


def test_misuse_raises() -> None:
    df = fd.DirectionFilter(True, 8)
    with pytest.raises(LocalProtocolError):
        df.verdict(K.ALLOW)
    with pytest.raises(LocalProtocolError):
        df.receive_data(b"x" * 9)  # more than the room
    df.receive_data(b"x")
    df.next_event()
    with pytest.raises(LocalProtocolError):
        df.next_event()  # the Peek is unanswered
    with pytest.raises(LocalProtocolError):
        df.verdict(K.FILTER, -1, 0)
    with pytest.raises(LocalProtocolError):
        fd.DirectionFilter(True, -1)


def test_peek_is_clamped() -> None:
    df = fd.DirectionFilter(True, 10**9)
    assert df.room() == fd.MAX_PEEK
    assert fd.DirectionFilter(True, 0).room() == 1


# ---------------------------------------------------------------- host-name parsers
def client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_of_a_real_client_hello() -> None:
    hello = client_hello("Blocked.Lab.Test")
    assert sniff_tls_sni(hello) == (True, "blocked.lab.test")
    assert sniff_tls_sni(hello[:40]) == (False, None)  # more bytes may name it
    assert sniff_tls_sni(client_hello(None)) == (True, None)
    assert sniff_tls_sni(b"GET / HTTP/1.1\r\n") == (True, None)


@given(st.integers(0, 600))
def test_every_truncation_of_a_client_hello_is_safe(cut: int) -> None:
    hello = client_hello("www.lab.test")
    complete, name = sniff_tls_sni(hello[:cut])
    assert name in (None, "www.lab.test")
    if cut >= len(hello):
        assert (complete, name) == (True, "www.lab.test")


@given(st.binary(max_size=MAX_SNIFF + 10))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    for sniff in (sniff_tls_sni, sniff_http_host):
        complete, name = sniff(data)
        assert isinstance(complete, bool) and (name is None or isinstance(name, str))


@given(st.data())
def test_mutated_client_hellos_never_raise(data: st.DataObject) -> None:
    hello = bytearray(client_hello("www.lab.test"))
    for _ in range(data.draw(st.integers(1, 8))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    complete, name = sniff_tls_sni(bytes(hello))
    assert complete in (True, False)
    assert name is None or name.isascii()


def test_http_host() -> None:
    req = b"GET / HTTP/1.1\r\nUser-Agent: curl\r\nHost: WWW.lab.test:80\r\nAccept: */*\r\n\r\n"
    assert sniff_http_host(req) == (True, "www.lab.test")
    assert sniff_http_host(req[:20]) == (False, None)
    assert sniff_http_host(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n") == (True, None)
    assert sniff_http_host(b"GET / HTTP/1.1\r\nHost: bad_name!\r\n\r\n") == (True, None)
    assert sniff_http_host(b"GET / HTTP/1.1\r\n\r\n") == (True, None)
    assert sniff_http_host(b"\x16\x03\x01garbage\r\n") == (True, None)
