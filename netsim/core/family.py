"""Address families: Darwin's and Linux's numbers, ethertypes, and the macOS utun 4-byte family header.

Apple's flow API hands each packet over with a protocol family in *Darwin* numbering: ``AF_INET`` = 2 and
``AF_INET6`` = 30 (``bsd/sys/socket.h``; Apple: ``NEPacket.init(data:protocolFamily:)``, ``readPackets`` passes
them in host byte order). Linux uses 2 and 10 (``include/linux/socket.h``), and a Linux TUN without
``IFF_NO_PI`` prefixes an *ethertype* instead (``struct tun_pi``). A raw utun socket prefixes each packet with
the Darwin family as a 4-byte big-endian word (what wireguard-go writes: ``00 00 00 02`` / ``00 00 00 1e``).

This module is the one home of these numbers: `netsim.apple` (``AF_INET``/``AF_INET6``), the IPC codec, the flow,
the helper and the TUN/MemoryTun framing all take them from here. It never imports `socket`: the Linux numbers are
constants here so the core stays sans-IO.
"""

from __future__ import annotations

import struct
from typing import Final

from netsim.core.packet import Buffer
from netsim.errors import BadPacket, LocalProtocolError

__all__ = [
    "DARWIN_AF_INET",
    "DARWIN_AF_INET6",
    "DARWIN_FAMILIES",
    "DARWIN_FAMILY_BY_NIBBLE",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "LINUX_AF_INET",
    "LINUX_AF_INET6",
    "UTUN_HEADER_SIZE",
    "UTUN_HEADER_V4",
    "UTUN_HEADER_V6",
    "darwin_family_for_version",
    "darwin_to_linux",
    "decode_utun_header_untrusted",
    "encode_utun_header",
    "ethertype_for_version",
    "linux_to_darwin",
    "version_for_darwin_family",
    "write_utun_header",
]

DARWIN_AF_INET: Final = 2
DARWIN_AF_INET6: Final = 30
LINUX_AF_INET: Final = 2
LINUX_AF_INET6: Final = 10
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
UTUN_HEADER_SIZE: Final = 4
"""XNU ``UTUN_HEADER_SIZE`` without ``UTUN_FLAGS_ENABLE_PROC_UUID`` (``bsd/net/if_utun.c``)."""

DARWIN_FAMILIES: Final = frozenset((DARWIN_AF_INET, DARWIN_AF_INET6))
"""The two families the flow API and the IPC carry (Apple: ``NEPacket.protocolFamily``)."""

DARWIN_FAMILY_BY_NIBBLE: Final[tuple[int, ...]] = tuple(
    DARWIN_AF_INET if v == 4 else DARWIN_AF_INET6 if v == 6 else 0 for v in range(16)
)
"""Darwin family indexed by an IP packet's version nibble, ``data[0] >> 4`` (RFC 791 §3.1, RFC 8200 §3); 0 for
anything that is not IPv4/IPv6. A tuple index is the cheapest per-packet lookup on the hot path (no call)."""

_U32 = struct.Struct("!I")
UTUN_HEADER_V4: Final = _U32.pack(DARWIN_AF_INET)
"""``00 00 00 02``: the utun header in front of an IPv4 packet."""
UTUN_HEADER_V6: Final = _U32.pack(DARWIN_AF_INET6)
"""``00 00 00 1e``: the utun header in front of an IPv6 packet."""
_HEADERS: Final = {DARWIN_AF_INET: UTUN_HEADER_V4, DARWIN_AF_INET6: UTUN_HEADER_V6}
_LINUX_TO_DARWIN: Final = {LINUX_AF_INET: DARWIN_AF_INET, LINUX_AF_INET6: DARWIN_AF_INET6}
_DARWIN_TO_LINUX: Final = {DARWIN_AF_INET: LINUX_AF_INET, DARWIN_AF_INET6: LINUX_AF_INET6}


