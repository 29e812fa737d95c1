"""The whole tunnel in the lab, in one call: wireguard-go server, helper, provider, connected.

``async with netsim_tunnel(lab) as t:`` generates keys and a wg-quick config, starts wireguard-go in ``vpn``
(forwarding and NAT to ``inet`` for IPv4 and IPv6 inner traffic), starts the helper process in ``mac`` and the
provider host (`HelperForwardingProvider`) through the app-side `TunnelProviderManager`, and returns once the
session is CONNECTED. Everything it started is stopped at exit, by pid, in reverse order.

Any provider runs here (docs/lab.md, "Your own provider"): ``provider=`` takes a class or a ``"module:Class"``
spec, ``provider_configuration=`` is Apple's ``providerConfiguration`` (merged with netsim's ``helper_socket``
and friends; a clashing key is an error), and `netsim.testing.memory_tunnel.memory_tunnel` takes the same
arguments, so one scenario runs with root and without. Every input is validated (`netsim.runtime.tunnelspec`)
before anything starts, and a second tunnel in the same lab is refused before it touches the first's state (the
ownership rule of `netsim.runtime.netconfig`). The helper's statistics come from its read-only observer socket
(``--stats-socket``), so they do not depend on the provider.

The data path it builds (see docs/helper.md)::

    mac: app -> utun -> provider --UDS--> helper --UDP/en0--> isp (NAT) --> inet --> vpn: wireguard-go wg0
                                                                                     -> NAT -> inet services

Tunnel addressing (fixed, documented): client 10.66.0.2/32 and fd00:66::2/128, server 10.66.0.1/24 and
fd00:66::1/64; DNS is the lab's internet resolver (203.0.113.53, 2001:db8:113::53) reached through the tunnel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from ipaddress import ip_interface, ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from netsim.apple.enums import VPNStatus
from netsim.apple.protocol import TunnelProviderProtocol
from netsim.core import ipc
from netsim.core.policy import parse_policy
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig, render_wg_quick
from netsim.core.wireguard.keys import PrivateKey
from netsim.errors import ConfigError, LabError
from netsim.lab.cleanup import RUN_DIR, helper_dir, tunnel_dir_prefix
from netsim.lab.pcap import CaptureStats
from netsim.lab.wireguard import WireGuardGo
from netsim.runtime.channel import connect_ipc_unix
from netsim.runtime.clock import MAX_JUMP, write_slept
from netsim.runtime.controller import SubprocessLauncher, TunnelProviderManager, TunnelProviderSession
from netsim.runtime.forwarding import HelperForwardingProvider
from netsim.runtime.netconfig import tunnel_owner
from netsim.runtime.provider import PacketTunnelProvider
from netsim.runtime.tunnelspec import TunnelInputs, resolve_inputs, resolve_protocol_fields
from netsim.transports.uds import new_token, read_token_file, write_token_file

if TYPE_CHECKING:
    from netsim.lab.lab import Lab
    from netsim.lab.process import LabProcess

__all__ = [
    "MAX_LAB_SLEEP",
    "STANDARD_PROBES",
    "LabTunnel",
    "ProbeResult",
    "TunnelPlan",
    "fetch_helper_stats",
    "netsim_tunnel",
    "udp_echo_argv",
    "vpn_nat_ruleset",
]

_HELPER_READY = r"^READY "
#: The longest `LabTunnel.sleep` (real seconds frozen); a longer sleep is a clock jump.
MAX_LAB_SLEEP = 30.0
log = logging.getLogger("netsim.lab.tunnel")


@dataclass(frozen=True)
class TunnelPlan:
    """Addresses and parameters of the lab tunnel (defaults are what docs/helper.md documents)."""

    client_v4: str = "10.66.0.2"
    client_v6: str = "fd00:66::2"
    server_v4: str = "10.66.0.1"
    server_v6: str = "fd00:66::1"
    port: int = 51820
    mtu: int = 1420
    keepalive: int | None = 25
    allowed_ips: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    dns_search: tuple[str, ...] = ("lab.test",)
    #: False: an IPv4-only tunnel (no v6 address, no v6 allowed IPs, v4 DNS only), as a provider whose
    #: settings have no ``ipv6_settings`` (reliability row K4: what happens to the Mac's IPv6 traffic then)
    ipv6: bool = True
    #: True: the helper reaches the server over IPv6 (``[2001:db8:2::2]:port``, outer packets 80 bytes over the
    #: inner ones instead of 60), e.g. for what a smaller path MTU does to an IPv6 path (docs/faults.md)
    outer_v6: bool = False

    def tunnel_allowed_ips(self) -> tuple[str, ...]:
        """``allowed_ips`` without the IPv6 prefixes when ``ipv6`` is False."""
        return self.allowed_ips if self.ipv6 else tuple(n for n in self.allowed_ips if ":" not in n)


def vpn_nat_ruleset(wan: str = "wan") -> str:
    """nftables NAT for the VPN server: tunnel clients leave ``wan`` with the server's address (v4 and v6)."""
    # One "inet" table masquerades both families (NAT44 for 10.66.0.0/24, NAT66 for the fd00:66::/64 ULA).
    return (
        "table inet netsim_vpn_nat {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{wan}" masquerade\n'
        "  }\n"
        "}\n"
    )


