"""Per-stage packet ledgers: every packet a stage reads is forwarded, dropped for a named reason, or still queued.

The invariant, per stage (docs/reliability.md C1, "L0 ledger")::

    read == forwarded + sum(dropped.values()) + queued

``queued`` is a gauge the stage owner sets from its real queue (or moves with `Stage.count_queued`), not a value
derived from the other counters, so a packet that leaks out of a stage without being counted shows up as an
*unattributed* difference in `Ledger.check`. At quiescence ``queued`` must also be 0.

Counters are plain ints bumped by cheap methods on the hot path; `Ledger.snapshot` freezes them for
``statistics()`` and `LedgerSnapshot.to_json` / `LedgerSnapshot.from_json_untrusted` carry them in an IPC
STATS_RESPONSE. Stage names (``"tun_read"``, ``"ipc_out"``, ``"wg_encrypt"`` ...) and drop reasons
(``"queue_full"``, ``"malformed"`` ...) are free-form strings chosen by callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from netsim.errors import BadPacket

__all__ = ["Imbalance", "Ledger", "LedgerSnapshot", "Stage", "StageSnapshot"]


class Stage:
    """Counters of one pipeline stage. Mutate only through the ``count_*`` / `set_queued` methods."""

    __slots__ = ("dropped", "forwarded", "name", "queued", "read")

    def __init__(self, name: str) -> None:
        self.name = name
        self.read = 0
        self.forwarded = 0
        self.queued = 0
        self.dropped: dict[str, int] = {}

    def count_read(self, n: int = 1) -> None:
        """``n`` packets entered the stage."""
        self.read += n

    def count_forwarded(self, n: int = 1) -> None:
        """``n`` packets left the stage onward."""
        self.forwarded += n

    def count_dropped(self, reason: str, n: int = 1) -> None:
        """``n`` packets were dropped for ``reason`` (the counter's name)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def count_queued(self, delta: int) -> None:
        """The stage's queue grew (``delta > 0``) or shrank by ``delta`` packets."""
        self.queued += delta

    def set_queued(self, n: int) -> None:
        """Set the queue gauge from the real queue length."""
        self.queued = n

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def unattributed(self) -> int:
        """``read - forwarded - dropped - queued``: nonzero means packets were lost or invented uncounted."""
        return self.read - self.forwarded - sum(self.dropped.values()) - self.queued

    def snapshot(self) -> StageSnapshot:
        return StageSnapshot(self.name, self.read, self.forwarded, self.queued, tuple(sorted(self.dropped.items())))

    def __repr__(self) -> str:
        return (
            f"Stage({self.name!r}, read={self.read}, forwarded={self.forwarded}, "
            f"queued={self.queued}, dropped={self.dropped})"
        )


@dataclass(frozen=True, slots=True)
class Imbalance:
    """One ledger violation found by `Ledger.check`."""

    stage: str
    kind: str  # "unattributed" | "queued_at_quiescence" | "negative"
    amount: int
    counter: str = ""  # for "negative": which counter ("read", "forwarded", "queued", "dropped[<reason>]")

    def __str__(self) -> str:
        what = f" {self.counter}" if self.counter else ""
        return f"{self.stage}: {self.kind}{what} {self.amount:+d}"


@dataclass(frozen=True, slots=True)
class StageSnapshot:
    """Frozen counters of one stage; ``dropped`` is sorted ``(reason, count)`` pairs."""

    name: str
    read: int
    forwarded: int
    queued: int
    dropped: tuple[tuple[str, int], ...] = ()

    @property
    def dropped_total(self) -> int:
        return sum(n for _, n in self.dropped)

    def dropped_for(self, reason: str) -> int:
        return dict(self.dropped).get(reason, 0)

    def unattributed(self) -> int:
        return self.read - self.forwarded - self.dropped_total - self.queued

    def imbalances(self, *, quiescent: bool = False) -> list[Imbalance]:
        out: list[Imbalance] = []
        if diff := self.unattributed():
            out.append(Imbalance(self.name, "unattributed", diff))
        if quiescent and self.queued:
            out.append(Imbalance(self.name, "queued_at_quiescence", self.queued))
        # every counter is a count of packets: a negative one means a caller subtracted what it never added
        # (e.g. a drop reason booked from a wrong classification), which `unattributed` alone may not show
        for field, n in (("read", self.read), ("forwarded", self.forwarded), ("queued", self.queued)):
            if n < 0:
                out.append(Imbalance(self.name, "negative", n, field))
        for reason, n in self.dropped:
            if n < 0:
                out.append(Imbalance(self.name, "negative", n, f"dropped[{reason}]"))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "forwarded": self.forwarded, "queued": self.queued, "dropped": dict(self.dropped)}


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """Frozen counters of every stage of one process, in stage creation order."""

    name: str
    stages: tuple[StageSnapshot, ...]

    def __getitem__(self, stage: str) -> StageSnapshot:
        for s in self.stages:
            if s.name == stage:
                return s
        raise KeyError(stage)

    def check(self, *, quiescent: bool = False) -> list[Imbalance]:
        """Every stage's violations (empty list when the books balance)."""
        return [i for s in self.stages for i in s.imbalances(quiescent=quiescent)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: ``{"name": ..., "stages": {stage: {"read", "forwarded", "queued", "dropped"}}}``."""
        return {"name": self.name, "stages": {s.name: s.to_json() for s in self.stages}}

    @classmethod
    def from_json_untrusted(cls, obj: object) -> LedgerSnapshot:
        """Rebuild a snapshot received from a peer (e.g. in STATS_RESPONSE). Raises only `BadPacket`."""
        if not isinstance(obj, Mapping) or not isinstance(obj.get("name"), str):
            raise BadPacket("bad_ledger", "expected an object with a string 'name'")
        stages = obj.get("stages")
        if not isinstance(stages, Mapping):
            raise BadPacket("bad_ledger", "'stages' must be an object")
        out = []
        for name, st in stages.items():
            if not isinstance(name, str) or not isinstance(st, Mapping):
                raise BadPacket("bad_ledger", f"stage {name!r} must be an object")
            nums = [st.get(k) for k in ("read", "forwarded", "queued")]
            dropped = st.get("dropped", {})
            if not all(_is_int(v) for v in nums) or not isinstance(dropped, Mapping):
                raise BadPacket("bad_ledger", f"stage {name!r}: read/forwarded/queued must be integers")
            if not all(isinstance(k, str) and _is_int(v) for k, v in dropped.items()):
                raise BadPacket("bad_ledger", f"stage {name!r}: dropped must map reasons to integers")
            out.append(StageSnapshot(name, nums[0], nums[1], nums[2], tuple(sorted(dropped.items()))))  # type: ignore[arg-type]
        return cls(obj["name"], tuple(out))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Ledger:
    """The stages of one process (or component), e.g. ``Ledger("helper")`` with ``tun_read``, ``ipc_out`` ..."""

    __slots__ = ("_stages", "name")

    def __init__(self, name: str, stages: tuple[str, ...] = ()) -> None:
        self.name = name
        self._stages: dict[str, Stage] = {}
        for s in stages:
            self.stage(s)

    def stage(self, name: str) -> Stage:
        """The stage called ``name``, created on first use. Keep the returned object on the hot path."""
        st = self._stages.get(name)
        if st is None:
            st = self._stages[name] = Stage(name)
        return st

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(self.name, tuple(s.snapshot() for s in self._stages.values()))

    def check(self, *, quiescent: bool = False) -> list[Imbalance]:
        """Violations of ``read == forwarded + dropped + queued`` (and ``queued == 0`` if ``quiescent``)."""
        return self.snapshot().check(quiescent=quiescent)
