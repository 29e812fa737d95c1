"""`check_leaks`: run a provider through the tunnel states, probe in each, and judge every cell from the captures.

One lab per run (captures on ``mac-en0``, ``isp-wan`` and ``vpn-wan`` from before any traffic) and at most two
tunnels: the first is started with its server blackholed (``connecting``), then unblocked (``connected``),
then faulted (``reasserting_helper``: helper SIGKILLed; ``reasserting_server``: server UDP dropped in ``vpn``;
``reasserting_link``: en0 down and up) and finally crashed (``after_crash``: the provider SIGKILLed); the
second is started and stopped (``after_stop``) and disabled (``disabled``). ``before_start`` (no tunnel) always
runs first: it is the positive control, and the CVE-2019-14899 probe's control puts the tunnel address on the
Mac's loopback for its duration (an unprotected Mac with a tunnel address).

The verdicts come from `netsim.core.leakmodel`; this module does the I/O: probes (`netsim.testing.leakprobes`),
captures, per-leaked-cell pcaps, the report. docs/leaks.md is the user's guide.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import trio

from netsim.apple.enums import VPNStatus
from netsim.core.leakmodel import (
    PROBES,
    STATES,
    Cell,
    Evidence,
    Expectation,
    LeakConfig,
    State,
    Verdict,
    blind_probes,
    classify,
)
from netsim.errors import ConfigError, LabError
from netsim.lab import faults
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.leakprobes import CVE_SCRIPT, KEPT_PORT, KEPT_SCRIPT, ProbeSpec, Targets, probe_argv, probe_specs

__all__ = ["Frame", "LeakReport", "check_leaks", "check_leaks_sync", "match_frames", "read_frames", "write_frames"]

log = logging.getLogger("netsim.testing.leaks")
PHYSICAL = ("mac-en0", "isp-wan")
PROBE_TIMEOUT = 0.8
SECOND_UID = 65534
_BLOCK_TABLE = "netsim_leak_block"


# ---------------------------------------------------------------------------------------------- pcap reading
@dataclass(frozen=True)
class Frame:
    """One captured frame, its IP header fields read (bounded; a frame that does not parse has ``proto`` -1)."""

    index: int
    ts: float
    raw: bytes
    linktype: int
    proto: int = -1
    src: str = ""
    dst: str = ""
    sport: int = -1
    dport: int = -1
    tcp_flags: int = 0
    icmp_type: int = -1
    payload: bytes = b""


_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}


def _ip_offset(linktype: int, raw: bytes) -> int:
    if linktype == 1:  # Ethernet (skip one 802.1Q tag)
        if len(raw) >= 18 and raw[12:14] == b"\x81\x00":
            return 18
        return 14
    if linktype in (12, 101, 228, 229):  # raw IP
        return 0
    if linktype == 113:  # Linux cooked
        return 16
    if linktype == 276:  # Linux cooked v2
        return 20
    return -1


def _parse(index: int, ts: float, raw: bytes, linktype: int) -> Frame:
    off = _ip_offset(linktype, raw)
    if off < 0 or len(raw) < off + 20:
        return Frame(index, ts, raw, linktype)
    version = raw[off] >> 4
    try:
        if version == 4:
            ihl = (raw[off] & 15) * 4
            proto = raw[off + 9]
            src, dst = str(ip_address(raw[off + 12 : off + 16])), str(ip_address(raw[off + 16 : off + 20]))
            l4 = off + ihl
        elif version == 6 and len(raw) >= off + 40:
            proto = raw[off + 6]
            src, dst = str(ip_address(raw[off + 8 : off + 24])), str(ip_address(raw[off + 24 : off + 40]))
            l4 = off + 40  # extension headers: not followed (the probes send none)
        else:
            return Frame(index, ts, raw, linktype)
    except ValueError:
        return Frame(index, ts, raw, linktype)
    sport = dport = icmp_type = -1
    flags = 0
    payload = raw[l4:]
    if proto in (6, 17) and len(raw) >= l4 + 8:
        sport, dport = struct.unpack_from("!HH", raw, l4)
        if proto == 6 and len(raw) >= l4 + 20:
            flags = raw[l4 + 13]
            payload = raw[l4 + (raw[l4 + 12] >> 4) * 4 :]
        else:
            payload = raw[l4 + 8 :]
    elif proto in (1, 58) and len(raw) >= l4 + 8:
        icmp_type = raw[l4]
        payload = raw[l4 + 8 :]
    return Frame(index, ts, raw, linktype, proto, src, dst, sport, dport, flags, icmp_type, payload)


def read_frames(path: str | os.PathLike[str], *, limit: int = 2_000_000) -> tuple[int, list[Frame]]:
    """``(linktype, frames)`` of a pcap file; a truncated last record (a capture still being written) is ignored.

    Raises:
        ConfigError: not a pcap file.
    """
    data = Path(path).read_bytes()
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise ConfigError(f"{path}: not a pcap file")
    e = _PCAP_MAGIC[data[:4]]
    nano = data[:4] in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack_from(e + "I", data, 20)[0] & 0x0FFFFFFF
    frames: list[Frame] = []
    pos = 24
    while pos + 16 <= len(data) and len(frames) < limit:
        sec, frac, incl, _orig = struct.unpack_from(e + "IIII", data, pos)
        pos += 16
        if pos + incl > len(data):
            break
        ts = sec + frac / (1e9 if nano else 1e6)
        frames.append(_parse(len(frames), ts, data[pos : pos + incl], linktype))
        pos += incl
    return linktype, frames


def write_frames(path: Path, linktype: int, frames: Sequence[Frame]) -> Path:
    """Write ``frames`` as a microsecond pcap (the cut of one cell)."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype))
        for fr in frames:
            sec = int(fr.ts)
            f.write(struct.pack("<IIII", sec, int((fr.ts - sec) * 1e6), len(fr.raw), len(fr.raw)))
            f.write(fr.raw)
    return path


