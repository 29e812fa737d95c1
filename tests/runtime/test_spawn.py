"""`netsim.runtime.spawn`: children die with their owner process, never with the thread that asked for them.

Reliability.md F15 (found by attack): ``PR_SET_PDEATHSIG`` fires when the *forking thread* exits, and trio retires
idle worker threads after 10 s, so a provider forked from one died with it. These tests need no root: they fork
``sleep`` and watch it through /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import trio

from netsim.runtime import spawn as spawn_mod
from netsim.runtime.spawn import Child, SpawnError, spawn, spawn_async


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _wait_until(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@pytest.mark.reliability("F15")
def test_child_survives_the_exit_of_the_thread_that_spawned_it() -> None:
    box: list[Child] = []
    caller = threading.Thread(target=lambda: box.append(spawn(["sleep", "30"])), name="short-lived caller")
    caller.start()
    caller.join()  # the caller's thread is gone now, as a retired trio worker is
    child = box[0]
    try:
        time.sleep(0.3)  # PDEATHSIG is delivered at once when the parent thread exits; give it time anyway
        assert child.returncode is None and _alive(child.pid)
        status = Path(f"/proc/{child.pid}/status").read_text()
        assert f"PPid:\t{os.getpid()}" in status  # our child, not re-parented
    finally:
        child.kill()
        assert child.wait_sync(5) == -signal.SIGKILL


@pytest.mark.reliability("F15")
def test_child_spawned_from_a_trio_worker_thread_survives_its_retirement(monkeypatch: pytest.MonkeyPatch) -> None:
    # trio's worker threads retire after IDLE_TIMEOUT (10 s) without work; shrink it so the test is fast. A child
    # forked on such a worker with PDEATHSIG (the old SubprocessLauncher) dies when the worker retires.
    from trio._core import _thread_cache

    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.2)

    async def main() -> tuple[Child, Child]:
        via_worker = await trio.to_thread.run_sync(spawn, ["sleep", "30"])
        direct = await spawn_async(["sleep", "30"])
        await trio.sleep(1.0)  # five idle timeouts: the worker thread has retired
        return via_worker, direct

    children = trio.run(main)
    try:
        for child in children:
            assert child.returncode is None and _alive(child.pid), child
    finally:
        for child in children:
            child.kill()
            child.wait_sync(5)


def test_children_die_when_their_owner_is_sigkilled(tmp_path: Path) -> None:
    # The other half of the contract: PDEATHSIG still holds, for the owner *process*.
    owner_code = textwrap.dedent(
        """
        import sys, threading, time
        from netsim.runtime.spawn import spawn
        pids = []
        t = threading.Thread(target=lambda: pids.append(spawn(["sleep", "60"]).pid))
        t.start(); t.join()
        pids.append(spawn(["sleep", "60"]).pid)
        print(*pids, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    assert _wait_until(lambda: not any(_alive(p) for p in pids)), f"children {pids} outlived their owner"


def test_one_spawner_thread_and_child_handle() -> None:
    first = spawn_mod.spawner_thread()
    assert first.name == "netsim-spawner" and first.daemon and first.is_alive()

    async def main() -> int:
        child = await spawn_async([sys.executable, "-c", "import sys; sys.exit(3)"])
        assert spawn_mod.spawner_thread() is first
        return await child.wait(10)

    assert trio.run(main) == 3
    with pytest.raises(SpawnError) as info:
        spawn(["/nonexistent/netsim-no-such-program"])
    assert info.value.argv == ("/nonexistent/netsim-no-such-program",)


def test_wait_timeout_and_signal_after_reap() -> None:
    child = spawn(["sleep", "30"])

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await child.wait(0.05)
        child.send_signal(signal.SIGTERM)
        assert await child.wait(5) == -signal.SIGTERM

    trio.run(main)
    child.kill()  # reaped: a no-op, never a signal to whoever reuses the pid
    assert child.returncode == -signal.SIGTERM
