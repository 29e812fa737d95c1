"""Faults measured in the lab: recovery time, probe loss and its ledger account, en0 leaks, a download's sha256.

Run (root): ``netsim bench --faults [--quick] [--only 'faults/en0-*'] [--json FILE]``, or
``python -m netsim.bench.bench_faults [--quick] [--json FILE] [--only PATTERN]``.

One `netsim.lab.Lab` and one built-in tunnel (`netsim.lab.tunnel.netsim_tunnel`) for the run; every scenario of
`SCENARIOS` runs against it in turn, each measured the same way (`measure_scenario`):

* **steady traffic**: numbered UDP probes from ``mac`` to the lab's echo on www (port 7), one every
  ``interval`` seconds, from a socket in the ``mac`` namespace (through the tunnel, which holds the default
  route); the time of each first reply is kept;
* **the fault** starts after ``lead`` seconds of steady replies; the scenario's callable returns when the fault
  has ended (the link is back, the process continued, the blackhole is gone);
* **recovery** is the scenario's outage: the longest gap between consecutive replies that ends after the fault
  started, "last reply before" -> "first reply after"; also the time from the fault's end to that first reply
  (the issue's goal: within 1 s when the server is reachable). The resolution is ``interval``;
* **loss and its account**: probes sent / answered / lost, and the packets the provider's and the helper's
  ledgers (`netsim.core.ledger`) name as dropped over the same window, by ``side/stage/reason``, read once every
  packet is decided (no stage queued). ``unaccounted`` = lost probes beyond the named drops. This is a count,
  not a per-packet match: the download's packets share the ledgers, and one lost packet can be named by two
  stages (``udp_out/udp_no_route`` while en0 is down, then ``wg_encrypt/sent_unconfirmed``); a lost *reply*
  the network dropped on its way back is invisible to the client's ledgers (its request counts as answered
  once any later reply arrives), and shows up as unaccounted;
* **leaks**: mac/en0 is captured for the scenario (`netsim.lab.lab.Lab.capture`) and every frame to or from an
  inner destination (www, the resolvers) or from a tunnel address is a leak (frames read with
  `netsim.testing.leaks.read_frames`); WireGuard frames to the server are the positive control;
* **a download across the fault**: ``/bytes/N`` from the lab's www (`netsim.lab.services`) over a TCP socket in
  ``mac`` with a small receive buffer, read at a steady rate so that it starts ``lead`` seconds before the fault
  and would end ``lead`` seconds after it (``across_fault`` says whether it did); its sha256 is checked against
  `netsim.lab.services.http_body`.

``faults/soak`` (reliability row LD5) is the other case: mixed traffic (the probe stream, repeated downloads, DNS
queries, IPv6 pings) for `SOAK_SECONDS` (``--quick``: `SOAK_QUICK_SECONDS`), the WireGuard session rekeying on
its own timer (REKEY_AFTER_TIME, 120 s: the full soak sees two rekeys, the quick one none), RSS / open fds /
threads of the provider and the helper sampled at the start, every 10 s, and at the end. Trio task counts are
not exposed by either process (their statistics have no such field), so the case reports them as unavailable.

Adding a scenario is one entry in `SCENARIOS`: a name, an async callable ``fault(lab, tunnel)`` that injects the
fault and returns when it has ended, and the fault's nominal length (for sizing the download). Everything is
bounded: probes per scenario, seconds waited for recovery (``recover_for``), the download's size and timeout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from netsim.lab.lab import Lab
    from netsim.lab.tunnel import LabTunnel
    from netsim.testing.leaks import Frame

__all__ = [
    "SCENARIOS",
    "SOAK_QUICK_SECONDS",
    "SOAK_SECONDS",
    "FaultScenario",
    "Probes",
    "case_names",
    "leak_account",
    "ledger_account",
    "recovery",
    "run_faults",
    "table_rows",
]

#: ``wg_decrypt`` outcomes that are protocol messages consumed, not packets lost (docs/helper.md, ledger).
NOT_LOSS = frozenset({"keepalive", "control"})
SOAK_SECONDS = 270.0  # two rekeys at REKEY_AFTER_TIME (120 s)
SOAK_QUICK_SECONDS = 20.0
ECHO_PORT = 7
RATE = 256 * 1024  # bytes/s of the download across a fault
OUTAGE_INTERVALS = 5  # a reply gap longer than this many probe intervals is an outage (0.25 s at 20/s)
GOAL_RECOVERY_S = 1.0  # the goal: first reply within 1 s of the fault's end


# ---------------------------------------------------------------------------------------------- scenarios
FaultFn = Callable[["Lab", "LabTunnel"], Awaitable["Mapping[str, int] | None"]]


@dataclass(frozen=True)
class FaultScenario:
    """One fault: ``fault(lab, tunnel)`` injects it and returns when it has ended; ``seconds`` is its nominal
    length (0 for an instant one), which sizes the download across it."""

    name: str
    fault: FaultFn
    seconds: float = 0.0
    description: str = ""


def _en0_flap(seconds: float) -> FaultFn:
    async def fault(lab: Lab, tunnel: LabTunnel) -> None:
        from netsim.lab import faults

        await faults.flap(lab.netns("mac"), "en0", down_for=seconds, plan=faults.link_plan("mac", "en0"))

    return fault


async def _nat_flush(lab: Lab, tunnel: LabTunnel) -> None:
    from netsim.lab import faults

    await trio.to_thread.run_sync(faults.nat_flush, lab.netns("isp"))


async def _server_blackhole(lab: Lab, tunnel: LabTunnel) -> Mapping[str, int]:
    from netsim.lab import faults

    # in inet, the internet between the home router and the server: the server is alive but unreachable
    hole = faults.Blackhole(lab.netns("inet"), str(lab.addr.vpn_wan_v4))
    await trio.to_thread.run_sync(hole.install)
    try:
        await trio.sleep(3.0)
        dropped = await trio.to_thread.run_sync(hole.dropped)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(hole.remove)
    return {"blackhole": dropped}  # the packets the network lost are the fault's count, not a ledger's


async def _helper_sigstop(lab: Lab, tunnel: LabTunnel) -> None:
    tunnel.helper.send_signal(signal.SIGSTOP)
    try:
        await trio.sleep(3.0)
    finally:
        tunnel.helper.send_signal(signal.SIGCONT)


async def _server_restart(lab: Lab, tunnel: LabTunnel) -> None:
    await tunnel.restart_server()


async def _path_change(lab: Lab, tunnel: LabTunnel) -> None:
    from netsim.lab import faults

    mac = lab.netns("mac")
    await trio.to_thread.run_sync(faults.move_default, mac, "en1")  # Wi-Fi -> Ethernet (the second uplink)
    try:
        await trio.sleep(3.0)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(faults.move_default, mac, "en0")


async def _public_address(lab: Lab, tunnel: LabTunnel) -> None:
    from netsim.lab import faults

    isp = lab.netns("isp")
    await trio.to_thread.run_sync(faults.change_public_address, isp)  # .2 -> .3, conntrack flushed
    try:
        await trio.sleep(3.0)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(faults.change_public_address, isp)  # and back


async def _isp_loss(lab: Lab, tunnel: LabTunnel) -> Mapping[str, int]:
    from netsim.core.impairment import Impairment
    from netsim.lab import faults

    spec = Impairment(loss=0.2, seed=16)
    return {"impairer": await trio.to_thread.run_sync(_impair_for, faults, lab, spec, 3.0)}


def _impair_for(faults: Any, lab: Lab, spec: Any, seconds: float) -> int:
    """Impair the ISP's uplink (egress: what the home sends) for ``seconds``; the datagrams it dropped."""
    import time

    with faults.impair(lab, "wan", "egress", spec, role="isp", max_duration=seconds + 30) as impairer:
        time.sleep(seconds)
    return int(impairer.statistics().model.dropped)


