"""The simulated Mac's own resolver: a small DNS forwarder implementing Apple's resolver selection (trio).

Theory of operation. macOS applications ask the system resolver, which picks the tunnel's ``NEDNSSettings``
servers or the primary interface's per query name (`netsim.core.resolver.select_upstream`). glibc cannot do
that (resolv.conf has no per-domain servers), so in the lab the ``mac`` namespace's resolv.conf names
``127.0.0.53`` and this daemon answers there (UDP and TCP, also on ``[::1]:53``):

* the state is two JSON files in ``/run/netsim/dns/<netns>/`` (`DNS_STATE_DIR`): ``system.json``, the Mac's own
  resolvers (written by the lab when it starts the daemon), and ``tunnel.json``, the running tunnel's DNS settings
  (written by `netsim.runtime.netconfig.KernelNetworkConfigurator` when it applies them, removed when it clears
  them). The daemon stats both before every query and every ``poll_interval`` (no inotify) and re-reads a file
  whose mtime, size or inode changed, so a query sent after a change already follows it. Both files are
  untrusted input (`netsim.core.resolver` parses them, bounded).
* a query for the tunnel's servers goes out of a socket bound to the tunnel's utun (``SO_BINDTODEVICE``), so it
  can only leave through the tunnel. Before each such query the daemon checks the tunnel is alive: the utun
  exists and the provider named by ``owner_pid`` runs. A crashed provider leaves its ``tunnel.json`` behind; the
  daemon then treats the tunnel as gone (the system resolver again, as macOS restores it), except that names
  under a dead split tunnel's match domains get SERVFAIL instead of going to the ISP in the clear. A
  ``tunnel.json`` that exists but does not parse (garbage, truncated, hostile) fails closed: every query gets
  SERVFAIL (``servfail_tunnel_state_corrupt``) until the file is rewritten or removed (row F14).
* other queries go to the system resolvers the normal way (whatever the routing table says).
* the daemon forwards the client's query bytes with a fresh random id (RFC 5452) on a new connected UDP socket
  per attempt and returns the first reply whose id and question match, with the client's id restored. TCP
  clients are answered over TCP, the upstream exchange is UDP (the lab's servers are UDP only).

Bounded: at most ``max_inflight`` queries at once (more are dropped and counted), at most ``max_tcp_clients``
TCP connections, messages up to ``max_message`` bytes, ``upstream_timeout`` per upstream try, at most three
upstream servers per query. Every drop has a named counter. Counters are written to ``stats.json`` in the state
directory after they change (at most once per ``poll_interval``) and at once on SIGUSR1; `read_stats` reads them.
SIGTERM/SIGINT stop the daemon.

Run: ``python -m netsim.runtime.resolver --state-dir /run/netsim/dns/<netns>`` inside the namespace; it prints
``READY`` once every listener is bound.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import socket
import struct
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from netsim.core.dns import parse_dns_query_untrusted, parse_dns_response_untrusted
from netsim.core.resolver import (
    MAX_STATE_BYTES,
    ResolverState,
    ResolverStateError,
    SystemDns,
    TunnelDns,
    select_upstream,
)
from netsim.errors import BadPacket

__all__ = [
    "DNS_STATE_DIR",
    "RESOLVER_LISTEN",
    "STATS_FILE",
    "SYSTEM_FILE",
    "TUNNEL_FILE",
    "MacResolver",
    "ResolverLimits",
    "main",
    "read_stats",
    "servfail",
    "write_state_file",
]

log = logging.getLogger("netsim.resolver")

#: Where each namespace's resolver state lives: ``DNS_STATE_DIR / <netns> / {system,tunnel,stats}.json``.
DNS_STATE_DIR = Path("/run/netsim/dns")
SYSTEM_FILE = "system.json"
TUNNEL_FILE = "tunnel.json"
STATS_FILE = "stats.json"
#: The addresses the daemon answers on by default (resolv.conf names the first).
RESOLVER_LISTEN: tuple[tuple[str, int], ...] = (("127.0.0.53", 53), ("::1", 53))
_MAX_UPSTREAMS = 3  # servers tried per query, like glibc's MAXNS
_MAX_BAD_REPLIES = 8  # mismatched datagrams tolerated per upstream try before giving up on it
_MAX_TCP_QUERIES = 16  # queries per TCP connection


@dataclass(frozen=True)
class ResolverLimits:
    """The daemon's bounds (module docstring)."""

    max_inflight: int = 64
    max_tcp_clients: int = 16
    max_message: int = 4096
    upstream_timeout: float = 0.8
    tcp_idle_timeout: float = 5.0
    poll_interval: float = 0.1


