"""The runtime's clock across a simulated sleep: trio's clock plus the time the Mac spent asleep.

Why: on a Mac the monotonic clock (``mach_absolute_time``) stops while the machine sleeps, but the wall clock and a
WireGuard session's sense of key age move on: a Mac that slept past REJECT_AFTER_TIME (180 s, whitepaper §6.1)
wakes with keys it must not use, and the session has to handshake again. A lab "sleep" only freezes the tunnel's
processes (SIGSTOP) for a bounded second or two, so their clock is made to jump forward on wake instead:
`SleepClock` is ``trio.current_time() + offset`` and `SleepClock.jump` grows the offset. The sans-IO cores take
``now`` from it (`netsim.runtime.helper.Helper`'s ``clock``); `netsim.runtime.driver.DatagramDriver` turns their
timers back into trio deadlines with `SleepClock.to_trio`, so a timer that the jump made due fires at once.

In the lab the helper process learns of a jump from a small file (`write_slept` / `read_slept_untrusted`): the
total seconds slept, re-read when the helper gets SIGCONT (the wake). The total, not a delta, so reading it twice
(a second SIGCONT) changes nothing.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path

import trio

__all__ = ["MAX_JUMP", "SleepClock", "read_slept_untrusted", "watch_slept_file", "write_slept"]

log = logging.getLogger("netsim.clock")

#: The longest sleep a jump may add at once (a week): a bound on what a clock file can claim.
MAX_JUMP = 7 * 24 * 3600.0
_MAX_FILE = 64  # bytes read from a clock file: a number, nothing more


class SleepClock:
    """``trio.current_time()`` plus the seconds the simulated Mac slept (callable: ``clock()`` is ``now``).

    The offset only grows (time never runs backwards for a WireGuard core). `jumps` counts the jumps applied.
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self.jumps = 0

    def __call__(self) -> float:
        return trio.current_time() + self.offset

    def to_trio(self, t: float) -> float:
        """``t`` on this clock as a trio deadline (what `trio.CancelScope` takes)."""
        return t - self.offset

    def jump(self, seconds: float) -> float:
        """Move the clock ``seconds`` forward (0 < seconds <= `MAX_JUMP`); returns the new offset.

        Raises:
            ValueError: ``seconds`` is not a finite number in (0, MAX_JUMP].
        """
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and 0 < seconds <= MAX_JUMP):
            raise ValueError(f"a clock jump must be a number of seconds in (0, {MAX_JUMP:g}], got {seconds!r}")
        self.offset += float(seconds)
        self.jumps += 1
        return self.offset

    def set_slept(self, total: float) -> float:
        """Make the offset ``total`` seconds if that is later than it is; returns the jump applied (0.0: none)."""
        delta = total - self.offset
        if delta <= 0:
            return 0.0
        self.jump(min(delta, MAX_JUMP))
        return min(delta, MAX_JUMP)


def write_slept(path: Path, total: float) -> None:
    """Write the total seconds slept to ``path`` atomically (temporary file + rename), mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{float(total):.6f}\n")
    os.replace(tmp, path)


def read_slept_untrusted(path: Path) -> float | None:
    """The total seconds slept that ``path`` holds, or None when it is missing, unreadable or not a number in
    [0, 4 x MAX_JUMP] (a bounded read: at most 64 bytes, no symlink followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        data = os.read(fd, _MAX_FILE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE:
        return None
    try:
        value = float(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if not math.isfinite(value) or not 0 <= value <= 4 * MAX_JUMP:
        return None
    return value


async def watch_slept_file(
    path: Path,
    clock: SleepClock,
    on_jump: Callable[[float], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """On every SIGCONT (the wake after a lab sleep froze this process), re-read ``path`` and move ``clock`` to
    the total it holds; ``on_jump(seconds)`` runs after a jump (the helper's `jump_clock` hook). Run it in a
    nursery; cancel to stop. A missing or garbled file changes nothing (it is logged)."""
    with trio.open_signal_receiver(signal.SIGCONT) as signals:
        task_status.started()
        async for _ in signals:
            total = read_slept_untrusted(path)
            if total is None:
                if await trio.Path(path).exists():  # missing: no sleep yet (a SIGCONT from elsewhere)
                    log.warning("ignoring the clock file %s: not a number of seconds", path)
                continue
            delta = clock.set_slept(total)
            if delta:
                log.info("woke with a clock jump of %.3f s (slept %.3f s in all)", delta, total)
                on_jump(delta)