async def _sleep_wake(lab: Lab, tunnel: LabTunnel) -> None:
    await tunnel.sleep(3.0, clock_jump=200.0)  # past REJECT_AFTER_TIME: the session must handshake again


#: The scenarios, in run order. One entry per fault (see the module docstring).
SCENARIOS: tuple[FaultScenario, ...] = (
    FaultScenario("en0-flap-1s", _en0_flap(1.0), 1.0, "mac/en0 down 1 s, then up with the network's plan"),
    FaultScenario("en0-flap-5s", _en0_flap(5.0), 5.0, "mac/en0 down 5 s, then up with the network's plan"),
    FaultScenario("nat-flush", _nat_flush, 0.0, "the home router forgets its NAT mappings (conntrack -F)"),
    FaultScenario("server-blackhole-3s", _server_blackhole, 3.0, "the server unreachable in inet for 3 s"),
    FaultScenario("helper-sigstop-3s", _helper_sigstop, 3.0, "the helper SIGSTOPped for 3 s, then SIGCONT"),
    FaultScenario("wireguard-go-restart", _server_restart, 0.0, "wireguard-go restarted (no session state)"),
    FaultScenario("path-en1-3s", _path_change, 3.0, "the default route moves to en1 for 3 s, then back to en0"),
    FaultScenario("public-address-3s", _public_address, 3.0, "the home router's public address changes, 3 s, back"),
    FaultScenario("isp-loss-20pct-3s", _isp_loss, 3.0, "20 % loss (seeded) on the ISP's uplink for 3 s"),
    FaultScenario("sleep-3s-jump-200s", _sleep_wake, 3.0, "the Mac sleeps 3 s; its clock jumps 200 s"),
)