_UDP_ECHO = (
    "import socket, sys; a = sys.argv[1]; p = int(sys.argv[2]) if len(sys.argv) > 2 else 7; "
    "s = socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET, socket.SOCK_DGRAM); "
    "s.settimeout(2); s.sendto(b'netsim-probe', (a, p)); print(s.recv(64).decode())"
)


def udp_echo_argv(host: str, port: int = 7) -> tuple[str, ...]:
    """A bounded UDP echo probe (one datagram, 2 s timeout) run in ``mac``: exits 0 when the echo comes back."""
    return (sys.executable, "-c", _UDP_ECHO, host, str(port))


#: The probes of the issue's end-to-end scenario, as ``(label, argv)`` run in ``mac`` (names resolve through the
#: tunnel's DNS server). iperf3 runs for one second: bounded.
STANDARD_PROBES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("http v4 (curl www.lab.test)", ("curl", "-4", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "http://www.lab.test/")),
    ("http v6 (curl www.lab.test)", ("curl", "-6", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "http://www.lab.test/")),
    ("dns (dig www.lab.test)", ("dig", "+short", "+time=2", "+tries=2", "www.lab.test")),
    ("ping v4", ("ping", "-c", "3", "-i", "0.2", "-W", "2", "-q", "203.0.113.10")),
    ("ping v6", ("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-q", "2001:db8:113::10")),
    ("udp echo v4", udp_echo_argv("203.0.113.10")),
    ("udp echo v6", udp_echo_argv("2001:db8:113::10")),
    ("iperf3 v4 1 s", ("iperf3", "-4", "-c", "203.0.113.10", "-t", "1", "-f", "m")),
)  # fmt: skip


@dataclass(frozen=True)
class ProbeResult:
    """One probe run by `LabTunnel.run_probe`.

    Attributes:
        path: where the probe's packets went, from the ledgers' deltas over the probe: ``"direct"`` when the
            provider read nothing (a connected network or an excluded route: the kernel sent it out of en0),
            ``"bypass"`` when the helper sent at least as many of them out of en0 through its NAT as through
            WireGuard, ``"dropped"`` when the helper dropped them by policy and sent nothing, else
            ``"tunnel"``. Other traffic in the same window (e.g. IPv6 router solicitations) counts too.
        tunnelled: packets the provider read from the utun meanwhile.
        bypassed: packets the helper sent through its NAT bypass meanwhile.
        policy_dropped: packets the helper dropped by a DROP rule meanwhile.
        unavailable: what the result could not use, e.g. ``("provider ledger",)`` for a provider whose
            ``b"stats"`` answer has no netsim ledger: ``tunnelled`` then counts the packets the helper received
            from the provider (its ``ipc_in`` stage), so a probe the kernel sent directly still reads ``"direct"``.
    """

    label: str
    argv: tuple[str, ...]
    returncode: int
    seconds: float
    path: str
    tunnelled: int
    output: str
    bypassed: int = 0
    policy_dropped: int = 0
    unavailable: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _tun_reads(provider: dict[str, Any], helper: dict[str, Any]) -> int:
    """Packets the provider read from the utun, or (no provider ledger) the packets the helper got from it."""
    reads = provider.get("ledger", {}).get("stages", {}).get("tun_read", {}).get("read")
    if isinstance(reads, int):
        return reads
    return int(helper.get("ledger", {}).get("stages", {}).get("ipc_in", {}).get("read", 0))


def _probe_counters(provider: dict[str, Any], helper: dict[str, Any]) -> tuple[int, int, int, int]:
    """(provider utun reads, helper bypass sends, helper WireGuard encryptions, helper policy drops)."""
    stages = helper.get("ledger", {}).get("stages", {})
    policy_drops = sum(
        n for reason, n in stages.get("ipc_in", {}).get("dropped", {}).items() if reason.startswith("policy_drop:")
    )
    return (
        _tun_reads(provider, helper),
        stages.get("bypass", {}).get("forwarded", 0),
        stages.get("wg_encrypt", {}).get("read", 0),
        policy_drops,
    )