def darwin_family_for_version(version: int) -> int:
    """Darwin family (2 or 30) for IP version 4 or 6, e.g. from `PacketView.version`.

    Raises:
        LocalProtocolError: ``version`` is not 4 or 6.
    """
    if version == 4:
        return DARWIN_AF_INET
    if version == 6:
        return DARWIN_AF_INET6
    raise LocalProtocolError(f"IP version must be 4 or 6, got {version!r}")


def version_for_darwin_family(family: int) -> int:
    """IP version (4 or 6) for a Darwin family number.

    Raises:
        LocalProtocolError: ``family`` is not 2 or 30 (pass Darwin numbers; convert Linux ones first).
    """
    if family == DARWIN_AF_INET:
        return 4
    if family == DARWIN_AF_INET6:
        return 6
    raise LocalProtocolError(f"Darwin family must be AF_INET (2) or AF_INET6 (30), got {family!r}")


def ethertype_for_version(version: int) -> int:
    """Ethertype (0x0800 / 0x86DD) for IP version 4 or 6, as in a Linux ``struct tun_pi``.

    Raises:
        LocalProtocolError: ``version`` is not 4 or 6.
    """
    if version == 4:
        return ETH_P_IP
    if version == 6:
        return ETH_P_IPV6
    raise LocalProtocolError(f"IP version must be 4 or 6, got {version!r}")


def linux_to_darwin(family: int) -> int:
    """Linux ``AF_INET``/``AF_INET6`` (2/10) to Darwin's (2/30).

    Raises:
        LocalProtocolError: not an IP family in Linux numbering.
    """
    try:
        return _LINUX_TO_DARWIN[family]
    except KeyError:
        raise LocalProtocolError(f"Linux family must be AF_INET (2) or AF_INET6 (10), got {family!r}") from None


def darwin_to_linux(family: int) -> int:
    """Darwin ``AF_INET``/``AF_INET6`` (2/30) to Linux's (2/10).

    Raises:
        LocalProtocolError: not an IP family in Darwin numbering.
    """
    try:
        return _DARWIN_TO_LINUX[family]
    except KeyError:
        raise LocalProtocolError(f"Darwin family must be AF_INET (2) or AF_INET6 (30), got {family!r}") from None


def encode_utun_header(family: int) -> bytes:
    """The 4-byte big-endian utun header for a Darwin family (2 or 30).

    Raises:
        LocalProtocolError: ``family`` is not 2 or 30.
    """
    try:
        return _HEADERS[family]
    except KeyError:
        raise LocalProtocolError(f"utun family must be AF_INET (2) or AF_INET6 (30), got {family!r}") from None


def write_utun_header(buf: bytearray | memoryview, offset: int, family: int) -> None:
    """Write the utun header into headroom at ``buf[offset:offset + 4]`` (the packet starts at offset + 4).

    Raises:
        LocalProtocolError: bad ``family``, or no room for the header at ``offset``.
    """
    if offset < 0 or offset + UTUN_HEADER_SIZE > len(buf):
        raise LocalProtocolError(f"no room for the 4-byte utun header at offset {offset} in {len(buf)} bytes")
    buf[offset : offset + UTUN_HEADER_SIZE] = encode_utun_header(family)


def decode_utun_header_untrusted(buf: Buffer, offset: int = 0) -> int:
    """The Darwin family in the utun header at ``buf[offset:offset + 4]``; the packet follows it.

    Raises:
        BadPacket: ``truncated`` when fewer than 4 bytes, ``bad_family`` when not 2 or 30.
    """
    if len(buf) - offset < UTUN_HEADER_SIZE or offset < 0:
        raise BadPacket("truncated", f"utun header needs 4 bytes, have {max(len(buf) - offset, 0)}")
    (family,) = _U32.unpack_from(buf, offset)
    if family != DARWIN_AF_INET and family != DARWIN_AF_INET6:
        raise BadPacket("bad_family", f"utun family {family} is neither AF_INET (2) nor AF_INET6 (30)")
    return int(family)
