"""The handshake order and the reason -> ErrorCode mapping, now protocol in `ipc.Connection` (sans-IO), and the
codec tables covering every message type (netsim issue 12)."""

from __future__ import annotations

import pytest

from netsim.core import ipc
from netsim.core.ipc import _codec
from netsim.errors import RemoteProtocolError


def wire(bufs: list[ipc.Buffer]) -> bytes:
    return b"".join(map(bytes, bufs))


def test_handshake_order_driven_by_the_connections_alone() -> None:
    p, h = ipc.Connection(ipc.Role.PROVIDER), ipc.Connection(ipc.Role.HELPER)
    opening = p.handshake_opening()
    assert isinstance(opening, ipc.Hello)
    h.receive_data(wire(p.send(opening)))
    ev = h.next_event()
    assert not isinstance(ev, ipc.NeedData)
    hello = h.handshake_event(ev)
    assert isinstance(hello, ipc.Hello)
    reply = h.handshake_reply()
    assert isinstance(reply, ipc.HelloAck) and p.handshake_reply() is None
    p.receive_data(wire(h.send(reply)))
    ev = p.next_event()
    assert not isinstance(ev, ipc.NeedData)
    assert isinstance(p.handshake_event(ev), ipc.HelloAck)
    assert p.our_state is p.their_state is ipc.SideState.OPEN
    assert h.our_state is h.their_state is ipc.SideState.OPEN


def test_helper_opening_is_none() -> None:
    assert ipc.Connection(ipc.Role.HELPER).handshake_opening() is None


@pytest.mark.parametrize(
    ("code", "reason"),
    [(ipc.ErrorCode.BUSY, "peer_busy"), (ipc.ErrorCode.AUTH, "peer_error"), (ipc.ErrorCode.PROTOCOL, "peer_error")],
)
def test_an_error_during_the_handshake_names_its_reason(code: ipc.ErrorCode, reason: str) -> None:
    p = ipc.Connection(ipc.Role.PROVIDER)
    with pytest.raises(RemoteProtocolError) as e:
        p.handshake_event(ipc.Error(code, "no"))
    assert e.value.reason == reason


def test_the_wrong_first_event_is_handshake_failed() -> None:
    with pytest.raises(RemoteProtocolError) as e:
        ipc.Connection(ipc.Role.PROVIDER).handshake_event(ipc.Settings(b"{}"))
    assert e.value.reason == "handshake_failed"
    with pytest.raises(RemoteProtocolError) as e:
        ipc.Connection(ipc.Role.HELPER).handshake_event(ipc.ConnectionClosed(clean=False))
    assert e.value.reason == "handshake_failed"


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("auth_failed", ipc.ErrorCode.AUTH),
        ("peer_timeout", ipc.ErrorCode.TIMEOUT),
        ("no_common_version", ipc.ErrorCode.VERSION),
        ("frame_too_big", ipc.ErrorCode.TOO_BIG),
        ("bad_magic", ipc.ErrorCode.PROTOCOL),
        ("out_of_order", ipc.ErrorCode.PROTOCOL),
    ],
)
def test_error_for_maps_the_reason_to_the_code(reason: str, code: ipc.ErrorCode) -> None:
    err = ipc.Connection.error_for(RemoteProtocolError(reason, "x" * 2000))
    assert err.code == code and len(err.message) <= 512 and reason in err.message


def test_a_wrong_token_is_answered_with_error_auth_on_the_wire() -> None:
    p = ipc.Connection(ipc.Role.PROVIDER, token=b"wrong")
    h = ipc.Connection(ipc.Role.HELPER, expected_token=b"right")
    h.receive_data(wire(p.send(p.hello())))
    with pytest.raises(RemoteProtocolError) as e:
        h.next_event()
    p.receive_data(wire(h.send(h.error_for(e.value))))  # last words after the failure are still allowed
    err = p.next_event()
    assert isinstance(err, ipc.Error) and err.code == ipc.ErrorCode.AUTH


def test_codec_tables_cover_every_message_type() -> None:
    assert set(_codec.DECODERS) == set(ipc.MessageType)
    encoded = {mtype for mtype, _ in _codec.ENCODERS.values()}
    assert encoded | {ipc.MessageType.PACKETS} == set(ipc.MessageType)


def test_ipc_families_are_the_ones_in_core_family() -> None:
    from netsim.core import family

    assert (ipc.AF_INET, ipc.AF_INET6) == (family.DARWIN_AF_INET, family.DARWIN_AF_INET6)
