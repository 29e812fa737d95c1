"""Entering a network namespace: run code or open a socket inside a named one (the ``ip netns`` kind).

Why threads: ``setns(2)`` with ``CLONE_NEWNET`` switches only the calling *thread* (a Linux task), and every socket,
TUN fd or netlink socket keeps the namespace it was created in for its whole life. So code that must act "inside"
a namespace runs in a fresh, dedicated thread that enters it and then exits; the objects it creates stay valid
and namespaced after the thread is gone. A dedicated thread (never trio's thread cache) is used so a pooled
thread is never left in a foreign namespace.

This is the transport layer's half of namespaces (the TUN device opens its fd in one); creating, deleting and
listing them is the lab's (`netsim.lab.netns`, which re-exports these helpers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from netsim.errors import LabError, PrivilegeError

__all__ = [
    "LAB_NETNS_PREFIX",
    "NETNS_RUN_DIR",
    "CommandResult",
    "check_netns_name",
    "netns_exec_argv",
    "require_lab_netns",
    "run_in_netns",
    "run_in_netns_async",
    "run_netns_command",
    "run_netns_command_async",
    "socket_in_netns",
]

T = TypeVar("T")

NETNS_RUN_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000  # <linux/sched.h>
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Every namespace netsim creates, and the only ones it changes, start with this.
LAB_NETNS_PREFIX = "netsim-"
#: Seconds a short command in a namespace (nft, ip, wg) may take before it counts as hung.
COMMAND_TIMEOUT = 10.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def check_netns_name(name: str) -> None:
    """Raise `LabError` unless ``name`` is a valid ``ip netns`` name."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise LabError(f"invalid namespace name {name!r}: use letters, digits, '-', '_' or '.'")


def require_lab_netns(name: str, doing: str) -> None:
    """Raise `LabError` unless ``name`` is one of netsim's own namespaces (``netsim-*``).

    ``doing`` completes "refusing to ... in namespace X" in the message. netsim never changes the root namespace or
    one it did not create; every kernel-state owner (configurator, kill switch, launcher, faults) asks this first.
    """
    if not name.startswith(LAB_NETNS_PREFIX):
        raise LabError(f"refusing to {doing} in namespace {name!r}: netsim only touches {LAB_NETNS_PREFIX}* namespaces")


def netns_exec_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside ``netns`` (``ip netns exec``, which also bind-mounts its /etc/netns
    files); ``argv`` itself when ``netns`` is None (the caller already runs in the namespace)."""
    return list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]


@dataclass(frozen=True)
class CommandResult:
    """What a short command in a namespace printed (`run_netns_command`)."""

    returncode: int
    stdout: str
    stderr: str


def _command_text(netns: str | None, argv: Sequence[str]) -> str:
    where = "" if netns is None else f" in {netns}"
    return f"`{' '.join(argv)}`{where}"


def _checked(netns: str | None, argv: Sequence[str], rc: int, out: bytes, err: bytes, *, check: bool) -> CommandResult:
    result = CommandResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and rc != 0:
        raise LabError(f"{_command_text(netns, argv)} failed with status {rc}: {result.stderr.strip()[:300]}")
    return result


def run_netns_command(
    netns: str | None,
    argv: Sequence[str],
    *,
    stdin: str | bytes | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
) -> CommandResult:
    """Run a short command (``nft``, ``ip``, ``conntrack``) inside ``netns`` (None: here) and wait for it.

    Scripts and secrets travel on ``stdin``, never in argv. Raises `LabError` when the command cannot start, runs
    longer than ``timeout`` seconds, or (with ``check``) exits non-zero; the message names the command, the
    namespace and the first 300 bytes of its stderr.
    """
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    try:
        done = subprocess.run(
            netns_exec_argv(netns, argv), input=data, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{_command_text(netns, argv)} did not finish within {timeout} s") from None
    except OSError as exc:
        raise LabError(f"{_command_text(netns, argv)} could not run: {exc}") from exc
    return _checked(netns, argv, done.returncode, done.stdout, done.stderr, check=check)


async def run_netns_command_async(
    netns: str | None,
    argv: Sequence[str],
    *,
    stdin: str | bytes | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
) -> CommandResult:
    """`run_netns_command` for trio code: the event loop keeps running while the command does."""
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(
                netns_exec_argv(netns, argv), stdin=data, capture_stdout=True, capture_stderr=True, check=False
            )
    except trio.TooSlowError:
        raise LabError(f"{_command_text(netns, argv)} did not finish within {timeout} s") from None
    except OSError as exc:
        raise LabError(f"{_command_text(netns, argv)} could not run: {exc}") from exc
    return _checked(netns, argv, done.returncode, done.stdout, done.stderr, check=check)


def _setns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise PrivilegeError(f"setns({path}) failed: {os.strerror(err)}; run as root (CAP_SYS_ADMIN)")
    finally:
        os.close(fd)


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a dedicated thread that has entered namespace ``name``; return or raise its result.

    Blocks the caller until ``fn`` returns. Sockets/fds ``fn`` creates stay in ``name`` after the thread exits.
    """
    check_netns_name(name)
    path = NETNS_RUN_DIR / name
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _setns(path)
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    if not path.exists():
        raise LabError(f"network namespace {name!r} does not exist (is the lab up?)")
    thread = threading.Thread(target=body, name=f"netns:{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def run_in_netns_async(name: str, fn: Callable[[], T]) -> T:
    """Async `run_in_netns`: the event loop keeps running while ``fn`` works in its namespace thread."""
    return await trio.to_thread.run_sync(run_in_netns, name, fn)


def socket_in_netns(
    name: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
) -> socket.socket:
    """Create a socket that lives in namespace ``name`` (usable from any thread afterwards)."""
    return run_in_netns(name, lambda: socket.socket(family, type, proto))
