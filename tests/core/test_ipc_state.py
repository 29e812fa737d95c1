"""Ordering rules of the IPC state machine, checked against a deliberately plain reference model."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from netsim.core import ipc
from netsim.core.ipc import NEED_DATA, Connection, Role
from netsim.errors import LocalProtocolError, RemoteProtocolError

KINDS = [
    "hello",
    "hello_ack",
    "packets",
    "settings",
    "stats_request",
    "stats_response",
    "policy",
    "ping",
    "pong",
    "error",
    "goodbye",
]
DATA = {"packets", "settings", "stats_request", "stats_response", "ping", "pong"}


class Model:
    """The rules written as plain if-chains (independent of the tables in ipc.py)."""

    def __init__(self) -> None:
        self.state = {Role.PROVIDER: "idle", Role.HELPER: "idle"}
        self.requests: dict[Role, set[tuple[str, int]]] = {Role.PROVIDER: set(), Role.HELPER: set()}

    def allowed(self, sender: Role, kind: str, key: int) -> bool:
        me = self.state[sender]
        other = Role.HELPER if sender is Role.PROVIDER else Role.PROVIDER
        if me == "done":
            return False
        if kind in ("error", "goodbye"):
            return True
        if kind == "hello":
            return sender is Role.PROVIDER and me == "idle"
        if kind == "hello_ack":
            return sender is Role.HELPER and me == "idle" and self.state[other] == "await"
        if me != "open":
            return False
        if kind == "policy":
            return sender is Role.PROVIDER
        if kind in ("stats_request", "ping"):
            reqs = self.requests[sender]
            return len(reqs) < 64 and (kind, key) not in reqs
        if kind == "stats_response":
            return ("stats_request", key) in self.requests[other]
        if kind == "pong":
            return ("ping", key) in self.requests[other]
        return kind in DATA

    def apply(self, sender: Role, kind: str, key: int) -> None:
        other = Role.HELPER if sender is Role.PROVIDER else Role.PROVIDER
        if kind == "hello":
            self.state[sender] = "await"
        elif kind == "hello_ack":
            self.state[sender] = self.state[other] = "open"
        elif kind in ("error", "goodbye"):
            self.state[sender] = "done"
        elif kind in ("stats_request", "ping"):
            self.requests[sender].add((kind, key))
        elif kind == "stats_response":
            self.requests[other].discard(("stats_request", key))
        elif kind == "pong":
            self.requests[other].discard(("ping", key))


def make(conn: Connection, kind: str, key: int) -> ipc.Event | None:
    match kind:
        case "hello":
            return conn.hello() if conn.role is Role.PROVIDER else ipc.Hello(Role.HELPER, (1,), 0, 1 << 20)
        case "hello_ack":
            return ipc.HelloAck(1, Role.HELPER, 0, 1 << 20)
        case "packets":
            return None
        case "settings":
            return ipc.Settings(b"{}")
        case "stats_request":
            return ipc.StatsRequest(key)
        case "stats_response":
            return ipc.StatsResponse(key, {"n": key})
        case "policy":
            return ipc.PolicyUpdate(key, b"p")
        case "ping":
            return ipc.Ping(key)
        case "pong":
            return ipc.Pong(key)
        case "error":
            return ipc.Error(1, "e")
        case _:
            return ipc.Goodbye()


class IpcPairMachine(RuleBasedStateMachine):
    """Both ends send in random order; each send is allowed iff the model says so, and arrives intact."""

    def __init__(self) -> None:
        super().__init__()
        self.conns = {Role.PROVIDER: Connection(Role.PROVIDER), Role.HELPER: Connection(Role.HELPER)}
        self.model = Model()

    @rule(sender=st.sampled_from(list(Role)), kind=st.sampled_from(KINDS), key=st.integers(0, 3))
    def send(self, sender: Role, kind: str, key: int) -> None:
        conn = self.conns[sender]
        peer = self.conns[Role.HELPER if sender is Role.PROVIDER else Role.PROVIDER]
        allowed = self.model.allowed(sender, kind, key)
        if not allowed:
            # A refused send kills the connection, so try it on a copy and keep exploring with the original.
            conn = copy.deepcopy(conn)
        ev = make(conn, kind, key)
        try:
            bufs = conn.send_packets([b"E" * (20 + key)], 2) if ev is None else conn.send(ev)
        except LocalProtocolError:
            assert not allowed, f"{sender.name} {kind} {key} should be allowed in {self.model.state}"
            assert conn.our_state in (ipc.SideState.ERROR, ipc.SideState.DONE)
            return
        assert allowed, f"{sender.name} {kind} {key} should be refused in {self.model.state}"
        self.model.apply(sender, kind, key)
        peer.receive_data(b"".join(bytes(b) for b in bufs))
        got = peer.next_event()
        assert peer.next_event() is NEED_DATA
        if ev is None:
            assert isinstance(got, ipc.PacketBatch) and got.copy_packets() == [b"E" * (20 + key)]
        else:
            assert got == ev

    @invariant()
    def states_agree(self) -> None:
        names = {"idle": ipc.SideState.IDLE, "await": ipc.SideState.AWAIT_ACK, "open": ipc.SideState.OPEN}
        names["done"] = ipc.SideState.DONE
        for conn in self.conns.values():
            for role in Role:
                assert conn.states[role] is names[self.model.state[role]]


IpcPairMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestIpcPair = IpcPairMachine.TestCase


# Remote ordering: a sequence of raw frames from a misbehaving provider, judged against the same model.
def _raw(kind: str, key: int) -> bytes:
    """Encode without any state checks, via a connection forced open (bypassing the tables on purpose)."""
    c = Connection(Role.PROVIDER)
    c.states = {Role.PROVIDER: ipc.SideState.OPEN, Role.HELPER: ipc.SideState.OPEN}
    c.version = 1
    ev = make(c, kind, key)
    if kind == "hello":
        c.states[Role.PROVIDER] = ipc.SideState.IDLE
    if kind == "hello_ack":
        c.role, c.peer_role = Role.HELPER, Role.PROVIDER
        c.states = {Role.PROVIDER: ipc.SideState.AWAIT_ACK, Role.HELPER: ipc.SideState.IDLE}
        c._peer_hello = ipc.Hello(Role.PROVIDER, (1,), 0, 1 << 20)
    if kind in ("stats_response", "pong"):
        c._their_requests.add(
            (ipc.MessageType.STATS_REQUEST if kind == "stats_response" else ipc.MessageType.PING, key)
        )
    bufs = c.send_packets([b"E" * 20], 2) if ev is None else c.send(ev)
    return b"".join(bytes(b) for b in bufs)


@pytest.mark.reliability("B7")
@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 3)), min_size=1, max_size=8))
def test_helper_judges_provider_frames_like_the_model(frames: list[tuple[str, int]]) -> None:
    helper = Connection(Role.HELPER)
    model = Model()
    for kind, key in frames:
        # the helper never answers here, so the provider can only ever be idle / await / done
        allowed = model.allowed(Role.PROVIDER, kind, key)
        helper.receive_data(_raw(kind, key))
        try:
            ev = helper.next_event()
        except RemoteProtocolError:
            assert not allowed, (kind, key, model.state)
            return
        assert allowed, (kind, key, model.state)
        assert ev is not NEED_DATA
        model.apply(Role.PROVIDER, kind, key)
