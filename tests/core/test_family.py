"""Address families and the utun 4-byte header."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netsim.core.family import (
    DARWIN_AF_INET,
    DARWIN_AF_INET6,
    DARWIN_FAMILIES,
    DARWIN_FAMILY_BY_NIBBLE,
    ETH_P_IPV6,
    LINUX_AF_INET,
    LINUX_AF_INET6,
    UTUN_HEADER_SIZE,
    UTUN_HEADER_V4,
    UTUN_HEADER_V6,
    darwin_family_for_version,
    darwin_to_linux,
    decode_utun_header_untrusted,
    encode_utun_header,
    ethertype_for_version,
    linux_to_darwin,
    version_for_darwin_family,
    write_utun_header,
)
from netsim.errors import BadPacket, LocalProtocolError


def test_constants() -> None:
    assert (DARWIN_AF_INET, DARWIN_AF_INET6) == (2, 30)
    # This test runs on Linux: the host's own socket module is the oracle for the Linux numbers.
    assert (LINUX_AF_INET, LINUX_AF_INET6) == (socket.AF_INET, socket.AF_INET6)
    assert ethertype_for_version(6) == ETH_P_IPV6 == 0x86DD and ethertype_for_version(4) == 0x0800


def test_wireguard_go_wire_bytes() -> None:
    """wireguard-go's darwin utun writes 00 00 00 02 / 00 00 00 1e."""
    assert encode_utun_header(darwin_family_for_version(4)) == b"\x00\x00\x00\x02"
    assert encode_utun_header(darwin_family_for_version(6)) == b"\x00\x00\x00\x1e"


@pytest.mark.parametrize("version", [4, 6])
def test_conversions_round_trip(version: int) -> None:
    darwin = darwin_family_for_version(version)
    assert linux_to_darwin(darwin_to_linux(darwin)) == darwin
    assert version_for_darwin_family(darwin) == version
    assert decode_utun_header_untrusted(encode_utun_header(darwin)) == darwin


@given(st.sampled_from([2, 30]), st.integers(0, 8), st.binary(max_size=40), st.sampled_from([bytes, bytearray]))
def test_utun_header_in_headroom_round_trips(family: int, offset: int, packet: bytes, kind: type) -> None:
    buf = bytearray(offset + UTUN_HEADER_SIZE) + packet
    write_utun_header(buf, offset, family)
    assert decode_utun_header_untrusted(kind(buf), offset) == family
    assert buf[offset + UTUN_HEADER_SIZE :] == packet


@given(st.binary(max_size=8))
def test_decode_raises_only_bad_packet(data: bytes) -> None:
    try:
        family = decode_utun_header_untrusted(data)
    except BadPacket as e:
        assert e.reason in ("truncated", "bad_family")
    else:
        assert family in (2, 30) and data[:4] == encode_utun_header(family)


def test_bad_inputs() -> None:
    with pytest.raises(BadPacket, match="truncated"):
        decode_utun_header_untrusted(b"\0\0\0")
    with pytest.raises(BadPacket, match="bad_family"):
        decode_utun_header_untrusted(b"\0\0\0\x0a")  # Linux AF_INET6 is not a utun family
    for bad in (lambda: linux_to_darwin(30), lambda: darwin_to_linux(10), lambda: encode_utun_header(10)):
        with pytest.raises(LocalProtocolError):
            bad()
    with pytest.raises(LocalProtocolError):
        darwin_family_for_version(5)
    with pytest.raises(LocalProtocolError):
        version_for_darwin_family(10)
    with pytest.raises(LocalProtocolError):
        ethertype_for_version(0)
    with pytest.raises(LocalProtocolError, match="no room"):
        write_utun_header(bytearray(3), 0, 2)


def test_nibble_table_and_headers_agree_with_the_functions() -> None:
    for version in range(16):
        expected = darwin_family_for_version(version) if version in (4, 6) else 0
        assert DARWIN_FAMILY_BY_NIBBLE[version] == expected
    assert len(DARWIN_FAMILY_BY_NIBBLE) == 16 and DARWIN_FAMILIES == {2, 30}
    assert (UTUN_HEADER_V4, UTUN_HEADER_V6) == (encode_utun_header(2), encode_utun_header(30))


def test_the_apple_names_are_this_modules_numbers() -> None:
    """One home: netsim.apple's AF_INET/AF_INET6 and its helpers answer from this module, including for junk."""
    from netsim import apple

    assert (apple.AF_INET, apple.AF_INET6) == (DARWIN_AF_INET, DARWIN_AF_INET6)
    for version in range(-1, 18):
        want = DARWIN_FAMILY_BY_NIBBLE[version] if 0 <= version < 16 else 0
        assert apple.family_for_version(version) == (want or None)
    for family in (0, 2, 10, 30, 31):
        assert apple.version_for_family(family) == {2: 4, 30: 6}.get(family)
