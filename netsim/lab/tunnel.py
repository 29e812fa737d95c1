"""The whole tunnel in the lab, in one call: wireguard-go server, helper, provider, connected.

``async with netsim_tunnel(lab) as t:`` generates keys and a wg-quick config, starts wireguard-go in ``vpn``
(forwarding and NAT to ``inet`` for IPv4 and IPv6 inner traffic), starts the helper process in ``mac`` and the
provider host (`HelperForwardingProvider`) through the app-side `TunnelProviderManager`, and returns once the
session is CONNECTED. Everything it started is stopped at exit, by pid, in reverse order.

The data path it builds (see docs/helper.md)::

    mac: app -> utun -> provider --UDS--> helper --UDP/en0--> isp (NAT) --> inet --> vpn: wireguard-go wg0
                                                                                     -> NAT -> inet services

Tunnel addressing (fixed, documented): client 10.66.0.2/32 and fd00:66::2/128, server 10.66.0.1/24 and
fd00:66::1/64; DNS is the lab's internet resolver (203.0.113.53, 2001:db8:113::53) reached through the tunnel.
"""

from __future__ import annotations

import json
import os
import secrets
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
from netsim.core.policy import parse_policy
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig, render_wg_quick
from netsim.core.wireguard.keys import PrivateKey
from netsim.errors import ConfigError, LabError
from netsim.lab.cleanup import RUN_DIR, helper_dir, tunnel_dir_prefix
from netsim.lab.wireguard import WireGuardGo
from netsim.runtime.controller import SubprocessLauncher, TunnelProviderManager, TunnelProviderSession
from netsim.runtime.forwarding import HelperForwardingProvider
from netsim.transports.uds import write_token_file

if TYPE_CHECKING:
    from netsim.lab.lab import Lab
    from netsim.lab.process import LabProcess

__all__ = [
    "STANDARD_PROBES",
    "LabTunnel",
    "ProbeResult",
    "TunnelPlan",
    "netsim_tunnel",
    "udp_echo_argv",
    "vpn_nat_ruleset",
]

_HELPER_READY = r"^READY "


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

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _probe_counters(provider: dict[str, Any], helper: dict[str, Any]) -> tuple[int, int, int, int]:
    """(provider utun reads, helper bypass sends, helper WireGuard encryptions, helper policy drops)."""
    stages = helper.get("ledger", {}).get("stages", {})
    policy_drops = sum(
        n for reason, n in stages.get("ipc_in", {}).get("dropped", {}).items() if reason.startswith("policy_drop:")
    )
    return (
        provider["ledger"]["stages"]["tun_read"]["read"],
        stages.get("bypass", {}).get("forwarded", 0),
        stages.get("wg_encrypt", {}).get("read", 0),
        policy_drops,
    )


@dataclass
class LabTunnel:
    """A running lab tunnel (from `netsim_tunnel`). Methods drive faults and read both sides' counters."""

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

    @property
    def pcaps(self) -> dict[str, Path]:
        """Capture files by name (``mac-en0``, ``isp-wan``, ``vpn-wan``, ``vpn-wg``) when the lab has a pcap_dir."""
        return {name: cap.path for name, cap in self.lab.captures.items()}

    async def provider_stats(self) -> dict[str, Any]:
        """The provider's statistics (`ForwardingStatistics.to_json` plus flow counters)."""
        reply = await self.session.send_provider_message(b"stats")
        return json.loads(reply or b"{}")  # type: ignore[no-any-return]

    async def helper_stats(self) -> dict[str, Any]:
        """The helper's statistics, fetched by the provider over IPC (`HelperStatistics.to_json`)."""
        reply = await self.session.send_provider_message(b"helper-stats")
        return json.loads(reply or b"{}")  # type: ignore[no-any-return]

    async def send_provider_message(self, data: bytes) -> bytes | None:
        """Send an app message to the provider (Apple's ``sendProviderMessage``) and return its answer."""
        return await self.session.send_provider_message(data)

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
                if stats["connects"] > after_connects and not stats["reasserting"]:
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
        before = _probe_counters(await self.provider_stats(), await self.helper_stats())
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
        )

    async def wait_quiet(self, *, interval: float = 0.1, timeout: float = 3.0) -> bool:
        """Wait until the provider read nothing from the utun for ``interval`` seconds (e.g. the last FIN/ACKs
        of an earlier probe's connections), so a probe's ledger deltas are its own. Returns False on timeout."""
        with trio.move_on_after(timeout):
            last = (await self.provider_stats())["ledger"]["stages"]["tun_read"]["read"]
            while True:
                await trio.sleep(interval)
                now = (await self.provider_stats())["ledger"]["stages"]["tun_read"]["read"]
                if now == last:
                    return True
                last = now
        return False

    def logs(self) -> str:
        """Helper stderr (JSON lines) and wireguard-go output, for failure messages."""
        parts = [f"--- helper pid {p.pid} ---\n{p.stderr()[-4000:]}" for p in self.helpers]
        return "\n".join([*parts, self.server.logs()])


