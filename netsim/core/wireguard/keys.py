"""WireGuard keys: X25519 private/public keys and the optional preshared key, in WireGuard's base64 form.

WireGuard writes every key as 32 raw bytes in standard base64 with padding: 44 characters ending in ``=``
(``wg genkey``, ``wg pubkey``, wg-quick files, ``wg show dump``). ``wg`` rejects any other length and any
non-canonical encoding (the unused low bits of the 43rd character must be zero, `wireguard-tools`
``encoding.c``); `decode_key` is exactly as strict, so a key netsim accepts is one ``wg`` accepts.

Randomness: ``core/`` may not touch ``os``, so `PrivateKey.generate` and `PresharedKey.generate` take an
optional ``rng(n) -> bytes`` (pass a seeded one in tests). Without it they use the ``cryptography`` package
(OpenSSL's CSPRNG via its X25519 key generation), which is the right source for real keys.

Private and preshared keys never appear in ``repr()`` or error messages, so they cannot leak into logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable
from typing import ClassVar, Self

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from netsim.errors import ConfigError

__all__ = ["KEY_LEN", "KEY_LEN_BASE64", "PresharedKey", "PrivateKey", "PublicKey", "Rng", "clamp", "decode_key"]

KEY_LEN = 32
"""Raw length of every WireGuard key (Curve25519 scalars and points, the preshared key)."""
KEY_LEN_BASE64 = 44
"""Length of a key in WireGuard's base64 form (``wg genkey`` output without the newline)."""

Rng = Callable[[int], bytes]
"""A source of random bytes: ``rng(n)`` returns ``n`` bytes."""


def decode_key(text: str, what: str, *, secret: bool) -> bytes:
    """Decode one key from WireGuard's base64 form, as strictly as ``wg`` does.

    Args:
        text: the base64 text; surrounding whitespace (such as ``wg genkey``'s newline) is ignored.
        what: the config key name used in the error message (``"PrivateKey"``, ``"PublicKey"`` ...).
        secret: do not echo ``text`` in the error (private and preshared keys).

    Raises:
        ConfigError: not 44 characters of canonical standard base64 encoding 32 bytes.
    """
    s = text.strip()
    raw: bytes | None = None
    if len(s) == KEY_LEN_BASE64 and s.endswith("=") and not s.endswith("=="):
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raw = None
        # Canonical form only: b64decode ignores non-zero padding bits, wg does not (encoding.c).
        if raw is not None and (len(raw) != KEY_LEN or base64.b64encode(raw).decode("ascii") != s):
            raw = None
    if raw is None:
        got = f"{len(s)} characters" if secret else repr(s)
        raise ConfigError(
            f"{what} must be 32 bytes of base64 (44 characters ending in '=', as printed by `wg genkey` / "
            f"`wg pubkey`), got {got}"
        )
    return raw


def _check_raw(raw: bytes | bytearray | memoryview, what: str) -> bytes:
    b = bytes(raw)
    if len(b) != KEY_LEN:
        raise ConfigError(f"{what} must be exactly {KEY_LEN} raw bytes, got {len(b)}")
    return b


def clamp(raw: bytes) -> bytes:
    """Clamp a Curve25519 scalar as ``wg genkey`` does (RFC 7748 §5 decodeScalar25519)."""
    k = bytearray(raw)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


class _Key:
    """Common shape: an immutable 32-byte value, equal by constant-time byte comparison."""

    __slots__ = ("_raw",)
    _what: ClassVar[str] = "key"
    _secret: ClassVar[bool] = True

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        self._raw = _check_raw(raw, self._what)

    @classmethod
    def from_base64(cls, text: str) -> Self:
        """Parse WireGuard's base64 form (raises ConfigError naming what is wrong)."""
        return cls(decode_key(text, cls._what, secret=cls._secret))

    @property
    def raw(self) -> bytes:
        """The 32 raw bytes."""
        return self._raw

    def to_base64(self) -> str:
        """WireGuard's 44-character base64 form."""
        return base64.b64encode(self._raw).decode("ascii")

    def __bytes__(self) -> bytes:
        return self._raw

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Key)
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._raw))

    def __repr__(self) -> str:
        if self._secret:
            return f"{type(self).__name__}(<redacted>)"
        return f"{type(self).__name__}({self.to_base64()!r})"


