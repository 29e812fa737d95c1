"""Impaired links, sans-IO: what happens to each packet (loss, delay, jitter, reorder, duplication, rate).

`Impairment` is the spec (validated; `ConfigError` names the bad field). `ImpairmentModel` is the deterministic
scheduler one impaired direction runs: the caller hands it packets (an opaque handle, a length and the arrival
time) and pulls what is due, as aioquic's timers are pulled::

    model.packet_in(handle, length, now)      # for each packet read
    for release in model.release_due(now):    # ACCEPT / DROP / COPY, each with its scheduled time
        ...
    wake_at = model.next_timer()              # None: nothing held

Theory of operation. A packet meets, in order (as netem orders them):

1. the **queue limit**: with ``limit`` packets held, it is dropped (``overflow``);
2. **loss**: dropped with probability ``loss`` (``dropped``);
3. **duplication**: with probability ``duplicate`` a copy follows it, released right after it (``COPY``);
4. the **delay line**: held ``delay`` plus a uniform ``±jitter`` (never below zero); with probability ``reorder``
   it skips the delay and so overtakes the packets held before it;
5. the **rate**: packets leave the delay line into a FIFO drained by a token bucket of ``rate`` bits/s and
   ``burst`` bytes, so over any span of release times ``[a, b]`` at most ``burst + rate/8 * (b - a)`` bytes go.

Every packet draws exactly four numbers from ``random.Random(seed)``, used or not, so the decisions for the
n-th packet depend only on the seed and n: the same seed and the same packets give the same drops, copies and
delays, whatever else is configured or however late the caller polls (release times are computed from the
schedule, not from ``now``). Only ``overflow`` depends on the caller's timing.

Counters (`ImpairmentStatistics`) add up: ``seen == passed + dropped + overflow + held``. ``reordered`` counts
the packets released while a packet that arrived before them was still held (what a receiver counting sequence
numbers sees as out of order), ``delayed`` those released later than they arrived.
"""

from __future__ import annotations

import heapq
import math
import random
import re
from collections import deque
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from typing import Any, NamedTuple

from netsim.errors import ConfigError

__all__ = [
    "Action",
    "Impairment",
    "ImpairmentModel",
    "ImpairmentStatistics",
    "Release",
    "parse_duration",
    "parse_probability",
    "parse_rate",
]

_MAX_DELAY = 60.0  # seconds: a lab link, not a satellite in a drawer
_MAX_RATE = 100 * 10**9  # bits/s
_FRAME = 1514  # bytes: an Ethernet frame, the default burst's unit
_EPSILON = 1e-9  # seconds / bytes: float slack in the token bucket


class Action(IntEnum):
    """What to do with a packet the model lets go."""

    ACCEPT = 1  #: let the packet through (the original)
    DROP = 2  #: drop it (loss or overflow)
    COPY = 3  #: send a copy of it (duplication); the original has been, or is being, accepted


class Release(NamedTuple):
    """One decision: the caller's ``handle``, the `Action`, and the schedule time it takes effect (never before
    the packet's arrival)."""

    handle: int
    action: Action
    at: float


