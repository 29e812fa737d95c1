"""pytest fixtures and leak checks for tests that use the lab (root tier).

Use from a conftest: ``pytest_plugins = ["netsim.testing.fixtures"]``, or import the helpers directly.

* ``lab``: a fresh `netsim.lab.Lab` per test (sync-managed, so plain tests and ``trio.run`` bodies can both use
  it), with the L4 cleanliness assertion (docs/reliability.md C1) after teardown.
* ``netns``: a fresh bare namespace (``netsim-<run>-t``), always removed.
* `RootSnapshot` / `assert_root_unchanged`: the root namespace's links, addresses, routes and nftables ruleset, so
  a test can prove the lab never touched the host.
* `LeakCheck`: this process's fds and children, plus a run's namespaces, run file and /etc/netns dirs.
* `run_lab_scenario`: the scaffolding of a module-scoped lab scenario (gate, snapshot, lab, trio, leak check)
  whose record many tests assert on; `run_captured_tunnel`: one tunnel of such a scenario, en0 captured.

Users' suites get the same checks through the pytest plugin's ``netsim_*`` fixtures (`netsim.testing.plugin`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

# First: without pytest, netsim.testing.require's import error names the extra to install (netsim[testing]).
from netsim.testing.require import require_binary, require_root

# isort: split
import pytest
import trio

from netsim.lab.cleanup import ETC_NETNS, RUN_DIR
from netsim.lab.lab import Lab
from netsim.lab.netns import create_netns, delete_netns, list_netns

__all__ = [
    "LeakCheck",
    "RootSnapshot",
    "assert_root_unchanged",
    "checked_lab",
    "lab",
    "netns",
    "root_snapshot",
    "run_captured_tunnel",
    "run_lab_scenario",
]

_ROUTE_ATTRS = ("RTA_TABLE", "RTA_DST", "RTA_GATEWAY", "RTA_OIF", "RTA_PRIORITY", "RTA_PREFSRC", "RTA_MULTIPATH")
_RTPROT_KERNEL, _RTN_MULTICAST = 2, 5  # <linux/rtnetlink.h>


def _netlink_dump() -> tuple[list[Any], list[Any], list[Any]]:
    """Links, addresses and routes (every table, both families) of the calling thread's namespace (pyroute2)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return list(ipr.get_links()), list(ipr.get_addr()), list(ipr.get_routes(family=socket.AF_UNSPEC))


@dataclass(frozen=True)
class RootSnapshot:
    """The root namespace's network state, in comparable form."""

    links: tuple[str, ...]
    addresses: tuple[str, ...]
    routes: tuple[str, ...]
    nft_ruleset: str

    def diff(self, other: RootSnapshot) -> list[str]:
        """Human-readable differences (empty when identical)."""
        out = []
        for name in ("links", "addresses", "routes"):
            mine, theirs = set(getattr(self, name)), set(getattr(other, name))
            out += [f"{name} removed: {x}" for x in sorted(mine - theirs)]
            out += [f"{name} added: {x}" for x in sorted(theirs - mine)]
        if self.nft_ruleset != other.nft_ruleset:
            out.append("nftables ruleset changed")
        return out


def root_snapshot() -> RootSnapshot:
    """Snapshot the root namespace (links, addresses and routes of every table over netlink, and
    ``nft list ruleset``). Call it from a thread in the root namespace (any test's own thread)."""
    link_msgs, addr_msgs, route_msgs = _netlink_dump()
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in link_msgs}
    links = tuple(
        json.dumps(
            {
                "ifindex": link["index"],
                "ifname": link.get_attr("IFLA_IFNAME"),
                "flags": link["flags"],
                "mtu": link.get_attr("IFLA_MTU"),
                "link_type": link["ifi_type"],
                "address": link.get_attr("IFLA_ADDRESS"),
                "master": link.get_attr("IFLA_MASTER"),
            },
            sort_keys=True,
        )
        for link in link_msgs
    )
    addrs = tuple(
        f"{names.get(a['index'], a['index'])} {a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
        for a in addr_msgs
    )
    routes = tuple(
        json.dumps(
            {
                "family": r["family"],
                "type": r["type"],
                "proto": r["proto"],
                "scope": r["scope"],
                "dst_len": r["dst_len"],
                **{k: str(r.get_attr(k)) for k in _ROUTE_ATTRS if r.get_attr(k) is not None},
            },
            sort_keys=True,
        )
        for r in route_msgs
        if r["proto"] != _RTPROT_KERNEL or r["type"] != _RTN_MULTICAST
    )
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    return RootSnapshot(links, addrs, routes, nft)


def assert_root_unchanged(before: RootSnapshot) -> None:
    """Fail the test if the root namespace differs from ``before``."""
    diff = before.diff(root_snapshot())
    assert not diff, "root namespace changed:\n" + "\n".join(diff)


def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rfind(")") + 2 :].split()[1] == me:
                kids.add(int(entry.name))
    return kids


def _open_fds() -> set[str]:
    """This process's open fds, less the one ``os.listdir`` used to read /proc/self/fd (closed by now).

    That fd has the lowest free number, the one the next ``open`` gets: left in a snapshot, it hid the first fd
    leaked after it.
    """
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


