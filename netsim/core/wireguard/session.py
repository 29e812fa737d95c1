"""Transport keypairs: keys, the send counter, the receive replay window and the nonce layout.

Whitepaper §5.4.6: each message's 64-bit counter is sent in clear and forms the AEAD nonce as 32 zero bits
followed by the little-endian counter; it must never repeat under one key, so a keypair refuses to send once its
counter reaches REJECT_AFTER_MESSAGES and is discarded after REJECT_AFTER_TIME.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from netsim import accel
from netsim.core.wireguard.replay import ReplayWindow

__all__ = ["NONCE", "Keypair"]

# 12-byte nonce: 4 zero bytes + u64 LE counter (RFC 8439 §2.8 nonce, WireGuard §5.4.6 layout)
NONCE = struct.Struct("<4xQ")


class Keypair:
    """One direction pair of transport keys from a completed handshake.

    Attributes:
        send: AEAD for outbound data; ``send_counter`` is the next counter to use.
        recv: AEAD for inbound data, guarded by ``replay``.
        local_index: the receiver index peers put in messages to us.
        remote_index: the index we put in messages to the peer.
        created: ``now`` at derivation (drives REKEY_AFTER_TIME / REJECT_AFTER_TIME).
        is_initiator: whether we initiated the handshake that made it (only the initiator rekeys on age).
        native_send: the same send key in the native accelerator (`netsim.accel`), None on the pure-Python path.
        native_recv: the same for the receive key.
    """

    __slots__ = (
        "created",
        "is_initiator",
        "local_index",
        "native_recv",
        "native_send",
        "recv",
        "remote_index",
        "replay",
        "send",
        "send_counter",
    )

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        *,
        local_index: int,
        remote_index: int,
        created: float,
        is_initiator: bool,
        reject_after_messages: int,
    ) -> None:
        """Wrap raw 32-byte keys in AEAD objects (built once, reused for every packet)."""
        self.send = ChaCha20Poly1305(send_key)
        self.recv = ChaCha20Poly1305(recv_key)
        native = accel.native  # read per keypair, so a test can build devices on either path in one process
        self.native_send: Any = None if native is None else native.Aead(send_key)
        self.native_recv: Any = None if native is None else native.Aead(recv_key)
        self.send_counter = 0
        self.replay = ReplayWindow(reject_after_messages)
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.is_initiator = is_initiator

    def __repr__(self) -> str:
        return (
            f"Keypair(local={self.local_index:#x}, remote={self.remote_index:#x}, "
            f"initiator={self.is_initiator}, sent={self.send_counter})"
        )
