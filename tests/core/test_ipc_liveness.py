"""Sans-IO liveness timers and POLICY_RESULT in `netsim.core.ipc.Connection` (no I/O, ``now`` passed in)."""

from __future__ import annotations

import pytest

from netsim.core import ipc
from netsim.core.ipc import Capability, Connection, Role
from netsim.errors import ConfigError, LocalProtocolError, RemoteProtocolError

ALL = Capability.STATS | Capability.POLICY | Capability.PING | Capability.POLICY_RESULT


def pair(p_caps: int = ALL, h_caps: int = ALL, **kw: float) -> tuple[Connection, Connection]:
    p = Connection(Role.PROVIDER, capabilities=p_caps, ping_interval=kw.get("interval", 5.0), ping_timeout=10.0)
    h = Connection(Role.HELPER, capabilities=h_caps, ping_interval=kw.get("interval", 5.0), ping_timeout=10.0)
    move(p, h, p.hello())
    move(h, p, h.hello_ack())
    return p, h


def move(src: Connection, dst: Connection, ev: ipc.Event) -> list[ipc.Event]:
    dst.receive_data(b"".join(bytes(b) for b in src.send(ev)))
    out: list[ipc.Event] = []
    while not isinstance(ev2 := dst.next_event(), ipc.NeedData):
        out.append(ev2)
    return out


def test_ping_due_after_interval_and_answered_pong_keeps_the_peer_alive() -> None:
    p, h = pair()
    assert p.get_timer() is None  # not started
    p.start_liveness(100.0)
    assert p.get_timer() == 105.0
    assert p.handle_timer(104.9) is None
    ping = p.handle_timer(105.0)
    assert isinstance(ping, ipc.Ping) and ping.nonce >> 63 == 1
    assert p.get_timer() == 115.0  # the deadline while it is outstanding
    (got,) = move(p, h, ping)
    assert got == ping
    assert move(h, p, ipc.Pong(ping.nonce)) == [ipc.Pong(ping.nonce)]
    assert p.get_timer() == 110.0 and not p.peer_timed_out  # next PING, one interval after the last
    assert (p.pings_sent, p.pongs_received) == (1, 1)


def test_unanswered_ping_declares_the_peer_dead_at_the_deadline() -> None:
    p, _ = pair()
    p.start_liveness(0.0)
    assert isinstance(p.handle_timer(5.0), ipc.Ping)
    assert p.handle_timer(14.99) is None and not p.peer_timed_out
    assert p.handle_timer(15.0) is None and p.peer_timed_out
    assert p.get_timer() is None
    with pytest.raises(RemoteProtocolError) as info:
        p.next_event()
    assert info.value.reason == "peer_timeout"


def test_a_late_handle_timer_call_still_sends_only_one_ping() -> None:
    p, _ = pair()
    p.start_liveness(0.0)
    assert isinstance(p.handle_timer(50.0), ipc.Ping)  # the runtime was late: one PING, deadline from now
    assert p.handle_timer(50.0) is None
    assert p.get_timer() == 60.0


def test_liveness_off_without_interval_or_peer_ping_capability() -> None:
    p = Connection(Role.PROVIDER)
    h = Connection(Role.HELPER)
    move(p, h, p.hello())
    move(h, p, h.hello_ack())
    p.start_liveness(0.0)
    assert p.get_timer() is None
    p2, _ = pair(h_caps=Capability.STATS)
    p2.start_liveness(0.0)
    assert p2.get_timer() is None  # the helper did not offer PING: the intersection lacks it
    with pytest.raises(ConfigError):
        Connection(Role.PROVIDER, ping_interval=0.0)


def test_policy_result_round_trip_and_capability_gate() -> None:
    p, h = pair()
    assert move(h, p, ipc.PolicyResult(3, ipc.ErrorCode.POLICY, "rule #0: bad")) == [
        ipc.PolicyResult(3, ipc.ErrorCode.POLICY, "rule #0: bad")
    ]
    assert move(h, p, ipc.PolicyResult(4)) == [ipc.PolicyResult(4, 0, "")]
    with pytest.raises(LocalProtocolError):
        p.send(ipc.PolicyResult(1))  # helper -> provider only
    _, h_new = pair(p_caps=Capability.STATS | Capability.POLICY | Capability.PING)
    with pytest.raises(LocalProtocolError, match="POLICY_RESULT"):
        h_new.send(ipc.PolicyResult(1))  # never to a provider that did not offer it


def test_policy_result_not_offered_is_a_remote_error() -> None:
    p, _ = pair(p_caps=Capability.STATS)
    frame = ipc.HEADER.pack(ipc.MAGIC, 1, ipc.MessageType.POLICY_RESULT, 0, 0, 10) + bytes(10)
    p.receive_data(frame)
    with pytest.raises(RemoteProtocolError) as info:
        p.next_event()
    assert info.value.reason == "not_negotiated"