def write_state_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


#: stats.json is a few KiB of counters; a bigger file is not the daemon's (row F14)
_MAX_STATS_BYTES = 1 << 20


def read_stats(state_dir: Path) -> dict[str, Any]:
    """The counters a running daemon last wrote to ``state_dir/stats.json`` (``{}`` if none yet, or if the file is
    not what the daemon writes: over 1 MiB, not JSON, nested past the parser's depth, not an object)."""
    try:
        with open(state_dir / STATS_FILE, "rb") as f:
            raw = f.read(_MAX_STATS_BYTES + 1)
        if len(raw) > _MAX_STATS_BYTES:
            return {}
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def servfail(query: bytes) -> bytes | None:
    """A SERVFAIL answer to ``query`` (a query that `parse_dns_query_untrusted` accepted), or None."""
    import dnslib

    try:
        reply = dnslib.DNSRecord.parse(query).reply()
    except Exception:  # dnslib raises several types on odd input; the query was already vetted
        return None
    reply.header.rcode = dnslib.RCODE.SERVFAIL
    reply.rr, reply.auth, reply.ar = [], [], []
    return bytes(reply.pack())


def _read_bounded(path: Path) -> bytes | None:
    """The file's bytes (at most MAX_STATE_BYTES + 1: the parser refuses more), None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, MAX_STATE_BYTES + 1)
    finally:
        os.close(fd)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class MacResolver:
    """The resolver daemon for one namespace (module docstring). ``stats`` holds the named counters.

    Differences from Apple's system resolver (mDNSResponder; docs/dns.md, "What is modelled"): no cache, no
    search list (the tunnel's ``searchDomains``/``domainName`` and appended match domains are recorded, not
    applied), encrypted DNS settings are queried in cleartext, ``allowFailover`` is ignored, upstream exchanges
    are UDP only, and a per-app tunnel's DNS applies to every app (the daemon cannot tell which app asked).
    A stale split tunnel's match-domain names get SERVFAIL rather than the system resolver (`select_upstream`).
    """

    def __init__(
        self,
        state_dir: Path,
        listen: Sequence[tuple[str, int]] = RESOLVER_LISTEN,
        limits: ResolverLimits | None = None,
        upstream_port: int = 53,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.listen = list(listen)
        self.limits = limits or ResolverLimits()
        self.upstream_port = upstream_port
        self.state = ResolverState()
        self.stats: Counter[str] = Counter()
        self.upstreams: Counter[str] = Counter()  # queries sent per upstream server address
        self._stamps: dict[str, tuple[int, int, int] | None] = {SYSTEM_FILE: None, TUNNEL_FILE: None}
        #: tunnel.json exists but cannot be read as one: every query gets SERVFAIL until it is fixed or removed
        self.tunnel_state_corrupt = False
        self._inflight = 0
        self._tcp_clients = 0
        self._written: tuple[dict[str, int], dict[str, int]] | None = None
        self.bound: list[tuple[str, int]] = []

    # -- state ----------------------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the state files that changed; True if the state changed. Never raises on bad files."""
        changed = False
        system, tunnel = self.state.system, self.state.tunnel
        for name in (SYSTEM_FILE, TUNNEL_FILE):
            path = self.state_dir / name
            stamp = _stamp(path)
            if stamp == self._stamps[name]:
                continue
            self._stamps[name] = stamp
            changed = True
            self.stats["state_reloads"] += 1
            parsed: SystemDns | TunnelDns | None = None
            bad = False
            try:
                data = _read_bounded(path)
                if data is not None:
                    parsed = SystemDns.from_json(data) if name == SYSTEM_FILE else TunnelDns.from_json(data)
            except ResolverStateError as exc:
                bad = True
                self.stats[f"state_{name.split('.')[0]}_{exc.reason}"] += 1
                log.warning("resolver: ignoring %s: %s", path, exc)
            except OSError as exc:
                bad = True
                self.stats["state_read_error"] += 1
                log.warning("resolver: cannot read %s: %s", path, exc)
            if name == SYSTEM_FILE:
                system = parsed if isinstance(parsed, SystemDns) else None  # none: SERVFAIL (no resolver)
            else:
                tunnel = parsed if isinstance(parsed, TunnelDns) else None
                # A tunnel's DNS settings we cannot read are still a tunnel's: fail closed (row F14). Falling back
                # to the system resolver would send the tunnel's names to the ISP in the clear.
                self.tunnel_state_corrupt = bad
        if changed:
            self.state = ResolverState(system, tunnel)
            log.info("resolver: state system=%s tunnel=%s", system, tunnel)
        return changed

    @staticmethod
    def tunnel_alive(tunnel: TunnelDns) -> bool:
        """The tunnel's utun exists (in this namespace) and its provider process runs."""
        try:
            socket.if_nametoindex(tunnel.interface)
        except OSError:
            return False
        try:
            os.kill(tunnel.owner_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    # -- one query ------------------------------------------------------------------------------------------
    async def resolve(self, query: bytes) -> bytes | None:
        """The answer to one client query (None: dropped, counted). Never raises (but for cancellation)."""
        try:
            return await self._resolve(query)
        except Exception:  # a bug or resource exhaustion (EMFILE) costs this query, never the daemon
            self.stats["error_internal"] += 1
            log.exception("resolver: query failed")
            return None

    async def _resolve(self, query: bytes) -> bytes | None:
        if len(query) > self.limits.max_message:
            self.stats["drop_too_big"] += 1
            return None
        try:
            q = parse_dns_query_untrusted(query)
        except BadPacket as exc:
            self.stats[f"drop_{exc.reason}"] += 1
            return None
        self.stats["queries"] += 1
        # Re-check the state files on every query (two stat calls): a query sent right after the configurator
        # wrote or removed tunnel.json already follows it, as Apple's settings are in force once applied.
        self.reload()
        if self.tunnel_state_corrupt:
            self.stats["servfail_tunnel_state_corrupt"] += 1
            return self._servfail(query)
        tunnel = self.state.tunnel
        alive = tunnel is None or self.tunnel_alive(tunnel)
        if tunnel is not None and not alive:
            self.stats["tunnel_stale"] += 1
        up = select_upstream(self.state, q.question, tunnel_alive=alive)
        if not up.servers:
            self.stats["servfail_tunnel_gone" if up.via_tunnel else "servfail_no_resolver"] += 1
            return self._servfail(query)
        self.stats["via_tunnel" if up.via_tunnel else "via_system"] += 1
        for server in up.servers[:_MAX_UPSTREAMS]:
            reply = await self._exchange(server, query, q.question, up.interface if up.via_tunnel else None)
            if reply is not None:
                self.stats["answered"] += 1
                return reply
        self.stats["servfail_upstream"] += 1
        return self._servfail(query)

    def _servfail(self, query: bytes) -> bytes | None:
        self.stats["servfail"] += 1
        return servfail(query)

    async def _exchange(self, server: str, query: bytes, question: str, device: str | None) -> bytes | None:
        ident = secrets.randbits(16)
        out = struct.pack("!H", ident) + query[2:]
        sock = trio.socket.socket(_family(server), socket.SOCK_DGRAM)
        with sock:
            try:
                if device is not None:
                    # Only through the utun: if the device is gone this fails (ENODEV) instead of using en0.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
                await sock.connect((server, self.upstream_port))
                self.upstreams[server] += 1
                await sock.send(out)
            except OSError as exc:
                self.stats[f"upstream_{errno.errorcode.get(exc.errno or 0, 'oserror').lower()}"] += 1
                return None
            bad = 0
            with trio.move_on_after(self.limits.upstream_timeout):
                while bad < _MAX_BAD_REPLIES:
                    try:
                        data = await sock.recv(self.limits.max_message)
                    except OSError:  # ICMP port unreachable on the connected socket
                        self.stats["upstream_refused"] += 1
                        return None
                    try:
                        resp = parse_dns_response_untrusted(data)
                    except BadPacket as exc:
                        self.stats[f"reply_{exc.reason}"] += 1
                        bad += 1
                        continue
                    if resp.id != ident or resp.question != question:
                        self.stats["reply_mismatch"] += 1
                        bad += 1
                        continue
                    return query[:2] + data[2:]
                return None
            self.stats["upstream_timeout"] += 1
            return None

    # -- listeners ------------------------------------------------------------------------------------------
    async def _udp_one(self, sock: Any, data: bytes, peer: Any) -> None:
        try:
            reply = await self.resolve(data)
            if reply is not None:
                try:
                    await sock.sendto(reply, peer)
                except OSError:
                    self.stats["drop_send_failed"] += 1
        finally:
            self._inflight -= 1

    async def _udp_loop(self, sock: Any, nursery: trio.Nursery) -> None:
        while True:
            try:
                data, peer = await sock.recvfrom(self.limits.max_message + 1)
            except OSError:
                self.stats["drop_recv_error"] += 1
                continue
            self.stats["udp_received"] += 1
            if self._inflight >= self.limits.max_inflight:
                self.stats["drop_busy"] += 1
                continue
            self._inflight += 1
            nursery.start_soon(self._udp_one, sock, data, peer)

    async def _tcp_client(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                for _ in range(_MAX_TCP_QUERIES):
                    with trio.move_on_after(self.limits.tcp_idle_timeout) as scope:
                        head = await _receive_exactly(stream, 2)
                        if head is None:
                            return
                        (length,) = struct.unpack("!H", head)
                        if length > self.limits.max_message:
                            self.stats["drop_too_big"] += 1
                            return
                        body = await _receive_exactly(stream, length)
                    if scope.cancelled_caught:
                        self.stats["drop_tcp_timeout"] += 1
                        return
                    if body is None:
                        self.stats["drop_tcp_truncated"] += 1
                        return
                    self.stats["tcp_received"] += 1
                    if self._inflight >= self.limits.max_inflight:
                        self.stats["drop_busy"] += 1
                        return
                    self._inflight += 1
                    try:
                        reply = await self.resolve(body)
                    finally:
                        self._inflight -= 1
                    if reply is None:
                        return
                    await stream.send_all(struct.pack("!H", len(reply)) + reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.stats["drop_tcp_broken"] += 1
        finally:
            self._tcp_clients -= 1

    async def _tcp_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError:
                self.stats["drop_accept_error"] += 1
                await trio.sleep(self.limits.poll_interval)
                continue
            if self._tcp_clients >= self.limits.max_tcp_clients:
                self.stats["drop_tcp_busy"] += 1
                await stream.aclose()
                continue
            self._tcp_clients += 1
            nursery.start_soon(self._tcp_client, stream)

    # -- stats ----------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        tunnel = self.state.tunnel
        return {
            "counters": dict(self.stats),
            "upstreams": dict(self.upstreams),
            "system": list(self.state.system.servers) if self.state.system else None,
            "tunnel": None if tunnel is None else {"interface": tunnel.interface, "servers": list(tunnel.servers)},
            "pid": os.getpid(),
        }

    def write_stats(self, *, force: bool = False) -> None:
        key = (dict(self.stats), dict(self.upstreams))
        if not force and key == self._written:
            return
        try:
            write_state_file(self.state_dir / STATS_FILE, json.dumps(self.snapshot(), sort_keys=True))
            self._written = key
        except OSError as exc:
            log.warning("resolver: cannot write stats: %s", exc)

    async def _poll(self) -> None:
        while True:
            self.reload()
            self.write_stats()
            await trio.sleep(self.limits.poll_interval)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every listener, then answer until cancelled. ``task_status.started()`` once bound."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.reload()
        with contextlib.ExitStack() as sockets:
            await self._serve(sockets, task_status)

    async def _serve(self, sockets: contextlib.ExitStack, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            for host, port in self.listen:
                fam = _family(host)
                udp = sockets.enter_context(trio.socket.socket(fam, socket.SOCK_DGRAM))
                await udp.bind((host, port))
                port = udp.getsockname()[1]  # port 0 (tests): TCP on the same ephemeral port
                tcp = sockets.enter_context(trio.socket.socket(fam, socket.SOCK_STREAM))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await tcp.bind((host, port))
                tcp.listen(self.limits.max_tcp_clients)
                self.bound.append((host, port))
                nursery.start_soon(self._udp_loop, udp, nursery)
                nursery.start_soon(self._tcp_loop, trio.SocketListener(tcp), nursery)
            nursery.start_soon(self._poll)
            self.write_stats(force=True)
            task_status.started()


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def _run(resolver: MacResolver) -> None:
    with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(resolver.serve)
            print("READY", flush=True)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    resolver.write_stats(force=True)
                    continue
                break
            resolver.write_stats(force=True)
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netsim.runtime.resolver", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", required=True, type=Path, help="the namespace's /run/netsim/dns/<netns>")
    parser.add_argument("--listen", action="append", type=_endpoint, help="HOST:PORT ([v6]:PORT); repeatable")
    parser.add_argument("--upstream-port", type=int, default=53, help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    resolver = MacResolver(args.state_dir, args.listen or RESOLVER_LISTEN, upstream_port=args.upstream_port)
    trio.run(_run, resolver)
    return 0


if __name__ == "__main__":
    sys.exit(main())
