"""WireGuard's cryptographic primitives and the Noise_IKpsk2 handshake, sans-IO.

Theory of operation: the handshake is two messages (WireGuard whitepaper §5.4). The initiator builds an
initiation from its static key, a fresh ephemeral key and a TAI64N timestamp; the responder consumes it, checks
the timestamp is newer than any seen from that peer, and answers with a response; both then derive the pair of
transport keys from the final chaining key (§5.4.5). Every function here is pure: randomness (ephemeral keys) and
wall time (TAI64N) are passed in, so tests are deterministic and the layer never touches a clock.

References followed: WireGuard whitepaper §5.4 (handshake), §5.4.7 (cookies); RFC 7693 (BLAKE2s); RFC 2104
(HMAC); RFC 8439 (ChaCha20-Poly1305); draft-irtf-cfrg-xchacha (HChaCha20 / XChaCha20-Poly1305).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

__all__ = [
    "CONSTRUCTION",
    "IDENTIFIER",
    "LABEL_COOKIE",
    "LABEL_MAC1",
    "HandshakeState",
    "XAeadSealer",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "hash_",
    "hchacha20",
    "hkdf",
    "hmac_",
    "initial_chain",
    "mac",
    "private_to_public",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

# Whitepaper §5.4: the protocol name and the identifier mixed into the first hash.
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

_ZERO_NONCE = bytes(12)
_EMPTY = b""


def hash_(*parts: bytes) -> bytes:
    """HASH(input) = BLAKE2s(input, 32) (whitepaper §5.4)."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, input) = Keyed-BLAKE2s(key, input, 16) (whitepaper §5.4; RFC 7693 keyed mode)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC(key, input) = HMAC-BLAKE2s(key, input, 32), RFC 2104 with BLAKE2s's 64-byte block."""
    return hmac.digest(key, data, "blake2s")


def hkdf(chaining_key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDF_n(key, input) from the whitepaper §5.4: HKDF (RFC 5869) with HMAC-BLAKE2s, n outputs of 32 bytes."""
    t0 = hmac_(chaining_key, data)
    out: list[bytes] = []
    prev = _EMPTY
    for i in range(1, n + 1):
        prev = hmac_(t0, prev + bytes((i,)))
        out.append(prev)
    return tuple(out)


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """DH(private, public) = X25519 (RFC 7748). An all-zero result (low-order point) is rejected."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return shared


def private_to_public(private: X25519PrivateKey) -> bytes:
    """The 32-byte public key of ``private``."""
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte private scalar (for tests and wg configuration)."""
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    """AEAD(key, counter, plain, auth): ChaCha20-Poly1305 with nonce = 32 zero bits || 64-bit LE counter."""
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE[:4] + counter.to_bytes(8, "little"), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of `aead_encrypt`; raises ``cryptography.exceptions.InvalidTag`` on failure."""
    return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE[:4] + counter.to_bytes(8, "little"), ciphertext, aad)


# --- HChaCha20 / XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha §2.2). Cookie replies are what the device sends
# instead of a DH under load, so they must cost far less than one: HChaCha20 is taken from one ChaCha20 keystream
# block computed by OpenSSL. A block is serialize(rounds(S) + S) for the input state S (RFC 8439 §2.3), and
# HChaCha20 is words 0-3 and 12-15 of rounds(S) (draft §2.2), so subtracting those words of S -- the constants
# and the 16-byte nonce, which cryptography's 16-byte ChaCha20 nonce places in words 12-15 as RFC 8439's
# counter || nonce -- recovers them. About 3 us instead of ~120 us for the same rounds in Python; the draft's
# test vector and a pure-Python reference check it (tests/core/wireguard).
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_M32 = 0xFFFFFFFF
_BLOCK = struct.Struct("<16I")
_NONCE_WORDS = struct.Struct("<4I")
_ZERO_BLOCK = bytes(64)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20(key, 16-byte nonce) -> 32-byte subkey (draft-irtf-cfrg-xchacha §2.2)."""
    w = _BLOCK.unpack(Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(_ZERO_BLOCK))
    n = _NONCE_WORDS.unpack(nonce16)
    return struct.pack(
        "<8I",
        (w[0] - _SIGMA[0]) & _M32,
        (w[1] - _SIGMA[1]) & _M32,
        (w[2] - _SIGMA[2]) & _M32,
        (w[3] - _SIGMA[3]) & _M32,
        (w[12] - n[0]) & _M32,
        (w[13] - n[1]) & _M32,
        (w[14] - n[2]) & _M32,
        (w[15] - n[3]) & _M32,
    )


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XAEAD: XChaCha20-Poly1305 = ChaCha20-Poly1305 under HChaCha20(key, nonce[:16]), nonce 0^4 || nonce[16:]."""
    return ChaCha20Poly1305(hchacha20(key, nonce24[:16])).encrypt(bytes(4) + nonce24[16:], plaintext, aad)


