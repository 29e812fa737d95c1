"""Impaired links in the lab: an impairer process holding NFQUEUE verdicts in a lab namespace (docs/impairment.md).

`impair` (or `Impairer`) starts ``python -m netsim.lab.impair`` inside a lab namespace (``netsim-<run>-<role>``,
checked) for one direction of one interface. That process:

1. binds a free NFQUEUE queue (`netsim.transports.nfqueue.NfQueue`);
2. installs its own iptables-nft rules (this kernel has no netem and no nft ``queue``, but the xtables
   ``NFQUEUE`` target through nft's compat layer): a chain ``netsim-<run>-<id>`` in the ``mangle`` table of both
   families, jumped to from ``POSTROUTING -o IFNAME`` (egress: after routing, before the source NAT) or
   ``PREROUTING -i IFNAME`` (ingress: as the packet arrives, before conntrack's de-NAT), with
   ``--queue-bypass`` so a missing impairer never blackholes the link;
3. runs every queued packet through the sans-IO `netsim.core.impairment.ImpairmentModel`: a drop verdict for
   loss, a verdict held until its release time for delay, jitter, reorder and the rate; a duplicate is the
   accepted packet plus a copy sent through a raw socket (`RawInjector`) carrying the chain's mark, which the
   chain lets pass (so the copy is not queued again), and which conntrack and NAT treat as the flow's own;
4. writes its counters (JSON) to a file every 0.2 s and when it stops;
5. on SIGTERM / SIGINT, or after ``max_duration`` seconds (bounded: at most one hour), accepts what it holds,
   removes its rules (only its own chain and jump), unbinds and exits.

The parent stops it by the pid it started, and removes the rules itself if the process died without doing so.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from netsim.core.impairment import Action, Impairment, ImpairmentStatistics, Release
from netsim.errors import LabError

__all__ = ["Direction", "Impairer", "ImpairerStatistics", "impair", "impairment_rules"]

Direction = Literal["egress", "ingress"]
_DIRECTIONS = ("egress", "ingress")
_PROTOCOLS = ("udp", "tcp")
_MAX_DURATION = 3600.0
_STATS_EVERY = 0.2  # seconds between counter files
_READY_TIMEOUT = 30.0  # a cold Python start on a busy 2-core machine
_NETNS = re.compile(r"^netsim-([a-z0-9]{1,6})-[a-z0-9]{1,12}$")
_MARK_BASE = 0x4E530000  # "NS": the copies' mark, plus 16 random bits per impairer


class _HasNetns(Protocol):
    def netns(self, role: str) -> str: ...


@dataclass(frozen=True)
class ImpairerStatistics:
    """What an impairer process reports.

    Attributes:
        model: the model's counters (`ImpairmentStatistics`: seen, passed, dropped, duplicated, ...).
        kernel_dropped: packets the kernel dropped before the impairer saw them (queue or socket buffer full).
        inject_errors: duplicates the raw socket could not send.
        bad_messages: malformed netlink messages skipped.
        running: False once the process has stopped (these are then its final counters).
    """

    model: ImpairmentStatistics = field(default_factory=ImpairmentStatistics)
    kernel_dropped: int = 0
    inject_errors: int = 0
    bad_messages: int = 0
    running: bool = False

    @classmethod
    def from_json_untrusted(cls, text: str) -> ImpairerStatistics:
        """Read a counter file (another process wrote it): anything malformed reads as zeros."""
        try:
            data = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()

        def count(name: str) -> int:
            value = data.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63 else 0

        return cls(
            ImpairmentStatistics.from_dict_untrusted(data.get("model")),
            count("kernel_dropped"),
            count("inject_errors"),
            count("bad_messages"),
            data.get("running") is True,
        )


def _check(netns: str, ifname: str, direction: str, protocol: str | None, port: int | None) -> str:
    """The run id of ``netns``, after checking every argument that reaches a command line."""
    from netsim.lab.faults import _check_ifname, _lab_ns

    _lab_ns(netns)
    _check_ifname(ifname)
    m = _NETNS.match(netns)
    if m is None:
        raise LabError(f"{netns!r} is not a lab namespace (netsim-<run>-<role>)")
    if direction not in _DIRECTIONS:
        raise LabError(f"direction must be one of {_DIRECTIONS}, not {direction!r}")
    if protocol is not None and protocol not in _PROTOCOLS:
        raise LabError(f"protocol must be one of {_PROTOCOLS} or None, not {protocol!r}")
    if port is not None and (protocol is None or not 1 <= port <= 65535):
        raise LabError("port (1-65535) needs a protocol")
    return m.group(1)


def impairment_rules(
    chain: str,
    ifname: str,
    direction: str,
    *,
    queue: int,
    mark: int,
    protocol: str | None = None,
    port: int | None = None,
) -> tuple[str, str]:
    """The ``iptables-restore --noflush`` scripts that install and remove one impairer's rules (the same for
    ``iptables`` and ``ip6tables``): its chain, with the copies' mark let through, and one jump to it."""
    hook, flag = ("POSTROUTING", "-o") if direction == "egress" else ("PREROUTING", "-i")
    match = ""
    if protocol is not None:
        match = f"-p {protocol} " + (f"-m multiport --ports {port} " if port is not None else "")
    jump = f"{hook} {flag} {ifname} -j {chain}"
    install = (
        f"*mangle\n:{chain} - [0:0]\n"
        f"-A {chain} -m mark --mark {mark:#x} -j RETURN\n"
        f"-A {chain} {match}-j NFQUEUE --queue-num {queue} --queue-bypass\n"
        f"-I {jump}\nCOMMIT\n"
    )
    remove = f"*mangle\n-D {jump}\n-F {chain}\n-X {chain}\nCOMMIT\n"
    return install, remove