class LeakCheck:
    """Record fds and child processes now; `check` asserts nothing was leaked by the given lab runs."""

    def __init__(self) -> None:
        self.fds = _open_fds()
        self.children = _children()

    def problems(self, run_ids: list[str] = []) -> list[str]:  # noqa: B006 - read only
        """Everything left behind (empty list when clean)."""
        out = []
        leaked = [f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}" for fd in sorted(_open_fds() - self.fds, key=int)]
        if leaked:
            out.append(f"leaked fds: {leaked}")
        kids = _children() - self.children
        if kids:
            out.append(f"leaked child processes: {sorted(kids)}")
        for run in run_ids:
            if ns := list_netns(f"netsim-{run}-"):
                out.append(f"leaked namespaces: {ns}")
            if (RUN_DIR / f"{run}.json").exists() or (RUN_DIR / run).exists():
                out.append(f"leaked run file/dir for {run}")
            if ETC_NETNS.exists() and (etc := list(ETC_NETNS.glob(f"netsim-{run}-*"))):
                out.append(f"leaked /etc/netns dirs: {etc}")
        return out

    def check(self, run_ids: list[str] = []) -> None:  # noqa: B006 - read only
        """Assert `problems` is empty."""
        problems = self.problems(run_ids)
        assert not problems, "; ".join(problems)


def run_lab_scenario(
    scenario: Callable[[Lab, dict[str, Any]], Awaitable[None]], *binaries: str, **lab_options: Any
) -> dict[str, Any]:
    """Run ``await scenario(lab, rec)`` in a fresh `Lab` under ``trio.run`` and return the record ``rec``.

    For a module-scoped fixture whose tests each assert one part of an expensive scenario: a failure is recorded,
    not raised, so every test reports the cause instead of an opaque fixture error. Gates first (root and
    ``binaries``, `netsim.testing.require`), then snapshots the root namespace and this process (`LeakCheck`).

    Besides what ``scenario`` records, ``rec`` gets ``run_id``; ``error`` (the traceback, then ``rec["logs"]``)
    if it raised; ``leaks`` (`LeakCheck.problems` for the run, empty when clean); ``root_changed`` (None, or what
    changed in the root namespace).
    """
    require_root()
    require_binary(*binaries)
    rec: dict[str, Any] = {}
    before = root_snapshot()
    leaks = LeakCheck()

    async def main() -> None:
        async with Lab(**lab_options) as the_lab:
            rec["run_id"] = the_lab.run_id
            await scenario(the_lab, rec)

    try:
        trio.run(main)
    except Exception as exc:  # trio's ExceptionGroup included
        rec["error"] = "".join(traceback.format_exception(exc)) + "\n" + rec.get("logs", "")
    rec["leaks"] = leaks.problems([rec["run_id"]] if "run_id" in rec else [])
    diff = before.diff(root_snapshot())
    rec["root_changed"] = "root namespace changed:\n" + "\n".join(diff) if diff else None
    return rec


async def run_captured_tunnel(
    lab: Lab,
    rec: dict[str, Any],
    key: str,
    flows: Callable[[Lab, Any], Awaitable[Any]],
    *,
    pcap: Path,
    policy: str | os.PathLike[str] | None = None,
) -> None:
    """Record ``rec[key] = await flows(lab, t)`` in a fresh `netsim_tunnel` with a capture of mac/en0 around it.

    The capture starts before the tunnel and stops after it (so its pcap, ``rec[key + "_pcap"]``, holds every
    packet the tunnel's bring-up and teardown sent on en0: what a leak check must see). When ``flows`` raises,
    the tunnel's logs go to ``rec["logs"]`` (`run_lab_scenario` appends them to the error).
    """
    from netsim.lab.tunnel import netsim_tunnel

    cap = await trio.to_thread.run_sync(partial(lab.capture, "mac", "en0", name=f"en0-{key}", path=pcap))
    try:
        async with netsim_tunnel(lab, policy=policy) as t:
            try:
                rec[key] = await flows(lab, t)
            except BaseException:
                rec["logs"] = t.logs()
                raise
    finally:
        await trio.to_thread.run_sync(cap.stop_sync)
    rec[f"{key}_pcap"] = pcap


@contextmanager
def checked_lab(**options: Any) -> Iterator[Lab]:
    """``Lab(**options)``, then, after teardown, the leak check (namespaces, fds, tasks, children of this run) and
    the root namespace compared with its state before. The caller gates on root and binaries first."""
    before = root_snapshot()
    leaks = LeakCheck()
    with Lab(**options) as the_lab:
        yield the_lab
    leaks.check([the_lab.run_id])
    assert_root_unchanged(before)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh lab with services, torn down and leak-checked after the test.

    ``@pytest.mark.parametrize`` is not needed for options: use ``Lab(...)`` directly for custom labs, or
    `checked_lab` for one with the same checks.
    """
    require_root()
    require_binary("ip", "nft", "iperf3", "tcpdump")
    with checked_lab() as the_lab:
        yield the_lab


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace (only ``lo``), deleted after the test."""
    require_root()
    name = f"netsim-t{secrets.token_hex(2)}-t"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)
