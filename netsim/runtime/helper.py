"""The helper process: accepts the provider over IPC, owns the WireGuard session and the physical UDP socket.

Theory of operation
-------------------
This is the stand-in for a macOS privileged helper tool (docs/design.md, Processes). It holds what a sandboxed
extension should not: the tunnel's private key, the WireGuard session state and a UDP socket on the physical
interface. The provider sends it batches of inner packets over the IPC (`netsim.core.ipc`) and receives the
decrypted replies the same way. Two loops share one `WireGuardDevice`:

* the **network loop** (`Helper.run`) waits until the UDP socket is readable or the device's next timer is due,
  drains the socket into reused buffers (``recvfrom_into`` until EAGAIN, at most ``batch`` datagrams: Python has
  no ``recvmmsg``), feeds the whole batch to the device, fires due timers, sends what the device queued
  (handshakes, keepalives, flushed staged packets) and hands the decrypted batch to the provider in one IPC
  frame;
* the **session loop** (`Helper.serve_session`, one per provider connection) reads IPC events: each packet of a
  PACKETS frame is validated (one reused `PacketView`; its source must be a tunnel address), classified by the
  optional `PolicyEngine` (default: everything TUNNEL), encrypted with one ``encapsulate`` call per ``batch``
  packets into reused datagram buffers and sent.

Tunnel state lives in the `Helper`, not in a session: when the provider disconnects the device, its keys and
timers keep running (decrypted packets are then dropped as ``no_provider``), and the next provider connection
resumes the same session. The UDP socket is bound to the physical interface with ``SO_BINDTODEVICE`` and marked
with the bypass fwmark (`netsim.runtime.netconfig.BYPASS_FWMARK`), so the helper's own datagrams never route into
the utun even when the tunnel claims the default route (the Linux analogue of Apple exempting a provider's own
traffic, F1).

Ledger (docs/reliability.md C1, L0): every stage keeps ``read = forwarded + dropped[reason] + queued``::

    ipc_in      packets from the provider        -> wg_encrypt | bypass; dropped: malformed, inner_src_not_allowed,
                                                    policy_drop:<rule> (one validation with or without a policy)
    bypass      BYPASS verdicts                  -> the bypass hook; dropped: bypass_unavailable (no hook yet)
    wg_encrypt  packets given to the device      -> forwarded: sent on a live session and answered by the peer;
                                                    dropped: sent_unconfirmed (no answer within 15 s, or sent
                                                    while the session was not live), no_route, staged_overflow,
                                                    handshake_timeout, ...; queued: staged while a handshake is in
                                                    flight, and sent but not yet answered
    udp_out     datagrams to the server          -> sendto accepted; dropped: udp_no_route, udp_eagain, udp_error
    wg_decrypt  datagrams from the network       -> inner packets; dropped: the device's reasons, plus
                                                    ``keepalive`` and ``control`` (protocol messages consumed)
    ipc_out     inner packets for the provider   -> written to the IPC socket; dropped: no_provider,
                                                    ipc_queue_full, ipc_closed

A stage's outcomes are counted from independent sources, never derived from the other terms: the datagrams the
device actually produced (`_book_sent`), its ``rx_packets`` / ``rx_keepalives`` / ``rx_control_consumed`` and
named drops -- the device classifies each received datagram once (`classify_datagram`) and counts one outcome
for it, so no input can drive a counter negative. A packet lost without a counter shows up as an unattributed
difference in `netsim.core.ledger.Ledger.check`. docs/helper.md says exactly what each stage means.

Path changes (issue 16; WireGuardKit's path monitor). The helper is the process with the socket, so it watches
the path itself (`watch_path`, on its namespace's netlink route events, `netsim.runtime.pathmonitor`): when the
main table's default route moves to another interface it re-binds the socket there (``SO_BINDTODEVICE``, same
port); when there is none (link down) it stays put; as soon as a default route is back it forces a handshake
with every peer instead of waiting for the 5 s / 15 s timers (`path_changed`). Counted in the statistics'
``path`` object; ``path.ready`` is False from a path loss until that handshake completed, which the provider
reads to leave ``reasserting``.

Logs are JSON lines on stderr (`JsonLogFormatter`), one object per event, so tests and tools parse them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

import trio

from netsim.core import ipc
from netsim.core.dnsguard import DnsGuard
from netsim.core.family import DARWIN_AF_INET, DARWIN_FAMILY_BY_NIBBLE
from netsim.core.ledger import Ledger
from netsim.core.packet import PacketView
from netsim.core.policy import Action, Mechanism, PolicyEngine, parse_policy, route_exclusions_payload
from netsim.core.wireguard.config import TunnelConfig
from netsim.core.wireguard.device import (
    HandshakeCompleted,
    HandshakeTimeout,
    WireGuardDevice,
    classify_datagram,
)
from netsim.core.wireguard.messages import MSG_TRANSPORT, TRANSPORT_MIN_SIZE
from netsim.core.wireguard.peer import Endpoint, Peer
from netsim.core.wireguard.timers import Timers
from netsim.errors import BadPacket, ConfigError, LocalProtocolError, RemoteProtocolError, TunnelDown
from netsim.runtime.channel import IpcChannel, UnixIpcServer
from netsim.runtime.driver import DatagramDriver, DatagramTransport
from netsim.runtime.logs import JsonLogFormatter, configure_json_logging
from netsim.runtime.pathmonitor import EventSource
from netsim.runtime.pathmonitor import watch_path as _watch_path
from netsim.runtime.push import learn_dns_answers, push_settings
from netsim.runtime.settings_payload import SETTINGS_VERSION, tunnel_settings_payload
from netsim.runtime.statistics import HelperStatistics
from netsim.transports.udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, UdpTransport

if TYPE_CHECKING:
    from netsim.core.nat import NatTable
    from netsim.runtime.bypass import BypassSink, NatBypass

    NatBypassFactory = Callable[[BypassSink, Ledger], NatBypass]

__all__ = [
    "DEFAULT_BATCH",
    "SETTINGS_VERSION",
    "DatagramTransport",
    "Helper",
    "HelperStatistics",
    "JsonLogFormatter",
    "UdpTransport",
    "configure_json_logging",
    "tunnel_settings_payload",
]

log = logging.getLogger("netsim.helper")

DEFAULT_BATCH = 64
# An IPC frame carries at most this many packets from the helper (64 KiB each worst case fits the 1 MiB default
# frame only in small numbers, so the batch is also cut by bytes with Connection.batch_fits).
_MAX_IPC_BATCH = 256


def _nat_carries(nat: NatTable, view: PacketView, now: float) -> bool:
    """True when ``nat`` has a live mapping for this packet's flow that already sent to its destination."""
    proto = view.protocol
    if proto == 6 or proto == 17:
        port, remote = view.sport, (view.dst, view.dport)
    elif (proto == 1 and view.icmp_type == 8) or (proto == 58 and view.icmp_type == 128):
        port, remote = view.icmp_id, (view.dst, 0)
    else:
        return False
    m = nat.mapping_for(view.version, proto, view.src, port, now)
    return m is not None and remote in m.remotes


