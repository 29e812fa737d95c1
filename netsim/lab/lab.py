"""`Lab`: the simulated Mac, home router, VPN server, internet and LAN device in network namespaces.

Topology (see docs/lab.md for the diagram and the addressing table in `netsim.lab.addressing`)::

    mac:en0 ──┐                                                   inet (core router + hosts on lo)
              ├─ isp:br-lan  [isp: NAT44+NAT66 masquerade] isp:wan ── inet:isp
    lan:eth0 ─┘                                            vpn:wan ── inet:vpn
    mac:en1 ── isp2:mac  [isp2: NAT44+NAT66]            isp2:wan ── inet:isp2   (only with second_uplink=True)

The ISP and the VPN server each hang off the internet router on their own point-to-point link, as real access
links do, so a capture on ``isp/wan`` shows exactly what leaves the home and ``vpn/wan`` what reaches the server.

Bring-up order matters: sysctls (``accept_dad=0``, forwarding) are written in every namespace *before* links are
created so each new interface inherits them from ``default``; veth pairs are created from inside one namespace
with the peer placed directly in the other, so nothing ever exists in the root namespace. Every wait is on a
condition (carrier, READY line, "listening on"), never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import trio

from netsim.core.resolver import SystemDns
from netsim.errors import LabError, MissingDependency, PrivilegeError
from netsim.lab import netlink
from netsim.lab.addressing import ADDR, ALL_ROLES, LAB_DOMAIN, ROLES, SECOND_UPLINK_ROLES, Addressing
from netsim.lab.cleanup import ETC_NETNS, RUN_DIR, RunRecord, invoking_uid, remove_run, valid_run_id
from netsim.lab.netns import create_netns, netns_exists, run_in_netns, run_in_netns_async, set_sysctl
from netsim.lab.pcap import (
    CAPTURE_NICE,
    DEFAULT_BUFFER_KIB,
    DEFAULT_SNAPLEN,
    Capture,
    CaptureStats,
    check_capture_options,
    write_capture_summary,
)
from netsim.lab.process import LabProcess, ProcessInfo, listening, netns_exec_argv, process_start_time
from netsim.runtime.resolver import DNS_STATE_DIR, RESOLVER_LISTEN, SYSTEM_FILE, write_state_file
from netsim.transports.netns import run_netns_command

if TYPE_CHECKING:
    from netsim.transports.tun import TunDevice

__all__ = ["Lab", "NatMode"]

log = logging.getLogger("netsim.lab")
T = TypeVar("T")
NatMode = Literal["cone", "symmetric"]

_IFA_F_NODAD = 0x02  # <linux/if_addr.h>
_BASE_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv6.conf.all.autoconf": "0",
    "net.ipv6.conf.default.autoconf": "0",
    "net.ipv6.conf.default.router_solicitations": "0",  # nobody sends RAs; keep captures free of RS noise
}
_ROUTER_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
_ROUTERS = ("isp", "isp2", "inet", "vpn")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # tear down as on Ctrl-C (see Lab._install_stop_signals)


def _nat_ruleset(mode: NatMode) -> str:
    # nftables "inet" family NAT covers IPv4 (NAT44) and IPv6 (NAT66 of the ULA) with one rule.
    # cone: masquerade keeps the source port when free, so one inside flow keeps one outside port for every
    #   destination (endpoint-independent mapping); conntrack filters replies per remote (port-restricted).
    # symmetric: "random" picks a fresh source port per conntrack entry (address-and-port-dependent mapping).
    flags = " random" if mode == "symmetric" else ""
    return (
        "table inet netsim_nat {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "wan" masquerade{flags}\n'
        "  }\n"
        "}\n"
    )


class Lab:
    """The namespace world. Use ``async with Lab() as lab:`` (or ``with Lab() as lab:`` in sync code).

    Args:
        run_id: short unique id (lowercase letters/digits) used in every name; random when None.
        pcap_dir: if set, capture mac/en0, isp/wan and vpn/wan there (one pcap per link) from before any traffic.
        services: start the HTTP/DNS/echo/iperf3 services (turn off for the fastest bare topology).
        nat: ``"cone"`` (default) or ``"symmetric"`` NAT behaviour of the home router.
        cli: mark the run as owned by ``netsim lab up`` (so ``netsim lab down`` can find it).
        progress: called with a short text as each bring-up step begins (``netsim lab up`` prints them on
            stderr); it runs in the bring-up thread and must not block.
        capture_buffer_kib: kernel buffer of every capture this lab starts (``tcpdump -B``, KiB), unless
            `capture` is given another.
        capture_snaplen: bytes kept per packet by every capture this lab starts (``tcpdump -s``).
        second_uplink: also give ``mac`` an ``en1`` on a second home network behind a second ISP router
            (role ``isp2``, NAT44+NAT66 like ``isp``, its own WAN link to ``inet``), standing in for Ethernet or
            a phone hotspot. ``en1`` is addressed but carries no default route: en0 stays the primary path
            until a path change (`netsim.lab.faults.move_default`). Off by default (one namespace less).

    Attributes:
        addr: the addressing plan (`netsim.lab.addressing.Addressing`), e.g. ``lab.addr.mac_en0_v4``.
        processes: every process the lab started and has not yet reaped.
        captures: running captures by name (``"mac-en0"`` ...).
        capture_history: the `netsim.lab.pcap.CaptureStats` of every capture stopped so far (at teardown, all
            of them), in stop order; kept after the lab is down. A capture that dropped packets is logged at
            WARNING and its stats say ``PARTIAL``; with a pcap_dir they are also written to ``captures.json``.
    """

    def __init__(
        self,
        run_id: str | None = None,
        pcap_dir: str | os.PathLike[str] | None = None,
        *,
        services: bool = True,
        nat: NatMode = "cone",
        cli: bool = False,
        progress: Callable[[str], None] | None = None,
        capture_buffer_kib: int = DEFAULT_BUFFER_KIB,
        capture_snaplen: int = DEFAULT_SNAPLEN,
        second_uplink: bool = False,
    ) -> None:
        if run_id is not None and not valid_run_id(run_id):
            raise LabError(f"run_id {run_id!r} must be 1-6 lowercase letters/digits (it goes into interface names)")
        if nat not in ("cone", "symmetric"):
            raise LabError(f"nat={nat!r}: choose 'cone' or 'symmetric'")
        check_capture_options(capture_buffer_kib, capture_snaplen)
        self.run_id = run_id or ""
        self.pcap_dir = Path(pcap_dir) if pcap_dir is not None else None
        self.services = services
        self.nat: NatMode = nat
        self.second_uplink = second_uplink
        self.cli = cli
        self._progress = progress
        self.addr: Addressing = ADDR
        self.domain = LAB_DOMAIN
        self.processes: list[LabProcess] = []
        self.captures: dict[str, Capture] = {}
        self.capture_history: list[CaptureStats] = []
        self.capture_buffer_kib = capture_buffer_kib
        self.capture_snaplen = capture_snaplen
        self._closeables: list[Callable[[], object]] = []
        self._record: RunRecord | None = None
        self._lock = threading.Lock()
        self._lifecycle = threading.Lock()  # start() and stop() never overlap (e.g. Ctrl-C during bring-up)
        self._up = False
        self._old_handlers: dict[int, Any] = {}
        self._signalled: int | None = None  # the stop signal received (SIGTERM/SIGHUP), if any
        self._body_scope: trio.CancelScope | None = None
        self._tearing_down = False
        self._counter = 0
        self._adopted: dict[str, ProcessInfo] = {}  # started by others, recorded here (`adopt`)

    # ------------------------------------------------------------------ names
    @property
    def prefix(self) -> str:
        """``netsim-<run>-``: every namespace of this lab starts with it."""
        return f"netsim-{self.run_id}-"

    @property
    def roles(self) -> tuple[str, ...]:
        """This lab's roles: ``mac isp vpn inet lan``, and ``isp2`` with ``second_uplink``."""
        return ALL_ROLES if self.second_uplink else ROLES

    def netns(self, role: str) -> str:
        """Namespace name of ``role`` (one of `roles`)."""
        if role not in self.roles:
            hint = " (isp2 needs Lab(second_uplink=True))" if role in SECOND_UPLINK_ROLES else ""
            raise LabError(f"unknown role {role!r}; roles are {', '.join(self.roles)}{hint}")
        return f"{self.prefix}{role}"

    @property
    def dns_state_dir(self) -> Path:
        """The Mac resolver's state directory, ``/run/netsim/dns/<mac netns>/`` (docs/dns.md): ``system.json``
        (written by the lab), ``tunnel.json`` (written by the provider's configurator while its DNS settings are
        applied) and ``stats.json`` (the daemon's counters; read them with `netsim.runtime.resolver.read_stats`)."""
        return DNS_STATE_DIR / self.netns("mac")

    def ifname(self, stem: str) -> str:
        """A name unique across concurrent labs, for objects in a global namespace (wireguard-go's UAPI socket
        ``/var/run/wireguard/<ifname>.sock`` is shared by all namespaces): ``ns<run><stem>``, at most 15 chars.
        `netsim clean` removes wireguard sockets with this prefix."""
        name = f"ns{self.run_id}{stem}"
        if len(name) > 15:
            raise LabError(f"interface name {name!r} is longer than 15 characters; use a shorter stem")
        return name

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        self._install_stop_signals(None)
        try:
            self.start()
        except BaseException:
            self._restore_stop_signals()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            self._restore_stop_signals()

    async def __aenter__(self) -> Lab:
        self._install_stop_signals(trio.lowlevel.current_trio_token())
        try:
            # Bring-up blocks on netlink and subprocesses: keep the event loop responsive meanwhile. Cancelling
            # mid bring-up is not supported (the thread finishes, then teardown runs).
            await trio.to_thread.run_sync(self.start)
        except BaseException:
            await self._abandon_bring_up()
            raise
        if self._signalled is not None:  # SIGTERM/SIGHUP during bring-up: the body never runs
            await self._abandon_bring_up()
            raise self._interrupt()
        # The body runs inside this scope, so a stop signal can cancel it like any trio code (entered here,
        # exited in __aexit__: same task, properly nested, as every async context manager's scopes are).
        self._body_scope = trio.CancelScope()
        self._body_scope.__enter__()
        return self

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope, self._body_scope = self._body_scope, None
        swallowed = False
        try:
            if scope is not None:
                swallowed = scope.__exit__(exc_type, exc, tb)  # True: it was our signal's Cancelled
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.stop)
            finally:
                self._restore_stop_signals()
        # Only a stop signal cancels the body scope, so a swallowed Cancelled always ends here, as the signal's
        # KeyboardInterrupt; the manager never swallows an exception (type checkers may rely on that).
        if self._signalled is not None:
            raise self._interrupt() from (None if swallowed else exc)

    async def _abandon_bring_up(self) -> None:
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.stop)
        finally:
            self._restore_stop_signals()

    def _interrupt(self) -> KeyboardInterrupt:
        assert self._signalled is not None
        name = signal.Signals(self._signalled).name
        return KeyboardInterrupt(f"{name}: lab {self.run_id or '(unclaimed)'} torn down")

    def _install_stop_signals(self, token: trio.lowlevel.TrioToken | None) -> None:
        """Make SIGTERM and SIGHUP tear the lab down as Ctrl-C does, in the foreground and in the background.

        Only signals at their default disposition are taken (a CLI or an application that handles them, or
        ``nohup``'s ignored SIGHUP, is left alone), and only from the main thread (where Python runs handlers).
        How the signal gets to the teardown depends on where the lab lives:

        * ``async with Lab()``: the handler schedules, through the trio token (`TrioToken.run_sync_soon`, the
          one trio call a signal handler may make), the cancellation of a scope around the body. The body
          unwinds at its next checkpoint, teardown runs, and ``__aexit__`` raises KeyboardInterrupt, so the
          program stops as after Ctrl-C. Raising KeyboardInterrupt from the handler itself, as before, could
          land inside trio's run loop (SIGINT is not trio's when a background shell ignores it): trio then
          abandoned the run and no teardown ran (found by attack).
        * ``with Lab()``: the handler raises SIGINT when SIGINT has a handler (trio's, if a ``trio.run`` is in
          progress, delivers it safely), else KeyboardInterrupt directly; ``__exit__`` tears down either way.

        A signal during teardown is ignored: teardown finishes.
        """
        self._signalled = None
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self._tearing_down:
                return
            first = self._signalled is None
            self._signalled = signum
            if token is not None:
                if first:
                    with contextlib.suppress(trio.RunFinishedError):
                        token.run_sync_soon(self._cancel_body)
                return
            if callable(signal.getsignal(signal.SIGINT)):
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt(f"{signal.Signals(signum).name}: tearing down lab {self.run_id}")

        for signum in _STOP_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                self._old_handlers[signum] = signal.SIG_DFL
                signal.signal(signum, on_signal)

    def _cancel_body(self) -> None:
        if self._body_scope is not None:
            self._body_scope.cancel()

    def _restore_stop_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        while self._old_handlers:
            signum, handler = self._old_handlers.popitem()
            signal.signal(signum, handler)

    def start(self) -> None:
        """Bring the world up (blocking). On failure everything created so far is removed."""
        with self._lifecycle:
            if self._up:
                raise LabError("lab is already up")
            self._check_environment()
            self.capture_history = []
            self._up = True
            try:
                self._claim_run_id()
                log.info("lab %s: bringing up namespaces %s{%s}", self.run_id, self.prefix, ",".join(self.roles))
                self._build()
            except BaseException:
                self._stop_locked()
                raise
            log.info("lab %s: up", self.run_id)

    def _check_environment(self) -> None:
        if os.geteuid() != 0:
            raise PrivilegeError("the lab needs root (network namespaces, veth, nftables); run as root or via sudo")
        needed = {"ip": "iproute2", "nft": "nftables"}
        if self.pcap_dir is not None:
            needed["tcpdump"] = "tcpdump"
        if self.services:
            needed["iperf3"] = "iperf3"
        for binary, package in needed.items():
            if shutil.which(binary) is None:
                raise MissingDependency(binary, package)

    def _claim_run_id(self) -> None:
        RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        for _ in range(20):
            run_id = self.run_id or secrets.token_hex(2)
            path = RUN_DIR / f"{run_id}.json"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic claim
            except FileExistsError:
                if self.run_id:
                    raise LabError(
                        f"lab run {run_id!r} already exists ({path}); run `netsim clean` if it is stale"
                    ) from None
                continue
            os.close(fd)
            self.run_id = run_id
            break
        else:
            raise LabError("could not find a free run id; run `netsim clean`")
        if any(netns_exists(self.netns(r)) for r in self.roles):
            path.unlink()
            raise LabError(f"namespaces {self.prefix}* already exist; run `netsim clean --orphans`")
        self._record = RunRecord(
            run_id=self.run_id,
            owner_pid=os.getpid(),
            owner_start=process_start_time(os.getpid()),
            created=time.time(),
            namespaces=[self.netns(r) for r in self.roles],
            pcap_dir=str(self.pcap_dir.resolve()) if self.pcap_dir else None,
            cli=self.cli,
            owner_uid=invoking_uid(),
        )
        self._record.save()
        self._record.log_dir.mkdir(parents=True, exist_ok=True)

    def _save_record(self) -> None:
        with self._lock:
            if self._record is not None:
                self._record.processes = [p.info() for p in self.processes] + list(self._adopted.values())
                self._record.save()

    def adopt(self, name: str, role: str, pid: int) -> ProcessInfo:
        """Record in the run file a process running in ``role``'s namespace that someone else started (the
        provider host a `TunnelProviderManager` launched), under ``name`` (replacing an earlier one of that name).

        Its starter still stops it; the record lets another process find it (``netsim lab fault signal provider
        KILL``: a crashed extension) and lets ``netsim clean`` stop it if this lab's owner died. The pid's start
        time is recorded, so a reused pid is never signalled.
        """
        self._require_up()
        self.netns(role)  # a known role
        info = ProcessInfo(name, role, pid, process_start_time(pid), ())
        with self._lock:
            self._adopted[name] = info
        self._save_record()
        return info

    def _step(self, what: str) -> None:
        if self._progress is not None:
            self._progress(what)

    def _build(self) -> None:
        self._step(f"namespaces {self.prefix}{{{','.join(self.roles)}}}, links, addresses, routes, NAT")
        for role in self.roles:
            create_netns(self.netns(role))
        log.debug("lab %s: namespaces created", self.run_id)
        for role in self.roles:
            set_sysctl(self.netns(role), {**_BASE_SYSCTLS, **(_ROUTER_SYSCTLS if role in _ROUTERS else {})})
        ns = self.netns
        # veth pairs: (namespace, name) <-> (peer namespace, peer name)
        self._veth("mac", "en0", "isp", "mac")
        self._veth("lan", "eth0", "isp", "lan")
        self._veth("isp", "wan", "inet", "isp")
        self._veth("vpn", "wan", "inet", "vpn")
        if self.second_uplink:
            self._veth("mac", "en1", "isp2", "mac")
            self._veth("isp2", "wan", "inet", "isp2")
        a = self.addr
        self._configure(
            "isp",
            bridge=("br-lan", ["mac", "lan"]),
            addrs=[
                ("br-lan", str(a.isp_lan_v4), 24),
                ("br-lan", str(a.isp_lan_v6), 64),
                ("wan", str(a.isp_wan_v4), 24),
                ("wan", str(a.isp_wan_v6), 64),
            ],
            routes=[("0.0.0.0/0", str(a.inet_isp_v4)), ("::/0", str(a.inet_isp_v6))],
        )
        self._configure(
            "mac",
            addrs=[("en0", str(a.mac_en0_v4), 24), ("en0", str(a.mac_en0_v6), 64)],
            routes=[("0.0.0.0/0", str(a.isp_lan_v4)), ("::/0", str(a.isp_lan_v6))],
        )
        self._configure(
            "lan",
            addrs=[("eth0", str(a.lan_eth0_v4), 24), ("eth0", str(a.lan_eth0_v6), 64)],
            routes=[("0.0.0.0/0", str(a.isp_lan_v4)), ("::/0", str(a.isp_lan_v6))],
        )
        self._configure(
            "vpn",
            addrs=[("wan", str(a.vpn_wan_v4), 24), ("wan", str(a.vpn_wan_v6), 64)],
            routes=[("0.0.0.0/0", str(a.inet_vpn_v4)), ("::/0", str(a.inet_vpn_v6))],
        )
        inet_links: list[tuple[str, object, object]] = [
            ("isp", a.inet_isp_v4, a.inet_isp_v6),
            ("vpn", a.inet_vpn_v4, a.inet_vpn_v6),
        ]
        if self.second_uplink:
            self._build_second_uplink()
            inet_links.append(("isp2", a.inet_isp2_v4, a.inet_isp2_v6))
        self._configure(
            "inet",
            addrs=[
                *((link, str(address), plen) for link, v4, v6 in inet_links for address, plen in ((v4, 24), (v6, 64))),
                ("lo", str(a.www_v4), 32),
                ("lo", str(a.www_v6), 128),
                ("lo", str(a.dns_v4), 32),
                ("lo", str(a.dns_v6), 128),
            ],
            routes=[],
        )
        self._prefer_source("inet", inet_links)
        self.nft("isp", _nat_ruleset(self.nat))
        # Every namespace gets the lab's resolver, not only the clients: the servers' own lookups (the HTTP
        # servers' PTR queries for a client address) must stay in the lab rather than go to the host's resolver.
        for role in self.roles:
            etc = ETC_NETNS / ns(role)
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(self.resolv_conf(role))
        for role in self.roles:
            self._wait_links_up(role)
        log.debug("lab %s: links, addresses, routes and NAT configured; links up", self.run_id)
        if self.pcap_dir is not None:
            self._step(f"captures into {self.pcap_dir}")
            self.pcap_dir.mkdir(parents=True, exist_ok=True)
            links = [("mac", "en0"), ("isp", "wan"), ("vpn", "wan")]
            if self.second_uplink:
                links += [("mac", "en1"), ("isp2", "wan")]
            for role, ifname in links:
                self.capture(role, ifname, wait=False)
            for cap in self.captures.values():
                cap.wait_ready_sync()
            log.debug("lab %s: capturing %s into %s", self.run_id, ", ".join(self.captures), self.pcap_dir)
        if self.services:
            self._step("services: HTTP, DNS, UDP echo, iperf3")
            self._start_services()
            log.debug("lab %s: services listening (HTTP, DNS, UDP echo, iperf3)", self.run_id)

    def _build_second_uplink(self) -> None:
        """``mac:en1`` on the second home network, and ``isp2``: its router (NAT44+NAT66, as ``isp``) with its
        own WAN link to ``inet``. en1 gets its addresses but no default route (en0 is the primary path)."""
        a = self.addr
        self._configure(
            "isp2",
            addrs=[
                ("mac", str(a.isp2_lan_v4), 24),
                ("mac", str(a.isp2_lan_v6), 64),
                ("wan", str(a.isp2_wan_v4), 24),
                ("wan", str(a.isp2_wan_v6), 64),
            ],
            routes=[("0.0.0.0/0", str(a.inet_isp2_v4)), ("::/0", str(a.inet_isp2_v6))],
        )
        self._configure("mac", addrs=[("en1", str(a.mac_en1_v4), 24), ("en1", str(a.mac_en1_v6), 64)], routes=[])
        self.nft("isp2", _nat_ruleset(self.nat))

    def _veth(self, role: str, ifname: str, peer_role: str, peer_ifname: str) -> None:
        peer_ns = self.netns(peer_role)
        alias = f"netsim-{self.run_id} {role}:{ifname}<->{peer_role}:{peer_ifname}"

        def create() -> None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer_ifname, "net_ns_fd": peer_ns})
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], ifalias=alias)

        run_in_netns(self.netns(role), create)

    def _configure(
        self,
        role: str,
        addrs: list[tuple[str, str, int]],
        routes: list[tuple[str, str]],
        bridge: tuple[str, list[str]] | None = None,
    ) -> None:
        def body() -> None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:

                def index(name: str) -> int:
                    found = ipr.link_lookup(ifname=name)
                    if not found:
                        raise LabError(f"{role}: interface {name} missing")
                    return int(found[0])

                if bridge is not None:
                    br, ports = bridge
                    # STP off (the default) so ports forward at once; no forwarding delay to wait out.
                    ipr.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0)
                    for port in ports:
                        ipr.link("set", index=index(port), master=index(br))
                for name in {"lo", *(link for link, _, _ in addrs), *(bridge[1] if bridge else [])}:
                    ipr.link("set", index=index(name), state="up")
                for name, address, plen in addrs:
                    ipr.addr("add", index=index(name), address=address, prefixlen=plen, flags=_IFA_F_NODAD)
                for dst, gateway in routes:
                    ipr.route("add", dst=dst, gateway=gateway)

        run_in_netns(self.netns(role), body)

    def _prefer_source(self, role: str, links: list[tuple[str, object, object]]) -> None:
        """Make what ``role`` (inet) originates on ``links`` leave from www's address, as an internet server's does.

        inet is both the internet's router and the host of www/dns. A server on an unbound socket (``iperf3 -s``
        for UDP: it ``connect()``s its socket to the client) gets the source address of the route back, which was
        the link's own (198.51.100.1): the home NAT had no conntrack entry for that source and dropped the replies,
        so ``iperf3 -u`` hung (issue 13). The connected routes keep their prefix and device and gain ``src``
        (Linux: RTA_PREFSRC), so replies leave from 203.0.113.10 / 2001:db8:113::10, the address clients reached.
        """
        a = self.addr

        def body() -> None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for link, v4, v6 in links:
                    index = ipr.link_lookup(ifname=link)[0]
                    for address, plen, src, metric in ((v4, 24, a.www_v4, 0), (v6, 64, a.www_v6, 256)):
                        net = ipaddress.ip_interface(f"{address}/{plen}").network
                        ipr.route(
                            "replace", dst=str(net), oif=index, prefsrc=str(src), scope=253, priority=metric, proto=2
                        )  # scope link, proto kernel: the connected route itself, one source preferred

        run_in_netns(self.netns(role), body)

    def _wait_links_up(self, role: str, timeout: float = 10.0) -> None:
        """Wait until every interface is operationally up and no address is tentative."""

        def body() -> None:
            from pyroute2 import IPRoute

            deadline = time.monotonic() + timeout
            delay = 0.001
            with IPRoute() as ipr:
                while True:
                    pending = [
                        link.get_attr("IFLA_IFNAME")
                        for link in ipr.get_links()
                        if link.get_attr("IFLA_IFNAME") != "lo" and link.get_attr("IFLA_OPERSTATE") != "UP"
                    ]
                    pending += [
                        str(a.get_attr("IFA_ADDRESS"))
                        for a in ipr.get_addr()
                        if a["flags"] & 0x40  # TENTATIVE
                    ]
                    if not pending:
                        return
                    if time.monotonic() > deadline:
                        raise LabError(f"{role}: {pending} not up/usable after {timeout} s")
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)

        run_in_netns(self.netns(role), body)

    def _start_services(self) -> None:
        a = self.addr

        def ep(host: object, port: int) -> str:
            text = str(host)
            return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"

        specs = {
            "inet": [
                *("--http", ep(a.www_v4, 80), "--http", ep(a.www_v6, 80)),
                *("--echo", ep(a.www_v4, 7), "--echo", ep(a.www_v6, 7)),
                *("--dns", ep(a.dns_v4, 53), "--dns", ep(a.dns_v6, 53)),
            ],
            "isp": ["--dns", ep(a.isp_lan_v4, 53), "--dns", ep(a.isp_lan_v6, 53)],
            **(
                {"isp2": ["--dns", ep(a.isp2_lan_v4, 53), "--dns", ep(a.isp2_lan_v6, 53)]} if self.second_uplink else {}
            ),
            "lan": [
                *("--http", ep(a.lan_eth0_v4, 80), "--http", ep(a.lan_eth0_v6, 80)),
                *("--echo", ep(a.lan_eth0_v4, 7), "--echo", ep(a.lan_eth0_v6, 7)),
            ],
        }
        procs = [
            self.spawn(role, [sys.executable, "-m", "netsim.lab.services", "--label", role, *args], name=f"svc-{role}")
            for role, args in specs.items()
        ]
        # The Mac's own resolver (docs/dns.md): its system resolvers are the home router's; resolv.conf names it.
        system = SystemDns((str(a.isp_lan_v4), str(a.isp_lan_v6)), (self.domain,))
        write_state_file(self.dns_state_dir / SYSTEM_FILE, system.to_json())
        listen = [arg for host, port in RESOLVER_LISTEN for arg in ("--listen", ep(host, port))]
        argv = [sys.executable, "-m", "netsim.runtime.resolver", "--state-dir", str(self.dns_state_dir), *listen]
        procs.append(self.spawn("mac", argv, name="resolver-mac"))
        iperf = self.spawn("inet", ["iperf3", "-s", "--forceflush"], name="iperf3")
        for proc in procs:
            proc.wait_output_sync(r"^READY$", timeout=20.0)
        deadline = time.monotonic() + 10.0
        while not listening(iperf.pid, 5201, "tcp"):
            if iperf.returncode is not None:
                raise LabError(f"iperf3 -s exited with {iperf.returncode}: {iperf.stderr()[-500:]}")
            if time.monotonic() > deadline:
                raise LabError("iperf3 -s did not listen on port 5201 within 10 s")
            time.sleep(0.005)

    def stop(self) -> None:
        """Tear everything down (blocking, idempotent): captures flushed, processes stopped, namespaces deleted."""
        with self._lifecycle:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if not self._up:
            return
        self._tearing_down = True  # a stop signal from now on must not interrupt the teardown itself
        try:
            self._teardown()
        finally:
            self._tearing_down = False

    def _teardown(self) -> None:
        log.info("lab %s: tearing down", self.run_id)
        errors: list[str] = []
        # Captures first, while every device they watch still exists: tcpdump drains, closes the file and
        # reports its drop counts (a TUN closed under it makes it exit with an error instead).
        for name in list(self.captures):
            try:
                self.stop_capture(name)
            except Exception as exc:
                errors.append(f"capture {name}: {exc}")
        for closer in reversed(self._closeables):
            try:
                closer()
            except Exception as exc:
                errors.append(f"close: {exc}")
        self._closeables.clear()
        for proc in self.processes:
            proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.stop_sync(grace=3.0)
            except Exception as exc:
                errors.append(f"process {proc.name}: {exc}")
        if self.run_id and self._record is not None:  # only a run this lab claimed (issue 13: a refused
            # `lab up --run ID` of a live lab removed that lab's namespaces and run file)
            infos = [p.info() for p in self.processes] + list(self._adopted.values())  # leftovers only
            try:
                remove_run(self.run_id, [self.netns(r) for r in self.roles], infos)
            except Exception as exc:
                errors.append(f"remove: {exc}")
        self.processes.clear()
        self._adopted.clear()
        self.captures.clear()
        self._record = None
        self._up = False
        if errors:
            log.warning("lab %s: teardown incomplete: %s", self.run_id, "; ".join(errors))
            raise LabError("lab teardown incomplete (run `netsim clean`): " + "; ".join(errors))
        log.info("lab %s: down", self.run_id)

    # ------------------------------------------------------------------ processes
    def spawn(
        self, role: str, argv: Sequence[str], *, name: str | None = None, env: Mapping[str, str] | None = None
    ) -> LabProcess:
        """Start ``argv`` in ``role``'s namespace; tracked, recorded in the run file and stopped at teardown.

        ``env`` entries are added to this process's environment. Output goes to ``proc.stdout()``/``stderr()``.
        """
        self._require_up()
        if self._record is None:
            raise LabError("lab has no run record")
        with self._lock:
            self._counter += 1
            label = name or f"{role}-{Path(argv[0]).name}"
            if any(p.name == label for p in self.processes):
                label = f"{label}-{self._counter}"  # keep log file names unique
        proc = LabProcess(label, role, self.netns(role), argv, self._record.log_dir, env=env)
        with self._lock:
            self.processes.append(proc)
        self._save_record()
        return proc

    def spawn_python(self, role: str, target: Callable[..., object] | str, *args: str) -> LabProcess:
        """Run a module-level Python function (or ``"pkg.mod:func"``) with string ``args`` in ``role``.

        The callable is imported by name in a fresh interpreter, so it must be importable (not a lambda/closure).
        """
        if callable(target):
            module, qualname = target.__module__, target.__qualname__
            if "<" in qualname or module == "__main__":
                raise LabError(f"{target!r} is not importable by name; pass a module-level function")
            spec = f"{module}:{qualname}"
        else:
            spec = target
        # Same sys.path as this interpreter, so whatever imported the target here imports it there too.
        path = os.pathsep.join(p for p in sys.path if p)
        return self.spawn(role, [sys.executable, "-m", "netsim.lab.runner", spec, *args], env={"PYTHONPATH": path})

    async def run(
        self,
        role: str,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command to completion in ``role`` and capture stdout/stderr (killed on timeout/cancel).

        Raises `LabError` on timeout, or on a non-zero exit when ``check`` (the message includes stderr).
        """
        self._require_up()
        with trio.move_on_after(timeout) as scope:
            result = await trio.run_process(
                netns_exec_argv(self.netns(role), argv),
                stdin=input if input is not None else subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        if scope.cancelled_caught:
            raise LabError(f"{role}: {' '.join(argv)} timed out after {timeout} s")
        if check and result.returncode != 0:
            raise LabError(
                f"{role}: {' '.join(argv)} exited with {result.returncode}: "
                f"{result.stderr.decode(errors='replace')[-2000:]}"
            )
        return result

    def run_sync(
        self, role: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Blocking `run`."""
        self._require_up()
        try:
            result = subprocess.run(
                netns_exec_argv(self.netns(role), argv), capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{role}: {' '.join(argv)} timed out after {timeout} s") from exc
        if check and result.returncode != 0:
            raise LabError(
                f"{role}: {' '.join(argv)} exited with {result.returncode}: "
                f"{result.stderr.decode(errors='replace')[-2000:]}"
            )
        return result

    # ------------------------------------------------------------------ in-process namespace access
    def in_netns(self, role: str, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in a thread inside ``role``'s namespace (sockets it creates stay there)."""
        return run_in_netns(self.netns(role), fn)

    async def in_netns_async(self, role: str, fn: Callable[[], T]) -> T:
        """Async `in_netns`."""
        return await run_in_netns_async(self.netns(role), fn)

    def socket(
        self, role: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
    ) -> socket.socket:
        """A socket living in ``role``'s namespace. Note: in-process name resolution uses the *root*
        /etc/resolv.conf; use addresses (``lab.addr``) or query ``lab.addr.dns_v4`` explicitly."""
        return run_in_netns(self.netns(role), lambda: socket.socket(family, type, proto))

    def open_tun(self, role: str = "mac", name: str = "utun%d", **kwargs: Any) -> TunDevice:
        """Create a `netsim.transports.tun.TunDevice` in ``role``; closed at teardown. With ``pcap_dir``, a
        capture named ``<role>-<ifname>`` starts on it."""
        from netsim.transports.tun import TunDevice

        self._require_up()
        dev = TunDevice.create(self.netns(role), name, **kwargs)
        self._closeables.append(dev.close)
        if self.pcap_dir is not None:
            self.capture(role, dev.name)
        return dev

    def resolv_conf(self, role: str) -> str:
        """The /etc/resolv.conf programs in ``role`` see (``/etc/netns/<ns>/resolv.conf``, bind-mounted by
        ``ip netns exec``): the home router's resolver for ``mac``, ``lan`` and ``isp`` itself, the internet's
        (``dns.lab.test``) for ``inet`` and ``vpn``. Never the host's. With services on, ``mac``'s names the
        Mac's own resolver at 127.0.0.53 instead, which forwards to the router's or the tunnel's (docs/dns.md)."""
        a = self.addr
        self.netns(role)  # validates the role
        if role == "mac" and self.services:
            # the Mac's own resolver (netsim.runtime.resolver), which picks the tunnel's or the router's servers
            nameservers = f"nameserver {RESOLVER_LISTEN[0][0]}\n"
        else:
            servers = (a.isp_lan_v4, a.isp_lan_v6) if role in ("mac", "lan", "isp") else (a.dns_v4, a.dns_v6)
            nameservers = f"nameserver {servers[0]}\nnameserver {servers[1]}\n"
        return (
            f"# written by netsim lab {self.run_id}\nsearch {self.domain}\n{nameservers}options timeout:1 attempts:2\n"
        )

    # ------------------------------------------------------------------ netlink (pyroute2, never the ip CLI)
    def add_address(self, role: str, address: str, dev: str) -> None:
        """Add ``address`` (``addr/prefixlen``; bare: a host address) to ``dev`` in ``role`` (pyroute2)."""
        self._require_up()
        netlink.add_address(self.netns(role), address, dev)

    def add_route(self, role: str, dst: str, *, dev: str | None = None, via: str | None = None) -> None:
        """Add a route to ``dst`` in ``role``, out of ``dev`` and/or through gateway ``via`` (pyroute2)."""
        self._require_up()
        netlink.add_route(self.netns(role), dst, ifname=dev, gateway=via)

    def del_route(self, role: str, dst: str, *, missing_ok: bool = False) -> bool:
        """Delete the route to ``dst`` in ``role``; False if absent and ``missing_ok`` (pyroute2)."""
        self._require_up()
        return netlink.del_route(self.netns(role), dst, missing_ok=missing_ok)

    def set_link(
        self, role: str, dev: str, *, up: bool | None = None, mtu: int | None = None, txqueuelen: int | None = None
    ) -> None:
        """Set ``dev``'s MTU, queue length and/or state in ``role`` (pyroute2)."""
        self._require_up()
        netlink.set_link(self.netns(role), dev, up=up, mtu=mtu, txqueuelen=txqueuelen)

    def links(self, role: str, kind: str | None = None) -> list[str]:
        """Interface names in ``role``, optionally only those of netlink kind ``kind`` (``"tun"``, ``"veth"``)."""
        self._require_up()
        return netlink.link_names(self.netns(role), kind)

    def nft(self, role: str, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -`` syntax) in ``role``'s namespace."""
        run_netns_command(self.netns(role), ["nft", "-f", "-"], stdin=ruleset)

    # ------------------------------------------------------------------ capture
    def capture(
        self,
        role: str,
        ifname: str,
        *,
        name: str | None = None,
        path: Path | None = None,
        wait: bool = True,
        buffer_kib: int | None = None,
        snaplen: int | None = None,
    ) -> Capture:
        """Start tcpdump on ``role``/``ifname`` writing ``path`` (default ``<pcap_dir>/<role>-<ifname>.pcap``);
        returns once the capture is active. Stopped and flushed at teardown (or call `stop_capture`).

        ``buffer_kib`` (``tcpdump -B``) and ``snaplen`` (``-s``) default to the lab's ``capture_buffer_kib``
        and ``capture_snaplen``. Whether the file is complete is known at stop (`stop_capture`).
        """
        self._require_up()
        label = name or f"{role}-{ifname}"
        if path is None:
            if self.pcap_dir is None:
                raise LabError("capture() needs path= when the lab has no pcap_dir")
            path = self.pcap_dir / f"{label}.pcap"
        if shutil.which("tcpdump") is None:
            raise MissingDependency("tcpdump")
        buffer_kib = self.capture_buffer_kib if buffer_kib is None else buffer_kib
        snaplen = self.capture_snaplen if snaplen is None else snaplen
        argv = Capture.argv(ifname, path, buffer_kib=buffer_kib, snaplen=snaplen)
        proc = self.spawn(role, argv, name=f"tcpdump-{label}")
        try:
            os.setpriority(os.PRIO_PROCESS, proc.pid, CAPTURE_NICE)
        except OSError as exc:  # not root, or it already exited: the capture runs, at the default priority
            log.debug("capture %s: cannot raise tcpdump's priority: %s", label, exc)
        cap = Capture(label, role, ifname, path, proc, buffer_kib=buffer_kib, snaplen=snaplen)
        self.captures[label] = cap
        if wait:
            cap.wait_ready_sync()
        return cap

    def stop_capture(self, name: str) -> CaptureStats:
        """Stop the capture ``name``, record its stats in `capture_history` and return them.

        A capture with drops (or whose tcpdump died before reporting) is logged at WARNING. With a pcap_dir,
        ``<pcap_dir>/captures.json`` is rewritten with the whole history (what ``netsim lab down`` prints).
        """
        cap = self.captures.pop(name, None)
        if cap is None:
            raise LabError(f"no running capture {name!r}; running: {', '.join(self.captures) or 'none'}")
        stats = cap.stop_sync()
        self.capture_history.append(stats)
        if not stats.complete:
            log.warning(
                "capture %s is not complete: %s (buffer %d KiB, snaplen %d)",
                stats.name,
                stats.status,
                stats.buffer_kib,
                stats.snaplen,
                extra={"capture": stats.name, "path": str(stats.path), "dropped": stats.dropped},
            )
        if self.pcap_dir is not None:
            write_capture_summary(self.pcap_dir, self.run_id, self.capture_history)
        return stats

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """A snapshot for ``netsim lab status`` and debugging."""
        return {
            "run_id": self.run_id,
            "namespaces": [self.netns(r) for r in self.roles],
            "addresses": self.addr.table(second_uplink=self.second_uplink),
            "processes": [(p.name, p.role, p.pid, p.returncode) for p in self.processes],
            "captures": {n: str(c.path) for n, c in self.captures.items()},
        }

    def _require_up(self) -> None:
        if not self._up:
            raise LabError("the lab is not up; use `async with Lab() as lab:`")