def case_names(quick: bool = False) -> list[str]:
    """Every case of the faults group, in run order."""
    return [f"faults/{s.name}" for s in SCENARIOS] + ["faults/soak"]


# ---------------------------------------------------------------------------------------------- analysis
@dataclass
class Probes:
    """The probe stream's record: send times by sequence number, first-reply times by sequence number."""

    sent: dict[int, float] = field(default_factory=dict)
    replies: dict[int, float] = field(default_factory=dict)
    send_errors: int = 0

    def counts(self) -> dict[str, int]:
        answered = len(self.replies.keys() & self.sent.keys())
        return {
            "sent": len(self.sent),
            "answered": answered,
            "lost": len(self.sent) - answered,
            "send_errors": self.send_errors,
        }


def recovery(
    reply_times: Iterable[float], fault_start: float, fault_end: float, interval: float = 0.05
) -> dict[str, Any]:
    """The outage around a fault: the longest gap between consecutive replies that ends after ``fault_start``.

    Times in the answer are seconds relative to ``fault_start``; ``after_fault_end_s`` is how long after the
    fault's end the outage ended (0 when it ended before: traffic flowed again). ``outage`` is False when no gap
    exceeds `OUTAGE_INTERVALS` probe intervals (nothing told apart from a busy machine's scheduling at this
    resolution; ``after_fault_end_s`` is then 0).
    ``recovered`` is False when no reply came after the fault started (then the outage has no end).
    """
    times = sorted(reply_times)
    before = [t for t in times if t <= fault_start]
    rel = {"fault_seconds": fault_end - fault_start}
    if not before:
        return {**rel, "recovered": False, "reason": "no reply before the fault", "recovery_s": None}
    tail = [before[-1], *(t for t in times if t > fault_start)]
    if len(tail) < 2:
        return {**rel, "recovered": False, "last_reply_before_s": before[-1] - fault_start, "recovery_s": None}
    gap, neg_i = max((tail[k + 1] - tail[k], -k) for k in range(len(tail) - 1))  # the earliest longest gap
    i = -neg_i
    outage = gap > OUTAGE_INTERVALS * interval
    return {
        **rel,
        "recovered": True,
        "outage": outage,
        "last_reply_before_s": tail[i] - fault_start,
        "first_reply_after_s": tail[i + 1] - fault_start,
        "recovery_s": gap,
        "after_fault_end_s": max(0.0, tail[i + 1] - fault_end) if outage else 0.0,
    }


def _drops(stats: Mapping[str, Any]) -> dict[str, int]:
    stages = stats.get("ledger", {}).get("stages", {})
    out: dict[str, int] = {}
    if isinstance(stages, dict):
        for stage, st in stages.items():
            dropped = st.get("dropped", {}) if isinstance(st, dict) else {}
            for reason, n in dropped.items():
                if reason not in NOT_LOSS and isinstance(n, int):
                    out[f"{stage}/{reason}"] = n
    return out


def _queued(stats: Mapping[str, Any]) -> int:
    stages = stats.get("ledger", {}).get("stages", {})
    return sum(int(st.get("queued", 0)) for st in stages.values() if isinstance(st, dict))