@dataclass(frozen=True)
class Impairment:
    """One direction of an impaired link. All zero (the default) passes every packet at once, unchanged.

    Attributes:
        loss: probability that a packet is dropped (0-1).
        delay: seconds every packet is held (0-60).
        jitter: a uniform ``±jitter`` seconds added to ``delay`` (0-60; the total never below zero).
        reorder: probability that a packet skips the delay, overtaking those held (needs ``delay`` or ``jitter``).
        duplicate: probability that a copy follows a packet (0-1).
        rate: bits per second out of the link, 0 for no limit (else 8 000 - 100 000 000 000).
        burst: the token bucket's depth in bytes (0: two full frames or 10 ms at ``rate``, the larger).
        limit: packets held at once; more are dropped as ``overflow`` (1-1 000 000).
        seed: seeds the model's `random.Random`.
    """

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    reorder: float = 0.0
    duplicate: float = 0.0
    rate: int = 0
    burst: int = 0
    limit: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("loss", "delay", "jitter", "reorder", "duplicate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"Impairment.{name} must be a finite number, not {value!r}")
        for name in ("rate", "burst", "limit", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"Impairment.{name} must be an integer, not {value!r}")
        for name in ("loss", "reorder", "duplicate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"Impairment.{name} is a probability (0-1), not {getattr(self, name)!r}")
        for name in ("delay", "jitter"):
            if not 0.0 <= getattr(self, name) <= _MAX_DELAY:
                raise ConfigError(f"Impairment.{name} must be 0-{_MAX_DELAY:g} s, not {getattr(self, name)!r}")
        if self.reorder and not (self.delay or self.jitter):
            raise ConfigError("Impairment.reorder needs a delay (or jitter): reordered packets skip the delay")
        if self.rate and not 8000 <= self.rate <= _MAX_RATE:
            raise ConfigError(f"Impairment.rate must be 0 (no limit) or 8000-{_MAX_RATE} bit/s, not {self.rate}")
        if self.burst and not (self.rate and 64 <= self.burst <= 1 << 26):
            raise ConfigError("Impairment.burst (64 B - 64 MiB) needs a rate")
        if not 1 <= self.limit <= 1_000_000:
            raise ConfigError(f"Impairment.limit must be 1-1000000 packets, not {self.limit}")
        if not 0 <= self.seed < 1 << 64:
            raise ConfigError(f"Impairment.seed must be 0 <= seed < 2**64, not {self.seed}")

    @property
    def bucket(self) -> int:
        """The token bucket's depth in bytes (``burst``, or its default); 0 without a rate."""
        if not self.rate:
            return 0
        return self.burst or max(2 * _FRAME, self.rate // 800)

    def model(self) -> ImpairmentModel:
        """A fresh model of this spec (its own seeded random stream)."""
        return ImpairmentModel(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Impairment:
        """An `Impairment` from `to_dict`'s form; unknown keys or bad values raise `ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError("an impairment is a mapping of its fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown impairment fields {unknown} (known: {sorted(known)})")
        return cls(**data)

    def describe(self) -> str:
        """A short human form, e.g. ``loss 10% delay 50ms jitter 5ms seed 1`` (``none`` when it changes nothing)."""
        parts = [f"{n} {getattr(self, n) * 100:g}%" for n in ("loss", "duplicate", "reorder") if getattr(self, n)]
        parts += [f"{n} {getattr(self, n) * 1000:g}ms" for n in ("delay", "jitter") if getattr(self, n)]
        if self.rate:
            parts.append(f"rate {self.rate / 1e6:g}mbit burst {self.bucket}B")
        return " ".join(parts) + f" seed {self.seed}" if parts else "none"


@dataclass(frozen=True)
class ImpairmentStatistics:
    """An `ImpairmentModel`'s counters (``seen == passed + dropped + overflow + held``).

    Attributes:
        seen: packets handed in.
        passed: originals released (accepted).
        dropped: dropped by ``loss``.
        overflow: dropped because ``limit`` packets were held.
        duplicated: copies released.
        delayed: originals released later than they arrived.
        reordered: originals released while an earlier-arrived packet was still held.
        held: originals held now.
    """

    seen: int = 0
    passed: int = 0
    dropped: int = 0
    overflow: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0
    held: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict_untrusted(cls, data: object) -> ImpairmentStatistics:
        """Read counters another process wrote (JSON): non-negative integers only; anything else is left 0."""
        if not isinstance(data, dict):
            return cls()
        values = {
            f.name: v
            for f in fields(cls)
            if isinstance(v := data.get(f.name), int) and not isinstance(v, bool) and 0 <= v < 1 << 63
        }
        return cls(**values)


class _Held(NamedTuple):
    due: float
    order: int  # a stable tie-break: arrival order, a copy right after its original
    arrival_index: int  # of the original (-1 for a copy)
    handle: int
    action: Action
    length: int
    arrival: float


class ImpairmentModel:
    """The scheduler of one impaired direction (see the module docstring for the pipeline and counters)."""

    def __init__(self, spec: Impairment) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed)
        self._rate = spec.rate / 8.0  # bytes per second
        self._bucket = float(spec.bucket)
        self._tokens = self._bucket
        self._tokens_at = -math.inf  # the bucket starts full
        self._line: list[_Held] = []  # the delay line: a heap by (due, order)
        self._fifo: deque[_Held] = deque()  # out of the delay line, waiting for tokens
        self._ready: list[Release] = []  # decided at arrival (drops), handed out by the next release_due
        self._order = 0
        self._index = 0
        self._outstanding: list[int] = []  # heap of the arrival indexes of held originals (lazy deletion)
        self._released: set[int] = set()
        self._held = 0  # packets (originals and copies) in the line and the FIFO
        self.seen = self.passed = self.dropped = self.overflow = 0
        self.duplicated = self.delayed = self.reordered = 0

    def packet_in(self, handle: int, length: int, now: float) -> bool:
        """Hand in a packet of ``length`` bytes that arrived at ``now``; its fate comes out of `release_due`.
        Returns True when a copy of it will be released (so the caller keeps its bytes until the ``COPY``)."""
        u_loss, u_dup, u_jitter, u_reorder = (self._rng.random() for _ in range(4))
        self.seen += 1
        spec = self.spec
        if self._held >= spec.limit:
            self.overflow += 1
            self._ready.append(Release(handle, Action.DROP, now))
            return False
        if u_loss < spec.loss:
            self.dropped += 1
            self._ready.append(Release(handle, Action.DROP, now))
            return False
        hold = spec.delay + spec.jitter * (2.0 * u_jitter - 1.0)
        due = now if u_reorder < spec.reorder else now + max(0.0, hold)
        index = self._index
        self._index += 1
        heapq.heappush(self._outstanding, index)
        self._push(_Held(due, self._order, index, handle, Action.ACCEPT, length, now))
        if u_dup < spec.duplicate:
            self._push(_Held(due, self._order, -1, handle, Action.COPY, length, now))
            return True
        return False

    def _push(self, item: _Held) -> None:
        self._order += 1
        self._held += 1
        heapq.heappush(self._line, item)

    def _ready_at(self, length: int) -> float:
        """When the bucket holds enough for a packet of ``length`` (a packet over ``burst`` waits for a full
        bucket and leaves it in debt)."""
        need = min(float(length), self._bucket)
        if self._tokens_at == -math.inf:
            return -math.inf
        level = self._tokens
        if level >= need - _EPSILON:
            return self._tokens_at
        return self._tokens_at + (need - level) / self._rate

    def _spend(self, at: float, length: int) -> None:
        if self._tokens_at != -math.inf:
            self._tokens = min(self._bucket, self._tokens + (at - self._tokens_at) * self._rate)
        self._tokens -= length
        self._tokens_at = at

    def next_timer(self) -> float | None:
        """The schedule time of the next release (None when nothing is held); pending drops are due at once."""
        if self._ready:
            return self._ready[0].at
        times = []
        if self._line:
            times.append(self._line[0].due)
        if self._fifo:
            head = self._fifo[0]
            times.append(max(head.due, self._ready_at(head.length)))
        return min(times) if times else None

    def release_due(self, now: float) -> list[Release]:
        """Every decision due at or before ``now``, in the order to carry them out."""
        out, self._ready = self._ready, []
        while True:
            line_due = self._line[0].due if self._line else math.inf
            if self._fifo:
                head = self._fifo[0]
                fifo_at = max(head.due, self._ready_at(head.length))
                if fifo_at <= line_due and fifo_at <= now:
                    self._fifo.popleft()
                    self._spend(fifo_at, head.length)
                    out.append(self._release(head, fifo_at))
                    continue
            if line_due > now:
                return out
            item = heapq.heappop(self._line)
            if self._rate:
                self._fifo.append(item)
            else:
                out.append(self._release(item, item.due))

    def flush(self, now: float) -> list[Release]:
        """Release everything held at once (the impairer is stopping): originals accepted, copies sent."""
        out, self._ready = self._ready, []
        items = sorted(self._fifo) + sorted(self._line)
        self._fifo.clear()
        self._line.clear()
        out += [self._release(item, now) for item in items]
        return out

    def _release(self, item: _Held, at: float) -> Release:
        self._held -= 1
        if item.action == Action.COPY:
            self.duplicated += 1
            return Release(item.handle, Action.COPY, at)
        self.passed += 1
        self.delayed += at > item.arrival
        self._released.add(item.arrival_index)
        outstanding = self._outstanding
        while outstanding and outstanding[0] in self._released:
            self._released.discard(heapq.heappop(outstanding))
        self.reordered += bool(outstanding) and outstanding[0] < item.arrival_index
        return Release(item.handle, Action.ACCEPT, at)

    def statistics(self) -> ImpairmentStatistics:
        return ImpairmentStatistics(
            seen=self.seen,
            passed=self.passed,
            dropped=self.dropped,
            overflow=self.overflow,
            duplicated=self.duplicated,
            delayed=self.delayed,
            reordered=self.reordered,
            held=self.seen - self.passed - self.dropped - self.overflow,
        )


# ------------------------------------------------------------------------------------ parsing what users type
_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DURATION = re.compile(_NUMBER + r"\s*(s|ms|us)?")
_RATE = re.compile(_NUMBER + r"\s*(bit|kbit|mbit|gbit)?", re.IGNORECASE)
_SECONDS = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
_BITS = {None: 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_duration(text: str) -> float:
    """Seconds from ``"50ms"``, ``"1.5s"``, ``"200us"`` or a bare number of seconds (tc's units)."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"{text!r} is not a duration (e.g. 50ms, 1.5s, 200us)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def parse_rate(text: str) -> int:
    """Bits per second from ``"10mbit"``, ``"512kbit"``, ``"1gbit"`` or a bare number of bit/s (tc's units)."""
    m = _RATE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"{text!r} is not a rate (e.g. 10mbit, 512kbit, 1gbit)")
    unit = m.group(2).lower() if m.group(2) else None
    return round(float(m.group(1)) * _BITS[unit])


def parse_probability(text: str) -> float:
    """A probability from ``"0.1"`` or ``"10%"``."""
    body = text.strip()
    scale = 100.0 if body.endswith("%") else 1.0
    try:
        value = float(body.rstrip("%")) / scale
    except ValueError:
        raise ConfigError(f"{text!r} is not a probability (e.g. 0.1 or 10%)") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{text!r} is not a probability between 0 and 1")
    return value