async def fetch_helper_stats(
    socket_path: str | os.PathLike[str], *, token_file: str | os.PathLike[str] | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """The helper's statistics (`HelperStatistics.to_json`) from its read-only observer socket.

    ``netsim helper --stats-socket PATH`` admits observers like providers (SO_PEERCRED, the per-tunnel token) but
    answers only STATS_REQUEST and PING (docs/ipc.md, Observers), so this works whatever provider holds the
    provider slot, and never takes it.

    Raises:
        TunnelDown: the helper did not answer within ``timeout`` seconds.
    """
    from netsim.errors import TunnelDown

    token = read_token_file(token_file) if token_file is not None else None
    conn = ipc.Connection(ipc.Role.PROVIDER, capabilities=ipc.Capability.STATS | ipc.Capability.PING, token=token)
    with trio.move_on_after(timeout):
        async with connect_ipc_unix(socket_path, connection=conn, retry_for=timeout, handshake_timeout=timeout) as ch:
            await ch.send(ipc.StatsRequest(1))
            while True:
                ev = await ch.receive_event()
                if isinstance(ev, ipc.StatsResponse) and ev.request_id == 1:
                    await ch.aclose(ipc.Goodbye(ipc.GoodbyeReason.NORMAL))
                    return dict(ev.stats)
                if isinstance(ev, ipc.Ping):
                    await ch.send(ipc.Pong(ev.nonce))
                elif isinstance(ev, ipc.Error | ipc.ConnectionClosed | ipc.Goodbye):
                    raise TunnelDown(f"the helper's observer socket {socket_path} closed: {ev!r}")
    raise TunnelDown(f"the helper's observer socket {socket_path} did not answer within {timeout:g} s")


@dataclass
class LabTunnel:
    """A running lab tunnel (from `netsim_tunnel`). Methods drive faults and read both sides' counters.

    The attributes both backends share (`netsim.testing.memory_tunnel.MemoryTunnel` has the same):

    Attributes:
        session: the app side's `TunnelProviderSession` (NETunnelProviderSession): ``status``,
            ``wait_status``, ``stop_vpn_tunnel``, ``send_provider_message``, ``last_disconnect_error``.
        provider_configuration: the ``providerConfiguration`` the provider got (the user's keys plus netsim's).
        provider_spec: the provider class or ``"module:Class"`` spec that runs.
    """

    lab: Lab
    plan: TunnelPlan
    server: WireGuardGo
    session: TunnelProviderSession
    client_key: PrivateKey
    config_path: Path
    socket_path: Path
    helper_argv: list[str]
    helper: LabProcess
    token_path: Path | None = None
    helpers: list[LabProcess] = field(default_factory=list)
    stats_socket: Path | None = None
    provider_configuration: dict[str, Any] = field(default_factory=dict)
    provider_spec: type[PacketTunnelProvider] | str = HelperForwardingProvider
    launcher: SubprocessLauncher | None = None
    manager: TunnelProviderManager | None = None
    #: the helper's ``--clock-file`` (`netsim.runtime.clock`): the total seconds the simulated Mac slept
    clock_file: Path | None = None
    #: total clock jump applied by `wake` so far
    slept: float = 0.0
    #: True between `sleep` and `wake`: the tunnel's processes are frozen
    frozen: bool = False
    _pending_jump: float = 0.0

    @property
    def provider_pid(self) -> int | None:
        """The pid of the running provider host process (the extension), or None if it has exited.

        ``ip netns exec`` execs the host, so this is the Python process that runs your provider.
        """
        if self.launcher is None or not self.launcher.processes:
            return None
        child = self.launcher.processes[-1]
        return child.pid if child.returncode is None else None

    def signal_provider(self, sig: int) -> None:
        """Send ``sig`` to the running provider host process (by its pidfd; a no-op once it has exited).

        For fault tests: ``SIGSTOP`` freezes the extension as a debugger or a hung extension would, ``SIGCONT``
        resumes it, ``SIGKILL`` crashes it (the session goes DISCONNECTED with the host's exit status; the
        system's watchdog also kills a host stuck in CONNECTING or DISCONNECTING).
        """
        if self.launcher is None or not self.launcher.processes:
            raise LabError("this tunnel has no provider host process")
        self.launcher.processes[-1].send_signal(sig)

    @property
    def pcaps(self) -> dict[str, Path]:
        """Capture files by name when the lab has a pcap_dir: the lab's ``mac-en0``, ``isp-wan``, ``vpn-wan``,
        and the tunnel's ``vpn-wg`` (wireguard-go's TUN: inner packets at the server) and ``mac-utun0`` (the
        provider's utun: inner packets as apps send them). Running and stopped captures alike; whether each
        file is complete is in `capture_stats` once it is stopped."""
        files = {s.name: s.path for s in self.lab.capture_history}
        files.update((name, cap.path) for name, cap in self.lab.captures.items())
        return files

    @property
    def capture_stats(self) -> dict[str, CaptureStats]:
        """`CaptureStats` by name for every capture stopped so far (the tunnel's own when it closes, all of them
        at lab teardown): ``stats.complete``, ``stats.dropped``, ``stats.status`` (``PARTIAL: N dropped``)."""
        return {s.name: s for s in self.lab.capture_history}

    async def send_provider_message(self, data: bytes) -> bytes | None:
        """Send an app message to the provider (``sendProviderMessage``); its ``handle_app_message`` answer."""
        return await self.session.send_provider_message(data)

    async def provider_stats(self) -> dict[str, Any]:
        """The provider's answer to the app message ``b"stats"`` as a JSON object.

        The built-in provider answers with `ForwardingStatistics.to_json` plus flow counters; a provider that
        does not answer ``b"stats"`` (None, or not a JSON object) gives ``{}``.
        """
        return _json_object(await self.session.send_provider_message(b"stats"))

    async def helper_stats(self) -> dict[str, Any]:
        """The helper's own statistics (`HelperStatistics.to_json`), whatever the provider: read from the helper's
        observer socket (`fetch_helper_stats`), not through the provider."""
        if self.stats_socket is None:
            raise LabError("this tunnel's helper has no observer socket (it was not started by netsim_tunnel)")
        return await fetch_helper_stats(self.stats_socket, token_file=self.token_path)

    def another_manager(
        self, provider: type[PacketTunnelProvider] | str | None = None, **configuration: Any
    ) -> TunnelProviderManager:
        """A `TunnelProviderManager` for a second provider in this tunnel's ``mac`` with the same configuration
        (``configuration`` keywords override its keys, e.g. ``connect_timeout=5.0``).

        netsim allows one tunnel per namespace: its start is refused (the helper answers BUSY, its settings are
        refused by the ownership claim) and the running tunnel's state is left alone (docs/lab.md).
        """
        return TunnelProviderManager(
            provider or self.provider_spec,
            SubprocessLauncher(self.lab.netns("mac")),
            TunnelProviderProtocol(
                server_address=str(self.lab.addr.vpn_wan_v4),
                provider_configuration={**self.provider_configuration, **configuration},
            ),
            start_timeout=15.0,
            stop_timeout=10.0,
        )

    async def kill_helper(self) -> int:
        """SIGKILL the helper process (by its pid) and reap it; returns its exit status."""
        self.helper.send_signal(signal.SIGKILL)
        return await self.helper.wait(10.0)

    async def stop_helper(self) -> int:
        """SIGTERM the helper and wait for it (it logs its final statistics)."""
        return await self.helper.stop(grace=5.0)

    async def start_helper(self) -> None:
        """Start a new helper process with the same config and socket; returns once it accepts providers."""
        if self.helper.returncode is None:
            raise LabError(f"the helper (pid {self.helper.pid}) is still running; kill or stop it first")
        self.helper = _spawn_helper(self.lab, self.helper_argv)
        self.helpers.append(self.helper)
        await self.helper.wait_output(_HELPER_READY, timeout=20.0)

    async def restart_helper(self) -> None:
        """Kill the helper and start a fresh one (new process, new WireGuard session)."""
        await self.kill_helper()
        await self.start_helper()

    async def restart_server(self) -> None:
        """Restart wireguard-go with the same key and peers but no session state (a server reboot)."""
        await self.server.restart()

    async def wait_connected(self, *, after_connects: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the provider is connected to a helper (more than ``after_connects`` times) and not
        reasserting; returns its statistics."""
        delay = 0.02
        with trio.move_on_after(timeout):
            while True:
                stats = await self.provider_stats()
                if "connects" in stats:
                    if stats["connects"] > after_connects and not stats["reasserting"]:
                        return stats
                else:  # not the built-in provider: the helper's sessions say it (re)connected
                    helper = await self.helper_stats()
                    if helper.get("sessions", 0) > after_connects and helper.get("connected"):
                        return stats
                await trio.sleep(delay)
                delay = min(delay * 2, 0.25)
        raise LabError(
            f"the provider did not reconnect within {timeout} s; helper log:\n{self.helper.stderr()[-3000:]}"
        )

    async def run_probe(self, label: str, argv: tuple[str, ...] | list[str], *, timeout: float = 30.0) -> ProbeResult:
        """Run ``argv`` in ``mac`` and report its result and path (see `ProbeResult.path`), read from the
        provider's and the helper's ledgers before and after."""
        await self.wait_quiet()
        provider = await self.provider_stats()
        unavailable = () if isinstance(provider.get("ledger"), dict) else ("provider ledger",)
        before = _probe_counters(provider, await self.helper_stats())
        start = trio.current_time()
        r = await self.lab.run("mac", list(argv), check=False, timeout=timeout)
        seconds = trio.current_time() - start
        after = _probe_counters(await self.provider_stats(), await self.helper_stats())
        read, bypassed, encrypted, dropped = (a - b for a, b in zip(after, before, strict=True))
        if read == 0:
            path = "direct"
        elif bypassed > 0 and bypassed >= encrypted:
            path = "bypass"
        elif dropped > 0 and bypassed == 0 and encrypted == 0:
            path = "dropped"
        else:
            path = "tunnel"
        text = (r.stdout or r.stderr).decode(errors="replace").strip()
        return ProbeResult(
            label=label,
            argv=tuple(argv),
            returncode=r.returncode,
            seconds=seconds,
            path=path,
            tunnelled=read,
            output=text.splitlines()[-1] if text else "",
            bypassed=bypassed,
            policy_dropped=dropped,
            unavailable=unavailable,
        )

    async def wait_quiet(self, *, interval: float = 0.1, timeout: float = 3.0) -> bool:
        """Wait until the provider read nothing from the utun for ``interval`` seconds (e.g. the last FIN/ACKs
        of an earlier probe's connections), so a probe's ledger deltas are its own. Returns False on timeout."""
        with trio.move_on_after(timeout):
            last = await self._reads()
            while True:
                await trio.sleep(interval)
                now = await self._reads()
                if now == last:
                    return True
                last = now
        return False

    async def _reads(self) -> int:
        provider = await self.provider_stats()
        return _tun_reads(provider, {} if "ledger" in provider else await self.helper_stats())

    def logs(self) -> str:
        """Helper stderr (JSON lines) and wireguard-go output, for failure messages."""
        parts = [f"--- helper pid {p.pid} ---\n{p.stderr()[-4000:]}" for p in self.helpers]
        return "\n".join([*parts, self.server.logs()])

    # ---- sleep/wake (docs/faults.md, "Sleep and wake") ----
    def _tunnel_processes(self) -> list[Any]:
        """The running helper and provider host: the simulated Mac's tunnel processes."""
        procs: list[Any] = [self.helper] if self.helper.returncode is None else []
        if self.launcher is not None and self.launcher.processes and self.launcher.processes[-1].returncode is None:
            procs.append(self.launcher.processes[-1])
        return procs

    async def sleep(self, seconds: float | None = None, *, clock_jump: float = 0.0) -> None:
        """Put the simulated Mac to sleep: Apple's sleep callbacks, then freeze its tunnel processes.

        The session's `TunnelProviderSession.simulate_sleep` runs first (the provider's ``sleep``, or with
        ``disconnect_on_sleep`` the tunnel stops with reason SLEEP), then the helper and the provider host are
        SIGSTOPped (by pidfd). `wake` continues them and jumps the helper's WireGuard clock ``clock_jump`` seconds
        forward, as a Mac's key ages move on across sleep (past 180 s the session must handshake again). With
        ``seconds`` (at most `MAX_LAB_SLEEP`) this waits that long and wakes; without, the Mac sleeps until `wake`.
        While asleep the provider is frozen: app messages to it (``provider_stats``) wait until `wake`.

        Raises:
            LabError: already asleep, or ``seconds`` / ``clock_jump`` out of range.
        """
        if self.frozen:
            raise LabError("the simulated Mac is already asleep; wake() it first")
        if seconds is not None and not 0 <= seconds <= MAX_LAB_SLEEP:
            raise LabError(f"a lab sleep lasts 0-{MAX_LAB_SLEEP:g} s (use clock_jump for longer), got {seconds}")
        if clock_jump and (self.clock_file is None or not 0 < clock_jump <= MAX_JUMP):
            raise LabError(f"clock_jump must be in (0, {MAX_JUMP:g}] s and needs a helper started with a clock file")
        await self.session.simulate_sleep()
        for proc in self._tunnel_processes():
            proc.send_signal(signal.SIGSTOP)
        self.frozen = True
        self._pending_jump = clock_jump
        if seconds is not None:
            await trio.sleep(seconds)
            await self.wake()

    async def wake(self) -> None:
        """Wake the simulated Mac: jump the helper's clock (the ``clock_jump`` given to `sleep`), SIGCONT the
        helper, then the provider host, then the provider's ``wake()`` (a tunnel that sleep stopped stays
        DISCONNECTED, as on a Mac without on-demand rules). A no-op when not asleep."""
        if not self.frozen:
            return
        if self._pending_jump and self.clock_file is not None:
            self.slept += self._pending_jump
            write_slept(self.clock_file, self.slept)  # read by the helper on the SIGCONT below
        self._pending_jump = 0.0
        for proc in self._tunnel_processes():
            proc.send_signal(signal.SIGCONT)
        self.frozen = False
        await self.session.simulate_wake()


def _json_object(reply: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(reply or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _spawn_helper(lab: Lab, argv: list[str]) -> LabProcess:
    path = os.pathsep.join(p for p in sys.path if p)
    return lab.spawn("mac", argv, name="helper", env={"PYTHONPATH": path})


def client_config(lab: Lab, plan: TunnelPlan, client_key: PrivateKey, server_key: PrivateKey) -> TunnelConfig:
    """The helper's wg-quick config for ``plan`` (DNS: the lab's internet resolvers, through the tunnel)."""
    v6 = plan.ipv6
    iface = InterfaceConfig(
        private_key=client_key,
        addresses=(ip_interface(f"{plan.client_v4}/32"),) + ((ip_interface(f"{plan.client_v6}/128"),) if v6 else ()),
        dns_servers=(lab.addr.dns_v4, lab.addr.dns_v6) if v6 else (lab.addr.dns_v4,),
        dns_search=plan.dns_search,
        mtu=plan.mtu,
    )
    peer = PeerConfig(
        public_key=server_key.public_key(),
        endpoint=Endpoint(str(lab.addr.vpn_wan_v6 if plan.outer_v6 else lab.addr.vpn_wan_v4), plan.port),
        allowed_ips=tuple(ip_network(n) for n in plan.tunnel_allowed_ips()),
        persistent_keepalive=plan.keepalive,
    )
    return TunnelConfig(iface, (peer,))


def _policy_file(text: str, directory: Path) -> Path:
    """Validated policy text written to ``directory`` for the helper's ``--policy`` (TOML or YAML, as it parsed)."""
    try:
        parse_policy(text, fmt="toml")
        suffix = ".toml"
    except ConfigError:
        suffix = ".yaml"  # resolve_policy already parsed it as one of the two
    path = directory / f"policy{suffix}"
    path.write_text(text)
    return path


#: Lab namespaces (``mac``) with a tunnel started by this process: a second `netsim_tunnel` is refused at once.
_ACTIVE: set[str] = set()


@asynccontextmanager
async def netsim_tunnel(
    lab: Lab,
    *,
    plan: TunnelPlan | None = None,
    provider: type[PacketTunnelProvider] | str = HelperForwardingProvider,
    provider_configuration: Mapping[str, Any] | None = None,
    group_access: bool = False,
    policy: str | os.PathLike[str] | None = None,
    start_timeout: float = 30.0,
    reconnect_for: float = 120.0,
    protocol: Mapping[str, Any] | None = None,
    wait_connected: bool = True,
) -> AsyncIterator[LabTunnel]:
    """Bring up server, helper and provider in ``lab`` and yield the connected `LabTunnel`.

    Args:
        lab: a running `Lab` (with services, for the probes).
        plan: addresses, port, MTU (defaults: `TunnelPlan`).
        provider: the provider class or its ``"package.module:Class"`` / ``"/path/file.py:Class"`` spec (imported
            here first to check it). Its ``providerConfiguration`` has netsim's keys (``helper_socket``,
            ``token_file``, ``connect_timeout``, ``reconnect_for``, ``backoff_max``): a provider that talks to the
            helper reads them as `HelperForwardingProvider` does.
        provider_configuration: the user's part of Apple's ``providerConfiguration`` (JSON-able; a key that
            clashes with netsim's is a `ConfigError`).
        group_access: socket directory 0750 (root group may reach it, SO_PEERCRED still decides).
        policy: the helper's bypass policy (``netsim helper --policy``; docs/policy.md): a path (`os.PathLike`, or
            a `str` naming an existing file or ending in .toml/.yaml/.yml) or TOML/YAML text. Validated here,
            before anything starts.
        start_timeout: seconds for the session to become CONNECTED.
        reconnect_for: seconds the provider keeps reasserting before giving up.
        protocol: NEVPNProtocol fields for the `TunnelProviderProtocol`, by their Python names, e.g.
            ``{"include_all_networks": True, "exclude_local_networks": True}`` (an unknown name, or
            ``server_address`` / ``provider_configuration``, which netsim sets, is a `ConfigError`).
        wait_connected: False yields as soon as ``start_vpn_tunnel`` returned (status CONNECTING, or whatever the
            provider reached): for tests of the bring-up window and of tunnels that never connect.

    Raises:
        ConfigError: a bad provider, provider_configuration, protocol field or policy (nothing was started).
        LabError: a second tunnel in this lab (nothing was started), or a part did not come up (the message
            carries the helper's and wireguard-go's logs).
    """
    inputs = resolve_inputs(provider, provider_configuration, policy)
    protocol_fields = resolve_protocol_fields(protocol)
    mac = lab.netns("mac")
    owner = tunnel_owner(mac)
    if mac in _ACTIVE or owner is not None:
        who = f"pid {owner}" if owner is not None else "this process"
        raise LabError(
            f"{mac} already has a tunnel (owned by {who}); netsim allows one tunnel per namespace. "
            "Leave the running netsim_tunnel first. Nothing was started."
        )
    _ACTIVE.add(mac)
    try:
        async with _netsim_tunnel(
            lab,
            inputs,
            plan or TunnelPlan(),
            group_access=group_access,
            start_timeout=start_timeout,
            reconnect_for=reconnect_for,
            protocol_fields=protocol_fields,
            wait_connected=wait_connected,
        ) as t:
            yield t
    finally:
        _ACTIVE.discard(mac)


async def _stop_captures(lab: Lab, names: list[str]) -> None:
    """Stop these captures (those still running) so tcpdump drains and reports before its device goes away."""
    for name in names:
        if name in lab.captures:
            await trio.to_thread.run_sync(lab.stop_capture, name)


@asynccontextmanager
async def _stopping_captures(lab: Lab, names: list[str]) -> AsyncIterator[None]:
    """On exit (before the enclosing session closes the provider's utun), stop the captures named in ``names``."""
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await _stop_captures(lab, names)


@asynccontextmanager
async def _netsim_tunnel(
    lab: Lab,
    inputs: TunnelInputs,
    plan: TunnelPlan,
    *,
    group_access: bool,
    start_timeout: float,
    reconnect_for: float,
    protocol_fields: Mapping[str, Any],
    wait_connected: bool,
) -> AsyncIterator[LabTunnel]:
    server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    lab.nft("vpn", vpn_nat_ruleset())
    server = WireGuardGo.in_lab(
        lab,
        "vpn",
        private_key=server_key,
        listen_port=plan.port,
        addresses=[f"{plan.server_v4}/24", f"{plan.server_v6}/64"],
        mtu=plan.mtu,
    )
    peer_ips = [f"{plan.client_v4}/32"] + ([f"{plan.client_v6}/128"] if plan.ipv6 else [])
    await server.add_peer(client_key.public_key(), allowed_ips=peer_ips)
    # Both directories are named after the run in RUN_DIR (/run: tmpfs on most systems), so
    # `netsim clean` finds them by run id after a SIGKILLed owner (docs/reliability.md R3).
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    conf_dir = Path(tempfile.mkdtemp(prefix=tunnel_dir_prefix(lab.run_id), dir=RUN_DIR))  # 0700: holds the key
    sock_dir = helper_dir(lab.run_id)
    socket_path = sock_dir / "helper.sock"
    stats_socket = sock_dir / "helper-stats.sock"
    helpers: list[LabProcess] = []
    server_captures: list[str] = []
    try:
        if group_access:
            # UnixIpcServer accepts an existing directory with the right owner and mode; creating it here keeps
            # the group bits its own mkdir would lose to the 077 umask it sets.
            sock_dir.mkdir(mode=0o750, exist_ok=True)
            os.chmod(sock_dir, 0o750)
        await server.start()
        log.info("lab %s: wireguard-go up in vpn (pid %s, port %d)", lab.run_id, server.pid, plan.port)
        if lab.pcap_dir is not None:
            await trio.to_thread.run_sync(lambda: lab.capture("vpn", server.ifname, name="vpn-wg"))
            server_captures.append("vpn-wg")
        config_path = conf_dir / "client.conf"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(render_wg_quick(client_config(lab, plan, client_key, server_key)))
        # The per-tunnel IPC secret (docs/ipc.md, Authentication): a 0600 file in the private conf dir, read by
        # both ends; only its path is in argv. Without it any same-uid process could take the provider's slot.
        token_path = conf_dir / "ipc.token"
        write_token_file(token_path, new_token())
        argv = [
            sys.executable, "-m", "netsim.helpercli",
            "--config", str(config_path), "--socket", str(socket_path),
            "--allowed-uid", str(os.geteuid()), "--interface", "en0",
            "--token-file", str(token_path), "--stats-socket", str(stats_socket),
            "--clock-file", str(conf_dir / "clock"),
        ]  # fmt: skip
        if group_access:
            argv.append("--group-access")
        if inputs.policy_path is not None:
            argv += ["--policy", str(inputs.policy_path)]
        elif inputs.policy_text is not None:
            argv += ["--policy", str(_policy_file(inputs.policy_text, conf_dir))]
        helper = _spawn_helper(lab, argv)
        helpers.append(helper)
        await helper.wait_output(_HELPER_READY, timeout=20.0)
        log.info("lab %s: helper ready in mac (pid %s, socket %s)", lab.run_id, helper.pid, socket_path)
        log_path = helper.stderr_path.parent / "provider.log"
        configuration = inputs.provider_configuration(
            {
                "helper_socket": str(socket_path),
                "connect_timeout": min(start_timeout, 20.0),
                "reconnect_for": reconnect_for,
                "backoff_max": 0.5,
                "token_file": str(token_path),
            }
        )
        launcher = SubprocessLauncher(lab.netns("mac"), log_path=log_path)
        manager = TunnelProviderManager(
            inputs.spec,
            launcher,
            TunnelProviderProtocol(
                server_address=str(lab.addr.vpn_wan_v4), provider_configuration=configuration, **protocol_fields
            ),
            start_timeout=start_timeout,
            stop_timeout=10.0,
        )
        utun_captures: list[str] = []
        async with manager.open_session() as session, _stopping_captures(lab, utun_captures):
            log.debug("lab %s: starting provider %s", lab.run_id, inputs.spec)
            await session.start_vpn_tunnel()
            if launcher.processes and launcher.processes[-1].returncode is None:
                # the run file lists the extension too: `netsim lab fault signal provider KILL` crashes it
                lab.adopt("provider", "mac", launcher.processes[-1].pid)
            if wait_connected:
                with trio.move_on_after(start_timeout + 5):
                    await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
            if wait_connected and session.status is not VPNStatus.CONNECTED:
                log.warning("lab %s: the tunnel did not connect (status %s)", lab.run_id, session.status.name)
                provider_log = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
                raise LabError(
                    f"the tunnel did not connect (status {session.status.name}, "
                    f"error {session.last_disconnect_error!r})\n--- provider ---\n{provider_log}\n"
                    f"--- helper ---\n{helper.stderr()[-3000:]}\n{server.logs()}"
                )
            if lab.pcap_dir is not None and session.status is VPNStatus.CONNECTED:
                # mac-utun0: the inner packets as the provider sees them (the utun exists once CONNECTED).
                for ifname in await trio.to_thread.run_sync(lab.links, "mac", "tun"):
                    await trio.to_thread.run_sync(partial(lab.capture, "mac", ifname, name=f"mac-{ifname}"))
                    utun_captures.append(f"mac-{ifname}")
            tunnel = LabTunnel(
                lab=lab,
                plan=plan,
                server=server,
                session=session,
                client_key=client_key,
                config_path=config_path,
                socket_path=socket_path,
                helper_argv=argv,
                helper=helper,
                token_path=token_path,
                helpers=helpers,
                stats_socket=stats_socket,
                provider_configuration=configuration,
                provider_spec=inputs.spec,
                launcher=launcher,
                manager=manager,
                clock_file=conf_dir / "clock",
            )
            log.info("lab %s: tunnel CONNECTED (provider %s)", lab.run_id, inputs.spec)
            try:
                yield tunnel
            finally:
                if tunnel.frozen:  # left asleep: thaw, so the processes can stop in an orderly way
                    for proc in tunnel._tunnel_processes():
                        proc.send_signal(signal.SIGCONT)
    finally:
        log.info("lab %s: stopping the tunnel (helper, wireguard-go)", lab.run_id)
        with trio.CancelScope(shield=True):
            for proc in helpers:
                if proc.returncode is None:
                    await proc.stop(grace=5.0)
            await _stop_captures(lab, server_captures)  # while wireguard-go's TUN still exists
            await server.stop()
            shutil.rmtree(conf_dir, ignore_errors=True)
            shutil.rmtree(sock_dir, ignore_errors=True)