def ledger_account(
    lost: int,
    before: Mapping[str, Mapping[str, Any]],
    after: Mapping[str, Mapping[str, Any]],
    fault_drops: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The drops both ledgers name between ``before`` and ``after`` (``{"provider": stats, "helper": stats}``)
    against ``lost`` probes: ``named_drops`` by ``side/stage/reason``, their total, ``unaccounted`` (lost probes
    beyond it), ``imbalances`` (`netsim.core.ledger.LedgerSnapshot.check` of each side's ``after``).

    ``fault_drops``: what the fault itself counted dropping on the network (a blackhole's nft counter, an
    impairer's drop verdicts), named ``fault/<name>``: a loss outside netsim's processes is on no ledger, but
    it is accounted when the fault that caused it counted it."""
    from netsim.core.ledger import LedgerSnapshot
    from netsim.errors import BadPacket

    named: dict[str, int] = {}
    imbalances: list[str] = []
    missing: list[str] = []
    for side in ("provider", "helper"):
        if "ledger" not in after.get(side, {}):
            missing.append(side)
            continue
        b, a = _drops(before.get(side, {})), _drops(after[side])
        for key, n in a.items():
            if n - b.get(key, 0) > 0:
                named[f"{side}/{key}"] = n - b.get(key, 0)
        try:
            imbalances += [f"{side}: {i}" for i in LedgerSnapshot.from_json_untrusted(after[side]["ledger"]).check()]
        except BadPacket as exc:
            imbalances.append(f"{side}: unreadable ledger ({exc})")
    for key, n in (fault_drops or {}).items():
        if n > 0:
            named[f"fault/{key}"] = int(n)
    total = sum(named.values())
    return {
        "named_drops": dict(sorted(named.items())),
        "named_total": total,
        "unaccounted": max(0, lost - total),
        "accounted": lost <= total,
        "imbalances": imbalances,
        "missing": missing,
    }


def leak_account(
    frames: Sequence[Frame], inner: Iterable[str], tunnel_sources: Iterable[str], server: str, port: int
) -> dict[str, Any]:
    """Judge en0's frames: any to or from an ``inner`` destination, or from a tunnel address, is a leak; frames
    to or from ``server``:``port`` (WireGuard) are the positive control that the capture saw the tunnel."""
    inner_set, sources = set(inner), set(tunnel_sources)
    leaked = [f for f in frames if f.dst in inner_set or f.src in inner_set or f.src in sources]
    wireguard = sum(
        1
        for f in frames
        if f.proto == 17 and ((f.dst == server and f.dport == port) or (f.src == server and f.sport == port))
    )
    return {
        "frames": len(frames),
        "wireguard_frames": wireguard,
        "leaked_frames": len(leaked),
        "leaked": [f"#{f.index} {f.src} -> {f.dst} proto {f.proto} dport {f.dport}" for f in leaked[:10]],
    }


# ---------------------------------------------------------------------------------------------- measuring
class _Stream:
    """The steady probe traffic: one numbered UDP datagram every ``interval`` seconds from ``mac``."""

    def __init__(self, lab: Lab, interval: float, limit: int) -> None:
        import socket

        self.lab = lab
        self.interval = interval
        self.limit = limit
        self.dst = (str(lab.addr.www_v4), ECHO_PORT)
        self.sock = trio.socket.from_stdlib_socket(lab.socket("mac", socket.AF_INET, socket.SOCK_DGRAM))
        self.token = f"NSFAULT{secrets.token_hex(3)}-".encode()
        self.probes = Probes()
        self.seq = 0
        self.sending = True
        self._replied = trio.Event()  # set (and renewed) at every new reply
        self.first_seq = self.last_seq = 0  # the measured window: probes first_seq .. last_seq - 1

    async def send(self) -> None:
        while self.seq < self.limit:
            if self.sending:
                try:
                    await self.sock.sendto(self.token + str(self.seq).encode(), self.dst)
                    self.probes.sent[self.seq] = trio.current_time()
                except OSError:  # no route at all (the kernel refused): not a loss, an error the app saw
                    self.probes.send_errors += 1
                self.seq += 1
            await trio.sleep(self.interval)

    async def receive(self) -> None:
        while True:
            try:
                data = await self.sock.recv(2048)
            except OSError:  # an ICMP error queued on the socket
                continue
            if data.startswith(self.token):
                try:
                    seq = int(data[len(self.token) :])
                except ValueError:
                    continue
                if seq not in self.probes.replies:
                    self.probes.replies[seq] = trio.current_time()
                    self._replied.set()
                    self._replied = trio.Event()

    def replies_since(self, t: float) -> int:
        return sum(1 for v in self.probes.replies.values() if v >= t)

    async def wait_replies(self, since: float, n: int = 1) -> None:
        """Until ``n`` replies arrived at or after ``since`` (the caller bounds the wait)."""
        while self.replies_since(since) < n:
            await self._replied.wait()

    async def start(self, nursery: trio.Nursery, tunnel: LabTunnel, before: str) -> None:
        """Start sending and receiving; return once replies come (the measured window starts then)."""
        nursery.start_soon(self.receive)
        nursery.start_soon(self.send)
        if not await _wait_replying(self, tunnel, 40.0):
            raise RuntimeError(f"the tunnel did not carry probes before {before}")
        self.first_seq = self.seq

    def stop_sending(self) -> None:
        self.sending = False
        self.last_seq = self.seq

    def window(self) -> Probes:
        """The probes of the measured window."""
        inside = range(self.first_seq, self.last_seq)
        return Probes(
            {s: t for s, t in self.probes.sent.items() if s in inside},
            {s: t for s, t in self.probes.replies.items() if s in inside},
            self.probes.send_errors,
        )

    def close(self) -> None:
        self.sock.close()


async def _stats(tunnel: LabTunnel) -> dict[str, dict[str, Any]]:
    return {"provider": await tunnel.provider_stats(), "helper": await tunnel.helper_stats()}


async def _settled_stats(tunnel: LabTunnel, timeout: float) -> dict[str, dict[str, Any]]:
    """Both sides' statistics once no ledger stage holds a packet still undecided (bounded by ``timeout``)."""
    with trio.move_on_after(timeout):
        while True:
            stats = await _stats(tunnel)
            if _queued(stats["provider"]) == 0 and _queued(stats["helper"]) == 0:
                return stats
            await trio.sleep(0.25)
    return await _stats(tunnel)


async def _download(lab: Lab, size: int, rate: int, timeout: float) -> dict[str, Any]:
    """GET ``/bytes/<size>`` from www over a socket in ``mac``, read at ``rate`` bytes/s, its sha256 checked.

    In process, not curl: the socket's receive buffer is small (``SO_RCVBUF`` 32 KiB), so the TCP window keeps
    the transfer on the network paced with the reading, and a download that spans the fault in time also
    crosses it on the wire (``curl --limit-rate`` only paces its reads: the kernel's autotuned buffer took
    the rest of the body early). Bounded: ``size`` plus 64 KiB of headers, ``timeout`` seconds.
    """
    import socket

    from netsim.lab.services import http_body

    raw = lab.socket("mac", socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock = trio.socket.from_stdlib_socket(raw)
    buf = bytearray()
    error = ""
    start = trio.current_time()
    with sock, trio.move_on_after(timeout) as scope:
        try:
            await sock.connect((str(lab.addr.www_v4), 80))
            await sock.send(f"GET /bytes/{size} HTTP/1.0\r\nHost: www.lab.test\r\n\r\n".encode())
            while len(buf) <= size + 65536:
                chunk = await sock.recv(16384)
                if not chunk:
                    break
                buf += chunk
                ahead = len(buf) / rate - (trio.current_time() - start)
                if ahead > 0:
                    await trio.sleep(ahead)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    end = trio.current_time()
    if scope.cancelled_caught:
        error = f"timed out after {timeout:g} s"
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    if not error and not (sep and head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n", 1)[0] + b" "):
        error = f"bad HTTP answer: {head[:80]!r}"
    digest = hashlib.sha256(body).hexdigest()
    return {
        "bytes": len(body),
        "expected_bytes": size,
        "sha256_ok": not error and digest == hashlib.sha256(http_body(size)).hexdigest(),
        "start": start,
        "end": end,
        "seconds": end - start,
        "error": error,
    }


async def _wait_replying(stream: _Stream, tunnel: LabTunnel, timeout: float) -> bool:
    """Until the probe stream gets replies again (the previous scenario's tail may still be recovering)."""
    with trio.move_on_after(timeout):
        await tunnel.wait_connected(timeout=timeout)
        await stream.wait_replies(trio.current_time(), 3)
        return True
    return False


def _capture_start(lab: Lab, path: Path, name: str) -> None:
    lab.capture("mac", "en0", name=name, path=path)


async def measure_scenario(
    lab: Lab,
    tunnel: LabTunnel,
    scenario: FaultScenario,
    workdir: Path,
    *,
    quick: bool = False,
    interval: float = 0.05,
    recover_for: float = 30.0,
) -> dict[str, Any]:
    """Run ``scenario`` under steady traffic and return its record (see the module docstring)."""
    from netsim.testing.leaks import read_frames

    lead = 1.0 if quick else 2.0
    stream = _Stream(lab, interval, limit=int((lead * 3 + scenario.seconds + recover_for + 30) / interval))
    cap_name = f"bench-faults-{scenario.name}"
    pcap = workdir / f"{scenario.name}-en0.pcap"
    rec: dict[str, Any] = {"name": f"faults/{scenario.name}", "group": "faults", "scenario": scenario.name}
    rec["description"] = scenario.description
    try:
        async with trio.open_nursery() as nursery:
            await stream.start(nursery, tunnel, "the fault (the previous one has not recovered)")
            before = await _stats(tunnel)
            await trio.to_thread.run_sync(_capture_start, lab, pcap, cap_name)
            size = int(RATE * (2 * lead + scenario.seconds))
            download: dict[str, Any] = {}
            fetched = trio.Event()

            async def fetch() -> None:
                download.update(await _download(lab, size, RATE, timeout=90.0))
                fetched.set()

            nursery.start_soon(fetch)
            await trio.sleep(lead)
            fault_start = trio.current_time()
            fault_drops = await scenario.fault(lab, tunnel)
            fault_end = trio.current_time()
            with trio.move_on_after(recover_for):
                await stream.wait_replies(fault_end)
            with trio.move_on_after(100.0):
                await fetched.wait()
            await trio.sleep(lead)  # steady traffic after: its replies confirm what was sent before them
            stream.stop_sending()
            await trio.sleep(2.0)  # the last replies
            nursery.cancel_scope.cancel()
        after = await _settled_stats(tunnel, timeout=20.0)
    finally:
        stream.close()
        cap_stats = await trio.to_thread.run_sync(lab.stop_capture, cap_name) if cap_name in lab.captures else None
    window = stream.window()
    counts = window.counts()
    rec["probes"] = {"interval_s": interval, **counts}
    rec["fault"] = {"start": fault_start, "end": fault_end, "seconds": fault_end - fault_start}
    rec["recovery"] = recovery(window.replies.values(), fault_start, fault_end, interval)
    rec["ledger"] = ledger_account(counts["lost"], before, after, fault_drops)
    frames: list[Frame] = read_frames(pcap)[1] if pcap.exists() else []
    a = lab.addr
    rec["leak"] = leak_account(
        frames,
        inner=[str(x) for x in (a.www_v4, a.www_v6, a.dns_v4, a.dns_v6)],
        tunnel_sources=[tunnel.plan.client_v4, tunnel.plan.client_v6],
        server=str(a.vpn_wan_v4),
        port=tunnel.plan.port,
    )
    rec["leak"]["capture_complete"] = bool(cap_stats is not None and cap_stats.complete)
    rec["leak"]["capture_status"] = cap_stats.status if cap_stats is not None else "not started"
    if download:
        download["across_fault"] = download["start"] < fault_start and download["end"] > fault_end
        download["start"] -= fault_start
        download["end"] -= fault_start
    rec["download"] = download or {"sha256_ok": False, "error": "the download did not finish", "across_fault": False}
    rec["goals"] = _goals(rec)
    return rec


def _goals(rec: dict[str, Any]) -> dict[str, bool | None]:
    after = rec["recovery"].get("after_fault_end_s")
    return {
        "recovery_within_1s": after is not None and after <= GOAL_RECOVERY_S,
        "no_unaccounted_loss": rec["ledger"]["unaccounted"] == 0 and not rec["ledger"]["imbalances"],
        "no_leak": rec["leak"]["leaked_frames"] == 0 and rec["leak"]["capture_complete"],
        "sha256_intact": bool(rec["download"].get("sha256_ok")) and bool(rec["download"].get("across_fault")),
    }


# ---------------------------------------------------------------------------------------------- LD5 soak
def proc_resources(pid: int | None) -> dict[str, int | None]:
    """RSS (KiB), open fds and threads of ``pid`` from /proc (None for what cannot be read)."""
    out: dict[str, int | None] = {"rss_kib": None, "fds": None, "threads": None}
    if pid is None:
        return out
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        pass
    return out


def _flat(start: Mapping[str, int | None], end: Mapping[str, int | None]) -> bool:
    """Flat: the same fds and threads, RSS grown by at most 10 % (and at most 8 MiB)."""
    vals = (start["rss_kib"], end["rss_kib"], start["fds"], end["fds"], start["threads"], end["threads"])
    if any(v is None for v in vals):
        return False
    r0, r1, f0, f1, t0, t1 = (int(v or 0) for v in vals)
    return f1 <= f0 and t1 <= t0 and r1 - r0 <= min(r0 * 0.10, 8192)


async def measure_soak(lab: Lab, tunnel: LabTunnel, *, quick: bool, seconds: float | None = None) -> dict[str, Any]:
    """LD5: mixed traffic for ``seconds`` with the session's own rekeys; resources at start and end."""
    seconds = seconds if seconds is not None else (SOAK_QUICK_SECONDS if quick else SOAK_SECONDS)
    interval = 0.05
    stream = _Stream(lab, interval, limit=int((seconds + 60) / interval))
    pids = {"provider": tunnel.provider_pid, "helper": tunnel.helper.pid}
    samples: list[dict[str, Any]] = []
    traffic = {"downloads": 0, "downloads_ok": 0, "dns": 0, "dns_ok": 0, "ping6": 0, "ping6_ok": 0}

    def sample(t0: float) -> None:
        samples.append({"t": round(trio.current_time() - t0, 1), **{k: proc_resources(p) for k, p in pids.items()}})

    mixed_done = trio.Event()

    async def mixed(stop_at: float) -> None:
        dns = ["dig", f"@{lab.addr.dns_v4}", "+short", "+time=2", "+tries=1", "www.lab.test"]
        ping6 = ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-q", str(lab.addr.www_v6)]
        while trio.current_time() < stop_at:
            d = await _download(lab, 512 * 1024, 4 * RATE, timeout=30.0)
            traffic["downloads"] += 1
            traffic["downloads_ok"] += bool(d["sha256_ok"])
            for key, argv in (("dns", dns), ("ping6", ping6)):
                r = await lab.run("mac", argv, timeout=15, check=False)
                traffic[key] += 1
                traffic[f"{key}_ok"] += r.returncode == 0
            await trio.sleep(0.5)
        mixed_done.set()

    try:
        async with trio.open_nursery() as nursery:
            await stream.start(nursery, tunnel, "the soak")
            before = await _stats(tunnel)
            t0 = trio.current_time()
            sample(t0)
            nursery.start_soon(mixed, t0 + seconds)
            while trio.current_time() < t0 + seconds:
                await trio.sleep(min(10.0, t0 + seconds - trio.current_time()))
                sample(t0)
            with trio.move_on_after(60.0):
                await mixed_done.wait()  # the last download, DNS query and ping
            await trio.sleep(1.0)
            stream.stop_sending()
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()
        after = await _settled_stats(tunnel, timeout=20.0)
    finally:
        stream.close()
    sample(t0)
    window = stream.window()
    counts = window.counts()
    hs = [s["helper"]["device"].get("handshakes_completed", 0) for s in (before, after)]
    start, end = samples[0], samples[-1]
    return {
        "name": "faults/soak",
        "group": "faults",
        "scenario": "soak",
        "description": "LD5: mixed traffic (UDP probes, downloads, DNS, IPv6 ping) with the session's own rekeys",
        "seconds": seconds,
        "probes": {"interval_s": interval, **counts},
        "traffic": traffic,
        "rekeys": hs[1] - hs[0],
        "ledger": ledger_account(counts["lost"], before, after),
        "resources": {
            name: {"start": start[name], "end": end[name], "flat": _flat(start[name], end[name])} for name in pids
        },
        "tasks": None,
        "tasks_unavailable": "the provider's and the helper's statistics expose no trio task count",
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------- rendering
def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table_rows(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, head, rows)`` tables of the faults group (what `netsim.bench.runner` renders)."""
    faults, soak = [], []
    for r in results:
        if r.get("group") != "faults":
            continue
        p, led = r["probes"], r["ledger"]
        account = "all" if led["accounted"] else f"unaccounted {led['unaccounted']}"
        if led["imbalances"]:
            account += f" (imbalance: {'; '.join(led['imbalances'])})"
        if r["scenario"] == "soak":
            res = r["resources"]
            soak += [
                [
                    name,
                    f"{v['start']['rss_kib']} -> {v['end']['rss_kib']}",
                    f"{v['start']['fds']} -> {v['end']['fds']}",
                    f"{v['start']['threads']} -> {v['end']['threads']}",
                    "yes" if v["flat"] else "NO",
                    f"{r['seconds']:.0f}",
                    str(r["rekeys"]),
                    f"{p['sent']}/{p['answered']}/{p['lost']}",
                    account,
                ]
                for name, v in res.items()
            ]
            continue
        rc, leak, dl = r["recovery"], r["leak"], r["download"]
        faults.append(
            [
                r["scenario"],
                _f(rc.get("recovery_s")) if rc.get("recovered") else "NOT RECOVERED",
                _f(rc.get("after_fault_end_s")),
                f"{p['sent']}/{p['answered']}/{p['lost']}",
                account,
                f"{leak['leaked_frames']} ({leak['wireguard_frames']} wg)" + ("" if leak["capture_complete"] else " !"),
                ("ok" if dl.get("sha256_ok") else "BAD") + ("" if dl.get("across_fault") else " (not across)"),
            ]
        )
    out = []
    if faults:
        head = ["scenario", "recovery s", "after end s", "sent/answered/lost", "loss accounted", "en0 leaks", "sha256"]
        out.append(("faults (recovery under steady traffic)", head, faults))
    if soak:
        head = ["process", "RSS KiB", "fds", "threads", "flat", "s", "rekeys", "sent/answered/lost", "accounted"]
        out.append(("soak (LD5)", head, soak))
    return out


# ---------------------------------------------------------------------------------------------- driver
def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices, nftables)"
    for binary in ("wireguard-go", "wg", "nft", "conntrack", "tcpdump", "dig", "ping"):
        if shutil.which(binary) is None:
            return f"needs {binary} on PATH"
    return None


async def _run(quick: bool, only: str | None, soak_seconds: float | None) -> dict[str, Any]:
    from netsim.bench.runner import selector
    from netsim.errors import NetsimError
    from netsim.lab.lab import Lab
    from netsim.lab.tunnel import netsim_tunnel

    selected = selector(only)
    wanted = [s for s in SCENARIOS if selected(f"faults/{s.name}")]
    soak = selected("faults/soak")
    out: dict[str, Any] = {"results": [], "skipped": []}
    names = [f"faults/{s.name}" for s in wanted] + ["faults/soak"] * soak
    if not names:
        return out
    reason = _unavailable()
    if reason is not None:
        out["skipped"] = [{"name": n, "reason": reason} for n in names]
        return out
    workdir = Path(tempfile.mkdtemp(prefix="netsim-bench-faults-"))
    try:
        async with Lab(second_uplink=True) as lab:  # en1 for the path change
            out["run_id"] = lab.run_id
            print(f"lab {lab.run_id} up", flush=True)
            async with netsim_tunnel(lab) as tunnel:
                for sc in wanted:
                    try:
                        rec = await measure_scenario(lab, tunnel, sc, workdir, quick=quick)
                    except Exception as exc:  # one scenario that fails is reported; the others still run
                        detail = f"{type(exc).__name__}: {exc}"[:2000]
                        out["skipped"].append({"name": f"faults/{sc.name}", "reason": f"failed: {detail}"})
                        print(f"  {sc.name:<22} FAILED: {detail}", flush=True)
                        continue
                    out["results"].append({**rec, "run_id": lab.run_id})
                    rc = rec["recovery"]
                    print(
                        f"  {sc.name:<22} recovery {_f(rc.get('recovery_s'))} s, after end "
                        f"{_f(rc.get('after_fault_end_s'))} s, lost {rec['probes']['lost']}",
                        flush=True,
                    )
                if soak:
                    try:
                        soaked = await measure_soak(lab, tunnel, quick=quick, seconds=soak_seconds)
                        out["results"].append({**soaked, "run_id": lab.run_id})
                    except Exception as exc:
                        out["skipped"].append({"name": "faults/soak", "reason": f"failed: {exc}"[:2000]})
    except NetsimError as exc:
        done = {r["name"] for r in out["results"]} | {s["name"] for s in out["skipped"]}
        out["skipped"] += [{"name": n, "reason": f"lab unavailable: {exc}"} for n in names if n not in done]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def run_faults(quick: bool = False, only: str | None = None, soak_seconds: float | None = None) -> dict[str, Any]:
    """Run the selected fault cases; ``{"results": [...], "skipped": [{"name", "reason"}], "run_id": ...}``."""
    return trio.run(_run, quick, only, soak_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--only", metavar="PATTERN", help="glob(s) over case names, comma separated")
    parser.add_argument("--soak-seconds", type=float, default=None, help="length of faults/soak")
    args = parser.parse_args(argv)
    out = run_faults(args.quick, args.only, args.soak_seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for title, head, rows in table_rows(out["results"]):
        print(f"\n{title}\n" + "\n".join("  ".join(r) for r in [head, *rows]))
    for s in out["skipped"]:
        print(f"skipped {s['name']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
