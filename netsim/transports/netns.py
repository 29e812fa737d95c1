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
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from netsim.errors import LabError, PrivilegeError

__all__ = ["NETNS_RUN_DIR", "check_netns_name", "run_in_netns", "run_in_netns_async", "socket_in_netns"]

T = TypeVar("T")

NETNS_RUN_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000  # <linux/sched.h>
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def check_netns_name(name: str) -> None:
    """Raise `LabError` unless ``name`` is a valid ``ip netns`` name."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise LabError(f"invalid namespace name {name!r}: use letters, digits, '-', '_' or '.'")


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