def _restore(tool: str, script: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [f"{tool}-restore", "--noflush"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=15, check=False)


def _chain_present(netns: str, chain: str) -> list[str]:
    """The tools (``iptables``, ``ip6tables``) whose mangle table in ``netns`` still has ``chain``."""
    present = []
    for tool in ("iptables", "ip6tables"):
        done = subprocess.run(
            ["ip", "netns", "exec", netns, f"{tool}-save", "-t", "mangle"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if f":{chain} " in done.stdout:
            present.append(tool)
    return present


class Impairer:
    """One impaired direction of one interface in a lab namespace, run by a process of its own.

    Args:
        netns: the lab namespace (``lab.netns("isp")`` or `netsim.lab.faults.lab_netns`).
        ifname: the interface in it (e.g. ``wan``).
        direction: ``"egress"`` (packets leaving through ``ifname``) or ``"ingress"`` (arriving on it).
        spec: the `Impairment`.
        protocol: impair only ``udp`` or ``tcp`` (default: every packet).
        port: ...and only packets with this source or destination port.
        max_duration: the process stops by itself after this many seconds (at most 3600).
    """

    def __init__(
        self,
        netns: str,
        ifname: str,
        direction: Direction,
        spec: Impairment,
        *,
        protocol: str | None = None,
        port: int | None = None,
        max_duration: float = 600.0,
    ) -> None:
        run_id = _check(netns, ifname, direction, protocol, port)
        if not 0 < max_duration <= _MAX_DURATION:
            raise LabError(f"max_duration must be 0-{_MAX_DURATION:g} s")
        self.netns, self.ifname, self.direction, self.spec = netns, ifname, direction, spec
        self.protocol, self.port, self.max_duration = protocol, port, max_duration
        token = secrets.token_hex(3)
        self.chain = f"netsim-{run_id}-{token}"
        self.mark = _MARK_BASE | int(token[:4], 16)
        self.queue_num: int | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._dir: Path | None = None
        self._final: ImpairerStatistics | None = None
        self._stderr = ""  # the process's stderr, once stopped

    @property
    def stats_path(self) -> Path:
        if self._dir is None:
            raise LabError("the impairer has not started")
        return self._dir / "stats.json"

    def start(self) -> Impairer:
        """Start the process and wait until its rules are in (bounded); raises `LabError` if it fails."""
        if self._proc is not None:
            raise LabError("this impairer has already been started")
        self._dir = Path(tempfile.mkdtemp(prefix="netsim-impair-"))
        argv = [
            "ip", "netns", "exec", self.netns, sys.executable, "-m", "netsim.lab.impair",
            "--spec", json.dumps(self.spec.to_dict()), "--ifname", self.ifname, "--direction", self.direction,
            "--chain", self.chain, "--mark", str(self.mark), "--stats", str(self.stats_path),
            "--max-duration", str(self.max_duration),
        ]  # fmt: skip
        if self.protocol is not None:
            argv += ["--protocol", self.protocol]
        if self.port is not None:
            argv += ["--port", str(self.port)]
        # `ip netns exec` execs the command: the pid is the impairer's own
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.pid = self._proc.pid
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], _READY_TIMEOUT)
        line = self._proc.stdout.readline() if ready else ""
        try:
            info = json.loads(line) if line else {}
        except ValueError:
            info = {}
        if not isinstance(info, dict) or info.get("ready") is not True:
            self.stop()
            raise LabError(f"the impairer in {self.netns} did not start: {line.strip()[:200]} {self._stderr}")
        queue = info.get("queue")
        self.queue_num = queue if isinstance(queue, int) else None
        return self

    def statistics(self) -> ImpairerStatistics:
        """The latest counters (at most 0.2 s old while running; final once stopped)."""
        if self._final is not None:
            return self._final
        try:
            return ImpairerStatistics.from_json_untrusted(self.stats_path.read_text())
        except OSError:
            return ImpairerStatistics()

    def stop(self, timeout: float = 15.0) -> ImpairerStatistics:
        """Stop the process (SIGTERM to its pid; SIGKILL after ``timeout``); returns its final counters. Its rules
        are removed by it, or here if it could not. Idempotent."""
        if self._final is not None:
            return self._final
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate(timeout=timeout)
            self._stderr = (err or "").strip()[-800:]
        final = self.statistics() if self._dir is not None else ImpairerStatistics()
        for tool in _chain_present(self.netns, self.chain):  # it died without cleaning up
            _restore(
                tool, impairment_rules(self.chain, self.ifname, self.direction, queue=0, mark=self.mark)[1], self.netns
            )
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._final = ImpairerStatistics(
            final.model, final.kernel_dropped, final.inject_errors, final.bad_messages, running=False
        )
        return self._final

    def __enter__(self) -> Impairer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def impair(
    where: str | _HasNetns,
    ifname: str,
    direction: Direction,
    spec: Impairment,
    *,
    role: str = "isp",
    protocol: str | None = None,
    port: int | None = None,
    max_duration: float = 600.0,
) -> Iterator[Impairer]:
    """Impair one direction of ``ifname`` while the block runs; yields the running `Impairer` (its
    `Impairer.statistics` are live, and final after the block).

    ``where`` is a lab namespace name, or a `netsim.lab.lab.Lab` (then ``role`` picks the namespace, the home
    router by default).
    """
    netns = where if isinstance(where, str) else where.netns(role)
    impairer = Impairer(netns, ifname, direction, spec, protocol=protocol, port=port, max_duration=max_duration)
    impairer.start()
    try:
        yield impairer
    finally:
        impairer.stop()


# ----------------------------------------------------------------------------------- the impairer process
def _serve(args: argparse.Namespace) -> int:
    """The impairer process's body (inside the namespace)."""
    from netsim.transports.nfqueue import (
        NF_ACCEPT,
        NF_DROP,
        NfQueue,
        QueuedPacket,
        QueueStatistics,
        RawInjector,
        queue_statistics,
    )

    spec = Impairment.from_dict(json.loads(args.spec))
    model = spec.model()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    queue: NfQueue | None = None
    for _ in range(50):  # a free queue number: binding one another socket holds fails with EPERM
        try:
            queue = NfQueue(1000 + secrets.randbelow(60000))
            break
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EBUSY):
                raise
    if queue is None:
        raise LabError("no free NFQUEUE queue number")
    injector = RawInjector(args.mark)
    install, remove = impairment_rules(
        args.chain,
        args.ifname,
        args.direction,
        queue=queue.queue_num,
        mark=args.mark,
        protocol=args.protocol,
        port=args.port,
    )
    installed: list[str] = []
    payloads: dict[int, bytes] = {}
    t0 = time.monotonic()
    deadline = t0 + args.max_duration

    def write_stats(running: bool, kernel: QueueStatistics | None = None) -> None:
        kernel = kernel or queue_statistics(queue.queue_num)
        doc = {
            "model": model.statistics().to_dict(),
            "kernel_dropped": (kernel.queue_dropped + kernel.user_dropped) if kernel else 0,
            "inject_errors": injector.errors,
            "bad_messages": sum(queue.bad.values()),
            "running": running,
            "queue": queue.queue_num,
        }
        tmp = f"{args.stats}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, args.stats)

    def take_in(batch: list[QueuedPacket], now: float) -> None:
        for packet in batch:
            if model.packet_in(packet.packet_id, len(packet.payload), now):
                payloads[packet.packet_id] = packet.payload  # until its copy is sent

    def carry_out(releases: list[Release]) -> None:
        for r in releases:
            if r.action == Action.COPY:
                queue.flush()  # the original first
                data = payloads.pop(r.handle, None)
                if data is not None:
                    injector.send(data)
                continue
            queue.verdict(r.handle, NF_ACCEPT if r.action == Action.ACCEPT else NF_DROP)
        queue.flush()

    try:
        for tool in ("iptables", "ip6tables"):
            done = _restore(tool, install)
            if done.returncode != 0:
                raise LabError(f"{tool}-restore failed: {done.stderr.strip()[:300]}")
            installed.append(tool)
        write_stats(True)
        print(json.dumps({"ready": True, "queue": queue.queue_num, "chain": args.chain}), flush=True)
        poller = select.poll()
        poller.register(queue.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        next_stats = time.monotonic() + _STATS_EVERY
        while not stop:
            now = time.monotonic()
            if now >= deadline:
                break
            timer = model.next_timer()
            wake = min(deadline, next_stats, timer if timer is not None else deadline)
            events = poller.poll(max(0.0, wake - now) * 1000.0 + 0.5)  # ms, rounded up
            if any(fd == wake_r for fd, _ in events):
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 64)
            now = time.monotonic()
            take_in(queue.receive_batch(), now)
            carry_out(model.release_due(now))
            if now >= next_stats:
                write_stats(True)
                next_stats = now + _STATS_EVERY
        # Stopping: the rules go first, so nothing more is queued; then what the kernel still holds for us is read
        # and everything is let go (the kernel would drop what is queued when the queue is unbound).
        while installed:
            _restore(installed.pop(), remove)
        for _ in range(64):
            batch = queue.receive_batch()
            if not batch:
                break
            take_in(batch, time.monotonic())
        carry_out(model.flush(time.monotonic()))
    finally:
        while installed:
            _restore(installed.pop(), remove)
        kernel = queue_statistics(queue.queue_num)  # gone once the queue is unbound
        queue.close()
        injector.close()
        write_stats(False, kernel)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netsim.lab.impair", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="the Impairment as JSON")
    parser.add_argument("--ifname", required=True)
    parser.add_argument("--direction", choices=_DIRECTIONS, required=True)
    parser.add_argument("--chain", required=True)
    parser.add_argument("--mark", type=int, required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--max-duration", type=float, default=600.0)
    parser.add_argument("--protocol", choices=_PROTOCOLS)
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    # everything that reaches the iptables-restore script is checked here too (the rules are written from it)
    if not re.fullmatch(r"netsim-[a-z0-9]{1,6}-[0-9a-f]{6}", args.chain):
        parser.error("bad --chain")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", args.ifname) or not 0 <= args.mark < 1 << 32:
        parser.error("bad --ifname or --mark")
    if not 0 < args.max_duration <= _MAX_DURATION or (args.port is not None and not 1 <= args.port <= 65535):
        parser.error("bad --max-duration or --port")
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
