"""Start netsim's long-lived children so they die with their owner process, and with nothing else.

Every child netsim keeps running (the provider host, the helper, wireguard-go, tcpdump, the lab's services,
anything `netsim.lab.Lab.spawn` starts) is forked here, by `spawn` or `spawn_async`.

Theory of operation. A child must not outlive its owner, even when the owner is SIGKILLed (then no teardown
code runs): ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the child between fork and exec asks the kernel for that.
But prctl(2) defines "the parent" as the *thread* that forked, not the process: the signal fires when that
thread exits. A child forked from a pooled worker thread therefore dies when the pool retires the thread --
trio retires an idle worker after 10 s, which killed an idle tunnel's provider (docs/reliability.md F15). So all
forks happen on one dedicated thread per process, ``netsim-spawner``, started on first use and never retired:
it ends only when the process ends, which is exactly when the children should die. The caller's thread (a
trio worker, a namespace thread, the main thread) no longer matters.

Alternatives weighed: a pidfd plus an explicit kill on exit covers an orderly exit only, not the SIGKILLed
owner (the case `netsim clean` exists for); ``PR_SET_CHILD_SUBREAPER`` re-parents orphans but kills nothing;
a long-lived thread per lab (the previous `Lab` design) still left the provider host, which the runtime
starts without a lab, on trio's pool. A single spawner thread is the smallest design that holds for every
caller. Two details close the remaining gaps: the child re-checks ``getppid()`` after the prctl, because an
owner that died between fork and prctl would never deliver the signal (prctl(2), PR_SET_PDEATHSIG notes); and
a pidfd is opened at once for every child, so waits are event-driven and signals go to the process we started
(by pid, never by name), even after it exited and before it is reaped.

Not routed here, on purpose: short commands awaited to completion in the same call -- `netsim.lab.Lab.run` and
``run_sync``, ``nft -f -`` (`netsim.lab.Lab.nft`, the helper's bypass ruleset), `netsim.lab.wireguard`'s
``ip``/``wg`` calls, the test kit's ``ip -j`` snapshots. They carry no PDEATHSIG, so no thread can take them
down; a timeout bounds them and trio kills them on cancellation; and ``nft`` for a namespace must fork from the
thread that entered it. If their owner is SIGKILLed mid-command, `netsim clean` kills whatever still runs in the
run's namespaces. ``netsim lab exec`` execs ``ip netns exec`` in place and forks nothing.

The spawner thread lives in the root network namespace (it never calls setns), so children start where the
process started; `netsim.lab` enters namespaces with ``ip netns exec`` in the child's argv.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import IO, Any

import trio

from netsim.errors import NetsimError

__all__ = ["Child", "SpawnError", "spawn", "spawn_async", "spawner_thread"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

#: What ``stdin``/``stdout``/``stderr`` accept: as `subprocess.Popen` (an fd, a file object, DEVNULL, None).
Redirect = int | IO[Any] | None


class SpawnError(NetsimError):
    """A child could not be started (the program is missing, or the exec failed); ``.argv`` says which."""

    def __init__(self, message: str, argv: Sequence[str]) -> None:
        super().__init__(message)
        self.argv = tuple(argv)


class Child:
    """A process started by `spawn`: wait for it (trio or blocking) and signal it, by its own pidfd.

    Attributes:
        pid: the child's pid (recorded by callers; signals use the pidfd while it is open).
        argv: what was executed.
    """

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.argv = tuple(argv)
        # Opened before anyone can reap the child (only our wait()/poll() do), so it names this process.
        self._pidfd: int | None = os.pidfd_open(self.pid)

    def __repr__(self) -> str:
        return f"<Child pid={self.pid} rc={self.returncode} {' '.join(self.argv)[:60]!r}>"

    @property
    def returncode(self) -> int | None:
        """Exit status (negative signal number if killed), or None while running."""
        return self._popen.poll()

    async def wait(self, timeout: float | None = None) -> int:
        """Wait (trio) for the child to exit and return its status.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the child is left running).
        """
        pidfd = self._pidfd
        if self._popen.poll() is None and pidfd is not None:
            with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                await trio.lowlevel.wait_readable(pidfd)  # pidfd_open(2): readable once the process exited
            if scope.cancelled_caught:
                raise TimeoutError(f"pid {self.pid} still running after {timeout} s")
        return self.wait_sync()

    def wait_sync(self, timeout: float | None = None) -> int:
        """Blocking wait; raises `TimeoutError` after ``timeout`` seconds."""
        try:
            rc = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"pid {self.pid} still running after {timeout} s") from None
        self._close_pidfd()
        return rc

    def send_signal(self, sig: int) -> None:
        """Signal the child (a no-op once it has exited and been reaped)."""
        pidfd = self._pidfd
        if self._popen.poll() is not None or pidfd is None:
            return
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass  # exited meanwhile; the next poll() reaps it

    def kill(self) -> None:
        """SIGKILL the child now (no-op once reaped)."""
        self.send_signal(signal.SIGKILL)

    def _close_pidfd(self) -> None:
        # Only wait()/wait_sync() close it: closing an fd a trio task still waits on would strand that task.
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)


# ------------------------------------------------------------------------------------------------ the thread
_Job = tuple[Callable[[], Child], "Future[Child]"]
_lock = threading.Lock()
_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_thread: threading.Thread | None = None


def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
    while True:
        make, future = jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(make())
        except BaseException as exc:  # handed to the caller's thread
            future.set_exception(exc)


def spawner_thread() -> threading.Thread:
    """The thread every fork happens on (started on first use; it lives as long as the process)."""
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_serve, args=(_jobs,), name="netsim-spawner", daemon=True)
            _thread.start()
        return _thread


def _after_fork_in_child() -> None:
    # A forked copy of this process has no spawner thread (fork copies only the calling thread) and may have
    # inherited a half-held lock or a queued job: start afresh.
    global _thread, _lock, _jobs
    _thread, _lock, _jobs = None, threading.Lock(), queue.SimpleQueue()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _die_with_owner(owner: int) -> Callable[[], None]:
    def preexec() -> None:  # in the child, between fork and exec: only prctl(), getppid() and _exit()
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != owner:  # the owner died before the prctl: the signal will never come
            os._exit(127)

    return preexec


def _popen(
    argv: Sequence[str],
    *,
    stdin: Redirect,
    stdout: Redirect,
    stderr: Redirect,
    env: Mapping[str, str] | None,
    pass_fds: Sequence[int],
) -> Child:
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            preexec_fn=_die_with_owner(os.getpid()),  # noqa: PLW1509 -- prctl/getppid/_exit only
        )
    except OSError as exc:
        raise SpawnError(f"cannot start {argv[0]!r}: {exc.strerror or exc}", argv) from exc
    return Child(popen, argv)


def _submit(make: Callable[[], Child]) -> Future[Child]:
    future: Future[Child] = Future()
    spawner_thread()
    _jobs.put((make, future))
    return future


def spawn(
    argv: Sequence[str],
    *,
    stdin: Redirect = subprocess.DEVNULL,
    stdout: Redirect = None,
    stderr: Redirect = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Child:
    """Start ``argv`` from the spawner thread (blocking until it has been exec'd) and return its `Child`.

    The child gets ``PR_SET_PDEATHSIG=SIGKILL`` tied to this process's lifetime, not the caller's thread.
    Redirections are as `subprocess.Popen`; ``env`` replaces the environment when given; ``pass_fds`` stay
    open in the child (everything else is closed).

    Raises:
        SpawnError: the program could not be executed.
    """
    if threading.current_thread() is _thread:
        raise RuntimeError("spawn() called from the spawner thread itself")  # would wait on itself forever
    return _submit(lambda: _popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, pass_fds=pass_fds)).result()


async def spawn_async(
    argv: Sequence[str],
    *,
    stdin: Redirect = subprocess.DEVNULL,
    stdout: Redirect = None,
    stderr: Redirect = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Child:
    """`spawn` for trio code: the event loop keeps running while the spawner thread forks.

    Not cancellable once submitted (a fork takes milliseconds): a cancelled caller would otherwise leave a
    child nobody tracks.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    future = _submit(lambda: _popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, pass_fds=pass_fds))
    future.add_done_callback(lambda _: token.run_sync_soon(done.set))
    with trio.CancelScope(shield=True):
        await done.wait()
    return future.result()
