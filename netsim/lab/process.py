"""Processes running inside lab namespaces: spawn, wait (trio or blocking), capture output, stop by pid.

Each process is started as ``ip netns exec <ns> <argv>`` so it also gets the namespace's ``/etc/netns/<ns>/``
files (resolv.conf) bind-mounted, exactly as a user would run it. Output goes to per-process log files in the run
directory rather than pipes: nothing has to drain them, a chatty process can never block on a full pipe, and the
logs survive for post-mortems. Every process is forked by `netsim.runtime.spawn` (the one mechanism for every
child netsim keeps running): it dies with the lab's owner even on SIGKILL (``PR_SET_PDEATHSIG``, tied to a
spawner thread that lives as long as the owner process, never to the calling thread); the run file lets
``netsim clean`` catch the rest.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from netsim.errors import LabError
from netsim.runtime.spawn import Child, SpawnError, spawn
from netsim.transports.netns import netns_exec_argv

__all__ = ["LabProcess", "ProcessInfo", "netns_exec_argv", "process_start_time"]


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat); None if gone or a zombie.

    Stored with every pid so cleanup never signals an unrelated process that reused the pid. A zombie counts as
    gone: it has exited and only waits for its parent to reap it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parens: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class ProcessInfo:
    """What the run file records about a process (enough to find and stop it later)."""

    name: str
    role: str
    pid: int
    start_time: int | None
    argv: tuple[str, ...]


class LabProcess:
    """A process running in a lab namespace. Create with `netsim.lab.Lab.spawn`."""

    def __init__(
        self,
        name: str,
        role: str,
        netns: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.role = role
        self.argv = tuple(argv)
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            try:
                self._child: Child = spawn(
                    netns_exec_argv(netns, argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env={**os.environ, **env} if env else None,
                )
            except SpawnError as exc:
                if isinstance(exc.__cause__, FileNotFoundError):
                    raise LabError("the `ip` command (iproute2) is missing; apt-get install iproute2") from exc
                raise LabError(f"{name}: {exc}") from exc
        self.pid = self._child.pid
        self.start_time = process_start_time(self.pid)

    def __repr__(self) -> str:
        return f"<LabProcess {self.name} pid={self.pid} role={self.role} rc={self.returncode}>"

    def info(self) -> ProcessInfo:
        """Serializable record for the run file."""
        return ProcessInfo(self.name, self.role, self.pid, self.start_time, self.argv)

    @property
    def returncode(self) -> int | None:
        """Exit status (negative signal number if killed) or None while running."""
        return self._child.returncode

    def stdout(self) -> str:
        """Everything the process wrote to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    async def wait(self, timeout: float | None = None) -> int:
        """Wait (trio) for exit and return the status; raises `LabError` after ``timeout`` seconds."""
        try:
            return await self._child.wait(timeout)
        except TimeoutError:
            raise LabError(f"{self.name} (pid {self.pid}) still running after {timeout} s") from None

    def wait_sync(self, timeout: float | None = None) -> int:
        """Blocking wait; raises `LabError` after ``timeout``."""
        try:
            return self._child.wait_sync(timeout)
        except TimeoutError:
            raise LabError(f"{self.name} (pid {self.pid}) still running after {timeout} s") from None

    def send_signal(self, sig: int) -> None:
        """Signal the process (by its pidfd: never another process that reused the pid; no-op once reaped)."""
        self._child.send_signal(sig)

    async def stop(self, grace: float = 2.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit status. Idempotent."""
        with trio.CancelScope(shield=True):
            self.send_signal(signal.SIGTERM)
            try:
                rc = await self.wait(grace)
            except LabError:
                self.send_signal(signal.SIGKILL)
                rc = await self.wait()
        return rc

    def stop_sync(self, grace: float = 2.0) -> int:
        """Blocking `stop`."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.wait_sync(grace)
        except LabError:
            self.send_signal(signal.SIGKILL)
            return self.wait_sync()

    def wait_output_sync(self, pattern: str, timeout: float = 10.0, stream: str = "stdout") -> re.Match[str]:
        """Block until ``pattern`` appears in the output (a readiness line); raises `LabError` on exit/timeout."""
        path = self.stdout_path if stream == "stdout" else self.stderr_path
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            match = regex.search(path.read_text(errors="replace"))
            if match:
                return match
            if self.returncode is not None:
                raise LabError(
                    f"{self.name} exited with status {self.returncode} before printing {pattern!r}; "
                    f"stderr: {self.stderr()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise LabError(f"{self.name} did not print {pattern!r} within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def wait_output(self, pattern: str, timeout: float = 10.0, stream: str = "stdout") -> re.Match[str]:
        """Async `wait_output_sync` (polls the log file in a worker thread)."""
        return await trio.to_thread.run_sync(self.wait_output_sync, pattern, timeout, stream)


def listening(pid: int, port: int, proto: str = "tcp") -> bool:
    """True if a socket on ``port`` is listening (tcp) or bound (udp) in ``pid``'s network namespace.

    Reads ``/proc/<pid>/net/{tcp,tcp6,udp,udp6}``, which show the namespace of that pid.
    """
    want_state = "0A" if proto == "tcp" else "07"
    for suffix in ("", "6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}{suffix}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == want_state and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False