def match_frames(spec: ProbeSpec, frames: Sequence[Frame], *, outbound_only: bool = True) -> Iterator[Frame]:
    """The frames of ``spec``'s probe (see `netsim.testing.leakprobes` for how each kind is recognised)."""
    m = spec.marker.encode()
    for fr in frames:
        k = spec.kind
        if k in ("tcp", "uid"):
            hit = fr.proto == 6 and fr.sport == spec.sport and fr.dport == spec.port
        elif k == "udp":
            hit = fr.proto == 17 and fr.sport == spec.sport and fr.dport == spec.port
        elif k == "dns":
            hit = fr.proto == 17 and fr.dport == 53 and m in fr.payload
        elif k == "icmp":
            hit = fr.proto in (1, 58) and fr.icmp_type in (8, 128) and m in fr.payload
        elif k == "kept":
            hit = fr.proto == 6 and fr.sport == KEPT_PORT and m in fr.payload
        elif k == "cve":  # the Mac answering the forged SYN/ACK (sent from port 80 to spec.sport)
            hit = fr.proto == 6 and fr.sport == spec.sport and fr.dport == 80
        else:
            hit = False
        if hit:
            yield fr


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class LeakReport:
    """The result of `check_leaks`.

    Attributes:
        cells: every cell, in matrix order (states, then probes).
        states: the states that ran.
        config: the configuration the verdicts were judged against.
        blind: probes whose positive control saw nothing (the run fails: a blind check cannot pass).
        leaked_pcaps: ``"state:probe"`` -> the pcap of that leaked cell's packets (cut from the captures).
        pcap_dir: where the captures are.
        errors: ``state`` -> what went wrong driving it (its cells are still judged).
        seconds: wall time of the run.
        run_id: the lab's run id (its namespaces are ``netsim-<run_id>-*``; `netsim clean` after a kill).
        windows: ``state`` -> ``(start, end)`` of its probes, wall clock (as the pcaps stamp frames).
        markers: ``"state:probe"`` -> the marker its packets carry (search a capture for it, e.g. reliability
            row S7: no tunnelled marker in the clear on ``isp-wan``).
    """

    cells: list[Cell]
    states: tuple[State, ...]
    config: LeakConfig
    blind: tuple[str, ...] = ()
    leaked_pcaps: dict[str, Path] = field(default_factory=dict)
    pcap_dir: Path | None = None
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    markers: dict[str, str] = field(default_factory=dict)
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    run_id: str = ""

    @property
    def leaked(self) -> list[Cell]:
        return [c for c in self.cells if c.verdict is Verdict.LEAKED]

    @property
    def unexpected(self) -> list[Cell]:
        return [c for c in self.cells if c.unexpected]

    @property
    def exit_status(self) -> int:
        """0 when no cell is unexpected and no probe is blind, else 1."""
        return 1 if self.unexpected or self.blind else 0

    def cell(self, state: State | str, probe: str) -> Cell:
        s = State(state)
        for c in self.cells:
            if c.state is s and c.probe.name == probe:
                return c
        raise KeyError(f"{s.value}:{probe}")

    def table(self) -> str:
        """The matrix as text: a row per probe, a column per state; ``T`` tunnelled, ``a`` allowed, ``-``
        blocked, ``LEAK`` leaked; ``!`` marks a cell that differs from the expect file; blind probes are named."""
        short = {Verdict.TUNNELLED: "T", Verdict.ALLOWED: "a", Verdict.BLOCKED: "-", Verdict.LEAKED: "LEAK"}
        heads = [s.value for s in self.states]
        width = max(len(p.name) for p in PROBES) + 1
        col = max([len(h) for h in heads] + [5])  # whole state names: three of them start "reasserting_"
        lines = [" " * width + " ".join(f"{h:>{col}}" for h in heads)]
        by_key = {c.key: c for c in self.cells}
        for p in PROBES:
            row = []
            for s in self.states:
                c = by_key.get(f"{s.value}:{p.name}")
                text = "" if c is None else short[c.verdict] + ("!" if c.unexpected and c.expected else "")
                row.append(f"{text:>{col}}")
            blind = "  BLIND" if p.name in self.blind else ""
            lines.append(f"{p.name:<{width}}" + " ".join(row) + blind)
        ian = "on" if self.config.include_all_networks else "off"
        lines.append(
            f"T tunnelled, a allowed (Apple semantics or --expect), - blocked, LEAK leaked; include_all_networks "
            f"{ian}; {len(self.leaked)} leaked, {len(self.unexpected)} unexpected, {len(self.blind)} blind"
        )
        for c in self.leaked:
            dsts = ", ".join(sorted(c.evidence.physical_dsts))
            lines.append(f"  LEAK {c.key}: {c.evidence.physical} packet(s) to {dsts}: {c.reason}")
        for state, err in self.errors.items():
            lines.append(f"  ERROR driving {state}: {err.splitlines()[0] if err else ''}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": {
                "include_all_networks": self.config.include_all_networks,
                "exclude_local_networks": self.config.exclude_local_networks,
                "enforce_routes": self.config.enforce_routes,
                "tunnel_ipv6": self.config.tunnel_ipv6,
            },
            "states": [s.value for s in self.states],
            "cells": [c.to_json() for c in self.cells],
            "leaked": [c.key for c in self.leaked],
            "unexpected": [c.key for c in self.unexpected],
            "blind": list(self.blind),
            "leaked_pcaps": {k: str(v) for k, v in self.leaked_pcaps.items()},
            "pcap_dir": str(self.pcap_dir) if self.pcap_dir else None,
            "errors": self.errors,
            "windows": {k: [round(a, 6), round(b, 6)] for k, (a, b) in self.windows.items()},
            "run_id": self.run_id,
            "exit_status": self.exit_status,
            "seconds": round(self.seconds, 2),
        }


