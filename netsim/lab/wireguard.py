"""A real wireguard-go peer inside a lab namespace: start, configure, inspect, restart, stop.

This is the independent witness for netsim's own WireGuard: a peer nobody here wrote, driven only through its
documented interfaces. ``wireguard-go -f <ifname>`` runs in the foreground inside the namespace as a tracked
child (`netsim.lab.process.LabProcess`: stopped by pid, logs in files, killed with its owner), creates the TUN
device there, and serves the cross-platform UAPI on ``/var/run/wireguard/<ifname>.sock`` (wireguard-go
``ipc/uapi_linux.go``). That directory is shared by every namespace, so interface names must be unique per
lab: `wg_ifname` derives them from the run id within the kernel's 15-character limit (IFNAMSIZ 16).

Configuration goes through ``wg`` (wireguard-tools) run inside the namespace, with secrets on stdin so no
private key is ever written to disk or shown in a process list; addresses and the link state through
netlink (pyroute2, `netsim.lab.netlink`). `WireGuardGo.show` parses ``wg show <if> dump`` (wg(8):
tab-separated; the interface line is private-key, public-key, listen-port, fwmark; each peer line is
public-key, preshared-key, endpoint, allowed-ips, latest-handshake, transfer-rx, transfer-tx,
persistent-keepalive).
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Interface, IPv6Interface, ip_address, ip_interface, ip_network
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import trio

from netsim.core.wireguard.config import (
    Endpoint,
    InterfaceConfig,
    IPNetwork,
    PeerConfig,
    TunnelConfig,
    parse_config,
    parse_config_bytes,
    parse_endpoint,
    to_wg_setconf,
)
from netsim.core.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from netsim.errors import ConfigError, LabError, MissingDependency
from netsim.lab import netlink
from netsim.lab.process import LabProcess
from netsim.transports.netns import run_netns_command_async

if TYPE_CHECKING:
    from netsim.lab.lab import Lab

__all__ = [
    "WG_SOCKET_DIR",
    "WgInterfaceStatus",
    "WgPeerStatus",
    "WireGuardGo",
    "load_config",
    "parse_wg_show_dump",
    "wg_ifname",
]

WG_SOCKET_DIR = Path("/var/run/wireguard")
IFNAMSIZ = 16  # <linux/if.h>: names are at most 15 characters plus the NUL
_SUFFIX_RE = re.compile(r"^[a-z0-9]{1,8}$")
_COMMAND_TIMEOUT = 10.0


def load_config(path: str | Path) -> TunnelConfig:
    """Read and parse a wg-quick file (the I/O half of `netsim.core.wireguard.config.parse_config`).

    Raises:
        ConfigError: unreadable file, or bad content (the message names the line).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the WireGuard config: {exc}", source=str(p)) from None
    return parse_config_bytes(data, source=str(p))


def wg_ifname(run_id: str, suffix: str = "wg0") -> str:
    """A per-lab unique WireGuard interface name of at most 15 characters.

    ``netsim-<run>-<suffix>`` when it fits, else ``ns<run><suffix>``; both forms are what `netsim clean`
    matches when it removes a dead run's stale UAPI sockets.

    Raises:
        LabError: the name cannot fit (use a shorter suffix) or the suffix has characters other than [a-z0-9].
    """
    if not _SUFFIX_RE.match(suffix):
        raise LabError(f"WireGuard interface suffix {suffix!r} must be 1-8 characters of [a-z0-9]")
    for name in (f"netsim-{run_id}-{suffix}", f"ns{run_id}{suffix}"):
        if len(name) < IFNAMSIZ:
            return name
    raise LabError(f"run id {run_id!r} plus suffix {suffix!r} exceeds the 15-character interface name limit")


@dataclass(frozen=True, slots=True)
class WgPeerStatus:
    """One peer as wireguard-go reports it.

    Attributes:
        latest_handshake: Unix time of the last completed handshake, None if never.
        rx_bytes / tx_bytes: UDP payload bytes received from / sent to this peer, handshakes included
            (wireguard-go ``peer.rxBytes``/``txBytes``).
    """

    public_key: PublicKey
    has_preshared_key: bool
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]
    latest_handshake: int | None
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None


