"""Network-namespace primitives: create, delete and list them; running code or opening sockets inside one comes
from `netsim.transports.netns` (re-exported here).

Why threads: ``setns(2)`` with ``CLONE_NEWNET`` switches only the calling *thread* (a Linux task), and every socket,
TUN fd or netlink socket keeps the namespace it was created in for its whole life. So code that must act "inside"
a namespace runs in a fresh, dedicated thread that enters it and then exits; the objects it creates stay valid
and namespaced after the thread is gone. A dedicated thread (never trio's thread cache) is used so a pooled
thread is never left in a foreign namespace.

Namespaces are the named kind from ``ip netns`` (a bind mount under ``/run/netns``), so ``ip -n`` and
``ip netns exec`` work on them too.
"""

from __future__ import annotations

import os
from pathlib import Path

from netsim.errors import LabError, PrivilegeError
from netsim.transports.netns import (
    NETNS_RUN_DIR,
    run_in_netns,
    run_in_netns_async,
    socket_in_netns,
)
from netsim.transports.netns import check_netns_name as _check_name

__all__ = [
    "NETNS_RUN_DIR",
    "create_netns",
    "delete_netns",
    "list_netns",
    "netns_exists",
    "netns_inode",
    "pids_in_netns",
    "run_in_netns",
    "run_in_netns_async",
    "set_sysctl",
    "socket_in_netns",
]


def set_sysctl(name: str, values: dict[str, str]) -> None:
    """Write ``net.*`` sysctls inside namespace ``name`` only (``/proc/sys/net`` resolves per calling task)."""

    def write() -> None:
        for key, value in values.items():
            if not key.startswith("net."):
                raise LabError(f"refusing non-namespaced sysctl {key!r}: only net.* keys are per-namespace")
            Path("/proc/sys", *key.split(".")).write_text(value)

    run_in_netns(name, write)


def create_netns(name: str) -> None:
    """Create a named namespace (``ip netns add`` semantics) with ``lo`` up. Raises if it already exists."""
    _check_name(name)
    from pyroute2 import netns as pr_netns

    if netns_exists(name):
        raise LabError(f"network namespace {name!r} already exists; run `netsim clean` if it is a leftover")
    try:
        pr_netns.create(name)
    except PermissionError as exc:
        raise PrivilegeError("creating a network namespace needs root; run as root or via sudo") from exc


def delete_netns(name: str) -> bool:
    """Remove a named namespace; returns False if it did not exist. Links inside it are destroyed with it."""
    _check_name(name)
    from pyroute2 import netns as pr_netns

    if not netns_exists(name):
        return False
    pr_netns.remove(name)
    return True


def netns_exists(name: str) -> bool:
    """True if ``/run/netns/<name>`` exists."""
    return (NETNS_RUN_DIR / name).exists()


def list_netns(prefix: str = "") -> list[str]:
    """Names of named namespaces starting with ``prefix``."""
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def netns_inode(name: str) -> int | None:
    """Inode of the namespace (what ``/proc/<pid>/ns/net`` links to), or None if it does not exist."""
    try:
        return os.stat(NETNS_RUN_DIR / name).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(name: str) -> list[int]:
    """Every pid whose network namespace is ``name`` (what ``ip netns pids`` reports)."""
    ino = netns_inode(name)
    if ino is None:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino == ino:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
