"""The lab backend of a proxy provider: nftables TPROXY delivers the namespace's matching flows as sockets.

Run inside the namespace whose apps are proxied (the lab's ``mac``): ``python -m netsim.runtime.proxy_tproxy
--provider SPEC``. The host binds transparent (``IP_TRANSPARENT``) TCP and UDP listeners on loopback, installs
the provider's claim rules as its own kernel state (`netsim.runtime.proxy_nft`), and turns every captured
connection or UDP conversation into an `AppProxyTCPFlow` / `AppProxyUDPFlow` for ``handle_new_flow``:

- **TCP**: an accepted socket's local address is the app's original destination (``remote_endpoint``); its peer
  is the app's socket, whose owner uid (``/proc/net``, `netsim.runtime.appid`) gives `FlowMetaData`.
- **UDP**: datagrams arrive with their original destination (``IP_RECVORIGDSTADDR``); one flow per app socket
  (``local_endpoint``), replies sent from the remote's address by a transparent socket bound to it, or, when a
  local server owns that address (the Mac's resolver on ``127.0.0.53:53`` / ``[::1]:53``), as raw IPv4 / IPv6
  datagrams (`udp_datagram`).
- **TCP is decided at the SYN**: the rules queue each new connection's SYN (NFQUEUE, `netsim.runtime.proxy_nft`)
  before anything answers it; the host builds the flow from the SYN (destination, and the socket owner's uid the
  kernel sends with it, ``NFQA_UID``; else the ``SYN_SENT`` socket's in ``/proc/net``), asks ``handle_new_flow``
  once, and gives the verdict: **declined** → the SYN and the rest of the connection leave as the app's own
  (conntrack-marked, never intercepted: Apple hands the app's socket back); **claimed** → the kernel sends it to
  TPROXY, and the accepted socket is matched to the flow the provider already holds
  (`netsim.core.flowdecision.DecisionTable`, keyed by 5-tuple, bounded, expiring). A SYN that bypassed the queue
  (full, or the host not reading) goes direct: fail open.
- **UDP** is decided at the first datagram as before: TPROXY has already taken it, so a declined UDP flow is
  relayed by the host on the app's behalf (`netsim.runtime.proxy.ProxyHost`); docs/proxy.md says what it costs.
- **Own sockets are never re-captured**: every socket the host opens carries ``SO_MARK`` `OWN_MARK`, which the
  output chain skips. **Capture loops are refused**, as sshuttle refuses them: a captured flow whose source port is
  one of the host's own outbound sockets, or whose destination is the host's own listener, is closed and counted
  (``capture_loops``) instead of being handed to the provider again (which would recurse without end).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from ipaddress import ip_address
from typing import Any

import trio

from netsim.apple.protocol import AppRule
from netsim.apple.proxy import (
    AppProxyError,
    AppProxyFlowError,
    AppProxyProvider,
    AppProxyTCPFlow,
    AppProxyUDPFlow,
    DatagramIO,
    DNSProxyProvider,
    HostEndpoint,
    NetworkRule,
    StreamIO,
    TransparentProxyNetworkSettings,
)
from netsim.apple.settings import DNSSettings
from netsim.core.checksum import fill_checksums
from netsim.core.flowdecision import DecisionTable
from netsim.core.netrules import FlowKey
from netsim.core.packet import PacketView
from netsim.errors import BadPacket, NetsimError
from netsim.runtime.appid import ProcNetOwnerLookup
from netsim.runtime.proxy import CLAIMED, DIRECT, FAILED, DatagramQueue, ProxyHost, _abort, metadata_for_uid
from netsim.runtime.proxy_nft import OWN_MARK, ProxyKernelState
from netsim.runtime.resolver import RESOLVER_LISTEN
from netsim.transports.nfqueue import NF_ACCEPT, NfQueue

__all__ = ["DNS_PROXY_NAMES", "TproxyHost", "load_proxy_provider", "main", "serve_until_signalled", "udp_datagram"]

log = logging.getLogger(__name__)

SO_MARK = getattr(socket, "SO_MARK", 36)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_RECVORIGDSTADDR = 20  # linux/in.h; the cmsg type IP_ORIGDSTADDR has the same value
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74  # linux/in6.h; cmsg IPV6_ORIGDSTADDR
UDP_QUEUE = 64  # datagrams waiting per UDP flow; more are dropped and counted (udp_queue_full)
MAX_REPLY_SOCKETS = 16  # per UDP flow
_MAX_DATAGRAM = 65535
SYN_QUEUE = 256  # SYNs the kernel holds for the host; more bypass the queue and go direct (fail open)
SYN_BATCH = 64  # SYNs decided per wakeup
DECISIONS = 4096  # SYN-time decisions remembered (5-tuple -> decision), each at most DECISION_TTL seconds
DECISION_TTL = 30.0
ACCEPT_WAIT = 30.0  # seconds a claimed flow waits for its accepted socket before failing
#: a DNS proxy's owned kernel names, distinct from a transparent proxy's (both may run in one namespace)
DNS_PROXY_NAMES: dict[str, Any] = {
    "table": "netsim_dnsproxy",
    "intercept_mark": 0x7472,
    "own_mark": 0x7473,
    "route_table": 0x7472,
    "priority": 5990,
}


def _origdst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The original destination from an ``IP(V6)_ORIGDSTADDR`` control message (untrusted length: checked)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), int.from_bytes(data[2:4], "big")
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), int.from_bytes(data[2:4], "big")
    return None


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _transparent(sock: socket.socket | trio.socket.SocketType, family: int) -> None:
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)


def udp_datagram(data: bytes, source: tuple[str, int], client: tuple[str, int]) -> bytes:
    """An IPv4 or IPv6 packet carrying one UDP datagram from ``source`` to ``client``, every checksum filled
    (`fill_checksums`: the UDP checksum is mandatory over IPv6, RFC 8200 §8.1, and a computed 0 is sent as
    0xFFFF, RFC 768). Pure: the caller checks that ``data`` fits (at most 65507 bytes over IPv4, 65527 over
    IPv6) and that both addresses are of one family."""
    family = _family(source[0])
    src, dst = socket.inet_pton(family, source[0]), socket.inet_pton(family, client[0])
    udp = struct.pack("!HHHH", source[1], client[1], 8 + len(data), 0) + data
    if family == socket.AF_INET:  # RFC 791 §3.1: no options, DF clear, TTL 64
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0, src, dst)
    else:  # RFC 8200 §3: traffic class and flow label 0, hop limit 64
        head = struct.pack("!IHBB16s16s", 6 << 28, len(udp), socket.IPPROTO_UDP, 64, src, dst)
    packet = bytearray(head + udp)
    fill_checksums(packet)
    return bytes(packet)


class _OwnStream:
    """A provider-owned TCP connection (a `StreamIO`); forgets its port in the host's own-port set on close."""

    def __init__(self, host: TproxyHost, stream: trio.SocketStream, port: int) -> None:
        self._host, self._stream, self._port = host, stream, port

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        self._host.own_ports.discard(self._port)
        await self._stream.aclose()