@dataclass(frozen=True, slots=True)
class WgInterfaceStatus:
    """``wg show <if> dump`` as data (the private key is deliberately not kept)."""

    public_key: PublicKey
    listen_port: int
    fwmark: int | None
    peers: tuple[WgPeerStatus, ...]

    def peer(self, public_key: PublicKey) -> WgPeerStatus:
        """The status of ``public_key``.

        Raises:
            KeyError: wireguard-go does not know that peer.
        """
        for p in self.peers:
            if p.public_key == public_key:
                return p
        raise KeyError(str(public_key))


def _socket_alive(path: Path) -> bool:
    """True if a process accepts connections on the UNIX socket ``path`` (a stale file refuses them)."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _none(field: str) -> str | None:
    return None if field in ("(none)", "") else field


def _peer_status(line: str) -> WgPeerStatus:
    f = line.split("\t")
    if len(f) != 8:
        raise LabError(f"`wg show dump` peer line needs 8 tab-separated fields, got {line!r}")
    endpoint, allowed, keepalive = _none(f[2]), _none(f[3]), f[7]
    return WgPeerStatus(
        public_key=PublicKey.from_base64(f[0]),
        has_preshared_key=_none(f[1]) is not None,
        endpoint=parse_endpoint(endpoint) if endpoint else None,
        allowed_ips=tuple(ip_network(a) for a in allowed.split(",")) if allowed else (),
        latest_handshake=int(f[4]) or None,
        rx_bytes=int(f[5]),
        tx_bytes=int(f[6]),
        persistent_keepalive=None if keepalive == "off" else (int(keepalive) or None),
    )


def parse_wg_show_dump(text: str) -> WgInterfaceStatus:
    """Parse the output of ``wg show <ifname> dump`` (one interface, so no leading interface column).

    Raises:
        LabError: the text is not in that format (it names the offending line).
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or len(head := lines[0].split("\t")) != 4:
        raise LabError(f"`wg show dump` interface line needs 4 tab-separated fields, got {text[:200]!r}")
    try:
        fwmark = head[3]
        return WgInterfaceStatus(
            public_key=PublicKey.from_base64(head[1]),
            listen_port=int(head[2]),
            fwmark=None if fwmark == "off" else (int(fwmark, 0) or None),
            peers=tuple(_peer_status(ln) for ln in lines[1:]),
        )
    except ValueError as exc:  # also ConfigError from the key and endpoint parsers
        raise LabError(f"cannot parse `wg show dump` output: {exc}") from None


