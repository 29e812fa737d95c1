"""Sans-IO pass/peek accounting of a content filter's data verdicts (Apple: NEFilterDataProvider, docs/filters.md).

Theory of operation. One `DirectionFilter` per direction of a flow (outbound: app -> server; inbound: server ->
app) sits between the bytes read from one side and the bytes written to the other. It is fed with
`DirectionFilter.receive_data` / `DirectionFilter.receive_eof` and drained with `DirectionFilter.next_event`, in
the h11 style: the caller loops on ``next_event()`` and acts on each event:

- `Deliver` ``data``: forward these bytes now (they passed).
- `Peek` ``offset, data``: ask the provider (``handle_outbound_data`` / ``handle_inbound_data`` with
  ``readBytesStartOffset = offset``); answer with `DirectionFilter.verdict`.
- `Complete`: the direction ended with bytes still undecided or a filter still watching: ask the provider's
  ``handle_*_data_complete``; answer with `DirectionFilter.verdict`.
- `End`: forward the end of stream (every byte has been decided).
- `Drop`: the flow is dropped (close both sides).
- `NEED_DATA`: read at most `DirectionFilter.room` more bytes and feed them; `PAUSED`: wait for `resume`.

The accounting follows Apple's ``NEFilterDataVerdict(passBytes:peekBytes:)``: a verdict for a call made at
offset ``O`` lets bytes ``[O, O + pass)`` through (bytes not yet received pass as they arrive, unseen) and the next
call starts at ``O + pass`` with up to ``peek`` bytes. The provider is called as soon as there are bytes it has not
seen yet inside its peek window (Apple delivers data as it arrives, so a short HTTP request is not held waiting
for a full peek); so a provider that needs more answers ``pass 0, peek N`` and is called again when more arrived.
Bounds: the peek is clamped to ``[1, MAX_PEEK]``, and the buffer never holds more than the peek window
(`DirectionFilter.room` is 0 beyond it, so the caller stops reading: backpressure, not memory). A verdict that
cannot make progress (``pass 0`` and a peek no larger than what the provider has already seen, with nothing more
able to arrive) drops the flow (counted ``stalled``), since waiting would hold the flow forever.

Verdict kinds are `VerdictKind` (plain strings, so this module needs nothing from ``netsim.apple``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from netsim.errors import LocalProtocolError

__all__ = [
    "MAX_PEEK",
    "NEED_DATA",
    "PAUSED",
    "Complete",
    "Deliver",
    "DirectionFilter",
    "Drop",
    "End",
    "Event",
    "Peek",
    "VerdictKind",
]

#: the most bytes a provider may peek at once (Apple documents no limit; netsim bounds every buffer)
MAX_PEEK: Final = 65536


class VerdictKind(enum.Enum):
    """What a data (or new-flow) verdict says to do with a direction."""

    ALLOW = "allow"  # the rest of the direction passes unseen
    DROP = "drop"  # drop the whole flow
    NEED_RULES = "need_rules"  # the host asks its control provider (none: dropped)
    PAUSE = "pause"  # hold until `DirectionFilter.resume`
    FILTER = "filter"  # pass ``pass_bytes``, then peek ``peek_bytes``


@dataclass(frozen=True, slots=True)
class Deliver:
    data: bytes


@dataclass(frozen=True, slots=True)
class Peek:
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Complete:
    pass


@dataclass(frozen=True, slots=True)
class End:
    pass


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
PAUSED: Final = _Sentinel("PAUSED")

Event = Deliver | Peek | Complete | End | Drop | _Sentinel

_FILTER, _ALLOW, _DROP, _PAUSE, _DONE = "filter", "allow", "drop", "pause", "done"


def _clamp_peek(peek: int) -> int:
    return max(1, min(peek, MAX_PEEK))


class DirectionFilter:
    """The pass/peek state of one direction of a filtered flow (see the module docstring).

    Args:
        filtered: False: the direction passes unseen (Apple: ``filterOutbound: false``).
        peek_bytes: the first peek (Apple: ``peekOutboundBytes`` / ``peekInboundBytes``), clamped to
            ``[1, MAX_PEEK]``.
    """

    def __init__(self, filtered: bool = True, peek_bytes: int = MAX_PEEK) -> None:
        if peek_bytes < 0:
            raise LocalProtocolError(f"peek_bytes must be >= 0, not {peek_bytes}")
        self._mode = _FILTER if filtered else _ALLOW
        self._buf = bytearray()
        self._off = 0  # stream offset of _buf[0]
        self._pass_to = 0  # bytes before this offset pass as they arrive
        self._peek = _clamp_peek(peek_bytes)
        self._shown = 0  # bytes from _pass_to shown at the last Peek
        self._awaiting = False
        self._eof = False
        self._complete_asked = False
        self._drop_reason = ""
        self.delivered = 0  # bytes released
        self.peeks = 0  # provider calls (Peek + Complete)
        self.stalled = 0

    # ---------------------------------------------------------------- input
    @property
    def received(self) -> int:
        """Stream offset of the next byte to be fed."""
        return self._off + len(self._buf)

    def room(self) -> int:
        """How many more bytes this direction accepts now (0: stop reading)."""
        if self._mode == _ALLOW:
            return MAX_PEEK if not self._eof else 0
        if self._mode != _FILTER or self._eof:
            return 0
        return max(0, self._pass_to + self._peek - self.received)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the source side (at most `room`)."""
        if self._eof:
            raise LocalProtocolError("receive_data after receive_eof")
        if len(data) > self.room() and self._mode in (_FILTER, _ALLOW):
            raise LocalProtocolError(f"fed {len(data)} bytes, room is {self.room()}")
        if self._mode in (_DROP, _DONE):
            return  # dropped: bytes are discarded
        self._buf += data

    def receive_eof(self) -> None:
        """The source side ended its stream."""
        self._eof = True

    # ---------------------------------------------------------------- verdicts
    def verdict(self, kind: VerdictKind, pass_bytes: int = 0, peek_bytes: int = 0) -> None:
        """Answer the last `Peek` or `Complete` (Apple's data verdict for this direction)."""
        if not self._awaiting:
            raise LocalProtocolError("verdict() without a pending Peek or Complete")
        self._awaiting = False
        self._apply(kind, pass_bytes, peek_bytes)

    def resume(self, kind: VerdictKind, pass_bytes: int = 0, peek_bytes: int = 0) -> None:
        """Resume a paused direction with a verdict (Apple: ``resumeFlow(_:with:)``)."""
        if self._mode != _PAUSE:
            raise LocalProtocolError("resume() of a direction that is not paused")
        self._mode = _FILTER
        if kind is VerdictKind.PAUSE:
            raise LocalProtocolError("resume() with a pause verdict")
        self._apply(kind, pass_bytes, peek_bytes)

    def drop(self, reason: str) -> None:
        """Drop the direction (the other direction dropped the flow, or the host failed it)."""
        self._mode, self._drop_reason = _DROP, reason
        self._awaiting = False
        self._buf.clear()

    def _apply(self, kind: VerdictKind, pass_bytes: int, peek_bytes: int) -> None:
        if kind is VerdictKind.ALLOW:
            self._mode = _ALLOW
        elif kind is VerdictKind.DROP:
            self.drop("verdict")
        elif kind is VerdictKind.NEED_RULES:
            self.drop("need_rules")
        elif kind is VerdictKind.PAUSE:
            self._mode = _PAUSE
        else:
            if pass_bytes < 0 or peek_bytes < 0:
                raise LocalProtocolError(f"pass_bytes and peek_bytes must be >= 0 ({pass_bytes}, {peek_bytes})")
            if self._complete_asked:  # at the end of the stream: Apple's complete verdict is allow or drop
                self._mode = _ALLOW
                return
            peek = _clamp_peek(peek_bytes)
            if pass_bytes == 0 and peek <= self._shown and not self._eof:
                self.stalled += 1
                self.drop("stalled")
                return
            if pass_bytes:
                self._pass_to += pass_bytes
                self._shown = 0
            self._peek = peek

    # ---------------------------------------------------------------- output
    def next_event(self) -> Event:
        """The next thing the caller must do (see the module docstring)."""
        if self._awaiting:
            raise LocalProtocolError("answer the pending Peek or Complete with verdict() first")
        if self._mode == _DROP:
            return Drop(self._drop_reason)
        if self._mode == _DONE:
            return NEED_DATA
        if self._mode == _PAUSE:
            return PAUSED
        limit = len(self._buf) if self._mode == _ALLOW else max(0, min(len(self._buf), self._pass_to - self._off))
        if limit:
            out = bytes(self._buf[:limit])
            del self._buf[:limit]
            self._off += limit
            self.delivered += limit
            return Deliver(out)
        if self._mode == _ALLOW:
            if self._eof:
                self._mode = _DONE
                return End()
            return NEED_DATA
        if self._off >= self._pass_to:  # _buf starts at the peek offset
            avail = min(len(self._buf), self._peek)
            if avail > self._shown:
                self._shown = avail
                self._awaiting = True
                self.peeks += 1
                return Peek(self._off, bytes(self._buf[:avail]))
        if self._eof:
            if not self._complete_asked:
                self._complete_asked = True
                self._awaiting = True
                self.peeks += 1
                return Complete()
            self._mode = _ALLOW  # pragma: no cover - a complete verdict always leaves FILTER
            return self.next_event()  # pragma: no cover
        return NEED_DATA