class _PendingStream:
    """The `StreamIO` of a TCP flow claimed at its SYN: waits (at most `ACCEPT_WAIT`) for the accepted socket.

    The provider gets the flow before the kernel has finished the handshake; its first read or write waits for
    `attach`. A stream that never arrives fails the flow (``BrokenResourceError``); one that arrives after
    `aclose` is closed at once.
    """

    def __init__(self) -> None:
        self._stream: trio.SocketStream | None = None
        self._ready = trio.Event()
        self._closed = False

    def attach(self, stream: trio.SocketStream) -> None:
        if self._closed or self._stream is not None:
            stream.socket.close()  # the flow is gone: the app's connection ends
            return
        self._stream = stream
        self._ready.set()

    async def _get(self) -> trio.SocketStream:
        with trio.move_on_after(ACCEPT_WAIT):
            await self._ready.wait()
        if self._stream is None or self._closed:
            raise trio.BrokenResourceError("the app's connection was never accepted")
        return self._stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await (await self._get()).receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await (await self._get()).send_all(data)

    async def send_eof(self) -> None:
        await (await self._get()).send_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._ready.set()
        if self._stream is not None:
            await self._stream.aclose()


class _Decision:
    """What the provider decided at a connection's SYN (a `DecisionTable` value)."""

    __slots__ = ("pending", "verdict")

    def __init__(self, verdict: str, pending: _PendingStream | None = None) -> None:
        self.verdict, self.pending = verdict, pending


