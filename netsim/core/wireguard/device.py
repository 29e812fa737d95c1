"""A sans-IO WireGuard device: the state machine of whitepaper §5-§6, driven by bytes, calls and ``now``.

Theory of operation (aioquic style). The caller owns the UDP socket and the clock:

* inbound: ``receive_datagram_untrusted(data, addr, now)`` for each UDP payload (or
  ``receive_datagrams_untrusted(datagrams, addrs, now)`` for a batch). Bad, unauthenticated or
  replayed datagrams are dropped and counted under a named reason and never answered (no oracle); the only
  unsolicited answer is a cookie reply, and only when under load (§5.4.7): past ``load_threshold`` handshake
  messages a second, one without a valid mac2 gets a cookie reply instead of a DH, one with a valid mac2 must
  pass its source's rate limiter (`ratelimiter`), and past `HANDSHAKE_BUDGET` a second they are dropped unread.
  Transport data never goes through any of it. Decrypted inner packets are taken in
  batches with ``take_received()``; control events (handshake completed / given up) with ``next_event()``.
* outbound data: ``encapsulate(packets, now, out_bufs, out_sizes, out_addrs)`` picks the peer by AllowedIPs
  longest prefix on the inner destination and writes each datagram into a caller buffer; packets for a peer with
  no usable session are staged (bounded, like wireguard-go's staged queue) and a handshake is started.
* control traffic: ``datagrams_to_send(now)`` returns handshake messages, keepalives, cookie replies and staged
  packets flushed after a handshake.
* timers are pulled: ``get_timer()`` gives the earliest deadline, ``handle_timer(now)`` fires what is due.

Roles (§5.4, wireguard-go ``noise-protocol.go``): the initiator may send on a new session as soon as it consumed
the response; the responder keeps its new keypair in ``next`` until the first transport message from the
initiator proves the initiator has it, then rotates (previous <- current <- next). The previous keypair stays
for in-flight packets until the next rotation.

Counters (``wg show transfer``): like wireguard-go, a peer's rx/tx count whole UDP payload bytes of handshake
initiations/responses and of authenticated transport messages (keepalives included); cookie replies are not
counted.
"""

from __future__ import annotations

import hmac
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from netsim import accel
from netsim.core.ledger import Stage
from netsim.core.wireguard import messages as m
from netsim.core.wireguard.allowedips import AllowedIPs
from netsim.core.wireguard.config import PeerConfig, TunnelConfig
from netsim.core.wireguard.noise import (
    LABEL_COOKIE,
    LABEL_MAC1,
    HandshakeState,
    XAeadSealer,
    aead_decrypt,
    aead_encrypt,
    dh,
    hash_,
    hkdf,
    initial_chain,
    mac,
    private_to_public,
    tai64n,
    xaead_decrypt,
)
from netsim.core.wireguard.peer import Endpoint, Peer, endpoint_of, raw_key
from netsim.core.wireguard.ratelimiter import RateLimiter
from netsim.core.wireguard.replay import RING_MASK
from netsim.core.wireguard.session import NONCE, Keypair
from netsim.core.wireguard.timers import PADDING_MULTIPLE, Timers
from netsim.errors import LocalProtocolError

Buffer = bytes | bytearray | memoryview

__all__ = [
    "DEFAULT_LOAD_THRESHOLD",
    "DROP_REASONS",
    "HANDSHAKE_BUDGET",
    "UNDER_LOAD_AFTER_TIME",
    "DeviceStatistics",
    "HandshakeCompleted",
    "HandshakeTimeout",
    "KeysZeroed",
    "WireGuardDevice",
    "classify_datagram",
]