def _spawn_helper(lab: Lab, argv: list[str]) -> LabProcess:
    path = os.pathsep.join(p for p in sys.path if p)
    return lab.spawn("mac", argv, name="helper", env={"PYTHONPATH": path})


def client_config(lab: Lab, plan: TunnelPlan, client_key: PrivateKey, server_key: PrivateKey) -> TunnelConfig:
    """The helper's wg-quick config for ``plan`` (DNS: the lab's internet resolvers, through the tunnel)."""
    iface = InterfaceConfig(
        private_key=client_key,
        addresses=(ip_interface(f"{plan.client_v4}/32"), ip_interface(f"{plan.client_v6}/128")),
        dns_servers=(lab.addr.dns_v4, lab.addr.dns_v6),
        dns_search=plan.dns_search,
        mtu=plan.mtu,
    )
    peer = PeerConfig(
        public_key=server_key.public_key(),
        endpoint=Endpoint(str(lab.addr.vpn_wan_v4), plan.port),
        allowed_ips=tuple(ip_network(n) for n in plan.allowed_ips),
        persistent_keepalive=plan.keepalive,
    )
    return TunnelConfig(iface, (peer,))


def _policy_file(policy: str | os.PathLike[str], directory: Path) -> Path:
    """A policy file for the helper: ``policy`` itself if it is a path, else its text written to ``directory``."""
    if isinstance(policy, os.PathLike):
        return Path(policy).resolve()
    try:
        parse_policy(policy, fmt="toml")
        suffix = ".toml"
    except ConfigError:
        parse_policy(policy, fmt="yaml")  # raises the ConfigError that says what to fix
        suffix = ".yaml"
    path = directory / f"policy{suffix}"
    path.write_text(policy)
    return path


