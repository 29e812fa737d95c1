"""Packet filters in the lab: a process running a `FilterPacketProvider` on the Mac's interfaces via NFQUEUE.

See docs/filters.md.

`packet_filter` (or `PacketFilter`) starts ``python -m netsim.lab.filter`` inside a lab namespace (``mac``, by
default its ``en0``, and ``en1`` too when the lab has a second uplink). That process:

1. binds a free NFQUEUE queue (`netsim.transports.nfqueue.NfQueue`) with a bounded length (``maxlen``);
2. loads the provider class, sets its ``filter_configuration`` and runs `start_filter` (the handler is set);
3. installs its own iptables-nft rules (this kernel has no nft ``queue``, but the xtables ``NFQUEUE`` target
   through nft's compat layer): a chain ``netsim-<run>-pf<id>`` in the ``mangle`` table of both families, jumped
   to from ``PREROUTING -i IF`` (inbound, as the packet arrives) and ``POSTROUTING -o IF`` (outbound, after
   routing) for each interface. Fail open adds ``--queue-bypass`` (no process bound: the kernel accepts) and the
   queue's ``NFQA_CFG_F_FAIL_OPEN`` (queue full: the kernel accepts); fail closed drops in both cases;
4. runs `netsim.runtime.filter.run_packet_filter` (one batch of verdicts per wakeup) and writes its counters
   (JSON) every 0.2 s and when it stops; the provider's log lines (``logging``) go to a log file;
5. on SIGTERM / SIGINT, or after ``max_duration`` seconds (at most an hour), removes its rules (only its own
   chain and jumps), gives delayed packets the failure verdict, runs `stop_filter`, unbinds and exits.

The parent stops it by the pid it started, and removes the rules itself if the process died without doing so.
`PacketFilter.kill` is that death on purpose: the rules stay, nobody holds the queue, and the fail-open choice
decides whether the Mac still has a network.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import logging
import os
import pkgutil
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from netsim.errors import LabError
from netsim.lab.impair import _NETNS, _chain_present, _HasNetns, _restore
from netsim.lab.process import LabProcess
from netsim.runtime.filter import FilterStatistics

__all__ = [
    "FilterProcessStatistics",
    "PacketFilter",
    "filter_rules",
    "load_filter_provider_class",
    "packet_filter",
    "running_filters",
]

_MAX_DURATION = 3600.0
_STATS_EVERY = 0.2
_READY_TIMEOUT = 30.0
_SPEC = re.compile(r"^(?:[A-Za-z_][\w.]*|/[\w./-]+\.py):[A-Za-z_]\w*$")
_CHAIN = re.compile(r"^netsim-[a-z0-9]{1,6}-pf[0-9a-f]{6}$")
_SAVED_CHAIN = re.compile(r"^:(netsim-[a-z0-9]{1,6}-pf[0-9a-f]{6}) ", re.M)
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class FilterProcessStatistics:
    """What a filter process reports.

    Attributes:
        filter: the runtime's counters (`FilterStatistics`: seen, allowed, dropped, delayed, ...).
        kernel_dropped: packets the kernel dropped before the filter saw them (queue or socket buffer full;
            with fail open a full queue accepts instead, and those are not counted anywhere).
        running: False once the process has stopped (these are then its final counters).
    """

    filter: FilterStatistics = field(default_factory=FilterStatistics)
    kernel_dropped: int = 0
    running: bool = False

    @classmethod
    def from_json_untrusted(cls, text: str) -> FilterProcessStatistics:
        try:
            data = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        kernel = data.get("kernel_dropped")
        ok = isinstance(kernel, int) and not isinstance(kernel, bool) and 0 <= kernel < 1 << 63
        return cls(
            FilterStatistics.from_dict_untrusted(data.get("filter")),
            kernel if ok and isinstance(kernel, int) else 0,
            data.get("running") is True,
        )


def filter_rules(chain: str, interfaces: Sequence[str], *, queue: int, fail_open: bool) -> tuple[str, str]:
    """The ``iptables-restore --noflush`` scripts that install and remove one filter's rules (the same for
    ``iptables`` and ``ip6tables``): its chain queueing everything to ``queue``, and two jumps per interface."""
    jumps = [
        j
        for ifname in interfaces
        for j in (f"PREROUTING -i {ifname} -j {chain}", f"POSTROUTING -o {ifname} -j {chain}")
    ]
    bypass = " --queue-bypass" if fail_open else ""
    install = (
        f"*mangle\n:{chain} - [0:0]\n-A {chain} -j NFQUEUE --queue-num {queue}{bypass}\n"
        + "".join(f"-I {j}\n" for j in jumps)
        + "COMMIT\n"
    )
    remove = "*mangle\n" + "".join(f"-D {j}\n" for j in jumps) + f"-F {chain}\n-X {chain}\nCOMMIT\n"
    return install, remove


def load_filter_provider_class(spec: str) -> type[Any]:
    """The `FilterPacketProvider` subclass ``spec`` names: ``"package.module:Class"`` or ``"/path/file.py:Class"``.

    Raises:
        LabError: the spec is malformed or names something else.
    """
    from netsim.apple.filter import FilterPacketProvider

    if not _SPEC.match(spec):
        raise LabError(f"filter provider {spec!r} must look like 'package.module:Class' or '/path/file.py:Class'")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        obj = getattr(importlib.import_module(path.stem), name, None)
    else:
        obj = pkgutil.resolve_name(spec)
    if not (isinstance(obj, type) and issubclass(obj, FilterPacketProvider)):
        raise LabError(f"{spec!r} is not a FilterPacketProvider subclass")
    return obj


def running_filters(netns: str) -> list[str]:
    """The chains of the packet filters whose rules are in ``netns`` (running, or died without cleaning up)."""
    found: set[str] = set()
    for tool in ("iptables", "ip6tables"):
        done = subprocess.run(
            ["ip", "netns", "exec", netns, f"{tool}-save", "-t", "mangle"],
            capture_output=True, text=True, timeout=15, check=False,
        )  # fmt: skip
        found.update(_SAVED_CHAIN.findall(done.stdout))
    return sorted(found)


class PacketFilter:
    """One packet filter on a lab namespace's physical interfaces, run by a process of its own.

    Args:
        netns: the lab namespace (``lab.netns("mac")``).
        provider: the `FilterPacketProvider` subclass, as ``"package.module:Class"`` or ``"/path/file.py:Class"``.
        interfaces: the interfaces to filter (default ``en0``).
        fail_open: what happens when the filter cannot decide: no process bound to the queue (it died, or has not
            started), a full queue, a handler that raises, packets still delayed at the end. True: allow; False
            (the default, as a security filter would): drop.
        vendor_configuration: the provider's ``filter_configuration.vendor_configuration`` (JSON-able).
        maxlen: packets the kernel holds for the queue (1-65536), delayed ones included.
        max_delayed: packets the provider may delay at once (1-65536); delaying one more drops the oldest.
        max_duration: the process stops by itself after this many seconds (at most 3600).
    """

    def __init__(
        self,
        netns: str,
        provider: str,
        *,
        interfaces: Sequence[str] = ("en0",),
        fail_open: bool = False,
        vendor_configuration: dict[str, Any] | None = None,
        maxlen: int = 1024,
        max_delayed: int = 256,
        max_duration: float = 600.0,
    ) -> None:
        from netsim.lab.faults import _lab_ns

        _lab_ns(netns)
        m = _NETNS.match(netns)
        if m is None:
            raise LabError(f"{netns!r} is not a lab namespace (netsim-<run>-<role>)")
        if not interfaces or not all(_IFNAME.match(i) for i in interfaces) or len(set(interfaces)) != len(interfaces):
            raise LabError(f"interfaces must be distinct interface names, not {list(interfaces)!r}")
        if not _SPEC.match(provider):
            raise LabError(
                f"filter provider {provider!r} must look like 'package.module:Class' or '/path/file.py:Class'"
            )
        if not 1 <= maxlen <= 65536 or not 1 <= max_delayed <= 65536 or not 0 < max_duration <= _MAX_DURATION:
            raise LabError(f"maxlen and max_delayed must be 1-65536, max_duration 0-{_MAX_DURATION:g} s")
        self.netns, self.provider, self.interfaces = netns, provider, tuple(interfaces)
        self.fail_open, self.maxlen, self.max_delayed, self.max_duration = fail_open, maxlen, max_delayed, max_duration
        self.vendor_configuration = dict(vendor_configuration or {})
        json.dumps(self.vendor_configuration)  # JSON-able, or TypeError now
        self.chain = f"netsim-{m.group(1)}-pf{secrets.token_hex(3)}"
        self.queue_num: int | None = None
        self.pid: int | None = None
        self._proc: LabProcess | None = None
        self._dir: Path | None = None
        self._final: FilterProcessStatistics | None = None
        self._log = ""

    def _path(self, name: str) -> Path:
        if self._dir is None:
            raise LabError("the filter has not started")
        return self._dir / name

    def start(self) -> PacketFilter:
        """Start the process and wait until its rules are in (bounded); raises `LabError` if it fails."""
        if self._proc is not None:
            raise LabError("this filter has already been started")
        others = running_filters(self.netns)
        if others:  # Apple: enabling a content filter disables all the others (R85); netsim refuses instead
            raise LabError(
                f"a packet filter is already running in {self.netns} ({', '.join(others)}): one at a time, as on "
                "macOS (an ACCEPT from one filter's queue would skip the other's rules); stop it first"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="netsim-filter-"))
        argv = [
            sys.executable, "-m", "netsim.lab.filter", "--provider", self.provider,
            "--interfaces", ",".join(self.interfaces), "--chain", self.chain,
            "--config", json.dumps(self.vendor_configuration), "--stats", str(self._path("stats.json")),
            "--log", str(self._path("filter.log")), "--maxlen", str(self.maxlen),
            "--max-delayed", str(self.max_delayed), "--max-duration", str(self.max_duration),
        ]  # fmt: skip
        if self.fail_open:
            argv.append("--fail-open")
        self._proc = LabProcess(f"filter-{self.chain}", "mac", self.netns, argv, self._dir)
        self.pid = self._proc.pid
        try:
            ready = self._proc.wait_output_sync(r"^\{.*\}$", timeout=_READY_TIMEOUT)
            info = json.loads(ready.group(0))
        except (LabError, ValueError) as exc:
            err = self._proc.stderr()[-800:]
            self.stop()
            raise LabError(f"the filter in {self.netns} did not start: {exc} {err}") from None
        queue = info.get("queue") if isinstance(info, dict) else None
        self.queue_num = queue if isinstance(queue, int) else None
        return self

    def statistics(self) -> FilterProcessStatistics:
        """The latest counters (at most 0.2 s old while running; final once stopped)."""
        if self._final is not None:
            return self._final
        try:
            return FilterProcessStatistics.from_json_untrusted(self._path("stats.json").read_text())
        except (OSError, LabError):
            return FilterProcessStatistics()

    def log_text(self) -> str:
        """What the provider logged (``logging``, INFO and up), up to 1 MiB."""
        if self._dir is None:
            return self._log
        try:
            with open(self._path("filter.log"), errors="replace") as f:
                return f.read(1 << 20)
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the process, as if the provider crashed: its rules stay and nobody holds the queue, so the
        kernel drops what they queue (fail closed) or accepts it (fail open, ``--queue-bypass``). `stop` then
        removes the rules."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait_sync(15)

    def stop(self, timeout: float = 15.0) -> FilterProcessStatistics:
        """Stop the process (SIGTERM to it; SIGKILL after ``timeout``); returns its final counters. Its rules are
        removed by it, or here if it could not. Idempotent."""
        if self._final is not None:
            return self._final
        if self._proc is not None:
            self._proc.stop_sync(grace=timeout)
        final = self.statistics() if self._dir is not None else FilterProcessStatistics()
        _, remove = filter_rules(self.chain, self.interfaces, queue=0, fail_open=self.fail_open)
        for tool in _chain_present(self.netns, self.chain):  # it died without cleaning up
            _restore(tool, remove, self.netns)
        if self._dir is not None:
            self._log = self.log_text()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._final = FilterProcessStatistics(final.filter, final.kernel_dropped, running=False)
        return self._final

    def __enter__(self) -> PacketFilter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def packet_filter(
    where: str | _HasNetns,
    provider: str,
    *,
    role: str = "mac",
    interfaces: Sequence[str] | None = None,
    fail_open: bool = False,
    vendor_configuration: dict[str, Any] | None = None,
    maxlen: int = 1024,
    max_delayed: int = 256,
    max_duration: float = 600.0,
) -> Iterator[PacketFilter]:
    """Filter the Mac's physical interfaces with ``provider`` while the block runs; yields the running
    `PacketFilter` (its statistics are live, and final after the block).

    ``where`` is a lab namespace name or a `netsim.lab.lab.Lab` (``role`` picks the namespace, ``mac`` by default).
    ``interfaces`` defaults to ``en0``, plus ``en1`` for a lab with ``second_uplink``.
    """
    netns = where if isinstance(where, str) else where.netns(role)
    if interfaces is None:
        interfaces = ("en0", "en1") if getattr(where, "second_uplink", False) and role == "mac" else ("en0",)
    pf = PacketFilter(
        netns,
        provider,
        interfaces=interfaces,
        fail_open=fail_open,
        vendor_configuration=vendor_configuration,
        maxlen=maxlen,
        max_delayed=max_delayed,
        max_duration=max_duration,
    )
    pf.start()
    try:
        yield pf
    finally:
        pf.stop()


# ----------------------------------------------------------------------------------------- the filter process
async def _serve(args: argparse.Namespace) -> int:
    """The filter process's body (inside the namespace)."""
    import trio

    from netsim.runtime.filter import PacketFilterEngine, run_packet_filter
    from netsim.transports.nfqueue import NfQueue, queue_statistics

    provider = load_filter_provider_class(args.provider)()
    names = args.interfaces.split(",")
    interfaces = {socket.if_nametoindex(n): n for n in names}
    queue: NfQueue | None = None
    for _ in range(50):  # a free queue number: binding one another socket holds fails with EPERM
        try:
            queue = NfQueue(1000 + secrets.randbelow(60000), maxlen=args.maxlen, fail_open=args.fail_open)
            break
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EBUSY):
                raise
    if queue is None:
        raise LabError("no free NFQUEUE queue number")
    install, remove = filter_rules(args.chain, names, queue=queue.queue_num, fail_open=args.fail_open)
    installed: list[str] = []
    engines: list[PacketFilterEngine] = []

    def write_stats(running: bool) -> None:
        kernel = queue_statistics(queue.queue_num)
        stats = engines[0].statistics(sum(queue.bad.values())) if engines else FilterStatistics()
        doc = {
            "filter": stats.to_dict(),
            "kernel_dropped": (kernel.queue_dropped + kernel.user_dropped) if kernel else 0,
            "running": running,
            "queue": queue.queue_num,
        }
        tmp = f"{args.stats}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, args.stats)

    async def remove_rules() -> None:
        while installed:
            await trio.to_thread.run_sync(_restore, installed.pop(), remove)

    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(
                        run_packet_filter,
                        provider,
                        queue,
                        interfaces=interfaces,
                        fail_open=args.fail_open,
                        max_delayed=args.max_delayed,
                        configuration=json.loads(args.config),
                        on_engine=engines.append,
                    )
                )
                for tool in ("iptables", "ip6tables"):
                    done = await trio.to_thread.run_sync(_restore, tool, install)
                    if done.returncode != 0:
                        raise LabError(f"{tool}-restore failed: {done.stderr.strip()[:300]}")
                    installed.append(tool)
                write_stats(True)
                print(json.dumps({"ready": True, "queue": queue.queue_num, "chain": args.chain}), flush=True)
                deadline = trio.current_time() + args.max_duration
                stop = False

                async def wait_signal() -> None:
                    nonlocal stop
                    async for _ in signals:
                        stop = True
                        return

                nursery.start_soon(wait_signal)
                while not stop and trio.current_time() < deadline:
                    await trio.sleep(_STATS_EVERY)
                    write_stats(True)
                # Stopping: the rules go first, so nothing more is queued; a last pass lets the runtime take what
                # the kernel still holds; then the runtime is cancelled (delayed packets get the failure verdict).
                await remove_rules()
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await remove_rules()
        write_stats(False)
        queue.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netsim.lab.filter", description=__doc__.split("\n")[0])
    parser.add_argument("--provider", required=True, help="package.module:Class or /path/file.py:Class")
    parser.add_argument("--interfaces", required=True, help="comma-separated interface names")
    parser.add_argument("--chain", required=True)
    parser.add_argument("--config", default="{}", help="the vendor configuration as JSON")
    parser.add_argument("--stats", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--maxlen", type=int, default=1024)
    parser.add_argument("--max-delayed", type=int, default=256)
    parser.add_argument("--max-duration", type=float, default=600.0)
    parser.add_argument("--fail-open", action="store_true")
    args = parser.parse_args(argv)
    # everything that reaches the iptables-restore script is checked here too (the rules are written from it)
    if not _CHAIN.match(args.chain) or not all(_IFNAME.match(i) for i in args.interfaces.split(",")):
        parser.error("bad --chain or --interfaces")
    if not 1 <= args.maxlen <= 65536 or not 1 <= args.max_delayed <= 65536:
        parser.error("bad --maxlen or --max-delayed")
    if not 0 < args.max_duration <= _MAX_DURATION or not isinstance(json.loads(args.config), dict):
        parser.error("bad --max-duration or --config")
    logging.basicConfig(filename=args.log, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import trio

    return trio.run(_serve, args)


if __name__ == "__main__":
    sys.exit(main())