# ---------------------------------------------------------------------------------------------- driving the states
@dataclass
class _Run:
    lab: Any
    token: str
    targets: Targets
    marker_file: Path
    specs: dict[State, tuple[ProbeSpec, ...]] = field(default_factory=dict)
    replies: dict[State, dict[str, str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    en0_mac: str = ""
    tunnel_pcaps: list[Path] = field(default_factory=list)
    windows: dict[State, tuple[float, float]] = field(default_factory=dict)  # wall clock, as pcaps stamp frames


async def _probe(run: _Run, state: State) -> None:
    """Run every probe of ``state`` at once (bounded by PROBE_TIMEOUT), then let the captures catch up."""
    specs = probe_specs(run.token, state, run.targets)
    run.specs[state] = specs
    kept = next(s for s in specs if s.kind == "kept")
    started = time.time()
    run.marker_file.write_text(kept.marker)
    replies: dict[str, str] = {}
    lab = run.lab

    async def mac(argv: list[str]) -> None:
        r = await lab.run("mac", argv, check=False, timeout=PROBE_TIMEOUT + 10)
        try:
            replies.update(json.loads(r.stdout or b"{}"))
        except ValueError:
            replies["error"] = r.stderr.decode(errors="replace")[-500:]

    async def cve(spec: ProbeSpec) -> None:
        argv = [
            sys.executable, "-I", "-c", CVE_SCRIPT,
            "eth0", run.en0_mac, str(lab.addr.lan_eth0_v4), spec.dst, str(spec.sport),
        ]  # fmt: skip
        r = await lab.run("lan", argv, check=False, timeout=10)
        replies[spec.name] = "sent" if r.returncode == 0 else "error: " + r.stderr.decode(errors="replace")[-300:]

    own = [s for s in specs if s.kind in ("tcp", "udp", "icmp", "dns")]
    uid = [s for s in specs if s.kind == "uid"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mac, probe_argv(own, PROBE_TIMEOUT))
        nursery.start_soon(mac, probe_argv(uid, PROBE_TIMEOUT, uid=SECOND_UID))
        nursery.start_soon(cve, next(s for s in specs if s.kind == "cve"))
        await trio.sleep(0.3)  # the kept connection sends the new marker meanwhile
    await trio.sleep(0.2)
    run.windows[state] = (started, time.time())
    run.replies[state] = replies
    log.info("leak check: %s probed: %s", state.value, replies)


async def _drive(run: _Run, state: State, body: Callable[[], Awaitable[object]]) -> None:
    """Drive one state (``body`` puts the tunnel in it) and probe; an error is recorded, the probes still run."""
    try:
        with trio.fail_after(40):
            await body()
    except Exception as exc:  # recorded in the report; the cells are still judged
        run.errors[state.value] = f"{type(exc).__name__}: {exc}"
        log.warning("leak check: driving %s failed: %s", state.value, exc)
    await _probe(run, state)


def _block_server(lab: Any, port: int) -> None:
    lab.nft(
        "vpn",
        f"table inet {_BLOCK_TABLE} {{\n chain input {{\n  type filter hook input priority -5; policy accept;\n"
        f"  udp dport {port} drop\n }}\n}}\n",
    )


async def _unblock_server(lab: Any) -> None:
    await lab.run("vpn", ["nft", "delete", "table", "inet", _BLOCK_TABLE], check=False)


async def _wait_ping(lab: Any, host: str, timeout: float = 15.0) -> bool:
    end = trio.current_time() + timeout
    while trio.current_time() < end:
        r = await lab.run("mac", ["ping", "-c", "1", "-W", "1", host], check=False, timeout=5)
        if r.returncode == 0:
            return True
        await trio.sleep(0.1)
    return False


async def _wait_utun(lab: Any, timeout: float = 5.0) -> None:
    end = trio.current_time() + timeout
    while trio.current_time() < end:
        if await trio.to_thread.run_sync(lab.links, "mac", "tun"):
            return
        await trio.sleep(0.05)
    raise LabError(f"no utun appeared in mac within {timeout} s (the provider applied no settings)")


async def _flap_en0(lab: Any) -> None:
    """en0 down and up. The network gives back what it provides (en0's addresses and default routes:
    `netsim.lab.faults.link_up`'s plan, DHCP's and SLAAC's part); the tunnel's own routes through en0 are the
    provider host's to re-apply (`netsim.runtime.pathmonitor`), so this state also checks that recovery."""
    await faults.flap(lab.netns("mac"), "en0", down_for=0.3, plan=faults.link_plan("mac", "en0"))
    await trio.sleep(0.2)  # the path monitor's settle time and its re-apply


def _rename_tunnel_pcaps(run: _Run, tag: str) -> None:
    """The second tunnel's captures reuse the first's names: keep the first's under ``<tag>-<name>``."""
    d = run.lab.pcap_dir
    for name in ("vpn-wg", *(n for n in (p.stem for p in d.glob("mac-utun*.pcap")))):
        p = d / f"{name}.pcap"
        if p.exists():
            dest = d / f"{tag}-{name}.pcap"
            p.rename(dest)
            run.tunnel_pcaps.append(dest)


async def _run_states(run: _Run, states: tuple[State, ...], tunnel_kwargs: Mapping[str, Any], plan: Any) -> None:
    from netsim.lab.tunnel import netsim_tunnel

    lab = run.lab
    want = set(states)

    async def control() -> None:
        lab.add_address("mac", f"{run.targets.tunnel_address_v4}/32", "lo")

    await _drive(run, State.BEFORE_START, control)
    await lab.run("mac", ["ip", "addr", "del", f"{run.targets.tunnel_address_v4}/32", "dev", "lo"], check=False)

    first = [s for s in STATES[1:7] if s in want]
    if first:
        connecting = State.CONNECTING in want
        if connecting:
            _block_server(lab, plan.port)
        async with netsim_tunnel(lab, plan=plan, wait_connected=not connecting, **tunnel_kwargs) as t:
            if connecting:
                await _drive(run, State.CONNECTING, lambda: _wait_utun(lab))
                await _unblock_server(lab)

            async def connected() -> None:
                await t.session.wait_status(VPNStatus.CONNECTED)
                if not await _wait_ping(lab, run.targets.inet_v4):
                    raise LabError("connected, but no traffic through the tunnel within 15 s")

            if State.CONNECTED in want:
                await _drive(run, State.CONNECTED, connected)
            else:
                with trio.move_on_after(20):
                    await connected()

            async def helper_killed() -> None:
                await t.kill_helper()
                await trio.sleep(0.3)

            if State.REASSERTING_HELPER in want:
                await _drive(run, State.REASSERTING_HELPER, helper_killed)
                with suppress(Exception), trio.move_on_after(20):
                    await t.start_helper()
                    await _wait_ping(lab, run.targets.inet_v4)

            async def server_gone() -> None:
                _block_server(lab, plan.port)
                await trio.sleep(0.3)

            if State.REASSERTING_SERVER in want:
                await _drive(run, State.REASSERTING_SERVER, server_gone)
                await _unblock_server(lab)
                await _wait_ping(lab, run.targets.inet_v4, timeout=10)

            if State.REASSERTING_LINK in want:
                await _drive(run, State.REASSERTING_LINK, lambda: _flap_en0(lab))
                await _wait_ping(lab, run.targets.inet_v4, timeout=10)

            async def crash() -> None:
                if t.provider_pid is not None:
                    t.signal_provider(signal.SIGKILL)
                with trio.move_on_after(10):
                    await t.session.wait_status(VPNStatus.DISCONNECTED, VPNStatus.INVALID)
                await trio.sleep(0.2)

            if State.AFTER_CRASH in want:
                await _drive(run, State.AFTER_CRASH, crash)
        _rename_tunnel_pcaps(run, "tunnel1")

    if State.AFTER_STOP in want or State.DISABLED in want:
        async with netsim_tunnel(lab, plan=plan, **tunnel_kwargs) as t:
            if State.AFTER_STOP in want:

                async def stop() -> None:
                    await _wait_ping(lab, run.targets.inet_v4, timeout=10)
                    await t.session.stop_vpn_tunnel()

                await _drive(run, State.AFTER_STOP, stop)

            async def disable() -> None:
                if t.session.status is not VPNStatus.CONNECTED:
                    if t.session.status is not VPNStatus.DISCONNECTED:
                        await t.session.stop_vpn_tunnel()
                    await t.session.start_vpn_tunnel()
                    with trio.move_on_after(20):
                        await t.session.wait_status(VPNStatus.CONNECTED)
                manager = t.manager
                set_enabled = getattr(manager, "set_enabled", None)
                if set_enabled is not None:
                    await set_enabled(False)
                else:  # no set_enabled on this netsim: stop, and mark the configuration disabled
                    await t.session.stop_vpn_tunnel()
                    if manager is not None:
                        manager.is_enabled = False
                with trio.move_on_after(10):
                    await t.session.wait_status(VPNStatus.DISCONNECTED, VPNStatus.INVALID)

            if State.DISABLED in want:
                await _drive(run, State.DISABLED, disable)
        _rename_tunnel_pcaps(run, "tunnel2")


def _window(run: _Run, state: State, spec: ProbeSpec) -> Any:
    """Which frames count for ``spec`` in ``state``: all, but for the kept connection only those sent during the
    state (its unacknowledged bytes, this state's marker included, are retransmitted later, e.g. once a kill
    switch is released or by the next tunnel)."""
    if spec.kind != "kept" or state not in run.windows:
        return lambda f: True
    t0, t1 = run.windows[state]
    return lambda f: t0 <= f.ts <= t1  # t1 is taken after the captures caught up, before the next state


def _judge(
    run: _Run,
    states: tuple[State, ...],
    config: LeakConfig,
    expect: Expectation | None,
    pcap_dir: Path,
) -> LeakReport:
    physical: dict[str, tuple[int, list[Frame]]] = {}
    for name in PHYSICAL:
        p = pcap_dir / f"{name}.pcap"
        if p.exists():
            physical[name] = read_frames(p)
    tunnel_frames: list[Frame] = []
    for p in run.tunnel_pcaps:
        with suppress(ConfigError, OSError):
            tunnel_frames += read_frames(p)[1]
    system_resolvers = (str(run.lab.addr.isp_lan_v4), str(run.lab.addr.isp_lan_v6))
    cells: list[Cell] = []
    pcaps: dict[str, Path] = {}
    control: dict[str, Evidence] = {}
    cut_dir = pcap_dir / "leaks"
    for state in states:
        for probe, spec in zip(PROBES, run.specs.get(state, ()), strict=False):
            hits: dict[str, list[Frame]] = {n: list(match_frames(spec, fr)) for n, (_, fr) in physical.items()}
            if spec.kind == "cve":
                hits = {"mac-en0": hits.get("mac-en0", [])}  # only the Mac's own answers on en0 count
            in_window = _window(run, state, spec)
            hits = {n: [f for f in v if in_window(f)] for n, v in hits.items()}
            n_phys = sum(len(v) for v in hits.values())
            n_tun = sum(1 for f in match_frames(spec, tunnel_frames) if in_window(f))
            ev = Evidence(
                physical=n_phys,
                tunnel=n_tun,
                physical_dsts=frozenset(f.dst for v in hits.values() for f in v),
                pcap_refs=tuple((n, f.index) for n, v in hits.items() for f in v),
            )
            cell = classify(state, probe, config, ev, expect=expect, system_resolvers=system_resolvers)
            cells.append(cell)
            if state is State.BEFORE_START:
                control[probe.name] = ev
            if cell.verdict is Verdict.LEAKED:
                cut_dir.mkdir(exist_ok=True)
                name, frames = next((n, v) for n, v in hits.items() if v)
                pcaps[cell.key] = write_frames(cut_dir / f"{state.value}-{probe.name}.pcap", physical[name][0], frames)
    return LeakReport(
        cells=cells,
        states=states,
        config=config,
        blind=blind_probes(control),
        leaked_pcaps=pcaps,
        pcap_dir=pcap_dir,
        errors=dict(run.errors),
        markers={f"{st.value}:{sp.name}": sp.marker for st, specs in run.specs.items() for sp in specs},
        windows={st.value: w for st, w in run.windows.items()},
    )


async def check_leaks(
    *,
    provider: type[PacketTunnelProvider] | str | None = None,
    provider_configuration: Mapping[str, Any] | None = None,
    policy: str | os.PathLike[str] | None = None,
    protocol: Mapping[str, Any] | None = None,
    expect: Expectation | None = None,
    states: Sequence[State] | None = None,
    pcap_dir: str | os.PathLike[str] | None = None,
    ipv6: bool = True,
) -> LeakReport:
    """Run ``provider`` through ``states`` in a fresh lab and judge every (state, probe) cell (needs root).

    Args:
        provider: a `PacketTunnelProvider` subclass or ``"module:Class"`` spec (default: netsim's own
            `HelperForwardingProvider`).
        provider_configuration: as `netsim.lab.tunnel.netsim_tunnel` takes it.
        policy: as `netsim.lab.tunnel.netsim_tunnel` takes it.
        protocol: NEVPNProtocol fields, as `netsim.lab.tunnel.netsim_tunnel` takes them
            (``{"include_all_networks": True}``); they also select the Apple semantics the verdicts are judged
            against.
        expect: what the user's configuration allows (`netsim.core.leakmodel.parse_expectation`).
        states: the states to visit (default all; ``before_start``, the positive control, always runs).
        pcap_dir: where the captures and the per-leaked-cell pcaps (``leaks/``) go (default: a new temp dir,
            kept).
        ipv6: False runs an IPv4-only tunnel (`TunnelPlan(ipv6=False)`, reliability row K4).

    Raises:
        PrivilegeError: not root. ConfigError: a bad provider, configuration, policy or protocol field.
    """
    from netsim.errors import PrivilegeError
    from netsim.lab.lab import Lab
    from netsim.lab.tunnel import TunnelPlan
    from netsim.runtime.forwarding import HelperForwardingProvider
    from netsim.runtime.tunnelspec import resolve_inputs, resolve_protocol_fields

    if os.geteuid() != 0:
        raise PrivilegeError("netsim check leaks needs root (it builds a lab of network namespaces): run it with sudo")
    spec = provider if provider is not None else HelperForwardingProvider
    resolve_inputs(spec, provider_configuration, policy)  # validate everything before anything starts
    fields = resolve_protocol_fields(protocol)
    chosen = tuple(s for s in STATES if s is State.BEFORE_START or states is None or s in set(states))
    config = LeakConfig(
        include_all_networks=bool(fields.get("include_all_networks", False)),
        exclude_local_networks=bool(fields.get("exclude_local_networks", False)),
        enforce_routes=bool(fields.get("enforce_routes", False)),
        tunnel_ipv6=ipv6,
    )
    out = Path(pcap_dir) if pcap_dir is not None else Path(tempfile.mkdtemp(prefix="netsim-leaks-"))
    out.mkdir(parents=True, exist_ok=True)
    plan = TunnelPlan(ipv6=ipv6)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="netsim-leakrun-"))
    os.chmod(work, 0o755)
    try:
        async with Lab(pcap_dir=out) as lab:
            targets = Targets(
                inet_v4=str(lab.addr.www_v4),
                inet_v6=str(lab.addr.www_v6),
                lan_v4=str(lab.addr.lan_eth0_v4),
                lan_v6=str(lab.addr.lan_eth0_v6),
                tunnel_dns_v4=str(lab.addr.dns_v4),
                isp_dns_v4=str(lab.addr.isp_lan_v4),
                tunnel_address_v4=plan.client_v4,
            )
            run = _Run(lab, secrets.token_hex(3), targets, work / "kept-marker")
            link = json.loads((await lab.run("mac", ["ip", "-j", "link", "show", "en0"])).stdout)
            run.en0_mac = link[0]["address"]
            keeper = lab.spawn(
                "mac",
                [sys.executable, "-I", "-c", KEPT_SCRIPT, targets.inet_v4, "80", str(KEPT_PORT), str(run.marker_file)],
                name="leak-kept-tcp",
            )
            await keeper.wait_output("connected", timeout=10.0)
            kwargs: dict[str, Any] = {
                "provider": spec,
                "provider_configuration": provider_configuration,
                "policy": policy,
                "protocol": fields,
                "start_timeout": 20.0,
                "reconnect_for": 60.0,
            }
            try:
                await _run_states(run, chosen, kwargs, plan)
            finally:
                await keeper.stop(grace=1.0)
        report = _judge(run, chosen, config, expect, out)
        report.run_id = lab.run_id
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def check_leaks_sync(**kwargs: Any) -> LeakReport:
    """Blocking `check_leaks` (runs its own trio loop)."""
    return trio.run(lambda: check_leaks(**kwargs))
