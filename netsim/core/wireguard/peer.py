"""Per-peer WireGuard state: configuration, keypair slots, handshake progress, timer deadlines, counters.

The state machine that drives it lives in `netsim.core.wireguard.device`; a `Peer` is plain data plus a
read-only public face (`public_key`, `endpoint`, `rx_bytes`, `tx_bytes`, `last_handshake`) for callers.
Timer deadlines are absolute ``now`` values or None, mirroring wireguard-go's per-peer timers
(``device/timers.go``): retransmit_handshake, send_keepalive, new_handshake, zero_key_material,
persistent_keepalive.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from netsim.core.wireguard.config import Endpoint as ConfigEndpoint
from netsim.core.wireguard.noise import HandshakeState
from netsim.core.wireguard.session import Keypair

__all__ = ["Endpoint", "Peer", "endpoint_of", "raw_key"]

Endpoint = tuple[Any, ...]
"""A UDP address as the transport gives it, e.g. ``("192.0.2.1", 51820)``; only hashed and echoed back."""


def endpoint_of(endpoint: object) -> Endpoint | None:
    """A transport address tuple from a `config.Endpoint`, a ``(host, port)`` tuple, or None.

    Raises:
        ValueError: the endpoint's host is a name (resolve it first: the sans-IO core does no DNS).
    """
    if endpoint is None or isinstance(endpoint, tuple):
        return endpoint
    if isinstance(endpoint, ConfigEndpoint):
        if endpoint.address is None:
            raise ValueError(f"endpoint {endpoint} is a host name; resolve it to an address before configuring")
        return (str(endpoint.address), endpoint.port)
    raise ValueError(f"endpoint must be a config.Endpoint or a (host, port) tuple, got {endpoint!r}")


def raw_key(key: object, what: str) -> bytes:
    """Accept a 32-byte key as raw bytes, WireGuard base64 text, or an object with ``__bytes__``.

    Raises:
        ValueError: naming ``what`` when the key is not 32 bytes / not valid base64.
    """
    if isinstance(key, str):
        try:
            raw = base64.b64decode(key.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{what}: {key!r} is not base64 (expected 44 characters as `wg genkey` prints)") from None
    elif isinstance(key, bytes | bytearray | memoryview) or hasattr(key, "__bytes__"):
        raw = bytes(key)
    elif hasattr(key, "raw"):
        raw = bytes(key.raw)
    else:
        raise ValueError(f"{what}: expected 32-byte key, base64 text or a key object, got {type(key).__name__}")
    if len(raw) != 32:
        raise ValueError(f"{what}: a WireGuard key is 32 bytes, got {len(raw)}")
    return raw


@dataclass(eq=False, slots=True)
class Peer:
    """Live state of one peer, owned and mutated by `WireGuardDevice`."""

    public_key: bytes
    preshared_key: bytes
    allowed_ips: list[IPv4Network | IPv6Network]
    endpoint: Endpoint | None
    persistent_keepalive: float
    # precomputed per-peer crypto material (whitepaper §5.4.4, §5.4.7)
    static_static: bytes = b""
    mac1_key: bytes = b""
    cookie_key: bytes = b""
    # keypair slots (whitepaper §6.3 / wireguard-go keypairs.go)
    current: Keypair | None = None
    previous: Keypair | None = None
    next: Keypair | None = None
    # handshake in progress
    handshake: HandshakeState | None = None
    handshake_index: int | None = None
    last_sent_initiation: float = float("-inf")
    last_initiation_consumed: float = float("-inf")
    latest_timestamp: bytes = bytes(12)
    last_mac1_sent: bytes = b""
    cookie: bytes | None = None
    cookie_time: float = float("-inf")
    handshake_attempts: int = 0
    sent_last_minute_handshake: bool = False
    need_another_keepalive: bool = False
    # timers: absolute deadlines in the `now` timebase, None when stopped
    t_retransmit: float | None = None
    t_keepalive: float | None = None
    t_new_handshake: float | None = None
    t_zero_keys: float | None = None
    t_persistent: float | None = None
    # liveness (`WireGuardDevice.session_live`): first data send not yet answered by an authenticated transport
    # message (None: all answered), and a number bumped whenever such messages arrive (callers compare it)
    unanswered_since: float | None = None
    transport_rx_epoch: int = 0
    staged: deque[bytes] = field(default_factory=deque)
    # counters comparable to `wg show` (whole UDP payload bytes, as wireguard-go counts them)
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float | None = None
    """Wall-clock time of the latest completed handshake (what `wg show` calls latest-handshake)."""

    def __repr__(self) -> str:
        return f"Peer({base64.b64encode(self.public_key).decode()[:8]}…, endpoint={self.endpoint})"

    @property
    def public_key_base64(self) -> str:
        """The public key as `wg` prints it."""
        return base64.b64encode(self.public_key).decode()

    def keypairs(self) -> list[Keypair]:
        """The live keypairs (current, previous, next) that exist."""
        return [k for k in (self.current, self.previous, self.next) if k is not None]

    def deadline(self) -> float | None:
        """The earliest pending timer deadline of this peer."""
        best: float | None = None
        for t in (self.t_retransmit, self.t_keepalive, self.t_new_handshake, self.t_zero_keys, self.t_persistent):
            if t is not None and (best is None or t < best):
                best = t
        return best