class _Session:
    """A provider-owned UDP session to one endpoint (a `DatagramIO`)."""

    def __init__(self, host: TproxyHost, sock: trio.socket.SocketType, endpoint: HostEndpoint, port: int) -> None:
        self._host, self._sock, self._endpoint, self._port = host, sock, endpoint, port

    async def receive_datagrams(self) -> list[tuple[bytes, HostEndpoint]]:
        try:
            return [(await self._sock.recv(_MAX_DATAGRAM), self._endpoint)]
        except (OSError, trio.ClosedResourceError):
            return []

    async def send_datagrams(self, datagrams: Sequence[tuple[bytes, HostEndpoint]]) -> None:
        for data, _ in datagrams:
            try:
                await self._sock.send(data)
            except OSError as exc:  # e.g. ICMP port unreachable reported on a connected socket: a UDP loss
                log.debug("udp session to %s: %s", self._endpoint, exc)

    async def aclose(self) -> None:
        self._host.own_ports.discard(self._port)
        self._sock.close()


class _CapturedUdp(DatagramQueue):
    """The backend of one captured UDP flow (a `DatagramIO`): a bounded inbound queue, transparent replies."""

    def __init__(self, host: TproxyHost, client: tuple[str, int]) -> None:
        super().__init__(host, UDP_QUEUE)
        self.tproxy, self.client = host, client
        self.replies: dict[HostEndpoint, trio.socket.SocketType | None] = {}  # None: the address is in use

    async def send_datagrams(self, datagrams: Sequence[tuple[bytes, HostEndpoint]]) -> None:
        for data, remote in datagrams:
            if remote not in self.replies:
                if len(self.replies) >= MAX_REPLY_SOCKETS:
                    self.host.count("udp_queue_full")
                    continue
                try:
                    fresh = self.tproxy.transparent_udp((remote.hostname, remote.port))
                except OSError:  # a local server owns remote (e.g. the Mac's resolver): reply with a raw datagram
                    self.replies[remote] = None
                else:
                    self.replies[remote] = fresh
                    self.tproxy.start(self.tproxy.udp_reader, fresh)
            sock = self.replies[remote]
            try:
                if sock is None:
                    await self.tproxy.raw_reply(data, (remote.hostname, remote.port), self.client)
                else:
                    await sock.sendto(data, self.client)
            except OSError as exc:
                self.tproxy.count("udp_reply_errors")
                log.debug("udp reply to %s: %s", self.client, exc)

    async def aclose(self) -> None:
        self.close()
        for sock in self.replies.values():
            if sock is not None:
                sock.close()
        self.replies.clear()
        if self.tproxy.udp_flows.get(self.client) is self:
            del self.tproxy.udp_flows[self.client]


