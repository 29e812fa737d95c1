"""NEPacket and NEFlowMetaData mirrors, and the Darwin address-family numbers the flow API uses."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from netsim.apple.enums import TrafficDirection
from netsim.core.family import DARWIN_AF_INET, DARWIN_AF_INET6, DARWIN_FAMILY_BY_NIBBLE

__all__ = ["AF_INET", "AF_INET6", "FlowMetaData", "Packet", "family_for_version", "version_for_family"]

# Darwin <sys/socket.h>: AF_INET 2, AF_INET6 30 (Linux uses 10 for AF_INET6). The flow API speaks Darwin values
# in host byte order (Apple: readPackets(completionHandler:)), so ported code comparing against AF_INET6 works.
# The numbers live in netsim.core.family (their one home); these are Apple's names for them.
AF_INET = DARWIN_AF_INET
AF_INET6 = DARWIN_AF_INET6
# What a packet's data may be; a tuple built once (a ``bytes | ...`` union in isinstance is rebuilt per call).
BYTES_LIKE = (bytes, bytearray, memoryview)


def family_for_version(version: int) -> int | None:
    """Darwin family for an IP version nibble (4 -> 2, 6 -> 30), or None for anything else."""
    return (DARWIN_FAMILY_BY_NIBBLE[version] if 0 <= version < 16 else 0) or None


def version_for_family(family: int) -> int | None:
    """IP version for a Darwin family (2 -> 4, 30 -> 6), or None for anything else (including Linux's 10)."""
    return 4 if family == DARWIN_AF_INET else 6 if family == DARWIN_AF_INET6 else None


@dataclass(frozen=True, slots=True)
class FlowMetaData:
    """Mirrors NEFlowMetaData: which app a packet or flow came from (Apple: NEFlowMetaData.h).

    As on Apple, the flow fills it only when ``routing_method == RoutingMethod.SOURCE_APPLICATION``: the packet's
    source socket is looked up in the namespace's ``/proc/net`` tables, its owner uid is matched to an `AppRule`,
    and the rule's ``signing_identifier`` and ``unique_identifier`` are copied here (one shared instance per rule).

    Differences from Apple: netsim has no code signing, so ``source_app_signing_identifier`` is the rule's label
    and ``source_app_unique_identifier`` a hash of its executable path (see `AppRule.unique_identifier`); the
    audit token and filter flow identifier stay None. Packets with no socket (ICMP, ICMPv6 echo from raw or ping
    sockets, fragments after the first) or whose socket is gone or belongs to no listed app get None, where
    Apple attributes every flow.
    """

    source_app_signing_identifier: str = ""
    source_app_unique_identifier: bytes = b""
    source_app_audit_token: bytes | None = None
    filter_flow_identifier: uuid.UUID | None = None


class Packet:
    """Mirrors NEPacket: one bare IP packet plus its protocol family (Apple: NEPacket.h).

    Kept light (``__slots__``, two ``isinstance`` checks) because the flow creates one per packet on the hot path:
    ``__init__`` refuses a ``data`` that is not bytes-like and a ``protocol_family`` that is not an int with a
    `TypeError` at once (Apple's initializer is typed the same way: ``init(data: Data, protocolFamily:
    sa_family_t)``); the flow checks the family against the IP version, and the length against the smallest IP
    header, when the packet is written.

    Differences from Apple: ``data`` may be any bytes-like object (the flow hands out ``bytes``); ``direction`` is
    available on every platform netsim runs on (Apple: macOS 10.15+ only); ``protocol_family`` uses Darwin values
    (`AF_INET` 2, `AF_INET6` 30), not Linux's.
    """

    __slots__ = ("data", "direction", "metadata", "protocol_family")

    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        protocol_family: int,
        direction: TrafficDirection = TrafficDirection.ANY,
        metadata: FlowMetaData | None = None,
    ) -> None:
        if not isinstance(data, BYTES_LIKE):
            raise TypeError(f"Packet data must be bytes, bytearray or memoryview, not {type(data).__name__}")
        if not isinstance(protocol_family, int):
            raise TypeError(
                f"Packet protocol_family must be an int (AF_INET=2 / AF_INET6=30), not {type(protocol_family).__name__}"
            )
        self.data = data
        self.protocol_family = protocol_family
        self.direction = direction
        self.metadata = metadata

    def __repr__(self) -> str:
        return (
            f"Packet(<{len(self.data)} bytes>, protocol_family={self.protocol_family}, "
            f"direction={self.direction!r}, metadata={self.metadata!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Packet):
            return NotImplemented
        return (
            bytes(self.data) == bytes(other.data)
            and self.protocol_family == other.protocol_family
            and self.direction == other.direction
            and self.metadata == other.metadata
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like NEPacket's data buffer