class WireGuardGo:
    """A wireguard-go peer in a lab namespace.

    Example:
        wg = WireGuardGo("netsim-ab12cd-vpn", wg_ifname("ab12cd"), PrivateKey.generate(), listen_port=51820,
                         addresses=["10.66.0.1/24"])
        async with wg:
            await wg.add_peer(client_public_key, allowed_ips=["10.66.0.2/32"])
            status = await wg.show()

    Configuration (key, port, addresses, MTU and peers) is remembered, so `restart` brings up an identical
    peer with no session state: exactly a server reboot, forcing clients into a fresh handshake.
    """

    def __init__(
        self,
        netns: str,
        ifname: str,
        private_key: PrivateKey,
        *,
        listen_port: int | None = None,
        addresses: Iterable[str | IPv4Interface | IPv6Interface] = (),
        mtu: int | None = None,
        log_dir: Path | None = None,
        log_level: str = "error",
        start_timeout: float = 10.0,
    ) -> None:
        """Describe the peer; nothing runs until `start`.

        Args:
            netns: the namespace to run in (must exist).
            ifname: interface name, unique on the host (see `wg_ifname`).
            private_key: the interface's static key.
            listen_port: UDP port; None lets wireguard-go pick one (read it back from `show`).
            addresses: tunnel addresses with prefix, added to the interface after it comes up.
            mtu: interface MTU (wireguard-go's default is 1420).
            log_dir: where wireguard-go's stdout/stderr logs go (default: a fresh temporary directory).
            log_level: wireguard-go ``LOG_LEVEL``: ``verbose``, ``error`` or ``silent``.
            start_timeout: seconds to wait for the UAPI socket.
        """
        if len(ifname) >= IFNAMSIZ or not re.fullmatch(r"[A-Za-z0-9_.-]+", ifname):
            raise LabError(f"interface name {ifname!r} must be 1-15 characters of [A-Za-z0-9_.-]")
        if log_level not in ("verbose", "debug", "error", "silent"):
            raise LabError(f"log_level must be verbose, error or silent, got {log_level!r}")
        if listen_port is not None and not 0 <= listen_port <= 65535:
            raise LabError(f"listen_port must be 0-65535, got {listen_port}")
        self.netns = netns
        self.ifname = ifname
        self.private_key = private_key
        self.listen_port = listen_port
        try:
            self.addresses: tuple[IPv4Interface | IPv6Interface, ...] = tuple(ip_interface(a) for a in addresses)
        except ValueError as exc:
            raise ConfigError(f"bad tunnel address: {exc}") from None
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ConfigError(f"mtu must be 68-65535 (1280+ with IPv6), got {mtu}")
        self.mtu = mtu
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._log_dir = log_dir
        self._own_log_dir: Path | None = None
        self._peers: dict[PublicKey, PeerConfig] = {}
        self._process: LabProcess | None = None
        self._generation = 0
        self._lab: Lab | None = None
        self._role: str | None = None
        self._serving = False

    @classmethod
    def in_lab(
        cls,
        lab: Lab,
        role: str = "vpn",
        *,
        stem: str = "wg0",
        private_key: PrivateKey | None = None,
        listen_port: int | None = 51820,
        addresses: Iterable[str | IPv4Interface | IPv6Interface] = (),
        mtu: int | None = None,
        log_level: str = "error",
    ) -> WireGuardGo:
        """A peer in ``lab``'s ``role`` namespace, named ``lab.ifname(stem)``, spawned through `Lab.spawn`.

        The process is recorded in the lab's run file (so `netsim clean` finds it after a crash), logs go to the
        lab's run directory, and the lab stops it at teardown if the caller did not. A fresh key is generated
        when ``private_key`` is None.
        """
        wg = cls(
            lab.netns(role),
            lab.ifname(stem),
            private_key or PrivateKey.generate(),
            listen_port=listen_port,
            addresses=addresses,
            mtu=mtu,
            log_level=log_level,
        )
        wg._lab, wg._role = lab, role
        return wg

    @classmethod
    def from_config(cls, netns: str, ifname: str, config: TunnelConfig, *, log_dir: Path | None = None) -> WireGuardGo:
        """A peer configured from a parsed wg-quick file (DNS and hooks are ignored: nothing resolves here)."""
        i = config.interface
        wg = cls(
            netns,
            ifname,
            i.private_key,
            listen_port=i.listen_port,
            addresses=i.addresses,
            mtu=i.mtu,
            log_dir=log_dir,
        )
        for p in config.peers:
            wg._peers[p.public_key] = p
        return wg

    # --- introspection -------------------------------------------------------------------------------------

    @property
    def public_key(self) -> PublicKey:
        """What the other side puts in its ``[Peer] PublicKey``."""
        return self.private_key.public_key()

    @property
    def socket_path(self) -> Path:
        """The UAPI socket wireguard-go serves."""
        return WG_SOCKET_DIR / f"{self.ifname}.sock"

    @property
    def pid(self) -> int | None:
        """The wireguard-go pid while running."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the wireguard-go process is alive."""
        return self._process is not None and self._process.returncode is None

    def config(self) -> TunnelConfig:
        """The remembered configuration as a `TunnelConfig` (feed it to `render_wg_quick` or a netsim peer)."""
        iface = InterfaceConfig(
            private_key=self.private_key, addresses=self.addresses, mtu=self.mtu, listen_port=self.listen_port
        )
        return TunnelConfig(iface, tuple(self._peers.values()))

    def logs(self) -> str:
        """wireguard-go's stdout and stderr so far (for test failure messages)."""
        if self._process is None:
            return ""
        return f"--- stdout ---\n{self._process.stdout()}--- stderr ---\n{self._process.stderr()}"

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Run wireguard-go, wait for its UAPI socket, apply the key, port, peers, addresses and bring it up.

        Raises:
            MissingDependency: wireguard-go, wg or ip (``ip netns exec`` runs them in the namespace) is missing.
            LabError: the process exited or the socket did not appear (the message carries its logs), or a
                configuration command failed.
        """
        if self.running:
            raise LabError(f"wireguard-go {self.ifname} is already running (pid {self.pid})")
        for binary, package in (("wireguard-go", "wireguard-go"), ("wg", "wireguard-tools"), ("ip", "iproute2")):
            if shutil.which(binary) is None:
                raise MissingDependency(binary, package)
        if self._process is not None:
            await self._kill()  # reap a crashed predecessor and drop the socket it left behind
        if _socket_alive(self.socket_path):
            raise LabError(
                f"{self.socket_path} is served by another wireguard-go: interface name {self.ifname!r} is in use "
                "(the socket directory is shared by all namespaces; pick a unique name, see wg_ifname)"
            )
        self._serving = False
        self._generation += 1
        # `env` execs in place, so the pid LabProcess tracks is wireguard-go's own (as is `ip netns exec`'s).
        argv = ["env", f"LOG_LEVEL={self.log_level}", "wireguard-go", "-f", self.ifname]
        name = f"wireguard-go-{self.ifname}-{self._generation}"
        if self._lab is not None and self._role is not None:
            self._process = self._lab.spawn(self._role, argv, name=name)
        else:
            log_dir = self._log_dir
            if log_dir is None:
                if self._own_log_dir is None:
                    self._own_log_dir = Path(tempfile.mkdtemp(prefix="netsim-wg-"))
                log_dir = self._own_log_dir
            self._process = LabProcess(name, "wireguard-go", self.netns, argv, log_dir)
        try:
            await self._wait_ready()
            self._serving = True
            await self._apply()
        except BaseException:
            await self._kill()
            raise

    async def _wait_ready(self) -> None:
        """Wait until ``wg show`` answers through the socket: the file appears at bind, before listen."""
        proc = self._process
        assert proc is not None
        delay = 0.005
        with trio.move_on_after(self.start_timeout) as scope:
            while True:
                if proc.returncode is not None:
                    raise LabError(
                        f"wireguard-go {self.ifname} in {self.netns} exited with status {proc.returncode}\n"
                        + self.logs()
                    )
                if self.socket_path.exists():
                    rc, _, _ = await self._run(["wg", "show", self.ifname, "public-key"], check=False)
                    if rc == 0:
                        return
                await trio.sleep(delay)
                delay = min(delay * 2, 0.1)
        if scope.cancelled_caught:
            raise LabError(
                f"wireguard-go {self.ifname} in {self.netns}: {self.socket_path} not ready after "
                f"{self.start_timeout} s\n" + self.logs()
            )

    async def _apply(self) -> None:
        await self._run(["wg", "setconf", self.ifname, "/dev/stdin"], stdin=to_wg_setconf(self.config()))
        for addr in self.addresses:
            await trio.to_thread.run_sync(netlink.add_address, self.netns, str(addr), self.ifname)
        await trio.to_thread.run_sync(partial(netlink.set_link, self.netns, self.ifname, mtu=self.mtu, up=True))

    async def stop(self) -> None:
        """Stop wireguard-go by pid (SIGTERM, then SIGKILL) and remove its socket. Idempotent.

        wireguard-go removes its socket and TUN device on SIGTERM; after a SIGKILL the TUN device goes with
        the last fd and the stale socket file is removed here.
        """
        await self._kill()
        if self._own_log_dir is not None:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
            self._own_log_dir = None

    async def _kill(self) -> None:
        proc = self._process
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            await proc.stop(grace=3.0)
            # Only a socket our process served: after SIGKILL it is left behind. Never touch another's.
            if self._serving:
                self.socket_path.unlink(missing_ok=True)
                self._serving = False

    async def restart(self) -> None:
        """Stop and start again with the same key, port, addresses and peers but no session state."""
        await self._kill()
        await self.start()

    async def restart_with(self, *, private_key: PrivateKey | None = None, listen_port: int | None = None) -> None:
        """Restart as a reconfigured server: a new static key and/or UDP port, the same addresses and peers, no
        session state. A client still configured with the old key or port can no longer handshake until it is
        given the new ones (docs/faults.md, "Server faults")."""
        if listen_port is not None and not 0 <= listen_port <= 65535:
            raise LabError(f"listen_port must be 0-65535, got {listen_port}")
        await self._kill()
        if private_key is not None:
            self.private_key = private_key
        if listen_port is not None:
            self.listen_port = listen_port
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- configuration -------------------------------------------------------------------------------------

    async def add_peer(
        self,
        public_key: PublicKey,
        *,
        allowed_ips: Iterable[str | IPNetwork] = (),
        endpoint: str | Endpoint | None = None,
        preshared_key: PresharedKey | None = None,
        persistent_keepalive: int | None = None,
    ) -> PeerConfig:
        """Add or replace a peer (``wg set <if> peer ... allowed-ips ...`` replaces the list); kept for `restart`.

        Raises:
            ConfigError: a bad prefix, endpoint or keepalive.
            LabError: wireguard-go rejected it.
        """
        if isinstance(endpoint, str):
            endpoint = parse_endpoint(endpoint)
        try:
            nets = tuple(dict.fromkeys(ip_network(n, strict=False) for n in allowed_ips))
        except ValueError as exc:
            raise ConfigError(f"bad AllowedIPs entry: {exc}") from None
        if persistent_keepalive is not None and not 0 <= persistent_keepalive <= 65535:
            raise ConfigError(f"persistent_keepalive must be 0-65535 seconds, got {persistent_keepalive}")
        peer = PeerConfig(public_key, preshared_key, endpoint, nets, persistent_keepalive or None)
        if self.running:
            await self._set_peer(peer)
        self._peers[public_key] = peer
        return peer

    async def _set_peer(self, peer: PeerConfig) -> None:
        argv = ["wg", "set", self.ifname, "peer", peer.public_key.to_base64()]
        argv += ["allowed-ips", ",".join(str(n) for n in peer.allowed_ips)]
        if peer.endpoint is not None:
            argv += ["endpoint", str(peer.endpoint)]
        argv += ["persistent-keepalive", str(peer.persistent_keepalive or "off")]
        stdin = None
        if peer.preshared_key is not None:
            argv += ["preshared-key", "/dev/stdin"]
            stdin = peer.preshared_key.to_base64() + "\n"
        await self._run(argv, stdin=stdin)

    async def remove_peer(self, public_key: PublicKey) -> None:
        """Remove a peer (and forget it for `restart`)."""
        self._peers.pop(public_key, None)
        if self.running:
            await self._run(["wg", "set", self.ifname, "peer", public_key.to_base64(), "remove"])

    async def show(self) -> WgInterfaceStatus:
        """Parse ``wg show <if> dump``: handshakes, transfer counters, endpoints as wireguard-go sees them."""
        _, out, _ = await self._run(["wg", "show", self.ifname, "dump"])
        return parse_wg_show_dump(out)

    async def wait_handshake(
        self, public_key: PublicKey, *, after: int | None = None, timeout: float = 10.0
    ) -> WgPeerStatus:
        """Poll `show` until ``public_key`` has a handshake (newer than Unix time ``after``, if given).

        Raises:
            LabError: none within ``timeout`` seconds (the message carries the last status and the logs).
        """
        status: WgPeerStatus | None = None
        delay = 0.01
        with trio.move_on_after(timeout):
            while True:
                status = (await self.show()).peer(public_key)
                hs = status.latest_handshake
                if hs is not None and (after is None or hs > after):
                    return status
                await trio.sleep(delay)
                delay = min(delay * 2, 0.2)
        raise LabError(
            f"{self.ifname}: no handshake with {public_key} within {timeout} s; last status {status}\n{self.logs()}"
        )

    async def wait_endpoint(self, public_key: PublicKey, host: str, *, timeout: float = 10.0) -> WgPeerStatus:
        """Poll `show` until wireguard-go's endpoint for ``public_key`` is on ``host`` (an IP literal): the server
        followed a roaming client (WireGuard: the endpoint is the source of the last authenticated packet).

        Raises:
            LabError: not within ``timeout`` seconds (the message carries the last status).
        """
        status: WgPeerStatus | None = None
        want = ip_address(host)
        delay = 0.01
        with trio.move_on_after(timeout):
            while True:
                status = (await self.show()).peer(public_key)
                if status.endpoint is not None and status.endpoint.address == want:
                    return status
                await trio.sleep(delay)
                delay = min(delay * 2, 0.2)
        raise LabError(f"{self.ifname}: endpoint of {public_key} not on {host} within {timeout} s; last {status}")

    async def showconf(self) -> TunnelConfig:
        """``wg showconf <if>`` parsed back: what wireguard-go actually holds (an oracle for our renderer)."""
        _, out, _ = await self._run(["wg", "showconf", self.ifname])
        return parse_config(out, source=f"wg showconf {self.ifname}")

    # --- commands ------------------------------------------------------------------------------------------

    async def _run(self, argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> tuple[int, str, str]:
        """Run a short command inside the namespace; (status, stdout, stderr).

        Secrets travel on ``stdin`` (wg reads key files from /dev/stdin), never in argv.
        """
        done = await run_netns_command_async(self.netns, argv, stdin=stdin, check=check, timeout=_COMMAND_TIMEOUT)
        return done.returncode, done.stdout, done.stderr