class TproxyHost(ProxyHost):
    """`ProxyHost` over TPROXY sockets in the current namespace (see the module docstring).

    Args:
        provider: the provider instance.
        options: passed to ``start_proxy``.
        app_rules: apps by uid, for `FlowMetaData`.
        port: the listeners' port (0: any free one).
        mark_own: mark the host's own sockets (`OWN_MARK`) so the rules skip them. False is a fault switch for
            tests: the provider's outbound connections are then captured, and the loop guard must refuse them.
        kernel_names: overrides of `ProxyKernelState`'s owned names (table, marks, route table, priority, and
            optionally the SYN queue's ``query_mark``, ``decline_mark``, ``queue_num``), so two hosts (a
            transparent proxy and a DNS proxy) can run in one namespace.
        dns_intercept: for a `DNSProxyProvider`: the resolver endpoints whose flows the host intercepts.
        system_dns: for a `DNSProxyProvider`: the servers put in its ``system_dns_settings``.
    """

    def __init__(
        self,
        provider: AppProxyProvider,
        *,
        options: dict[str, Any] | None = None,
        app_rules: list[AppRule] | None = None,
        port: int = 0,
        mark_own: bool = True,
        max_flows: int = 256,
        kernel_names: dict[str, Any] | None = None,
        dns_intercept: Sequence[tuple[str, int]] = RESOLVER_LISTEN,
        system_dns: Sequence[str] = (),
    ) -> None:
        super().__init__(provider, app_rules=app_rules, max_flows=max_flows)
        self.kernel_names = dict(kernel_names or {})
        self.own_mark: int = self.kernel_names.get("own_mark", OWN_MARK)
        self.dns_intercept = tuple(dns_intercept)
        if isinstance(provider, DNSProxyProvider):
            provider.system_dns_settings = [DNSSettings(servers=list(system_dns))] if system_dns else []
        self.options = options
        self.port = port
        self.mark_own = mark_own
        self.kernel: ProxyKernelState | None = None
        self.own_ports: set[int] = set()
        self.listen: set[tuple[str, int]] = set()
        self.udp_flows: dict[tuple[str, int], _CapturedUdp] = {}
        self.owner = ProcNetOwnerLookup()
        self.ruleset = ""
        self._raw: dict[int, trio.socket.SocketType] = {}  # address family -> raw socket (`raw_reply`)
        self.decisions: DecisionTable[_Decision] = DecisionTable(DECISIONS, DECISION_TTL)
        self.queue: NfQueue | None = None

    # ---------------------------------------------------------------- sockets
    def _mark(self, sock: trio.socket.SocketType) -> None:
        if self.mark_own:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.own_mark)

    def transparent_udp(self, bind: tuple[str, int]) -> trio.socket.SocketType:
        """A marked transparent UDP socket bound to ``bind`` (any address, local or not)."""
        family = _family(bind[0])
        raw = socket.socket(family, socket.SOCK_DGRAM)
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            raw.setsockopt(socket.SOL_SOCKET, SO_MARK, self.own_mark)  # replies and listeners: always marked
            _transparent(raw, family)
            if family == socket.AF_INET6:
                raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            raw.bind(bind)
        except OSError:
            raw.close()
            raise
        return trio.socket.from_stdlib_socket(raw)

    async def raw_reply(self, data: bytes, source: tuple[str, int], client: tuple[str, int]) -> None:
        """Send one UDP datagram from ``source`` (an address:port a local socket owns) to ``client``, as a raw
        packet built by `udp_datagram` (``IPPROTO_RAW`` implies ``IP_HDRINCL`` / ``IPV6_HDRINCL``, raw(7)), one
        marked socket per family. A datagram too long for one packet is dropped and counted (``udp_reply_errors``)."""
        family = _family(source[0])
        if _family(client[0]) != family or len(data) > _MAX_DATAGRAM - (28 if family == socket.AF_INET else 8):
            self.count("udp_reply_errors")
            return
        sock = self._raw.get(family)
        if sock is None:
            raw = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            raw.setsockopt(socket.SOL_SOCKET, SO_MARK, self.own_mark)
            sock = self._raw[family] = trio.socket.from_stdlib_socket(raw)
        await sock.sendto(udp_datagram(data, source, client), (client[0], 0))

    def start(self, fn: Any, *args: Any) -> None:
        """Start a task in the host's nursery."""
        assert self.nursery is not None
        self.nursery.start_soon(fn, *args)

    async def create_tcp_connection(self, endpoint: HostEndpoint) -> StreamIO:
        family = _family(endpoint.hostname)
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        self._mark(sock)
        await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # the port is known before the SYN
        port = sock.getsockname()[1]
        self.own_ports.add(port)
        try:
            await sock.connect((endpoint.hostname, endpoint.port))
        except OSError as exc:
            self.own_ports.discard(port)
            sock.close()
            code = (
                AppProxyFlowError.REFUSED
                if isinstance(exc, ConnectionRefusedError)
                else AppProxyFlowError.HOST_UNREACHABLE
            )
            raise AppProxyError(code, f"connect to {endpoint}: {exc}") from exc
        return _OwnStream(self, trio.SocketStream(sock), port)

    async def create_udp_session(self, endpoint: HostEndpoint) -> DatagramIO:
        family = _family(endpoint.hostname)
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        self._mark(sock)
        await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        port = sock.getsockname()[1]
        self.own_ports.add(port)
        await sock.connect((endpoint.hostname, endpoint.port))
        return _Session(self, sock, endpoint, port)

    # ---------------------------------------------------------------- settings
    async def apply_settings(self, settings: TransparentProxyNetworkSettings | None) -> None:
        kernel = self.kernel
        assert kernel is not None
        inc = [r.fields for r in (settings.included_network_rules or [])] if settings else []
        exc = [r.fields for r in (settings.excluded_network_rules or [])] if settings else []
        self.ruleset = await trio.to_thread.run_sync(kernel.apply, inc, exc)
        await super().apply_settings(settings)

    def _dns_settings(self) -> TransparentProxyNetworkSettings:
        """Claim rules for a DNS proxy: every flow to the intercepted resolver endpoints (UDP and TCP)."""
        rules = [
            NetworkRule.destination_network(HostEndpoint(addr, port), 128 if ":" in addr else 32)
            for addr, port in self.dns_intercept
        ]
        return TransparentProxyNetworkSettings(included_network_rules=rules)  # not validated: port 53 is the point

    # ---------------------------------------------------------------- flows
    def _loop(self, client: tuple[str, int], dst: tuple[str, int]) -> bool:
        if client[1] in self.own_ports or (dst[0], dst[1]) in self.listen:
            self.count("capture_loops")
            log.warning("refused a capture loop: %s -> %s is the proxy's own traffic", client, dst)
            return True
        return False

    def _uid(self, protocol: int, address: str, port: int) -> int | None:
        packed = ip_address(address).packed
        return self.owner(4 if len(packed) == 4 else 6, protocol, packed, port)

    def _claimed(self, key: FlowKey) -> bool:
        return self.settings is not None and self.settings.decide(key).claimed

    async def _accept(self, listener: trio.socket.SocketType) -> None:
        while True:
            sock, peer = await listener.accept()
            try:
                dst = sock.getsockname()[:2]
                client = peer[:2]
            except OSError:
                sock.close()
                continue
            if self._loop(client, dst):
                sock.close()
                continue
            src, dst_ip = ip_address(client[0]).packed, ip_address(dst[0]).packed
            five = (4 if len(src) == 4 else 6, 6, src, dst_ip, client[1], dst[1])
            decided = self.decisions.take(five, trio.current_time())
            if decided is not None:
                if decided.verdict == CLAIMED and decided.pending is not None:
                    decided.pending.attach(trio.SocketStream(sock))  # the provider already holds this flow
                else:
                    sock.close()  # refused at the SYN (or failed): the app's connection ends
                continue
            self.count("undecided_accepts")
            uid = self._uid(6, client[0], client[1])
            key = FlowKey(6, ip_address(dst[0]), dst[1], ip_address(client[0]), client[1])
            flow = AppProxyTCPFlow(
                trio.SocketStream(sock), HostEndpoint(dst[0], dst[1]), metadata_for_uid(uid, self.apps), source_uid=uid
            )
            if not self.admit():
                sock.close()
                continue
            self.start(self.dispatch, flow, self._claimed(key))

    def syn_verdict(self, payload: bytes, uid: int | None = None) -> int | None:
        """Decide one queued TCP SYN (see the module docstring); returns the mark to accept it with: None (the
        packet unchanged: it goes out as the app's) or the intercept mark (to TPROXY). Never raises.

        ``uid``: the socket owner the kernel sent with the packet (``NFQA_UID``); None looks the ``SYN_SENT``
        socket up in ``/proc/net`` (`ProcNetOwnerLookup`), which costs the handshake a walk of the TCP tables
        (about 6 ms in the lab, against about 0.1 ms for the rest of the decision)."""
        kernel = self.kernel
        assert kernel is not None
        try:
            view = PacketView.parse_untrusted(payload)
        except BadPacket:
            self.count("flow_errors")
            return None  # not a packet we can decide: fail open, as a full queue does
        if view.protocol != 6:
            return None
        now = trio.current_time()
        key = view.five_tuple()
        known = self.decisions.get(key, now)
        if known is not None:  # a retransmitted SYN: never ask twice
            return None if known.verdict == DIRECT else kernel.intercept_mark
        family = socket.AF_INET if view.version == 4 else socket.AF_INET6
        client = (socket.inet_ntop(family, view.src), view.sport)
        dst = (socket.inet_ntop(family, view.dst), view.dport)
        if client[1] in self.own_ports or dst in self.listen:
            return kernel.intercept_mark  # a capture loop: the accept path refuses and counts it
        if not self.admit():
            self.decisions.put(key, _Decision(FAILED), now)
            return kernel.intercept_mark  # over the flow limit: refused, as an accepted one would be
        self.count("decided_at_syn")
        if uid is None:
            uid = self._uid(6, client[0], client[1])
        pending = _PendingStream()
        flow = AppProxyTCPFlow(pending, HostEndpoint(*dst), metadata_for_uid(uid, self.apps), source_uid=uid)
        fkey = FlowKey(6, ip_address(dst[0]), dst[1], ip_address(client[0]), client[1])
        verdict = self.decide(flow, self._claimed(fkey))
        self.decisions.put(key, _Decision(verdict, pending), now)
        if verdict == CLAIMED:
            return kernel.intercept_mark
        self.active -= 1
        if verdict == DIRECT:
            return None  # Apple: the app's own connection goes on, untouched
        code = AppProxyFlowError.INTERNAL if verdict == FAILED else AppProxyFlowError.REFUSED
        self.start(_abort, flow, code)
        return kernel.intercept_mark  # refused: accepted by the listener, then closed

    async def _syn_reader(self, queue: NfQueue) -> None:
        """Read queued SYNs, a batch per wakeup; one accept verdict (with its mark) each, sent in one batch."""
        fd = queue.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            for packet in queue.receive_batch(SYN_BATCH):
                queue.verdict(packet.packet_id, NF_ACCEPT, self.syn_verdict(packet.payload, packet.uid))
            queue.flush()

    async def udp_reader(self, sock: trio.socket.SocketType) -> None:
        """Read captured datagrams from ``sock`` (a listener or a reply socket) and file them by app socket."""
        while True:
            try:
                data, anc, _flags, peer = await sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(32))
            except (OSError, trio.ClosedResourceError):
                return
            dst = _origdst(anc) or tuple(sock.getsockname()[:2])
            if not (isinstance(peer, tuple) and len(peer) >= 2):
                continue
            self._datagram(data, (str(peer[0]), int(peer[1])), (str(dst[0]), int(dst[1])))

    def _datagram(self, data: bytes, client: tuple[str, int], dst: tuple[str, int]) -> None:
        io = self.udp_flows.get(client)
        remote = HostEndpoint(dst[0], dst[1])
        if io is None:
            if self._loop(client, dst):
                return
            uid = self._uid(17, client[0], client[1])
            key = FlowKey(17, ip_address(dst[0]), dst[1], ip_address(client[0]), client[1])
            if not self.admit():
                return
            io = self.udp_flows[client] = _CapturedUdp(self, client)
            flow = AppProxyUDPFlow(
                io,
                HostEndpoint(client[0], client[1]),
                metadata_for_uid(uid, self.apps),
                initial_remote_endpoint=remote,
                source_uid=uid,
            )
            self.start(self.dispatch, flow, self._claimed(key))
        io.put(data, remote)

    # ---------------------------------------------------------------- run
    async def _listeners(self) -> list[tuple[trio.socket.SocketType, bool]]:
        out: list[tuple[trio.socket.SocketType, bool]] = []
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            tcp = trio.socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.setsockopt(socket.SOL_SOCKET, SO_MARK, self.own_mark)  # SYN-ACKs and accepted sockets inherit it
            _transparent(tcp, family)
            if family == socket.AF_INET6:
                tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await tcp.bind((address, self.port))
            self.port = tcp.getsockname()[1]
            tcp.listen(128)
            out.append((tcp, True))
            out.append((self.transparent_udp((address, self.port)), False))
            self.listen.add((address, self.port))
        return out

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, start the provider, report the port to ``task_status``; serve until cancelled, then clean up."""
        listeners = await self._listeners()
        self.kernel = ProxyKernelState(self.port, **self.kernel_names)
        try:
            await trio.to_thread.run_sync(self.kernel.install_routes)
            try:
                self.queue = NfQueue(self.kernel.queue_num, maxlen=SYN_QUEUE, fail_open=True, uid_gid=True)
            except OSError as exc:
                raise NetsimError(f"NFQUEUE {self.kernel.queue_num} cannot be bound ({exc}); another owns it") from exc
            await trio.to_thread.run_sync(self.kernel.install_queue)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._syn_reader, self.queue)
                for sock, is_tcp in listeners:
                    nursery.start_soon(self._accept if is_tcp else self.udp_reader, sock)
                if isinstance(self.provider, DNSProxyProvider):
                    await self.apply_settings(self._dns_settings())  # the system's choice, not the provider's
                await self.provider.start_proxy(self.options)
                if self.settings is None:
                    await self.apply_settings(None)
                task_status.started(self.port)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.provider.stop_proxy(0)
                finally:
                    problems = await trio.to_thread.run_sync(self.kernel.remove)
                    if self.queue is not None:
                        self.queue.close()  # after the rules are gone: nothing is queued to it any more
                    for sock, _ in listeners:
                        sock.close()
                    for raw in self._raw.values():
                        raw.close()
                    if problems:
                        log.error("proxy cleanup incomplete: %s", "; ".join(problems))


def load_proxy_provider(spec: str, base: type = AppProxyProvider) -> type[Any]:
    """Load ``"package.module:Class"`` naming a ``base`` subclass (default `AppProxyProvider`; the module must be
    importable). A bad spec or class exits with a message (these are the hosts' command lines)."""
    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name:
        raise SystemExit(f"provider spec {spec!r} must look like 'package.module:Class'")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        article = "an" if base.__name__[:1] in "AEIOU" else "a"
        raise SystemExit(f"{spec!r} is not {article} {base.__name__} subclass")
    return cls


async def serve_until_signalled(host: TproxyHost) -> None:
    """Run ``host`` in this namespace, print ``READY <port>`` once it listens, and return on SIGTERM or SIGINT
    (the host's kernel state is removed on the way out)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(host.run)
            print(f"READY {port}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def _serve(args: argparse.Namespace) -> None:
    apps = [AppRule(label, uid=int(uid)) for uid, _, label in (a.partition("=") for a in args.app)]
    names = DNS_PROXY_NAMES if args.dns else {}
    host = TproxyHost(
        load_proxy_provider(args.provider)(),
        options=json.loads(args.options) if args.options else None,
        app_rules=apps,
        port=args.port,
        mark_own=not args.no_mark_own,
        kernel_names=names,
        system_dns=args.system_dns,
    )
    await serve_until_signalled(host)
    if args.print_stats:
        stats = {k: getattr(host.statistics(), k) for k in host.statistics().__slots__}
        print("STATS " + json.dumps({"statistics": stats, "ruleset": host.ruleset}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m netsim.runtime.proxy_tproxy``: host a proxy provider in this namespace until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m netsim.runtime.proxy_tproxy", description=main.__doc__)
    parser.add_argument("--provider", required=True, help="package.module:Class (importable)")
    parser.add_argument("--options", help="JSON object passed to start_proxy")
    parser.add_argument("--app", action="append", default=[], metavar="UID=LABEL", help="an app by uid (repeat)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--print-stats", action="store_true", help="print 'STATS {json}' (counters, ruleset) at exit")
    parser.add_argument("--no-mark-own", action="store_true", help="fault switch: leave the host's sockets unmarked")
    parser.add_argument("--dns", action="store_true", help="use the DNS proxy's own kernel names (DNS_PROXY_NAMES)")
    parser.add_argument("--system-dns", action="append", default=[], metavar="ADDR", help="a system DNS server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    trio.run(_serve, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