# ------------------------------------------------------------------------------------------------ helper
class Helper:
    """The helper's tunnel: one WireGuard device, one datagram transport, at most one provider session.

    Args:
        config: the wg-quick configuration (interface key, addresses, DNS, MTU, peers).
        transport: the network side (`UdpTransport.open(...)` in a real helper).
        endpoints: resolved ``(host, port)`` per peer public key (base64) for peers whose Endpoint is a name;
            peers with an IP literal endpoint need no entry.
        policy: classifies each (validated) packet from the provider; None tunnels every valid packet.
        bypass: receives the packets the policy marks BYPASS when there is no ``nat_bypass``; without either
            they are dropped as ``bypass_unavailable``.
        nat_bypass: the NAT mechanism's factory, ``factory(sink, ledger) -> NatBypass``, called once here when
            the helper's ledger exists, with the helper as the sink and its ledger (so the NAT's ``nat_out`` /
            ``nat_in`` stages join it); e.g. `netsim.runtime.bypass.NatBypassHost.make_bypass`. The helper
            carries its BYPASS verdicts with it and runs its capture loop in `run`.
        batch: datagrams read per wakeup and packets encrypted per ``encapsulate`` call.
        timers / rng: passed to the `WireGuardDevice` (tests shorten timers).
        clock: the time source (``trio.current_time``; the device never reads a clock itself).
    """

    def __init__(
        self,
        config: TunnelConfig,
        transport: DatagramTransport,
        *,
        endpoints: Mapping[str, Endpoint] | None = None,
        policy: PolicyEngine | None = None,
        bypass: Callable[[list[memoryview]], None] | None = None,
        nat_bypass: NatBypassFactory | None = None,
        batch: int = DEFAULT_BATCH,
        timers: Timers | None = None,
        rng: Any = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if not config.peers:
            raise ConfigError("the helper's WireGuard configuration needs a [Peer] (the VPN server)")
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        self.config = config
        self.transport = transport
        #: While set, the transport's kernel filter drops handshake initiations until this time (`_filter_flood`).
        self._filter_until: float | None = None
        self.policy = policy
        self.bypass = bypass
        self.batch = batch
        self.clock = clock
        mtu = config.interface.mtu or 1420
        self.device = WireGuardDevice(config.interface.private_key, timers=timers, rng=rng, mtu=mtu)
        self.device.wall_offset = time.time() - clock()
        endpoints = dict(endpoints or {})
        server: str | None = None
        for peer in config.peers:
            ep = endpoints.get(peer.public_key.to_base64())
            self.device.add_peer(peer, endpoint=ep)
            resolved = ep or (
                (str(peer.endpoint.address), peer.endpoint.port)
                if peer.endpoint is not None and peer.endpoint.address is not None
                else None
            )
            if server is None and resolved is not None:
                server = str(ip_address(str(resolved[0])))
        self._server_address = server
        self.settings = self._settings_payload()
        # the network loop (`netsim.runtime.driver`): its receive slab is sliced once and reused for every batch
        self._driver = DatagramDriver(
            _HelperCore(self), transport, batch=batch, clock=clock, send=self._send_datagram, after=self._after_batch
        )
        self._rx_views = self._driver.views
        self._rx_sizes = self._driver.sizes
        self._rx_addrs: list[Endpoint | None] = self._driver.addrs
        # transmit buffers: one slab, sliced once
        tx_size = mtu + 64
        self._tx_slab = bytearray(batch * tx_size)
        txs = memoryview(self._tx_slab)
        self._tx_views = [txs[i * tx_size : (i + 1) * tx_size] for i in range(batch)]
        self._tx_sizes = [0] * batch
        self._tx_addrs: list[Endpoint | None] = [None] * batch
        self._view = PacketView()
        # ledger
        self.ledger = Ledger("helper", ("ipc_in", "bypass", "wg_encrypt", "udp_out", "wg_decrypt", "ipc_out"))
        self._ipc_in = self.ledger.stage("ipc_in")
        self._bypass = self.ledger.stage("bypass")
        self._wg_out = self.ledger.stage("wg_encrypt")
        self._udp_out = self.ledger.stage("udp_out")
        self._wg_in = self.ledger.stage("wg_decrypt")
        self._ipc_out = self.ledger.stage("ipc_out")
        # the device counts wg_decrypt's every outcome and wg_encrypt's drops itself (no before/after diff)
        self.device.count_into(self._wg_in, self._wg_out)
        # data packets handed to a live session, awaiting the peer's answer (see `_book_sent`):
        # peer -> [[transport_rx_epoch at the first send, deadline, count], ...], oldest first
        self._awaiting: dict[Peer, list[list[Any]]] = {}
        self._awaiting_total = 0
        t = self.device.timers
        self._no_reply_time = t.keepalive_timeout + t.rekey_timeout
        # the tunnel's own addresses: the only inner sources a client may emit (`_classify`)
        self._inner_sources = frozenset(a.ip.packed for a in config.interface.addresses)
        self.verdicts = {"tunnel": 0, "bypass": 0, "drop": 0}
        self.tx_batches = 0  # encapsulate calls of the outbound path (hops_json)
        self.sessions = 0
        self.observers = 0  # read-only observer connections served (serve_observer)
        self.observer_rejected = 0  # observers that sent something other than STATS_REQUEST/PING
        self.policy_updates = 0
        self.policy_rejected = 0
        self.server: UnixIpcServer | None = None
        self.nat_bypass: NatBypass | None = None
        self.bypass_tunnelled = 0
        self.bypass_sticky = 0  # TUNNEL verdicts kept on the NAT bypass because their flow already used it
        self.settings_pushed = 0  # mid-session SETTINGS sent for new route exclusions (bypassed domains)
        self._held: list[Any] = []  # decrypted packets waiting for those SETTINGS to go out first
        self._dns_view = PacketView()
        self.dns_guard = self._make_dns_guard()  # answers are learned only for queries it saw (_learn_dns)
        self._channel: IpcChannel | None = None
        self._connected = trio.Event()
        # path changes (`path_changed`): the interface the socket is bound to, and what happened since start
        self.interface: str | None = None
        self.path_handshake = True  # force a handshake when the path comes back (False: the control of a test)
        self.path_satisfied = True
        self.path_changes = 0
        self.path_rebinds = 0
        self.path_rebind_errors = 0
        self.path_handshakes = 0  # initiations sent because the path changed (not by the device's timers)
        self.path_recoveries = 0  # handshakes completed after a path change
        self._path_awaiting = False  # a forced handshake has not completed yet
        self.nat_bypass = self._make_nat_bypass(nat_bypass) if nat_bypass is not None else None

    def _make_nat_bypass(self, factory: NatBypassFactory) -> NatBypass:
        """Build the NAT bypass with this helper as its sink and its stages in this ledger (checked: a NAT that
        delivers or counts elsewhere would leave BYPASS replies unaccounted in this helper's ledger)."""
        nat_bypass = factory(self, self.ledger)
        if nat_bypass.sink is not self or nat_bypass.ledger is not self.ledger:
            raise ConfigError(
                "the nat_bypass factory must build the NatBypass with the sink and ledger it is given "
                "(NatBypass(..., sink=sink, ledger=ledger))"
            )
        return nat_bypass

    def _settings_payload(self) -> dict[str, Any]:
        """SETTINGS for the provider: the tunnel config plus the policy's route exclusions (route mechanism)."""
        out = tunnel_settings_payload(self.config, self._server_address)
        engine = self.policy
        if engine is not None:
            # route mechanism: prefix rules, plus host routes for the live addresses of bypassed domains
            exclusion = engine.route_exclusion(self.clock()) if engine.policy.mechanism is Mechanism.ROUTE else None
            out.update(route_exclusions_payload(engine.policy, exclusion))
        else:
            out.update(excluded_routes=[], bypass_unsupported=[])
        return out

    # -- bypass ---------------------------------------------------------------------------------------------
    def deliver_bypass(self, packets: list[ipc.Buffer]) -> str | None:
        """Hand de-NATed bypass replies to the provider in one IPC frame; learn DNS answers first.

        Returns None when handed over (the channel's ``ipc_out`` stage counts what happens next), or
        ``"no_provider"`` when no provider is connected (the caller counts it). The NAT itself uses the
        `BypassSink` pair below, which reuses its parse of each reply.
        """
        if self.policy is not None and self.policy.has_domain_rules:
            self._learn_dns(packets, self.clock())
        return self.bypass_deliver(packets)

    def bypass_deliver(self, packets: list[ipc.Buffer]) -> str | None:
        """`BypassSink`: hand replies to the provider (their DNS answers were learned already); they may be views
        into the NAT's buffers, so the channel copies whatever it has to queue (`_send_to_provider`)."""
        ch = self._channel
        if ch is None or ch.is_broken:
            return "no_provider"
        self._send_to_provider(ch, packets, borrowed=True)
        return None

    def bypass_dns_reply(self, view: PacketView, now: float) -> None:
        """`BypassSink`: learn from one de-NATed DNS answer, with the NAT's parse of it (see `_learn_dns`)."""
        engine = self.policy
        if engine is None or not engine.has_domain_rules:
            return
        payload = memoryview(view.buffer)[view.l4_offset + 8 : view.total_length]
        try:
            engine.learn_dns_response_untrusted(
                payload, now, guard=self.dns_guard, resolver=view.src, client=view.dst, client_port=view.dport
            )
        except BadPacket:
            pass  # not ours to judge: the app gets the packet; the bad answer is counted by the policy

    def _make_dns_guard(self) -> DnsGuard:
        """The tracker of the client's DNS queries; the tunnel's own addresses (its DNS servers, the WireGuard
        servers, the interface addresses) are never learned, whatever an answer says."""
        i = self.config.interface
        own: list[Any] = [*i.dns_servers, *(a.ip for a in i.addresses)]
        own += [peer.endpoint[0] for peer in self.device.peers if peer.endpoint is not None]
        return DnsGuard(own)

    def _learn_dns(self, packets: Sequence[ipc.Buffer], now: float) -> int:
        """Teach the policy the name -> address answers in DNS responses (UDP from port 53), before the app
        sees them, so a domain rule applies to the app's very first packet to that address. Only answers to a
        query the client sent (recorded on the way out, `_classify`) count: `DnsGuard` matches id, question,
        client port and the address asked, caps the TTL, refuses the tunnel's own addresses, and counts what it
        refuses. Returns how many bindings were (re)learned."""
        assert self.policy is not None
        return learn_dns_answers(self.policy, self.dns_guard, self._dns_view, packets, now)

    # -- statistics -----------------------------------------------------------------------------------------
    def statistics(self) -> HelperStatistics:
        """A frozen snapshot; the ``wg_encrypt`` queue gauge is the device's staged data packets plus the data
        packets sent on a live session and not yet answered (see `_book_sent`)."""
        self._settle(self.clock())
        staged = sum(1 for peer in self.device.peers for pkt in peer.staged if pkt)
        self._wg_out.set_queued(staged + self._awaiting_total)
        return HelperStatistics(
            ledger=self.ledger.snapshot(),
            device=self.device.statistics(),
            server=self.server.statistics() if self.server is not None else None,
            sessions=self.sessions,
            connected=self._channel is not None,
            verdicts=dict(self.verdicts),
            policy_updates=self.policy_updates,
            policy_rejected=self.policy_rejected,
            recv_errors=getattr(self.transport, "recv_errors", 0),
            wakeups=self.wakeups,
            bypass_tunnelled=self.bypass_tunnelled,
            settings_pushed=self.settings_pushed,
            bypass_sticky=self.bypass_sticky,
            policy=self.policy.statistics() if self.policy is not None else None,
            bypass=self.nat_bypass.statistics() if self.nat_bypass is not None else None,
            dns_guard=self.dns_guard.statistics(),
        )

    def stats_json(self) -> dict[str, Any]:
        """`statistics` as the JSON object a STATS_RESPONSE carries, with the ``path`` object (`path_changed`)."""
        out = self.statistics().to_json()
        out["path"] = self.path_json()
        out["tunnel"] = self.tunnel_json()
        out["hops"] = self.hops_json()
        stats = getattr(self.transport, "statistics", None)
        out["udp"] = stats() if stats is not None else None
        return out

    def hops_json(self) -> dict[str, dict[str, int]]:
        """Wakeups, batches and packets per hop, to check that a batch crosses each hop with one wakeup
        (docs/helper.md, Hops): ``udp_in`` (network-loop wakeups, the ones that received, receive syscalls,
        datagrams), ``udp_out`` (encrypted batches, send syscalls, datagrams), and the current provider
        session's ``uds_in`` (stream receives, frames, packets) and ``uds_out`` (sendmsg calls, writer-task
        wakeups, frames, packets). Plain counters; the UDS ones start at 0 with each session."""
        driver, t = self._driver, self.transport
        ch = self._channel
        c = ch.statistics() if ch is not None else None
        return {
            "udp_in": {
                "wakeups": driver.wakeups,
                "batches": driver.batches,
                "reads": getattr(t, "rx_reads", driver.datagrams),
                "syscalls": getattr(t, "rx_syscalls", driver.datagrams),
                "packets": driver.datagrams,
            },
            "udp_out": {
                "batches": self.tx_batches,
                "sends": getattr(t, "tx_sends", 0),
                "packets": getattr(t, "tx_datagrams", 0),
            },
            "uds_in": {
                "receives": c.receive_calls if c else 0,
                "frames": c.frames_received if c else 0,
                "packets": c.packets_received if c else 0,
            },
            "uds_out": {
                "sends": c.sendmsg_calls if c else 0,
                "writer_wakeups": c.writer_wakeups if c else 0,
                "frames": c.frames_sent if c else 0,
                "packets": c.ipc_out.read if c else 0,
            },
        }

    def tunnel_json(self) -> dict[str, Any]:
        """Whether the server answers: ``unanswered_for`` (seconds data went out with nothing authenticated back,
        the longest over the peers) and ``responding`` (false from WireGuard's ``no_reply_time``, 15 s, on: the
        session is taken for dead and re-handshaken; `netsim.runtime.forwarding.HelperForwardingProvider`
        reasserts while it is false; row F6)."""
        now = self.clock()
        device = self.device
        unanswered = max((device.unanswered_for(peer, now) for peer in device.peers), default=0.0)
        return {
            "unanswered_for": round(unanswered, 3),
            "no_reply_time": device.no_reply_time,
            "responding": unanswered < device.no_reply_time,
        }

    def path_json(self) -> dict[str, Any]:
        """The path-change counters: ``ready`` is True when the path is satisfied and no forced handshake is
        outstanding (the provider leaves ``reasserting`` on it); ``handshakes_by_reason`` splits the device's
        initiations into ``path_change`` (forced here) and ``timers_or_data`` (the device's own)."""
        forced = self.path_handshakes
        by_reason = {"path_change": forced, "timers_or_data": self.device.handshakes_initiated - forced}
        return {
            "interface": self.interface,
            "satisfied": self.path_satisfied,
            "ready": self.path_satisfied and not self._path_awaiting,
            "changes": self.path_changes,
            "rebinds": self.path_rebinds,
            "rebind_errors": self.path_rebind_errors,
            "handshakes_by_reason": by_reason,
            "recoveries": self.path_recoveries,
            "path_handshake": self.path_handshake,
        }

    # -- path changes ---------------------------------------------------------------------------------------
    async def watch_path(
        self, events: EventSource, interface_of: Callable[[], str | None], *, settle: float = 0.05
    ) -> None:
        """Follow the physical path until cancelled: ``interface_of()`` (e.g.
        `netsim.runtime.pathmonitor.default_route_interface`) is looked at after each burst of ``events``, and
        `path_changed` is called when it differs. Closes ``events``."""

        async def changed(old: object, new: object) -> None:
            self.path_changed(new if isinstance(new, str) else None)

        try:
            await _watch_path(events, interface_of, changed, settle=settle)
        finally:
            events.close()

    def path_changed(self, interface: str | None) -> None:
        """The default route now uses ``interface`` (None: there is none; the path is unsatisfied).

        Unsatisfied: the socket stays bound where it is (nothing else could carry it) and ``path.ready`` turns
        False. Satisfied again, or on another interface: re-bind the socket there if it moved, then force a
        handshake with every peer (WireGuard's rate limit of one initiation per REKEY_TIMEOUT is lifted for this
        one: the path is new) and flush it at once, instead of waiting for the device's 5 s / 15 s timers.
        """
        self.path_changes += 1
        if interface is None:
            self.path_satisfied = False
            self._path_awaiting = True
            log.info("path unsatisfied", extra={"event": "path", "satisfied": False, "interface": self.interface})
            return
        came_back = not self.path_satisfied
        self.path_satisfied = True
        moved = interface != self.interface
        if moved:
            rebind = getattr(self.transport, "bind_to_device", None)
            if rebind is None:  # a transport with no device (the fake network): nothing to re-bind
                self.interface = interface
            else:
                try:
                    rebind(interface)
                except ConfigError as exc:
                    self.path_rebind_errors += 1
                    log.warning("re-bind failed", extra={"event": "path_rebind_error", "error": str(exc)})
                else:
                    self.path_rebinds += 1
                    self.interface = interface
        log.info(
            "path satisfied",
            extra={"event": "path", "satisfied": True, "interface": interface, "moved": moved, "back": came_back},
        )
        if not (moved or came_back):
            return
        if not self.path_handshake:
            self._path_awaiting = False
            return
        now = self.clock()
        dev = self.device
        before = dev.handshakes_initiated
        for peer in dev.peers:
            if peer.endpoint is not None:
                peer.last_sent_initiation = -math.inf  # a new path: not a retry the rate limit guards against
                dev.initiate(peer, now)
        sent = dev.handshakes_initiated - before
        self.path_handshakes += sent
        self._path_awaiting = sent > 0
        self._flush(now)

    @property
    def connected(self) -> bool:
        """True while a provider session is open."""
        return self._channel is not None

    async def wait_connected(self) -> None:
        """Wait until a provider session is open."""
        while self._channel is None:
            await self._connected.wait()

    # -- device bookkeeping ---------------------------------------------------------------------------------
    def _log_events(self) -> None:
        while (ev := self.device.next_event()) is not None:
            key = ev.peer.public_key
            peer = key.hex()[:16] if isinstance(key, bytes) else str(key)
            if isinstance(ev, HandshakeCompleted):
                log.info("handshake completed", extra={"event": "handshake", "peer": peer, "initiator": ev.initiator})
                if self._path_awaiting:
                    self._path_awaiting = False
                    self.path_recoveries += 1
            elif isinstance(ev, HandshakeTimeout):
                log.warning("handshake timed out", extra={"event": "handshake_timeout", "peer": peer})
            else:
                log.info("keys zeroed", extra={"event": "keys_zeroed", "peer": peer})

    def _book_sent(self, peer: Peer, n: int, now: float) -> None:
        """``n`` data packets for ``peer`` were just encrypted and handed to the UDP send.

        On a session that is not live (`WireGuardDevice.session_live`: no handshake-confirmed keypair, or sends
        unanswered for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT) they are ``sent_unconfirmed`` at once. On a live one
        they wait (in the ``wg_encrypt`` queue gauge) for the peer's next authenticated transport message, which
        makes them ``forwarded``; if none comes within KEEPALIVE_TIMEOUT + REKEY_TIMEOUT of the first of them
        they are ``sent_unconfirmed`` too (`_settle`). Per batch, not per packet.
        """
        if not n:
            return
        if not self.device.session_live(peer, now):
            self._wg_out.count_dropped("sent_unconfirmed", n)
            return
        buckets = self._awaiting.setdefault(peer, [])
        epoch = peer.transport_rx_epoch
        if buckets and buckets[-1][0] == epoch:
            buckets[-1][2] += n
        else:
            buckets.append([epoch, now + self._no_reply_time, n])
        self._awaiting_total += n

    def _settle(self, now: float) -> None:
        """Decide the packets awaiting an answer: answered -> forwarded; past the deadline -> sent_unconfirmed."""
        if not self._awaiting_total:
            return
        st = self._wg_out
        for peer, buckets in self._awaiting.items():
            epoch = peer.transport_rx_epoch
            while buckets:
                b_epoch, deadline, count = buckets[0]
                if b_epoch != epoch:  # an authenticated transport message arrived after these were sent
                    st.count_forwarded(count)
                elif now >= deadline:
                    st.count_dropped("sent_unconfirmed", count)
                else:
                    break
                del buckets[0]
                self._awaiting_total -= count

    def _peer_at(self, addr: Endpoint) -> Peer | None:
        """The peer whose endpoint is ``addr`` (several peers only; one peer takes every datagram)."""
        peers = self.device.peers
        if len(peers) == 1:
            return peers[0]
        for peer in peers:
            if peer.endpoint == addr:
                return peer
        return None

    def _send_datagram(self, data: ipc.Buffer, addr: Endpoint) -> None:
        st = self._udp_out
        st.count_read()
        reason = self.transport.send(data, addr)
        if reason is None:
            st.count_forwarded()
        else:
            st.count_dropped(reason)

    def _flush(self, now: float) -> None:
        """Send the device's control datagrams and re-arm the network loop's timer if it moved earlier."""
        self._driver.flush(now)

    def _datagrams_to_send(self, now: float) -> Iterator[tuple[ipc.Buffer, Endpoint]]:
        """The device's queued datagrams; staged data among them is booked (`_book_sent`) as it leaves."""
        for data, addr in self.device.datagrams_to_send(now):
            # staged data flushed after a handshake is transport data longer than a keepalive (32 bytes)
            if len(data) > TRANSPORT_MIN_SIZE and classify_datagram(data) == MSG_TRANSPORT:
                peer = self._peer_at(addr)
                if peer is not None:
                    self._book_sent(peer, 1, now)
            yield data, addr

    def _handle_timer(self, now: float) -> None:
        until = self._filter_until
        if until is not None and now >= until:  # the device reads initiations again: so must the socket
            self._filter_until = None
            self.transport.filter_initiations(False)  # type: ignore[attr-defined]
        self._settle(now)  # before the no-reply handshake replaces the session
        self.device.handle_timer(now)
        self._log_events()

    async def _after_batch(self, now: float) -> None:
        self._settle(now)
        self._deliver()
        if self._held:
            await self._push_settings()

    def jump_clock(self, seconds: float) -> None:
        """The simulated Mac slept: move the helper's clock (a `netsim.runtime.clock.SleepClock`) ``seconds``
        forward, so the session's keys age as a Mac's do across sleep, and wake the network loop so the timers the
        jump made due fire now. The device's wall time (TAI64N timestamps) moves with it, as a Mac's wall clock
        does across sleep: the next initiation's timestamp is later than any the server saw.

        Raises:
            LocalProtocolError: the helper's clock is not a SleepClock.
        """
        from netsim.runtime.clock import SleepClock

        clock = self.clock
        if not isinstance(clock, SleepClock):
            raise LocalProtocolError("jump_clock needs a helper built with clock=SleepClock()")
        clock.jump(seconds)
        self.clock_jumped(seconds)

    def clock_jumped(self, seconds: float) -> None:
        """The helper's clock has just jumped ``seconds`` forward (`jump_clock`, or the lab helper's clock file):
        re-arm the network loop on the jumped clock."""
        self._driver.rearm()

    @property
    def wakeups(self) -> int:
        """Network-loop wakeups so far."""
        return self._driver.wakeups

    # -- network loop ---------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The network loop (run it in a nursery for the helper's lifetime; cancel to stop)."""
        dev = self.device
        for peer in dev.peers:  # bring the session up now rather than on the first packet
            if peer.endpoint is not None:
                dev.initiate(peer, self.clock())
        self._flush(self.clock())
        if self.nat_bypass is None:
            await self._driver.run(task_status=task_status)
            return
        async with trio.open_nursery() as nursery:  # the NAT's capture loop lives as long as the helper's
            await nursery.start(self.nat_bypass.run)
            await self._driver.run(task_status=task_status)

    def _receive(self, n: int, now: float) -> None:
        """Feed one batch to the device, which books every datagram's single outcome in ``wg_decrypt``.

        The device classifies each datagram once (`classify_datagram`: the u32 little-endian type, exact
        sizes) and counts exactly one outcome for it into the stage (`WireGuardDevice.count_into`): an inner
        packet (forwarded), a keepalive, a consumed handshake/cookie message (``control``) or one named drop.
        So no crafted datagram can make a counter negative or leave one unattributed.
        """
        views, sizes = self._rx_views, self._rx_sizes
        datagrams = [views[i][: sizes[i]] for i in range(n)]
        self.device.receive_datagrams_untrusted(datagrams, self._rx_addrs[:n], now)  # type: ignore[arg-type]
        if self._filter_until is None:
            self._filter_flood(now)
        self._log_events()
        self._settle(now)

    def _filter_flood(self, now: float) -> None:
        """Under a handshake flood, move the shedding into the kernel (S10, docs/helper.md).

        When the device, under load with this second's handshake budget spent, would drop every further
        initiation unread (`WireGuardDevice.initiations_shed_until`), the transport's socket filter drops them
        instead (`UdpTransport.filter_initiations`) until that moment, when `_handle_timer` removes it. Same
        outcome for every initiation, but the flood no longer costs a read each or fills the receive buffer in
        front of the session's transport data, whatever its rate. A transport without the filter: nothing
        changes, the device sheds them.
        """
        until = self.device.initiations_shed_until(now)
        if until is None:
            return
        filter_initiations = getattr(self.transport, "filter_initiations", None)
        if filter_initiations is not None and filter_initiations(True):
            self._filter_until = until

    def _deliver(self) -> None:
        """Hand the decrypted packets to the provider: one IPC frame per batch, dropped (counted) if none."""
        items = self.device.take_received()
        if not items:
            return
        packets = [pkt for _, pkt in items]
        engine = self.policy
        # The tunnel's resolver answers through here. With the route mechanism a bypassed name that resolved to
        # a new address needs its host route in place before the app sees the answer, or its first SYN goes
        # into the tunnel and the flow breaks when the route lands. So the batch waits until `run` has sent the
        # new SETTINGS; the provider handles frames in order and applies them before it writes the answer.
        if (
            engine is not None
            and engine.has_domain_rules
            and self._learn_dns(packets, self.clock())
            and engine.policy.mechanism is Mechanism.ROUTE
        ):
            settings = self._settings_payload()
            if settings != self.settings:
                self.settings = settings
                self._held.extend(packets)  # the device's own bytes: safe to hold
                return
        ch = self._channel
        if ch is None or ch.is_broken:
            out = self._ipc_out
            out.count_read(len(packets))
            out.count_dropped("no_provider", len(packets))
            return
        self._send_to_provider(ch, packets)

    async def _push_settings(self) -> None:
        """Send the changed SETTINGS (route exclusions for newly resolved bypassed names), then the batch that
        taught them (`_deliver`)."""
        held, self._held = self._held, []
        ch = self._channel
        sent = await push_settings(ch, self.settings)
        if sent:
            self.settings_pushed += 1
        if not sent or ch is None or ch.is_broken:
            self._ipc_out.count_read(len(held))
            self._ipc_out.count_dropped("no_provider", len(held))
            return
        self._send_to_provider(ch, held)

    def _send_to_provider(self, ch: IpcChannel, packets: Sequence[ipc.Buffer], *, borrowed: bool = False) -> None:
        """Send ``packets`` on the channel in as few frames as fit (the channel counts ``ipc_out``).

        ``borrowed``: they are views into buffers the caller's next receive reuses (the NAT's capture buffers), so
        the channel writes them at once and copies only what the socket refuses; the device's decrypted packets
        are ``bytes`` of their own and are not copied.
        """
        start = 0
        total = len(packets)
        while start < total:
            end = min(start + _MAX_IPC_BATCH, total)
            nbytes = sum(len(p) for p in packets[start:end])
            while end - start > 1 and not ch.connection.batch_fits(end - start, nbytes):
                end -= 1
                nbytes -= len(packets[end])
            chunk = packets[start:end]
            try:
                ch.send_packets_nowait(
                    chunk, [DARWIN_FAMILY_BY_NIBBLE[p[0] >> 4] or DARWIN_AF_INET for p in chunk], borrowed=borrowed
                )
            except LocalProtocolError:
                pass  # counted by the channel as ipc_local_error (e.g. the session is closing)
            start = end

    # -- provider sessions ----------------------------------------------------------------------------------
    async def serve_session(self, channel: IpcChannel) -> None:
        """Serve one provider connection (handshake already done) until it closes; the tunnel state stays.

        Sends SETTINGS first, then forwards PACKETS, answers STATS_REQUEST and PING, applies POLICY_UPDATE.
        """
        if self._channel is not None and not self._channel.is_broken:
            await channel.send(ipc.Error(ipc.ErrorCode.BUSY, "the helper already serves a provider"))
            return
        self._channel = channel
        self.sessions += 1
        self._connected.set()
        self._connected = trio.Event()
        peer = channel.peer
        log.info(
            "provider connected",
            extra={"event": "session_open", "pid": peer.pid if peer else None, "session": self.sessions},
        )
        reason = "closed"
        try:
            await channel.send(ipc.Settings(json.dumps(self.settings).encode()))
            while True:
                ev = await channel.receive_event()
                if isinstance(ev, ipc.PacketBatch):
                    self._outbound(ev)
                elif isinstance(ev, ipc.StatsRequest):
                    await channel.send(ipc.StatsResponse(ev.request_id, self.stats_json()))
                elif isinstance(ev, ipc.Ping):
                    await channel.send(ipc.Pong(ev.nonce))
                elif isinstance(ev, ipc.PolicyUpdate):
                    before = self.settings
                    error = self._apply_policy(ev)
                    caps = channel.connection.capabilities & channel.connection.peer_capabilities
                    if caps & ipc.Capability.POLICY_RESULT:  # the answer; a rejected update keeps the old policy
                        code = ipc.ErrorCode.POLICY if error is not None else 0
                        await channel.send(ipc.PolicyResult(ev.generation, code, (error or "")[:1024]))
                    if self.settings != before:  # new route exclusions: the provider re-applies its settings
                        await channel.send(ipc.Settings(json.dumps(self.settings).encode()))
                elif isinstance(ev, ipc.Goodbye | ipc.Error | ipc.ConnectionClosed):
                    reason = type(ev).__name__.lower()
                    break
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            raise
        except TunnelDown as exc:
            reason = f"lost: {exc}"
        finally:
            if self._channel is channel:
                self._channel = None
            log.info("provider disconnected", extra={"event": "session_close", "reason": reason})

    async def serve_observer(self, channel: IpcChannel) -> None:
        """Serve a read-only observer (``netsim helper --stats-socket``): STATS_REQUEST and PING, nothing else.

        An observer never takes the provider's slot, so the helper's statistics are reachable whatever provider
        runs (docs/ipc.md, Observers). Anything but STATS_REQUEST/PING/GOODBYE is a protocol violation from this
        peer and ends its connection (counted in ``observer_rejected``).
        """
        self.observers += 1
        while True:
            ev = await channel.receive_event()
            if isinstance(ev, ipc.StatsRequest):
                await channel.send(ipc.StatsResponse(ev.request_id, self.stats_json()))
            elif isinstance(ev, ipc.Ping):
                await channel.send(ipc.Pong(ev.nonce))
            elif isinstance(ev, ipc.Goodbye | ipc.Error | ipc.ConnectionClosed):
                return
            else:
                self.observer_rejected += 1
                await channel.send(ipc.Error(ipc.ErrorCode.PROTOCOL, f"an observer may not send {type(ev).__name__}"))
                return

    def _apply_policy(self, ev: ipc.PolicyUpdate) -> str | None:
        """Apply a POLICY_UPDATE atomically; return why it was refused (the old policy then stays), else None.

        The payload is untrusted IPC bytes: `parse_policy` raises only `ConfigError` for any input (bounded size
        and depth, docs/policy.md), so a hostile update cannot take the helper down.
        """
        try:
            policy = parse_policy(ev.payload, source=f"POLICY_UPDATE {ev.generation}")
        except ConfigError as exc:
            self.policy_rejected += 1
            log.warning(
                "policy update rejected",
                extra={"event": "policy_rejected", "generation": ev.generation, "error": str(exc)[:1024]},
            )
            return str(exc)
        if self.policy is None:
            self.policy = PolicyEngine(policy)
        else:
            self.policy.replace(policy)
        self.policy_updates += 1
        self.settings = self._settings_payload()  # route exclusions may have changed: the session resends them
        log.info("policy updated", extra={"event": "policy", "generation": ev.generation})
        return None

    def _outbound(self, batch: ipc.PacketBatch) -> None:
        """Classify, encrypt and send one batch from the provider (the hot path)."""
        packets = batch.packets()
        n = len(packets)
        self._ipc_in.count_read(n)
        now = self.clock()
        packets = self._classify(packets, now)
        self._ipc_in.count_forwarded(len(packets))
        dev = self.device
        bufs, sizes, addrs = self._tx_views, self._tx_sizes, self._tx_addrs
        step = self.batch
        send = self.transport.send
        # UDP GSO (`UdpTransport.send_segments`): a run of equal-sized datagrams to one endpoint (the last may
        # be shorter) leaves in one sendmsg, split by the kernel; without it, one sendto per datagram.
        send_segments = getattr(self.transport, "send_segments", None)
        udp = self._udp_out
        for start in range(0, len(packets), step):
            chunk = packets[start : start + step]
            m = len(chunk)
            self.tx_batches += 1
            self._wg_out.count_read(m)
            dev.encapsulate(chunk, now, bufs, sizes, addrs)
            attempted = sent = 0
            i = 0
            while i < m:
                size = sizes[i]
                addr = addrs[i]
                if not size or addr is None:
                    i += 1
                    continue
                j = i + 1
                if send_segments is not None:
                    limit = min(m, i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
                    while j < limit and sizes[j] == size and addrs[j] == addr:
                        j += 1
                    if j < limit and 0 < sizes[j] < size and addrs[j] == addr:
                        j += 1  # a shorter last segment ends the run (udp(7))
                if j - i == 1 or send_segments is None:
                    reason = send(bufs[i][:size], addr)
                else:
                    reason = send_segments([bufs[k][: sizes[k]] for k in range(i, j)], addr)
                attempted += j - i
                if reason is None:
                    sent += j - i
                else:
                    udp.count_dropped(reason, j - i)
                i = j
            udp.count_read(attempted)  # counted per batch: no per-packet method calls on the hot path
            udp.count_forwarded(sent)
            if attempted:
                peers = dev.peers
                if len(peers) == 1:
                    self._book_sent(peers[0], attempted, now)
                else:
                    self._book_by_endpoint(addrs, sizes, len(chunk), now)
            self._log_events()
            self._flush(now)

    def _book_by_endpoint(self, addrs: list[Endpoint | None], sizes: list[int], n: int, now: float) -> None:
        """`_book_sent` for a batch spread over several peers (by each datagram's endpoint)."""
        counts: dict[Endpoint, int] = {}
        for i in range(n):
            addr = addrs[i]
            if sizes[i] and addr is not None:
                counts[addr] = counts.get(addr, 0) + 1
        for addr, count in counts.items():
            peer = self._peer_at(addr)
            if peer is not None:
                self._book_sent(peer, count, now)

    def _classify(self, packets: list[memoryview], now: float) -> list[memoryview]:
        """Validate a batch, then apply the policy: returns the packets to tunnel; BYPASS goes to the hook.

        Validation is the same with or without a policy: every packet is parsed once with the core's
        `PacketView` (bounded; bad IHL/lengths, truncated or over-long IPv6 extension-header chains, tiny or
        low-offset fragments are ``malformed``) and its source must be one of the tunnel's own addresses, else it
        is dropped as ``inner_src_not_allowed`` (the receive side's name: WireGuard's cryptokey routing drops
        such packets at the server, whitepaper §2; a client must not emit them). Nothing invalid is encrypted.

        With the route mechanism a BYPASS packet should never reach the helper (the kernel sent it out of en0);
        one that does (a port, protocol or domain rule routes cannot express) is tunnelled and counted in
        ``bypass_tunnelled``: a route bypass never leaks through a NAT path the policy did not ask for.

        With the NAT mechanism and domain rules, a flow the NAT already carries stays on the bypass when its
        verdict turns to TUNNEL (the name's DNS binding expired mid-flow): moving it into the tunnel would change
        its source address and break it. Counted in ``bypass_sticky``.
        """
        engine = self.policy
        view = self._view
        load = view.load_untrusted
        sources = self._inner_sources
        keep: list[memoryview] = []
        malformed = spoofed = 0
        if engine is None:
            for pkt in packets:
                try:
                    load(pkt)
                except BadPacket:
                    malformed += 1
                    continue
                if view.src not in sources:
                    spoofed += 1
                    continue
                keep.append(pkt)
            self._count_invalid(malformed, spoofed)
            self.verdicts["tunnel"] += len(keep)
            return keep
        classify = engine.classify
        route_mechanism = engine.policy.mechanism is Mechanism.ROUTE
        nat_bypass = self.nat_bypass
        nat = nat_bypass.nat if nat_bypass is not None and engine.has_domain_rules else None
        to_nat = nat_bypass.send_view if nat_bypass is not None else None  # parse once: the NAT takes our view
        nat_sent = 0
        track = self.dns_guard.record_query_untrusted if engine.has_domain_rules else None  # their answers teach
        bypass: list[memoryview] = []
        tunnel = 0
        for pkt in packets:
            try:
                load(pkt)
            except BadPacket:
                malformed += 1
                continue
            if view.src not in sources:
                spoofed += 1
                continue
            verdict = classify(view, now)
            action = verdict.action
            if view.dport == 53 and track is not None and view.protocol == 17 and action is not Action.DROP:
                track(view.src, view.sport, view.dst, memoryview(pkt)[view.l4_offset + 8 : view.total_length], now)
            if action is Action.TUNNEL:
                if nat is not None and _nat_carries(nat, view, now):
                    self.verdicts["bypass"] += 1
                    self.bypass_sticky += 1
                    if to_nat is not None:
                        to_nat(view, now)  # NATed in place in our receive buffer and sent
                        nat_sent += 1
                    else:
                        bypass.append(pkt)
                    continue
                tunnel += 1
                keep.append(pkt)
            elif action is Action.BYPASS:
                self.verdicts["bypass"] += 1
                if route_mechanism:
                    self.bypass_tunnelled += 1
                    keep.append(pkt)
                elif to_nat is not None:
                    to_nat(view, now)  # NATed in place in our receive buffer and sent
                    nat_sent += 1
                else:
                    bypass.append(pkt)
            else:
                self._ipc_in.count_dropped(verdict.reason)  # "policy_drop:<rule>"
                self.verdicts["drop"] += 1
        self.verdicts["tunnel"] += tunnel
        self._count_invalid(malformed, spoofed)
        if nat_sent:
            assert nat_bypass is not None
            nat_bypass.rearm()
            self._ipc_in.count_forwarded(nat_sent)
            self._bypass.count_read(nat_sent)
            self._bypass.count_forwarded(nat_sent)
        if bypass:
            self._ipc_in.count_forwarded(len(bypass))
            self._bypass.count_read(len(bypass))
            if self.bypass is None:
                self._bypass.count_dropped("bypass_unavailable", len(bypass))
            else:
                self.bypass(bypass)
                self._bypass.count_forwarded(len(bypass))
        return keep

    def _count_invalid(self, malformed: int, spoofed: int) -> None:
        if malformed:
            self._ipc_in.count_dropped("malformed", malformed)
        if spoofed:
            self._ipc_in.count_dropped("inner_src_not_allowed", spoofed)

    def close(self) -> None:
        """Drop the provider session (as a dying process would) and close the transport."""
        ch = self._channel
        if ch is not None:
            ch.close()
            self._channel = None
        self.transport.close()


class _HelperCore:
    """The helper's bookkeeping around its device, in the shape `DatagramDriver` drives."""

    __slots__ = ("_h",)

    def __init__(self, helper: Helper) -> None:
        self._h = helper

    def receive_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any], n: int, now: float) -> None:
        self._h._receive(n, now)

    def datagrams_to_send(self, now: float) -> Iterator[tuple[ipc.Buffer, Endpoint]]:
        return self._h._datagrams_to_send(now)

    def get_timer(self) -> float | None:
        timer = self._h.device.get_timer()
        until = self._h._filter_until
        if until is not None and (timer is None or until < timer):
            return until
        return timer

    def handle_timer(self, now: float) -> None:
        self._h._handle_timer(now)