class XAeadSealer:
    """XChaCha20-Poly1305 encryption of many messages under one key, with one HChaCha20 for all of them.

    The 24-byte nonce is a random 16-byte prefix, fixed for the sealer's life, then an 8-byte little-endian
    counter: unique per message like a random nonce, but the HChaCha20 subkey depends only on the prefix, so
    each message costs one ChaCha20-Poly1305 call. Whoever opens it needs nothing special (`xaead_decrypt`
    with the nonce sent alongside). The device uses one per cookie secret for its cookie replies.

    Args:
        key: the 32-byte XAEAD key.
        prefix: 16 random bytes (from the caller's rng: this layer has no randomness of its own).
    """

    LIMIT = 1 << 64  # counter values; a sealer past it must be replaced (`exhausted`)

    def __init__(self, key: bytes, prefix: bytes) -> None:
        if len(prefix) != 16:
            raise ValueError(f"XAeadSealer prefix must be 16 bytes, got {len(prefix)}")
        self._prefix = bytes(prefix)
        self._aead = ChaCha20Poly1305(hchacha20(key, prefix))
        self.counter = 0

    @property
    def exhausted(self) -> bool:
        """True once every counter value was used."""
        return self.counter >= self.LIMIT

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Return ``(nonce24, ciphertext)``, the same as ``xaead_encrypt(key, nonce24, plaintext, aad)``."""
        if self.counter >= self.LIMIT:
            raise ValueError("XAeadSealer exhausted: make a new one with a fresh prefix")
        tail = self.counter.to_bytes(8, "little")
        self.counter += 1
        return self._prefix + tail, self._aead.encrypt(bytes(4) + tail, plaintext, aad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of `xaead_encrypt`; raises ``InvalidTag`` on failure."""
    return ChaCha20Poly1305(hchacha20(key, nonce24[:16])).decrypt(bytes(4) + nonce24[16:], ciphertext, aad)


_TAI64_BASE = 0x400000000000000A  # TAI64 label 2^62 plus the 10 s TAI-UTC offset, as wireguard-go uses
_TAI64N = struct.Struct(">QI")
# wireguard-go rounds the nanoseconds down to ~16.7 ms so the timestamp does not leak a fine clock.
_WHITENER_MASK = 0x1000000 - 1


def tai64n(wall: float) -> bytes:
    """TAI64N of a Unix wall-clock time (whitepaper §5.1: 12 bytes, big-endian seconds then nanoseconds)."""
    secs = int(wall)
    nanos = int((wall - secs) * 1e9) & ~_WHITENER_MASK
    return _TAI64N.pack(_TAI64_BASE + secs, nanos)


_C0 = hash_(CONSTRUCTION)
_H0 = hash_(_C0, IDENTIFIER)


def initial_chain(responder_static_public: bytes) -> tuple[bytes, bytes]:
    """(C, H) before the first message: C = HASH(CONSTRUCTION), H = HASH(HASH(C || IDENTIFIER) || S_r^pub)."""
    return _C0, hash_(_H0, responder_static_public)


@dataclass
class HandshakeState:
    """The evolving Noise state of one handshake (chaining key, hash, ephemeral keys)."""

    chaining_key: bytes = b""
    hash: bytes = b""
    ephemeral_private: X25519PrivateKey | None = None
    remote_ephemeral: bytes = b""
    remote_static: bytes = b""
    timestamp: bytes = b""
    extra: dict[str, bytes] = field(default_factory=dict)

    def mix_hash(self, data: bytes) -> None:
        """H = HASH(H || data)."""
        self.hash = hash_(self.hash, data)

    def mix_key(self, data: bytes) -> None:
        """C = KDF1(C, data)."""
        (self.chaining_key,) = hkdf(self.chaining_key, data, 1)

    def mix_key2(self, data: bytes) -> bytes:
        """C, k = KDF2(C, data); returns k."""
        self.chaining_key, k = hkdf(self.chaining_key, data, 2)
        return k

    def transport_keys(self) -> tuple[bytes, bytes]:
        """(T_send_initiator, T_recv_initiator) = KDF2(C, empty) (whitepaper §5.4.5)."""
        a, b = hkdf(self.chaining_key, _EMPTY, 2)
        return a, b