class PublicKey(_Key):
    """A peer's X25519 public key (a Curve25519 u-coordinate), the peer's identity in WireGuard."""

    __slots__ = ()
    _what = "PublicKey"
    _secret = False

    def __str__(self) -> str:
        return self.to_base64()

    def to_cryptography(self) -> X25519PublicKey:
        """The key as a ``cryptography`` object (for DH in the handshake)."""
        return X25519PublicKey.from_public_bytes(self._raw)


class PrivateKey(_Key):
    """A static X25519 private key.

    Any 32 bytes are accepted, as ``wg`` does: X25519 clamps the scalar when it is used (RFC 7748 §5), so an
    unclamped key and its clamped form have the same public key. Generated keys are stored clamped, like
    ``wg genkey`` output.
    """

    __slots__ = ("_public",)
    _what = "PrivateKey"
    _secret = True

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        super().__init__(raw)
        self._public: PublicKey | None = None

    @classmethod
    def generate(cls, rng: Rng | None = None) -> PrivateKey:
        """A fresh private key, from ``rng`` if given (tests, reproducible labs) else from OpenSSL's CSPRNG."""
        if rng is not None:
            return cls(clamp(_check_raw(rng(KEY_LEN), "rng output")))
        sk = X25519PrivateKey.generate()
        return cls(clamp(sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())))

    def public_key(self) -> PublicKey:
        """The matching public key (X25519 of the scalar with the base point 9), cached."""
        if self._public is None:
            pub = self.to_cryptography().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            self._public = PublicKey(pub)
        return self._public

    def to_cryptography(self) -> X25519PrivateKey:
        """The key as a ``cryptography`` object (for DH in the handshake)."""
        return X25519PrivateKey.from_private_bytes(self._raw)

    def exchange(self, peer: PublicKey) -> bytes:
        """X25519 shared secret with ``peer``.

        Raises:
            ConfigError: ``peer`` is a low-order point, so the result would be all zeros (RFC 7748 §6.1 says
                to abort; WireGuard rejects such keys too).
        """
        try:
            return self.to_cryptography().exchange(peer.to_cryptography())
        except ValueError:
            raise ConfigError(f"PublicKey {peer} is a low-order point; it cannot be a WireGuard peer key") from None


class PresharedKey(_Key):
    """The optional symmetric key mixed into the handshake (whitepaper §5.2, the ``psk`` of IKpsk2).

    Without one WireGuard uses 32 zero bytes; `PresharedKey.zero()` is that value.
    """

    __slots__ = ()
    _what = "PresharedKey"
    _secret = True

    @classmethod
    def generate(cls, rng: Rng | None = None) -> PresharedKey:
        """A fresh random preshared key (``wg genpsk``), from ``rng`` if given else from OpenSSL's CSPRNG."""
        if rng is not None:
            return cls(_check_raw(rng(KEY_LEN), "rng output"))
        # cryptography exposes no raw RNG, and X25519 generation clamps 5 bits; BLAKE2s over two independent
        # generated scalars (about 500 bits of OpenSSL CSPRNG output) yields 32 uniform bytes.
        a = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        b = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(hashlib.blake2s(a + b, person=b"nspsk").digest())

    @classmethod
    def zero(cls) -> PresharedKey:
        """The all-zero key WireGuard uses when no preshared key is configured."""
        return cls(bytes(KEY_LEN))

    def is_zero(self) -> bool:
        """True for the all-zero (absent) key."""
        return not any(self._raw)
