"""WireGuard keys: RFC 7748 known answers, WireGuard's base64 form, and `wg` as an oracle."""

from __future__ import annotations

import base64
import random
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.wireguard.keys import PresharedKey, PrivateKey, PublicKey, clamp
from netsim.errors import ConfigError
from netsim.testing.require import require_binary

H = bytes.fromhex

# RFC 7748 §5.2: scalar, u-coordinate, X25519 output.
RFC7748_5_2 = [
    (
        "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
        "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
    ),
    (
        "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
        "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
        "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
    ),
]

# RFC 7748 §6.1: Alice and Bob.
ALICE_PRIV = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUB = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_PRIV = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUB = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


@pytest.mark.parametrize(("scalar", "u", "out"), RFC7748_5_2)
def test_rfc7748_section_5_2_vectors(scalar: str, u: str, out: str) -> None:
    assert PrivateKey(H(scalar)).exchange(PublicKey(H(u))) == H(out)


def test_rfc7748_section_6_1_diffie_hellman() -> None:
    alice, bob = PrivateKey(H(ALICE_PRIV)), PrivateKey(H(BOB_PRIV))
    assert alice.public_key() == PublicKey(H(ALICE_PUB))
    assert bob.public_key() == PublicKey(H(BOB_PUB))
    assert alice.exchange(bob.public_key()) == bob.exchange(alice.public_key()) == H(SHARED)


def test_rfc7748_iterated_1000() -> None:
    # RFC 7748 §5.2: k = u = 9; repeat (k, u) = (X25519(k, u), k).
    k = u = (9).to_bytes(32, "little")
    for i in range(1000):
        k, u = PrivateKey(k).exchange(PublicKey(u)), k
        if i == 0:
            assert k == H("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
    assert k == H("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")


def test_low_order_point_is_rejected_with_config_error() -> None:
    with pytest.raises(ConfigError, match="low-order"):
        PrivateKey.generate().exchange(PublicKey(bytes(32)))


def test_generate_is_clamped_and_distinct() -> None:
    keys = {PrivateKey.generate().raw for _ in range(8)}
    assert len(keys) == 8
    for raw in keys:
        assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40


def test_generate_with_seeded_rng_is_reproducible() -> None:
    a = PrivateKey.generate(random.Random(7).randbytes)
    b = PrivateKey.generate(random.Random(7).randbytes)
    assert a == b and a.raw == clamp(random.Random(7).randbytes(32))
    assert PresharedKey.generate(random.Random(1).randbytes) == PresharedKey(random.Random(1).randbytes(32))


def test_generated_psks_differ_and_are_not_zero() -> None:
    psks = {PresharedKey.generate().raw for _ in range(8)}
    assert len(psks) == 8 and bytes(32) not in psks
    assert PresharedKey.zero().is_zero() and not PresharedKey.generate().is_zero()


@settings(max_examples=300)
@given(st.binary(min_size=32, max_size=32))
def test_base64_round_trip(raw: bytes) -> None:
    for cls in (PrivateKey, PublicKey, PresharedKey):
        key = cls(raw)
        text = key.to_base64()
        assert len(text) == 44 and text.endswith("=")
        assert text == base64.b64encode(raw).decode()
        assert cls.from_base64(text) == key
        assert cls.from_base64(f"  {text}\n") == key


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_decode_never_raises_anything_but_config_error(text: str) -> None:
    try:
        key = PublicKey.from_base64(text)
    except ConfigError as exc:
        assert "PublicKey must be 32 bytes of base64" in str(exc)
    else:
        assert base64.b64encode(key.raw).decode() == text.strip()


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        base64.b64encode(bytes(31)).decode(),  # 31 bytes
        base64.b64encode(bytes(33)).decode(),  # 33 bytes
        base64.b64encode(bytes(32)).decode().rstrip("="),  # padding missing
        "A" * 42 + "B=",  # non-canonical: unused low bits set, wg rejects it
        "A" * 42 + "!=",
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),  # url-safe alphabet
    ],
)
def test_bad_keys_raise_clear_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="PrivateKey must be 32 bytes of base64"):
        PrivateKey.from_base64(bad)


def test_secret_keys_never_appear_in_repr_or_errors() -> None:
    sk = PrivateKey.generate()
    assert sk.to_base64() not in repr(sk) and "redacted" in repr(sk)
    psk = PresharedKey.generate()
    assert psk.to_base64() not in repr(psk)
    pk = sk.public_key()
    assert pk.to_base64() in repr(pk) and str(pk) == pk.to_base64()
    secret_like = sk.to_base64()[:-2] + "=="
    with pytest.raises(ConfigError) as info:
        PrivateKey.from_base64(secret_like)
    assert secret_like not in str(info.value)


def test_equality_and_hash_are_per_type() -> None:
    raw = bytes(range(32))
    assert PublicKey(raw) == PublicKey(raw) and hash(PublicKey(raw)) == hash(PublicKey(raw))
    assert PublicKey(raw) != PresharedKey(raw)
    with pytest.raises(ConfigError, match="32 raw bytes"):
        PublicKey(bytes(31))


def test_wg_pubkey_agrees() -> None:
    """`wg genkey | wg pubkey` is the oracle for key generation, encoding and public-key derivation."""
    require_binary("wg")
    wg = shutil.which("wg")
    assert wg is not None
    for _ in range(3):
        priv = subprocess.run([wg, "genkey"], check=True, capture_output=True, text=True).stdout
        pub = subprocess.run([wg, "pubkey"], input=priv, check=True, capture_output=True, text=True).stdout
        assert PrivateKey.from_base64(priv).public_key() == PublicKey.from_base64(pub)
    ours = PrivateKey.generate()
    done = subprocess.run([wg, "pubkey"], input=ours.to_base64() + "\n", check=True, capture_output=True, text=True)
    assert done.stdout.strip() == ours.public_key().to_base64()
    psk = subprocess.run([wg, "genpsk"], check=True, capture_output=True, text=True).stdout
    assert len(PresharedKey.from_base64(psk).raw) == 32


def test_canonical_encoding_rule_matches_wg() -> None:
    """For every possible 43rd character, netsim accepts the key exactly when `wg pubkey` does."""
    require_binary("wg")
    wg = shutil.which("wg")
    assert wg is not None
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for ch in alphabet:
        text = "Q" * 42 + ch + "="
        result = subprocess.run([wg, "pubkey"], input=text + "\n", capture_output=True, text=True, check=False)
        theirs = result.returncode == 0
        try:
            PrivateKey.from_base64(text)
            ours = True
        except ConfigError:
            ours = False
        assert ours == theirs, (text, ours, theirs)