@asynccontextmanager
async def netsim_tunnel(
    lab: Lab,
    *,
    plan: TunnelPlan | None = None,
    provider: type[HelperForwardingProvider] | str = HelperForwardingProvider,
    provider_configuration: Mapping[str, Any] | None = None,
    group_access: bool = False,
    policy: str | os.PathLike[str] | None = None,
    start_timeout: float = 30.0,
    reconnect_for: float = 120.0,
) -> AsyncIterator[LabTunnel]:
    """Bring up server, helper and provider in ``lab`` and yield the connected `LabTunnel`.

    Args:
        lab: a running `Lab` (with services, for the probes).
        plan: addresses, port, MTU (defaults: `TunnelPlan`).
        provider: the provider class or spec; it must read ``helper_socket`` like `HelperForwardingProvider`.
        provider_configuration: Apple's ``providerConfiguration`` for the provider, merged with netsim's keys
            (``helper_socket`` and ``token_file`` are always netsim's).
        group_access: socket directory 0750 (root group may reach it, SO_PEERCRED still decides).
        policy: the helper's bypass policy (``netsim helper --policy``; docs/policy.md): TOML or YAML text, or a
            path (`os.PathLike`) to such a file. Validated here, before anything starts.
        start_timeout: seconds for the session to become CONNECTED.
        reconnect_for: seconds the provider keeps reasserting before giving up.

    Raises:
        LabError: a part did not come up (the message carries the helper's and wireguard-go's logs).
    """
    plan = plan or TunnelPlan()
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
    await server.add_peer(client_key.public_key(), allowed_ips=[f"{plan.client_v4}/32", f"{plan.client_v6}/128"])
    # Both directories are named after the run in RUN_DIR (/run: tmpfs on most systems), so
    # `netsim clean` finds them by run id after a SIGKILLed owner (reliability.md R3).
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    conf_dir = Path(tempfile.mkdtemp(prefix=tunnel_dir_prefix(lab.run_id), dir=RUN_DIR))  # 0700: holds the key
    sock_dir = helper_dir(lab.run_id)
    socket_path = sock_dir / "helper.sock"
    helpers: list[LabProcess] = []
    try:
        if group_access:
            # UnixIpcServer accepts an existing directory with the right owner and mode; creating it here keeps
            # the group bits its own mkdir would lose to the 077 umask it sets.
            sock_dir.mkdir(mode=0o750, exist_ok=True)
            os.chmod(sock_dir, 0o750)
        await server.start()
        if lab.pcap_dir is not None:
            await trio.to_thread.run_sync(lambda: lab.capture("vpn", server.ifname, name="vpn-wg"))
        config_path = conf_dir / "client.conf"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(render_wg_quick(client_config(lab, plan, client_key, server_key)))
        # The per-tunnel IPC secret (docs/ipc.md, Authentication): a 0600 file in the private conf dir, read by
        # both ends; only its path is in argv. Without it any same-uid process could take the provider's slot.
        token_path = conf_dir / "ipc.token"
        write_token_file(token_path, secrets.token_hex(32).encode())
        argv = [
            sys.executable, "-m", "netsim.helpercli",
            "--config", str(config_path), "--socket", str(socket_path),
            "--allowed-uid", str(os.geteuid()), "--interface", "en0",
            "--token-file", str(token_path),
        ]  # fmt: skip
        if group_access:
            argv.append("--group-access")
        if policy is not None:
            argv += ["--policy", str(_policy_file(policy, conf_dir))]
        helper = _spawn_helper(lab, argv)
        helpers.append(helper)
        await helper.wait_output(_HELPER_READY, timeout=20.0)
        log_path = helper.stderr_path.parent / "provider.log"
        manager = TunnelProviderManager(
            provider,
            SubprocessLauncher(lab.netns("mac"), log_path=log_path),
            TunnelProviderProtocol(
                server_address=str(lab.addr.vpn_wan_v4),
                provider_configuration={
                    "connect_timeout": min(start_timeout, 20.0),
                    "reconnect_for": reconnect_for,
                    "backoff_max": 0.5,
                    **(provider_configuration or {}),
                    "helper_socket": str(socket_path),
                    "token_file": str(token_path),
                },
            ),
            start_timeout=start_timeout,
            stop_timeout=10.0,
        )
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            with trio.move_on_after(start_timeout + 5):
                await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
            if session.status is not VPNStatus.CONNECTED:
                provider_log = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
                raise LabError(
                    f"the tunnel did not connect (status {session.status.name}, "
                    f"error {session.last_disconnect_error!r})\n--- provider ---\n{provider_log}\n"
                    f"--- helper ---\n{helper.stderr()[-3000:]}\n{server.logs()}"
                )
            if lab.pcap_dir is not None:
                # mac-utun0: the inner packets as the provider sees them (the utun exists once CONNECTED).
                links = await lab.run("mac", ["ip", "-o", "link", "show", "type", "tun"], check=False)
                for line in links.stdout.decode().splitlines():
                    ifname = line.split(":")[1].strip().split("@")[0]
                    await trio.to_thread.run_sync(partial(lab.capture, "mac", ifname, name=f"mac-{ifname}"))
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
            )
            yield tunnel
    finally:
        with trio.CancelScope(shield=True):
            for proc in helpers:
                if proc.returncode is None:
                    await proc.stop(grace=5.0)
            await server.stop()
            shutil.rmtree(conf_dir, ignore_errors=True)
            shutil.rmtree(sock_dir, ignore_errors=True)