DROP_REASONS = (
    "short",  # fewer bytes than the message type needs (transport < 32, header < 4)
    "bad_length",  # handshake/cookie message not exactly its size
    "bad_type",  # unknown message type or non-zero reserved bytes
    "bad_mac1",
    "bad_mac2",  # under load and mac2 missing/stale: a cookie reply was sent instead
    "handshake_failed",  # initiation/response did not decrypt, unknown static key, bad DH
    "stale_timestamp",  # initiation TAI64N not newer than the last one from that peer (replayed initiation)
    "handshake_flood",  # initiations from one peer faster than HANDSHAKE_INITIATION_RATE
    "handshake_overload",  # under load, past HANDSHAKE_BUDGET this second: dropped by its type alone, no crypto
    "rate_limited",  # under load, valid mac2, but the source's token bucket is empty (ratelimiter.py): no DH
    "unexpected_response",  # response/cookie for no handshake we have in flight
    "bad_cookie",  # cookie reply did not decrypt
    "unknown_receiver",  # transport message for an index we do not hold
    "expired_keypair",  # keypair older than REJECT_AFTER_TIME
    "decrypt_failed",
    "replay",  # counter seen before, too old for the window, or past REJECT_AFTER_MESSAGES
    "inner_malformed",  # decrypted payload is not a sane IPv4/IPv6 packet
    "inner_src_not_allowed",  # inner source not in the sending peer's AllowedIPs
    "no_route",  # outbound inner destination matches no peer's AllowedIPs
    "no_endpoint",  # need to send to a peer whose endpoint is unknown
    "staged_overflow",  # outbound staged queue full while waiting for a handshake
    "handshake_timeout",  # staged packets dropped after REKEY_ATTEMPT_TIME without a handshake
    "oversize",  # outbound packet does not fit the caller's buffer
)


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A session with ``peer`` is usable in both directions (``initiator``: we started it)."""

    peer: Peer
    initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeTimeout:
    """No handshake with ``peer`` succeeded within REKEY_ATTEMPT_TIME; staged packets were dropped."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    """All keys of ``peer`` were erased after 3 x REJECT_AFTER_TIME without a new session."""

    peer: Peer


Event = HandshakeCompleted | HandshakeTimeout | KeysZeroed


@dataclass(frozen=True, slots=True)
class DeviceStatistics:
    """Counters of a `WireGuardDevice` (plain ints; ``drops`` keyed by `DROP_REASONS`)."""

    rx_datagrams: int
    tx_datagrams: int
    rx_packets: int
    tx_packets: int
    rx_keepalives: int
    tx_keepalives: int
    handshakes_initiated: int
    handshakes_completed: int
    cookie_replies_sent: int
    cookie_replies_received: int
    staged: int
    drops: dict[str, int]
    handshakes_processed: int = 0
    """Handshake messages that passed the mac checks (and, under load, the rate limiter) and so cost a DH."""
    handshakes_rate_limited: int = 0
    """Under load: handshake messages with a valid mac2 refused by the per-source rate limiter (no DH)."""
    rx_control_consumed: int = 0
    """Handshake initiations/responses and cookie replies that were processed (not dropped)."""

    @property
    def dropped(self) -> int:
        """Total dropped, over every reason."""
        return sum(self.drops.values())


_U16BE = struct.Struct(">H")
_ROUTE_CACHE_MAX = 4096
_TRANSPORT_HEADER_UNPACK = m.TRANSPORT_HEADER.unpack_from
_NONCE_PACK = NONCE.pack_into
_HEADER_PACK = m.TRANSPORT_HEADER.pack_into
_U32_UNPACK = m.U32.unpack_from
_U16BE_UNPACK = _U16BE.unpack_from
# the few inner-header fields the hot paths need (RFC 791 §3.1, RFC 8200 §3), in one call each:
# version/IHL byte + destination (outbound routing); version/IHL byte, total length, source (inbound checks)
_V4_DST_UNPACK = struct.Struct(">B15x4s").unpack_from
_V6_DST_UNPACK = struct.Struct(">24x16s").unpack_from
_V4_INNER_UNPACK = struct.Struct(">BxH8x4s").unpack_from
_TOO_SHORT = (0, b"")  # stands in for _V4_DST_UNPACK's result when there are not 20 bytes (version 0: malformed)
_MISS: Any = object()
_PAD = bytes(PADDING_MULTIPLE)
_PADS = tuple(bytes(k) for k in range(PADDING_MULTIPLE))  # zero padding by length, no per-packet slice
_JOIN = b"".join
_seal_batch: Any = accel.native.seal_batch if accel.native is not None else None
_open_batch: Any = accel.native.open_batch if accel.native is not None else None
# Handshake messages (valid mac1) per second above which the device is under load. wireguard-go's trigger is a
# handshake-queue backlog of QueueHandshakeSize / 8 = 1024 / 8 = 128 messages (device.go IsUnderLoad); a sans-IO
# device has no queue, so the same number is used as a per-second count of what it was handed.
DEFAULT_LOAD_THRESHOLD = 128
UNDER_LOAD_AFTER_TIME = 1.0  # seconds the device stays under load after the trigger (wireguard-go constants.go)
# Under load, at most this many handshake messages per second get any crypto (mac1, cookie reply, DH); the rest
# are dropped on their type alone, so a driver drains its socket at the cost of a read and a type check and the
# transport datagrams queued behind a flood are not lost in the kernel. wireguard-go sheds the same way: its
# handshake queue holds QueueHandshakeSize = 1024 messages and drops when full, while transport data has queues of
# its own. The number is that queue size, read as a per-second budget (a sans-IO device has no queue); a response
# to a handshake we have in flight (its receiver index is ours, which an off-path sender cannot guess) is exempt.
# While the budget is spent, `WireGuardDevice.initiations_shed_until` tells a driver it may shed initiations before
# they are read (the helper's socket filter): the flood then costs no read either.
HANDSHAKE_BUDGET = 1024
_CONTROL_SIZES = {
    m.MSG_INITIATION: m.INITIATION_SIZE,
    m.MSG_RESPONSE: m.RESPONSE_SIZE,
    m.MSG_COOKIE_REPLY: m.COOKIE_REPLY_SIZE,
}
DATAGRAM_JUNK = 0
"""`classify_datagram`: not a WireGuard message (too short, unknown type, non-zero reserved bytes, wrong size)."""


def classify_datagram(data: Buffer) -> int:
    """What a received UDP payload is, decided once for the device and for every caller's accounting.

    The first four bytes are one little-endian u32 -- the type in the low byte, three reserved zero bytes
    (whitepaper §5.4; wireguard-go ``receive.go`` reads them the same way) -- so ``04 01 00 00`` is *not* a
    transport message, whatever its first byte says.

    Returns:
        ``messages.MSG_TRANSPORT`` (4) for a transport message of at least 32 bytes (header + tag);
        ``MSG_INITIATION`` / ``MSG_RESPONSE`` / ``MSG_COOKIE_REPLY`` (1/2/3) for a handshake or cookie message
        of exactly its size; `DATAGRAM_JUNK` (0) for anything else. `WireGuardDevice.receive_datagrams_untrusted`
        sends kinds 1-3 to their handlers and counts junk as ``short``/``bad_length``/``bad_type``; its hot loop
        inlines the transport test (same header unpack) instead of calling this per datagram.
    """
    n = len(data)
    if n < 4:
        return DATAGRAM_JUNK
    kind: int = _U32_UNPACK(data)[0]
    if kind == m.MSG_TRANSPORT:
        return kind if n >= m.TRANSPORT_MIN_SIZE else DATAGRAM_JUNK
    return kind if _CONTROL_SIZES.get(kind) == n else DATAGRAM_JUNK


class WireGuardDevice:
    """One WireGuard interface: a static key, peers, and the protocol state machine, with no I/O.

    Args:
        private_key: this interface's static X25519 private key (32 bytes, base64 text, or key object).
        peers: initial peers (more with `add_peer`).
        timers: protocol thresholds; the defaults are WireGuard's (tests lower them to force rekeys).
        rng: seeded source for sender indices, jitter and cookie nonces (tests pass ``random.Random(seed)``;
            the default is the OS CSPRNG).
        ephemeral: factory for handshake ephemeral keys (tests may make them deterministic).
        wall_offset: ``now + wall_offset`` is Unix wall time, used only for TAI64N timestamps and
            `Peer.last_handshake`.
        mtu: inner MTU; padding to 16 bytes never grows a packet past it (wireguard-go does the same).
        load_threshold: handshake messages (valid mac1) per second above which the device is under load for
            the next second: it then answers a handshake message without a valid mac2 with a cookie reply
            (no DH) and passes those with one through a per-source rate limiter before the DH (whitepaper
            §5.4.7, wireguard-go ``receive.go``). Default `DEFAULT_LOAD_THRESHOLD`; None disables the automatic
            trigger (``under_load`` can still be forced).
        ratelimiter: the per-source limiter used under load (a fresh `RateLimiter` by default).
    """

    def __init__(
        self,
        private_key: object,
        peers: Iterable[PeerConfig] = (),
        *,
        timers: Timers | None = None,
        rng: random.Random | None = None,
        ephemeral: Callable[[], X25519PrivateKey] = X25519PrivateKey.generate,
        wall_offset: float = 0.0,
        mtu: int = 1420,
        load_threshold: int | None = DEFAULT_LOAD_THRESHOLD,
        ratelimiter: RateLimiter | None = None,
    ) -> None:
        raw = raw_key(private_key, "private_key")
        self._private = X25519PrivateKey.from_private_bytes(raw)
        self.public_key = private_to_public(self._private)
        self.timers = timers or Timers()
        t = self.timers
        self._reject_after_time = t.reject_after_time
        self._keepalive_timeout = t.keepalive_timeout
        # wireguard-go keepKeyFreshReceiving: REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
        self._last_minute = t.reject_after_time - t.keepalive_timeout - t.rekey_timeout
        self._rng = rng or random.SystemRandom()
        self._ephemeral = ephemeral
        self.wall_offset = wall_offset
        self.mtu = mtu
        self.load_threshold = load_threshold
        self.under_load = False
        """Force cookie mode (mac2 required) regardless of the measured load."""
        self._load_until = float("-inf")
        self._load_window_start = float("-inf")
        self._load_count = 0
        self.ratelimiter = ratelimiter or RateLimiter()
        # our own mac1/cookie keys, for messages addressed to us (§5.4.4, §5.4.7)
        self._mac1_key = hash_(LABEL_MAC1, self.public_key)
        self._cookie_key = hash_(LABEL_COOKIE, self.public_key)
        self._cookie_secret = b""
        self._cookie_secret_time = float("-inf")
        self._cookie_sealer: XAeadSealer | None = None  # cookie-reply encryption, renewed with the secret
        self._budget_window_start = float("-inf")
        self._budget_count = 0
        self._peers: dict[bytes, Peer] = {}
        self._routes: AllowedIPs[Peer] = AllowedIPs()
        # address bytes -> owning peer: the hot path pays one dict probe instead of a longest-prefix walk.
        # Cleared whenever peers/AllowedIPs change, and when it grows past _ROUTE_CACHE_MAX entries.
        self._route_cache: dict[bytes, Peer | None] = {}
        self._pending: dict[int, Peer] = {}  # sender index of an in-flight handshake -> peer
        self._by_index: dict[int, tuple[Keypair, Peer]] = {}  # keypair local index -> keypair, peer
        # the same indices -> the keypair's native receive AEAD (`netsim.accel`; empty on the pure-Python path)
        self._rx_aead: dict[int, Any] = {}
        self._outbox: list[tuple[bytes, Endpoint]] = []
        self._received: list[tuple[Peer, bytes]] = []
        self._events: deque[Event] = deque()
        self._drops = dict.fromkeys(DROP_REASONS, 0)
        # ledger stages the caller hands us (`count_into`); None: the device's own counters only
        self._rx_stage: Stage | None = None
        self._tx_stage: Stage | None = None
        self._nonce = bytearray(12)
        self.rx_datagrams = self.tx_datagrams = 0
        self.rx_packets = self.tx_packets = 0
        self.rx_keepalives = self.tx_keepalives = 0
        self.handshakes_initiated = self.handshakes_completed = 0
        self.cookie_replies_sent = self.cookie_replies_received = 0
        self.handshakes_processed = 0
        self.rx_control_consumed = 0
        self._no_reply_time = t.keepalive_timeout + t.rekey_timeout
        for cfg in peers:
            self.add_peer(cfg)

    # ------------------------------------------------------------------ configuration

    @classmethod
    def from_config(cls, config: TunnelConfig, **kwargs: Any) -> WireGuardDevice:
        """Build a device from a parsed wg-quick file (`netsim.core.wireguard.config.parse_config`).

        ``kwargs`` are the keyword arguments of the constructor; ``mtu`` defaults to the file's MTU.
        """
        if config.interface.mtu is not None:
            kwargs.setdefault("mtu", config.interface.mtu)
        return cls(config.interface.private_key, config.peers, **kwargs)

    def add_peer(self, config: PeerConfig, *, endpoint: Endpoint | None = None) -> Peer:
        """Add (or replace) a peer; its AllowedIPs take over those prefixes from any other peer (as `wg set`).

        Args:
            config: the peer section (`netsim.core.wireguard.config.PeerConfig`).
            endpoint: a resolved ``(host, port)`` overriding ``config.endpoint`` (needed when that is a name).

        Raises:
            ValueError: a bad key or endpoint, or the peer's key is our own.
        """
        pub = raw_key(config.public_key, "peer public_key")
        if pub == self.public_key:
            raise ValueError("peer public_key is this device's own public key")
        psk = raw_key(config.preshared_key, "preshared_key") if config.preshared_key is not None else bytes(32)
        if pub in self._peers:
            self.remove_peer(pub)
        peer = Peer(
            public_key=pub,
            preshared_key=psk,
            allowed_ips=list(config.allowed_ips),
            endpoint=endpoint if endpoint is not None else endpoint_of(config.endpoint),
            persistent_keepalive=float(config.persistent_keepalive or 0.0),
        )
        try:
            peer.static_static = dh(self._private, pub)
        except ValueError:
            raise ValueError("peer public_key is a low-order point (DH result is zero)") from None
        peer.mac1_key = hash_(LABEL_MAC1, pub)
        peer.cookie_key = hash_(LABEL_COOKIE, pub)
        self._peers[pub] = peer
        for net in peer.allowed_ips:
            self._routes.insert(net, peer)
        self._route_cache.clear()
        return peer

    def remove_peer(self, public_key: object) -> None:
        """Remove a peer and everything it owns (keys, indices, routes)."""
        peer = self._peers.pop(raw_key(public_key, "public_key"))
        self._zero_keys(peer)
        self._routes.remove_peer(peer)
        self._route_cache.clear()

    def _route(self, addr: bytes) -> Peer | None:
        """AllowedIPs longest-prefix match for raw address bytes, through the cache."""
        cache = self._route_cache
        if len(cache) >= _ROUTE_CACHE_MAX:
            cache.clear()
        peer = cache[addr] = self._routes.lookup(addr)
        return peer

    @property
    def peers(self) -> list[Peer]:
        """The configured peers (live objects: read ``rx_bytes``, ``tx_bytes``, ``last_handshake``)."""
        return list(self._peers.values())

    def peer(self, public_key: object) -> Peer:
        """The peer with this public key (KeyError if absent)."""
        return self._peers[raw_key(public_key, "public_key")]

    # ------------------------------------------------------------------ sans-IO API

    def statistics(self) -> DeviceStatistics:
        """A frozen snapshot of the device counters."""
        return DeviceStatistics(
            rx_datagrams=self.rx_datagrams,
            tx_datagrams=self.tx_datagrams,
            rx_packets=self.rx_packets,
            tx_packets=self.tx_packets,
            rx_keepalives=self.rx_keepalives,
            tx_keepalives=self.tx_keepalives,
            handshakes_initiated=self.handshakes_initiated,
            handshakes_completed=self.handshakes_completed,
            cookie_replies_sent=self.cookie_replies_sent,
            cookie_replies_received=self.cookie_replies_received,
            staged=sum(len(p.staged) for p in self._peers.values()),
            drops=dict(self._drops),
            handshakes_processed=self.handshakes_processed,
            handshakes_rate_limited=self._drops["rate_limited"],
            rx_control_consumed=self.rx_control_consumed,
        )

    def unanswered_for(self, peer: Peer, now: float) -> float:
        """Seconds data has gone to ``peer`` with no authenticated message back (0 when nothing is unanswered).

        From KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (`no_reply_time`, 15 s) on, WireGuard takes the session for dead
        and handshakes again (§6.2); an idle tunnel is never unanswered.
        """
        since = peer.unanswered_since
        return 0.0 if since is None else max(0.0, now - since)

    @property
    def no_reply_time(self) -> float:
        """KEEPALIVE_TIMEOUT + REKEY_TIMEOUT: how long data may go unanswered before the session counts as dead."""
        return self._no_reply_time

    def session_live(self, peer: Peer, now: float) -> bool:
        """True when data for ``peer`` would go out on a handshake-confirmed session the peer still answers.

        Whitepaper §6: a session is confirmed for the initiator once it consumed the response, for the responder
        once the first transport message arrived -- here, exactly when its keypair is ``peer.current`` (the device
        never encrypts on anything else). It must also still be usable (younger than REJECT_AFTER_TIME, below
        REJECT_AFTER_MESSAGES, endpoint known), and not have gone unanswered: data sent and no authenticated
        transport message back for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s), WireGuard's own "the session may be
        dead" trigger for a new handshake (§6.2, wireguard-go ``timersDataSent``/``expiredNewHandshake``).
        """
        since = peer.unanswered_since
        return (
            self._usable(peer.current, now)
            and peer.endpoint is not None
            and (since is None or now - since < self._no_reply_time)
        )

    def next_event(self) -> Event | None:
        """Pop the next control event, or None."""
        return self._events.popleft() if self._events else None

    def count_into(self, inbound: Stage | None, outbound: Stage | None) -> None:
        """Count straight into the caller's ledger stages, besides the device's own counters.

        ``inbound`` (the helper's ``wg_decrypt``): ``read`` per datagram given to `receive_datagrams_untrusted`,
        ``forwarded`` per inner packet, ``dropped`` ``keepalive`` / ``control`` (protocol messages consumed) and
        every inbound drop reason. ``outbound`` (``wg_encrypt``): only the drop reasons of the send path
        (``no_route``, ``no_endpoint``, ``staged_overflow``, ``handshake_timeout``, ``oversize``,
        ``inner_malformed``); its ``read`` and ``forwarded`` are the caller's (it knows when the peer answered).
        Each datagram gets exactly one inbound outcome, so the stage balances by construction.
        """
        self._rx_stage = inbound
        self._tx_stage = outbound

    def _drop_in(self, reason: str, n: int = 1) -> None:
        self._drops[reason] += n
        if self._rx_stage is not None:
            self._rx_stage.count_dropped(reason, n)

    def _drop_out(self, reason: str, n: int = 1) -> None:
        self._drops[reason] += n
        if self._tx_stage is not None:
            self._tx_stage.count_dropped(reason, n)

    def take_received(self) -> list[tuple[Peer, bytes]]:
        """Take the decrypted inner packets received since the last call, in arrival order."""
        out = self._received
        self._received = []
        return out

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Take the control datagrams (handshakes, keepalives, cookie replies, flushed staged packets)."""
        out = self._outbox
        self._outbox = []
        return out

    def get_timer(self) -> float | None:
        """The earliest deadline at which `handle_timer` must be called, or None."""
        best = self.ratelimiter.get_timer()
        for peer in self._peers.values():
            t = peer.deadline()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def handle_timer(self, now: float) -> None:
        """Fire every peer timer due at ``now`` (wireguard-go ``timers.go`` expiry handlers)."""
        self.ratelimiter.handle_timer(now)  # collect idle rate-limiter entries (bounded table)
        for peer in list(self._peers.values()):
            if peer.t_retransmit is not None and peer.t_retransmit <= now:
                peer.t_retransmit = None
                self._expired_retransmit(peer, now)
            if peer.t_keepalive is not None and peer.t_keepalive <= now:
                peer.t_keepalive = None
                self._send_keepalive(peer, now)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.t_keepalive = now + self.timers.keepalive_timeout
            if peer.t_new_handshake is not None and peer.t_new_handshake <= now:
                # we sent data and heard nothing back for KEEPALIVE + REKEY_TIMEOUT: the session may be dead
                peer.t_new_handshake = None
                self._send_initiation(peer, now, is_retry=False)
            if peer.t_zero_keys is not None and peer.t_zero_keys <= now:
                peer.t_zero_keys = None
                self._zero_keys(peer)
                self._events.append(KeysZeroed(peer))
            if peer.t_persistent is not None and peer.t_persistent <= now:
                peer.t_persistent = None
                if peer.persistent_keepalive > 0:
                    self._send_keepalive(peer, now)

    def initiate(self, peer: Peer, now: float) -> None:
        """Start a handshake with ``peer`` now (rate-limited to one per REKEY_TIMEOUT, as wireguard-go)."""
        self._send_initiation(peer, now, is_retry=False)

    # ------------------------------------------------------------------ outbound data (hot path)

    def encapsulate(
        self,
        packets: Sequence[Buffer],
        now: float,
        out_bufs: Sequence[bytearray | memoryview],
        out_sizes: list[int],
        out_addrs: list[Endpoint | None],
    ) -> int:
        """Encrypt a batch of inner IP packets into caller-owned datagram buffers.

        ``out_bufs[i]`` receives the datagram for ``packets[i]`` (16-byte header, ciphertext of the padded
        packet, 16-byte tag: it needs ``len(packet) + 47`` bytes); ``out_sizes[i]`` is set to its length and
        ``out_addrs[i]`` to the peer endpoint, or 0/None when the packet was staged (no session yet) or dropped
        (counted). Returns the number of datagrams produced.

        Raises:
            LocalProtocolError: fewer ``out_bufs``/``out_sizes``/``out_addrs`` entries than packets.
        """
        # Hot path. Consecutive packets usually go to one peer, so the batch is processed in *runs*: the peer's
        # keypair checks, AEAD method and send counter are loaded into locals once per run, and the counter and
        # tx byte count are written back when the run ends (`_end_tx_run`) -- before anything else can look at
        # them (staging, the end of the batch). Everything per packet is local-variable work plus a few C calls.
        reject_msgs = self.timers.reject_after_messages
        reject_time = self._reject_after_time
        cache = self._route_cache
        nonce = self._nonce
        mtu = self.mtu
        produced = 0
        sent_to: list[Peer] = []
        run_peer: Peer | None = None  # the peer of the current run (None: no run; reload on the next packet)
        kp: Keypair | None = None  # its usable keypair, or None (stage)
        encrypt: Any = None
        # the native accelerator (`netsim.accel`): the run's packets are only checked here and listed in `batch`,
        # then sealed in one C call when the run ends (`aead` is the run keypair's native AEAD, None: pure Python)
        aead: Any = None
        batch: list[int] = []
        seal = _seal_batch
        remote_index = counter = run_start = tx_bytes = 0
        endpoint: Endpoint | None = None
        if len(out_bufs) < len(packets) or len(out_sizes) < len(packets) or len(out_addrs) < len(packets):
            raise LocalProtocolError(
                f"encapsulate: {len(packets)} packets need as many out_bufs, out_sizes and out_addrs entries "
                f"(got {len(out_bufs)}, {len(out_sizes)}, {len(out_addrs)})"
            )
        try:
            for i, pkt in enumerate(packets):
                n = len(pkt)
                # only the destination is needed here: RFC 791 §3.1 / RFC 8200 §3 offsets, no packet object
                first, dst = _V4_DST_UNPACK(pkt) if n >= 20 else _TOO_SHORT
                if first >> 4 != 4:
                    if first >> 4 == 6 and n >= 40:
                        dst = _V6_DST_UNPACK(pkt)[0]
                    else:
                        self._drop_out("inner_malformed")
                        out_sizes[i] = 0
                        out_addrs[i] = None
                        continue
                peer = cache.get(dst, _MISS)
                if peer is not run_peer:
                    if peer is _MISS:
                        peer = self._route(dst)
                    if peer is not run_peer:  # a new run: end the old one, load this peer's sending state
                        if kp is not None:
                            if batch:
                                sealing, batch = batch, []
                                seal(aead, remote_index, run_start, mtu, packets, out_bufs, sealing)
                            produced += counter - run_start
                            self._end_tx_run(run_peer, kp, counter, tx_bytes, sent_to)  # type: ignore[arg-type]
                        run_peer = peer
                        kp = None
                        if peer is not None:
                            kp = peer.current
                            endpoint = peer.endpoint
                            if kp is not None:
                                if now - kp.created >= reject_time or endpoint is None:
                                    kp = None
                                else:
                                    counter = run_start = kp.send_counter
                                    remote_index = kp.remote_index
                                    encrypt = kp.send.encrypt_into
                                    aead = kp.native_send
                                    tx_bytes = 0
                if kp is None or counter >= reject_msgs:
                    out_sizes[i] = 0
                    out_addrs[i] = None
                    if peer is None:
                        self._drop_out("no_route")
                        continue
                    if kp is not None:
                        if batch:
                            sealing, batch = batch, []
                            seal(aead, remote_index, run_start, mtu, packets, out_bufs, sealing)
                        produced += counter - run_start
                        self._end_tx_run(peer, kp, counter, tx_bytes, sent_to)
                        kp = None
                    self._stage(peer, bytes(pkt), now)
                    run_peer = None  # staging may send or rotate: reload the peer's state on its next packet
                    continue
                # padding to 16 bytes, never past the MTU (whitepaper §5.4.6; wireguard-go does the same)
                padded = (n + 15) & ~15
                if padded > mtu:
                    padded = max(n, mtu)
                size = padded + 32
                out = out_bufs[i]
                if len(out) < size:
                    self._drop_out("oversize")
                    out_sizes[i] = 0
                    out_addrs[i] = None
                    continue
                _HEADER_PACK(out, 0, 4, remote_index, counter)  # type 4 = transport (messages.MSG_TRANSPORT)
                if aead is not None:  # padding and AEAD in C when the run ends (the header pack above proved the
                    batch.append(i)  # buffer writable, so an unusable one fails here, as on the pure path)
                    counter += 1
                    out_sizes[i] = size
                    out_addrs[i] = endpoint
                    tx_bytes += size
                    continue
                _NONCE_PACK(nonce, 0, counter)
                counter += 1
                # one join with a prebuilt pad (any buffer type): measured ~1.5-2x faster than copying into a
                # scratch buffer through memoryview slices (three slice objects per packet)
                encrypt(
                    nonce,
                    pkt if padded == n else _JOIN((pkt, _PADS[padded - n])),
                    None,
                    out[16:size] if type(out) is memoryview else memoryview(out)[16:size],
                )
                out_sizes[i] = size
                out_addrs[i] = endpoint
                tx_bytes += size
        finally:
            # also on an exception: a counter that was used must never be used again (nonce reuse, §5.4.6)
            if kp is not None:
                if batch:  # the run's accepted packets, also when the loop raised after them (the pure path
                    seal(aead, remote_index, run_start, mtu, packets, out_bufs, batch)  # had encrypted them)
                produced += counter - run_start
                self._end_tx_run(run_peer, kp, counter, tx_bytes, sent_to)  # type: ignore[arg-type]
            self.tx_packets += produced
            self.tx_datagrams += produced
        for peer in dict.fromkeys(sent_to):
            self._after_data_sent(peer, now)
        return produced

    @staticmethod
    def _end_tx_run(peer: Peer, kp: Keypair, counter: int, tx_bytes: int, sent_to: list[Peer]) -> None:
        """Write back what an `encapsulate` run kept in locals: the send counter and the `wg show` tx bytes."""
        kp.send_counter = counter
        if tx_bytes:
            peer.tx_bytes += tx_bytes
            sent_to.append(peer)

    def _after_data_sent(self, peer: Peer, now: float) -> None:
        # timersDataSent + timersAnyAuthenticatedPacketSent + traversal, then keepKeyFreshSending (§6.2)
        t = self.timers
        if peer.t_new_handshake is None:
            peer.t_new_handshake = now + t.keepalive_timeout + t.rekey_timeout + self._jitter()
        if peer.unanswered_since is None:
            peer.unanswered_since = now
        peer.t_keepalive = None
        if peer.persistent_keepalive > 0:
            peer.t_persistent = now + peer.persistent_keepalive
        kp = peer.current
        if (
            kp is not None
            and kp.is_initiator
            and (kp.send_counter > t.rekey_after_messages or now - kp.created > t.rekey_after_time)
        ):
            self._send_initiation(peer, now, is_retry=False)

    def _stage(self, peer: Peer, packet: bytes, now: float) -> None:
        if len(peer.staged) >= self.timers.max_staged_packets:
            self._drop_out("staged_overflow")
        else:
            peer.staged.append(packet)
        self._send_staged(peer, now)

    def _usable(self, kp: Keypair | None, now: float) -> bool:
        t = self.timers
        return kp is not None and kp.send_counter < t.reject_after_messages and now - kp.created < t.reject_after_time

    def _send_staged(self, peer: Peer, now: float) -> None:
        """Flush staged packets on the current keypair, or start a handshake if there is none usable."""
        kp = peer.current
        if kp is None or not self._usable(kp, now):
            self._send_initiation(peer, now, is_retry=False)
            return
        if peer.endpoint is None:
            return
        sent_data = False
        while peer.staged:
            pkt = peer.staged.popleft()
            if kp.send_counter >= self.timers.reject_after_messages:
                peer.staged.appendleft(pkt)
                self._send_initiation(peer, now, is_retry=False)
                break
            self._send_transport(peer, kp, pkt, now)
            if pkt:
                sent_data = True
                self.tx_packets += 1
            else:
                self.tx_keepalives += 1
        if sent_data:
            self._after_data_sent(peer, now)

    def _send_transport(self, peer: Peer, kp: Keypair, pkt: bytes, now: float) -> None:
        n = len(pkt)
        padded = (n + 15) & ~15
        if padded > self.mtu:
            padded = max(n, self.mtu)
        counter = kp.send_counter
        kp.send_counter = counter + 1
        header = m.TRANSPORT_HEADER.pack(m.MSG_TRANSPORT, kp.remote_index, counter)
        ct = kp.send.encrypt(NONCE.pack(counter), pkt + _PAD[: padded - n] if padded > n else pkt, None)
        dgram = header + ct
        assert peer.endpoint is not None
        self._outbox.append((dgram, peer.endpoint))
        self.tx_datagrams += 1
        peer.tx_bytes += len(dgram)
        peer.t_keepalive = None  # timersAnyAuthenticatedPacketSent
        if peer.persistent_keepalive > 0:
            peer.t_persistent = now + peer.persistent_keepalive

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        """wireguard-go SendKeepalive: an empty packet unless staged data will go out anyway."""
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    # ------------------------------------------------------------------ handshake: initiator

    def _jitter(self) -> float:
        return self._rng.uniform(0.0, self.timers.rekey_timeout_jitter_max)

    def _new_index(self) -> int:
        while True:
            idx = self._rng.getrandbits(32)
            if idx not in self._pending and idx not in self._by_index:
                return idx

    def _send_initiation(self, peer: Peer, now: float, *, is_retry: bool) -> None:
        if not is_retry:
            peer.handshake_attempts = 0
        if now - peer.last_sent_initiation < self.timers.rekey_timeout:
            return
        if peer.endpoint is None:
            self._drop_out("no_endpoint")
            return
        peer.last_sent_initiation = now
        msg = self._create_initiation(peer, now)
        self._outbox.append((msg, peer.endpoint))
        self.tx_datagrams += 1
        self.handshakes_initiated += 1
        peer.tx_bytes += len(msg)
        peer.t_keepalive = None
        if peer.persistent_keepalive > 0:
            peer.t_persistent = now + peer.persistent_keepalive
        peer.t_retransmit = now + self.timers.rekey_timeout + self._jitter()

    def _create_initiation(self, peer: Peer, now: float) -> bytes:
        """Whitepaper §5.4.2: build a type-1 message and remember the handshake state."""
        if peer.handshake_index is not None:
            self._pending.pop(peer.handshake_index, None)
        ck, h = initial_chain(peer.public_key)
        hs = HandshakeState(chaining_key=ck, hash=h)
        e = self._ephemeral()
        e_pub = private_to_public(e)
        hs.ephemeral_private = e
        hs.mix_key(e_pub)
        hs.mix_hash(e_pub)
        k = hs.mix_key2(dh(e, peer.public_key))
        enc_static = aead_encrypt(k, 0, self.public_key, hs.hash)
        hs.mix_hash(enc_static)
        k = hs.mix_key2(peer.static_static)
        enc_ts = aead_encrypt(k, 0, tai64n(now + self.wall_offset), hs.hash)
        hs.mix_hash(enc_ts)
        idx = self._new_index()
        peer.handshake = hs
        peer.handshake_index = idx
        self._pending[idx] = peer
        body = m.INITIATION.pack(m.MSG_INITIATION, idx, e_pub, enc_static, enc_ts, bytes(16), bytes(16))
        return self._add_macs(peer, body, now)

    def _add_macs(self, peer: Peer, body: bytes, now: float) -> bytes:
        """Fill mac1 (always) and mac2 (with a fresh cookie from the peer), §5.4.4."""
        n = len(body)
        mac1 = mac(peer.mac1_key, body[: n - 32])
        peer.last_mac1_sent = mac1
        mac2 = bytes(16)
        if peer.cookie is not None and now - peer.cookie_time < self.timers.cookie_refresh_time:
            mac2 = mac(peer.cookie, body[: n - 32] + mac1)
        return body[: n - 32] + mac1 + mac2

    def _expired_retransmit(self, peer: Peer, now: float) -> None:
        max_attempts = int(self.timers.rekey_attempt_time / self.timers.rekey_timeout)
        if peer.handshake_attempts > max_attempts:
            # give up (wireguard-go expiredRetransmitHandshake): drop staged packets, schedule key erasure
            peer.t_keepalive = None
            self._drop_out("handshake_timeout", len(peer.staged))
            peer.staged.clear()
            if peer.t_zero_keys is None:
                peer.t_zero_keys = now + self.timers.reject_after_time * 3
            self._events.append(HandshakeTimeout(peer))
            return
        peer.handshake_attempts += 1
        self._send_initiation(peer, now, is_retry=True)

    # ------------------------------------------------------------------ inbound

    def receive_datagram_untrusted(self, data: Buffer, addr: Endpoint, now: float) -> None:
        """Process one UDP payload from ``addr``. Never raises on bad input: drops are counted by reason."""
        self.receive_datagrams_untrusted((data,), (addr,), now)

    def receive_datagrams_untrusted(self, datagrams: Sequence[Buffer], addrs: Sequence[Endpoint], now: float) -> None:
        """Process a batch of UDP payloads (``addrs[i]`` is the source of ``datagrams[i]``).

        The batch form of `receive_datagram_untrusted`: the transport-data path runs inline in one loop with
        its lookups hoisted, which is what a driver reading a batch per wakeup should call. Never raises on
        bad input.
        """
        # Hot path, processed in *runs* of consecutive transport messages for one receiver index (a batch is
        # usually one run). Per run: the keypair lookup, its expiry and "needs the uncommon path" checks, the
        # bound AEAD method and the replay window's state go into locals. Per packet: header unpack, nonce,
        # decrypt, replay check (in-order case inline, see `replay`), inner version/length/source check.
        # The per-peer effects of authenticated packets (wireguard-go receive.go: rx bytes, roaming endpoint,
        # timersAnyAuthenticatedPacketReceived, timersDataReceived) are accumulated and applied by
        # `_end_rx_run` when the run ends -- before any other code can observe them (a control message, the
        # uncommon path, the end of the batch) -- so the end state is the one per-packet updates would leave.
        # Data packets of a run are counted as the growth of `received` since `mark`.
        # With the native accelerator every transport message under an index held now is decrypted first, in one
        # C call (`opened[i]`: plaintext, False for a bad tag, None when not tried); a run uses those results only
        # if its keypair is the one they were made with (`use_opened`), else it decrypts here as without it.
        aeads = self._rx_aead
        if aeads:
            held = dict(aeads)
            opened = _open_batch(datagrams, held)
        else:
            held = aeads
            opened = [None] * len(datagrams)
        use_opened = False
        self.rx_datagrams += len(datagrams)
        stage = self._rx_stage
        if stage is not None:
            stage.count_read(len(datagrams))
        by_index = self._by_index
        route_cache = self._route_cache
        received = self._received
        start = mark = len(received)
        nonce = self._nonce
        reject_time = self._reject_after_time
        last_minute = self._last_minute
        keepalives = 0
        run_index = -1  # receiver index of the current run; -1 (never a u32) when there is none
        kp: Keypair | None = None  # the run's keypair (None: no run to end)
        peer: Any = None
        window: Any = None
        ring = bytearray()
        decrypt: Any = None
        highest = limit = run_bytes = 0
        expired = uncommon = run_auth = False  # run_auth: authenticated bytes already applied in this run
        run_addr: Endpoint = ()
        try:
            for data, addr, plain in zip(datagrams, addrs, opened, strict=True):
                n = len(data)
                mv = data if type(data) is memoryview else memoryview(data)
                if n < 32:
                    kind = 0
                else:
                    kind, receiver, counter = _TRANSPORT_HEADER_UNPACK(mv)
                if kind != 4:  # not a well-sized transport message: handshake, cookie, or garbage
                    if kp is not None:
                        self._end_rx_run(kp, peer, highest, run_bytes, run_addr, run_auth, len(received) - mark, now)
                        kp = None
                    run_index = -1
                    self._receive_control(mv, n, addr, now)
                    continue
                if receiver != run_index:
                    if kp is not None:
                        self._end_rx_run(kp, peer, highest, run_bytes, run_addr, run_auth, len(received) - mark, now)
                    entry = by_index.get(receiver)
                    if entry is None:
                        kp = None
                        run_index = -1
                        self._drop_in("unknown_receiver")
                        continue
                    kp, peer = entry
                    run_index = receiver
                    created = kp.created
                    expired = now - created >= reject_time
                    decrypt = kp.recv.decrypt
                    use_opened = kp.native_recv is not None and held.get(receiver) is kp.native_recv
                    window = kp.replay
                    ring = window.ring
                    highest = window.highest
                    limit = window.limit
                    # exactly when `_uncommon_receive` has something to do: confirm a responder's `next`, or the
                    # initiator's keepKeyFreshReceiving rekey
                    uncommon = kp is peer.next or (
                        kp.is_initiator
                        and kp is peer.current
                        and not peer.sent_last_minute_handshake
                        and now - created > last_minute
                    )
                    run_bytes = 0
                    run_auth = False
                    mark = len(received)
                if expired:
                    self._drop_in("expired_keypair")
                    continue
                if plain is None or not use_opened:
                    _NONCE_PACK(nonce, 0, counter)
                    try:
                        plain = decrypt(nonce, mv[16:], None)
                    except InvalidTag:
                        self._drop_in("decrypt_failed")
                        continue
                elif plain is False:
                    self._drop_in("decrypt_failed")
                    continue
                # replay window, only after authentication: the in-order case inline, the rest in ReplayWindow
                if counter == highest + 1 and counter < limit:
                    ring[counter & RING_MASK] = 1
                    highest = counter
                else:
                    window.highest = highest
                    accepted = window.check_and_update(counter)
                    highest = window.highest
                    if not accepted:
                        self._drop_in("replay")
                        continue
                run_bytes += n
                run_addr = addr  # roaming (§2.1): answer the latest authenticated source
                if uncommon:
                    assert kp is not None  # set with `uncommon` when the run began
                    self._end_rx_run(kp, peer, highest, run_bytes, run_addr, run_auth, len(received) - mark, now)
                    mark = len(received)
                    run_bytes = 0
                    run_auth = True  # this packet's timer effects are still to apply
                    run_index = -1  # the peer's keypair slots change: reload them on the next datagram
                    uncommon = False
                    self._uncommon_receive(kp, peer, now)
                pn = len(plain)
                # inner packet: bounds-checked version/length/source (RFC 791 §3.1, RFC 8200 §3); one unpack reads
                # the IPv4 fields, which an IPv6 packet then overrides
                if pn < 20:
                    if pn:
                        self._drop_in("inner_malformed")
                    else:
                        keepalives += 1
                    continue
                first, inner_len, src = _V4_INNER_UNPACK(plain)
                if first >> 4 == 4:
                    if inner_len < 20 or inner_len > pn:
                        self._drop_in("inner_malformed")
                        continue
                elif first >> 4 == 6 and pn >= 40:
                    inner_len = 40 + _U16BE_UNPACK(plain, 4)[0]
                    if inner_len > pn:
                        self._drop_in("inner_malformed")
                        continue
                    src = plain[8:24]
                else:
                    self._drop_in("inner_malformed")
                    continue
                owner = route_cache.get(src, _MISS)
                if owner is not peer and (owner is not _MISS or self._route(src) is not peer):
                    self._drop_in("inner_src_not_allowed")
                    continue
                received.append((peer, plain if inner_len == pn else plain[:inner_len]))
        finally:
            # also if the loop raised (mismatched lengths): the replay window must know what it accepted
            if kp is not None:
                self._end_rx_run(kp, peer, highest, run_bytes, run_addr, run_auth, len(received) - mark, now)
            self.rx_packets += len(received) - start
            self.rx_keepalives += keepalives
            if stage is not None:
                stage.count_forwarded(len(received) - start)
                if keepalives:
                    stage.count_dropped("keepalive", keepalives)

    def _end_rx_run(  # noqa: PLR0917 -- once per run; positional arguments keep the call cheap
        self,
        kp: Keypair,
        peer: Peer,
        highest: int,
        rx_bytes: int,
        addr: Endpoint,
        auth: bool,
        data: int,
        now: float,
    ) -> None:
        """Apply what a receive run accumulated, leaving the state that per-packet updates would have left.

        Args:
            kp: the run's keypair; ``highest`` is its replay window's highest counter kept in a local.
            peer: the keypair's peer.
            highest: see ``kp``.
            rx_bytes: authenticated UDP payload bytes (0: no authenticated packet not yet applied).
            addr: source of the last authenticated datagram (the roaming endpoint).
            auth: an authenticated packet's bytes were applied earlier in the run, its timers were not.
            data: inner packets delivered (passed the source check) in the run.
            now: the batch's clock.
        """
        kp.replay.highest = highest
        if rx_bytes:
            peer.rx_bytes += rx_bytes
            peer.endpoint = addr
        if rx_bytes or auth:
            peer.t_new_handshake = None  # timersAnyAuthenticatedPacketReceived
            peer.unanswered_since = None  # the peer holds a session with us (`session_live`)
            peer.transport_rx_epoch += 1
            if peer.persistent_keepalive > 0:
                peer.t_persistent = now + peer.persistent_keepalive
        if data:  # timersDataReceived: arm the keepalive, or note that another is needed
            if peer.t_keepalive is None:
                peer.t_keepalive = now + self._keepalive_timeout
                if data > 1:
                    peer.need_another_keepalive = True
            else:
                peer.need_another_keepalive = True

    def _receive_control(self, mv: memoryview, n: int, addr: Endpoint, now: float) -> None:
        """Everything that is not a well-sized transport message: dispatch by `classify_datagram` (§5.4)."""
        kind = classify_datagram(mv)
        if kind in _CONTROL_SIZES:
            drops = self._drops
            if kind != m.MSG_COOKIE_REPLY and self._over_budget(mv, n, kind, now):
                self._drop_in("handshake_overload")  # under load and past the second's budget: no crypto at all
                return
            # consumed exactly when the handler counted no drop: robust to new drop reasons in the handlers, so
            # every datagram has one outcome and a caller's ledger needs no list of control drop reasons
            before = sum(drops.values())
            if kind == m.MSG_INITIATION:
                self._receive_initiation(bytes(mv), addr, now)
            elif kind == m.MSG_RESPONSE:
                self._receive_response(bytes(mv), addr, now)
            else:
                self._receive_cookie_reply(bytes(mv), now)
            if sum(drops.values()) == before:
                self.rx_control_consumed += 1
                if self._rx_stage is not None:
                    self._rx_stage.count_dropped("control")
        elif n < 4:
            self._drop_in("short")
        else:  # junk: say why, for the drop counter
            raw = _U32_UNPACK(mv)[0]
            if raw == m.MSG_TRANSPORT:
                self._drop_in("short")
            elif raw in _CONTROL_SIZES:
                self._drop_in("bad_length")
            else:
                self._drop_in("bad_type")

    def _uncommon_receive(self, kp: Keypair, peer: Peer, now: float) -> None:
        """Off the hot path: confirm a responder's `next` keypair, or rekey an ageing initiator session."""
        if kp is peer.next:
            self._confirm_next(peer, now)
        # keepKeyFreshReceiving: the initiator rekeys before the session nears REJECT_AFTER_TIME
        if (
            kp.is_initiator
            and kp is peer.current
            and not peer.sent_last_minute_handshake
            and now - kp.created > self._last_minute
        ):
            peer.sent_last_minute_handshake = True
            self._send_initiation(peer, now, is_retry=False)

    def _confirm_next(self, peer: Peer, now: float) -> None:
        """Responder: the initiator used the new keypair, so it becomes current (wireguard-go ReceivedWithKeypair)."""
        old = peer.previous
        if old is not None:
            self._unindex(old.local_index)
        peer.previous = peer.current
        peer.current = peer.next
        peer.next = None
        self._handshake_complete(peer, now, initiator=False)
        if peer.staged:
            self._send_staged(peer, now)

    def _handshake_complete(self, peer: Peer, now: float, *, initiator: bool) -> None:
        peer.t_retransmit = None
        peer.handshake_attempts = 0
        peer.sent_last_minute_handshake = False
        peer.last_handshake = now + self.wall_offset
        self.handshakes_completed += 1
        self._events.append(HandshakeCompleted(peer, initiator))

    def _check_macs(self, msg: bytes, addr: Endpoint, now: float) -> bool:
        """mac1 always; under load, mac2 then the source's rate limit (§5.4.4, §5.4.7; wireguard-go receive.go).

        Under load a message without a valid mac2 is answered with a cookie reply (a few microseconds, no DH)
        and dropped as ``bad_mac2``; one with a valid mac2 -- its sender proved it receives at its source
        address -- still has to find a token in that source's bucket (``rate_limited`` otherwise). True: go on
        to the DH.
        """
        n = len(msg)
        if not hmac.compare_digest(mac(self._mac1_key, msg[: n - 32]), msg[n - 32 : n - 16]):
            self._drop_in("bad_mac1")
            return False
        if not self._is_under_load(now):
            return True
        cookie = self._cookie_for(addr, now)
        if hmac.compare_digest(mac(cookie, msg[: n - 16]), msg[n - 16 :]):
            if self.ratelimiter.allow(str(addr[0]), now):
                return True
            self._drop_in("rate_limited")
            return False
        self._drop_in("bad_mac2")
        sender = m.U32.unpack_from(msg, 4)[0]
        sealer = self._cookie_sealer
        if sealer is None or sealer.exhausted:
            sealer = self._cookie_sealer = XAeadSealer(
                self._cookie_key, self._rng.getrandbits(128).to_bytes(16, "little")
            )
        nonce, enc = sealer.seal(cookie, msg[n - 32 : n - 16])
        self._outbox.append((m.COOKIE_REPLY.pack(m.MSG_COOKIE_REPLY, sender, nonce, enc), addr))
        self.tx_datagrams += 1
        self.cookie_replies_sent += 1
        return False

    def _over_budget(self, mv: memoryview, n: int, kind: int, now: float) -> bool:
        """Under load, whether this handshake message is past the second's `HANDSHAKE_BUDGET` (drop it unread)."""
        if not self.under_load and now >= self._load_until:
            return False
        if kind == m.MSG_RESPONSE and n == m.RESPONSE_SIZE and _U32_UNPACK(mv, 8)[0] in self._pending:
            return False  # answers our own in-flight initiation: never shed (it still needs mac2 under load)
        if now - self._budget_window_start >= 1.0:
            self._budget_window_start = now
            self._budget_count = 0
        self._budget_count += 1
        return self._budget_count > HANDSHAKE_BUDGET

    def initiations_shed_until(self, now: float) -> float | None:
        """Until when every handshake initiation handed to the device would be shed unread, or None.

        Under load with this second's `HANDSHAKE_BUDGET` spent, an initiation is dropped on its type alone
        (``handshake_overload``) until the budget's window ends, or the load lapses if that comes first. A driver
        may drop those initiations before they reach the device, in the kernel (the helper's socket filter,
        `netsim.transports.udp.UdpTransport.filter_initiations`), and so spend no read on them: the outcome is
        the one the device would have given, only counted by the kernel. Responses and cookie replies are not
        covered (a response to our own initiation is never shed). Call it after a batch.
        """
        if self._budget_count <= HANDSHAKE_BUDGET:
            return None
        end = self._budget_window_start + 1.0
        if not self.under_load:
            end = min(end, self._load_until)
        return end if now < end else None

    def _is_under_load(self, now: float) -> bool:
        """Count a handshake message with a valid mac1; True while under load (forced, or the count passed
        ``load_threshold`` in the current one-second window less than `UNDER_LOAD_AFTER_TIME` ago)."""
        if self.under_load:
            return True
        if self.load_threshold is None:
            return False
        if now - self._load_window_start >= 1.0:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count > self.load_threshold:
            self._load_until = now + UNDER_LOAD_AFTER_TIME
        return now < self._load_until

    def _cookie_for(self, addr: Endpoint, now: float) -> bytes:
        # τ = MAC(R_m, source address || port), R_m rotated every COOKIE_REFRESH_TIME (§5.4.7)
        if now - self._cookie_secret_time >= self.timers.cookie_refresh_time:
            self._cookie_secret = self._rng.getrandbits(256).to_bytes(32, "little")
            self._cookie_secret_time = now
            self._cookie_sealer = None  # and a fresh nonce prefix with it
        return mac(self._cookie_secret, repr(tuple(addr[:2])).encode())

    def _receive_initiation(self, msg: bytes, addr: Endpoint, now: float) -> None:
        """Whitepaper §5.4.2, responder side: authenticate, then answer with a response (§5.4.3)."""
        if not self._check_macs(msg, addr, now):
            return
        self.handshakes_processed += 1
        _, sender, e_pub, enc_static, enc_ts, _, _ = m.INITIATION.unpack(msg)
        ck, h = initial_chain(self.public_key)
        hs = HandshakeState(chaining_key=ck, hash=h)
        try:
            hs.mix_key(e_pub)
            hs.mix_hash(e_pub)
            k = hs.mix_key2(dh(self._private, e_pub))
            static = aead_decrypt(k, 0, enc_static, hs.hash)
            hs.mix_hash(enc_static)
            peer = self._peers.get(static)
            if peer is None:
                self._drop_in("handshake_failed")
                return
            k = hs.mix_key2(peer.static_static)
            ts = aead_decrypt(k, 0, enc_ts, hs.hash)
            hs.mix_hash(enc_ts)
        except (InvalidTag, ValueError):
            self._drop_in("handshake_failed")
            return
        if ts <= peer.latest_timestamp:
            self._drop_in("stale_timestamp")
            return
        if now - peer.last_initiation_consumed <= self.timers.handshake_initiation_rate:
            self._drop_in("handshake_flood")
            return
        peer.latest_timestamp = ts
        peer.last_initiation_consumed = now
        peer.rx_bytes += len(msg)
        peer.endpoint = addr
        peer.t_new_handshake = None  # any authenticated packet received
        # response (§5.4.3)
        try:
            e = self._ephemeral()
            er_pub = private_to_public(e)
            hs.mix_key(er_pub)
            hs.mix_hash(er_pub)
            hs.mix_key(dh(e, e_pub))
            hs.mix_key(dh(e, peer.public_key))
        except ValueError:
            self._drop_in("handshake_failed")
            return
        hs.chaining_key, tau, k = hkdf(hs.chaining_key, peer.preshared_key, 3)
        hs.mix_hash(tau)
        enc_empty = aead_encrypt(k, 0, b"", hs.hash)
        hs.mix_hash(enc_empty)
        if peer.handshake_index is not None:
            self._pending.pop(peer.handshake_index, None)
            peer.handshake_index = None
            peer.handshake = None
        idx = self._new_index()
        body = m.RESPONSE.pack(m.MSG_RESPONSE, idx, sender, er_pub, enc_empty, bytes(16), bytes(16))
        resp = self._add_macs(peer, body, now)
        recv_key, send_key = hs.transport_keys()
        kp = Keypair(
            send_key,
            recv_key,
            local_index=idx,
            remote_index=sender,
            created=now,
            is_initiator=False,
            reject_after_messages=self.timers.reject_after_messages,
        )
        # responder: new keypair waits in `next`; previous is dropped (wireguard-go BeginSymmetricSession)
        for old in (peer.next, peer.previous):
            if old is not None:
                self._unindex(old.local_index)
        peer.next = kp
        peer.previous = None
        self._index(idx, kp, peer)
        self._outbox.append((resp, addr))
        self.tx_datagrams += 1
        peer.tx_bytes += len(resp)
        peer.t_zero_keys = now + self.timers.reject_after_time * 3
        peer.t_keepalive = None
        if peer.persistent_keepalive > 0:
            peer.t_persistent = now + peer.persistent_keepalive

    def _receive_response(self, msg: bytes, addr: Endpoint, now: float) -> None:
        """Whitepaper §5.4.3, initiator side: finish the handshake and derive transport keys (§5.4.5)."""
        if not self._check_macs(msg, addr, now):
            return
        _, sender, receiver, er_pub, enc_empty, _, _ = m.RESPONSE.unpack(msg)
        peer = self._pending.get(receiver)
        if peer is None or peer.handshake is None or peer.handshake.ephemeral_private is None:
            self._drop_in("unexpected_response")
            return
        self.handshakes_processed += 1
        src = peer.handshake
        assert src.ephemeral_private is not None
        hs = HandshakeState(chaining_key=src.chaining_key, hash=src.hash)
        try:
            hs.mix_key(er_pub)
            hs.mix_hash(er_pub)
            hs.mix_key(dh(src.ephemeral_private, er_pub))
            hs.mix_key(dh(self._private, er_pub))
            hs.chaining_key, tau, k = hkdf(hs.chaining_key, peer.preshared_key, 3)
            hs.mix_hash(tau)
            aead_decrypt(k, 0, enc_empty, hs.hash)
        except (InvalidTag, ValueError):
            self._drop_in("handshake_failed")
            return
        del self._pending[receiver]
        peer.handshake = None
        peer.handshake_index = None
        send_key, recv_key = hs.transport_keys()
        kp = Keypair(
            send_key,
            recv_key,
            local_index=receiver,
            remote_index=sender,
            created=now,
            is_initiator=True,
            reject_after_messages=self.timers.reject_after_messages,
        )
        # initiator rotation (wireguard-go BeginSymmetricSession): an unconfirmed `next` becomes previous
        drop: list[Keypair | None]
        if peer.next is not None:
            drop = [peer.current, peer.previous]
            peer.previous = peer.next
            peer.next = None
        else:
            drop = [peer.previous]
            peer.previous = peer.current
        for old in drop:
            if old is not None:
                self._unindex(old.local_index)
        peer.current = kp
        self._index(receiver, kp, peer)
        peer.rx_bytes += len(msg)
        peer.endpoint = addr
        peer.t_zero_keys = now + self.timers.reject_after_time * 3
        peer.t_new_handshake = None
        peer.unanswered_since = None  # §6: the initiator's new session is confirmed by the response
        if peer.persistent_keepalive > 0:
            peer.t_persistent = now + peer.persistent_keepalive
        self._handshake_complete(peer, now, initiator=True)
        # confirm the session to the responder at once: staged data, or a keepalive
        self._send_keepalive(peer, now)

    def _receive_cookie_reply(self, msg: bytes, now: float) -> None:
        """Whitepaper §5.4.7: store the cookie; the next (re)transmitted handshake message carries mac2."""
        _, receiver, nonce, enc = m.COOKIE_REPLY.unpack(msg)
        peer = self._pending.get(receiver)
        if peer is None:
            entry = self._by_index.get(receiver)
            peer = entry[1] if entry is not None else None
        if peer is None or not peer.last_mac1_sent:
            self._drop_in("unexpected_response")
            return
        try:
            cookie = xaead_decrypt(peer.cookie_key, nonce, enc, peer.last_mac1_sent)
        except InvalidTag:
            self._drop_in("bad_cookie")
            return
        peer.cookie = cookie
        peer.cookie_time = now
        self.cookie_replies_received += 1

    # ------------------------------------------------------------------ key erasure

    def _index(self, index: int, kp: Keypair, peer: Peer) -> None:
        self._by_index[index] = (kp, peer)
        if kp.native_recv is not None:
            self._rx_aead[index] = kp.native_recv

    def _unindex(self, index: int) -> None:
        self._by_index.pop(index, None)
        self._rx_aead.pop(index, None)

    def _zero_keys(self, peer: Peer) -> None:
        for kp in peer.keypairs():
            self._unindex(kp.local_index)
        peer.current = peer.previous = peer.next = None
        if peer.handshake_index is not None:
            self._pending.pop(peer.handshake_index, None)
        peer.handshake = None
        peer.handshake_index = None
