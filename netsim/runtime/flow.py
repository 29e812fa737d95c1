"""PacketTunnelFlow: the NEPacketTunnelFlow mirror over any `PacketDevice` (TUN or MemoryTun).

Theory of operation. Apple's ``readPacketObjects`` calls its completion handler exactly once with a batch of whatever
the utun has queued; the provider re-arms the read to get more (R31, R32). Here one ``await read_packet_objects()`` is
one completion: it drains every packet that is ready, up to ``batch_limit``, and parks in ``device.wait_readable()``
only when nothing is queued, so a busy provider pays one trio wakeup per batch, not per packet (docs/design.md, The
data path). Backpressure is Apple's too: a provider that stops reading leaves the packets in the device queue, and
once that queue is full the kernel (or MemoryTun) drops; those drops are the device's, and `FlowStatistics.device`
reports them when the device exposes statistics.

Writes never block (Apple: "writePackets doesn't support flow control", F15). The returned bool, which Apple
leaves undocumented (R33, R34), means here: True when *every* packet of the call was accepted by the device;
False when at least one was not -- its family did not match its IP version, the family was not Darwin
AF_INET (2) or AF_INET6 (30), the packet was empty or longer than the utun MTU, the device refused it (queue
full) or no device is attached yet.
Nothing is retried; each dropped packet increments exactly one named counter.

Validation happens once. The flow checks every written packet (family, empty, MTU) because those drops carry
Apple-facing names here; it then hands the survivors to the device with ``validated=True``, so the device does
not check them again (a device used directly still checks everything itself). What only the device can know
(queue full, the kernel refusing a packet) comes back as a count and is booked as ``write_dropped_refused``.

Statistics never do I/O: `PacketTunnelFlow.statistics` copies plain ints and the device's own cheap counters, so
it is safe on the event loop under load. The kernel's interface counters (a TUN's tx_dropped: packets the kernel
dropped because the provider did not read) cost a ``/proc`` read in the namespace; they come only from the
explicitly named `PacketTunnelFlow.kernel_statistics`, and `statistics` then shows the value read last.

Ledger. A packet the read path drops (empty, or an IP version nibble other than 4/6) never reaches the provider,
so the provider cannot count it. `PacketTunnelFlow.count_reads_in` names a ledger stage (the forwarding
provider's ``tun_read``) in which each such packet is counted as read and dropped ``malformed``, so the stage's
``read`` is every packet taken from the utun and the books balance across the flow (docs/reliability.md C1, L0).

TUN offloads (netsim extension, docs/helper.md "TUN offloads"). On a device created with vnet headers
(``TunDevice.create(offload=True)``, what ``NETSIM_TUN_OFFLOAD`` asks the provider process for) the flow reads with
``read_offload_packets``, which cuts every TCP/UDP super-packet the kernel hands over into wire packets with full
checksums, so ``read_packet_objects`` / ``read_packets`` still return one packet per object exactly as Apple's do;
and it writes with ``write_coalesced``, which merges consecutive segments of a TCP flow into one super-packet
write (GRO on writes). Nothing a provider sees changes, only what a packet costs.

Per-app metadata. Apple fills ``NEPacket.metadata`` only in per-app VPN mode (``routingMethod ==
sourceApplication``, R3). After `PacketTunnelFlow.set_routing_method` with ``SOURCE_APPLICATION``,
``read_packet_objects`` attributes each TCP/UDP packet to its app: the flow tuple (version, protocol, source
address, source port) is read from the header, looked up in a bounded per-flow cache, and on a miss resolved by
an `OwnerLookup` (default: the namespace's ``/proc/net`` socket tables, `netsim.runtime.appid`) to a uid and so
to an `AppRule`. Cached answers expire (``METADATA_TTL`` for apps, ``METADATA_NEGATIVE_TTL`` for unknown owners),
so a port reused by another app is re-resolved. In every other mode the read path is the plain one: one
attribute test per batch, no per-packet work. ``read_packets`` never carries metadata (Apple's does not either).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from netsim.apple.enums import RoutingMethod, TrafficDirection
from netsim.apple.packet import BYTES_LIKE, FlowMetaData, Packet
from netsim.apple.protocol import AppRule
from netsim.core.family import DARWIN_AF_INET, DARWIN_FAMILY_BY_NIBBLE
from netsim.core.ledger import Stage
from netsim.errors import LocalProtocolError, TunnelDown
from netsim.runtime.appid import OwnerLookup, ProcNetOwnerLookup, app_rules_by_uid
from netsim.transports.base import PacketDevice

__all__ = [
    "DEFAULT_BATCH_LIMIT",
    "METADATA_CACHE_SIZE",
    "METADATA_NEGATIVE_TTL",
    "METADATA_TTL",
    "FlowStatistics",
    "PacketTunnelFlow",
    "flow_key",
]

DEFAULT_BATCH_LIMIT = 64
METADATA_CACHE_SIZE = 4096  # flow tuples remembered; the oldest is evicted first
METADATA_TTL = 10.0  # seconds an app attribution is trusted before the socket tables are asked again
METADATA_NEGATIVE_TTL = 1.0  # seconds an "unknown owner" answer is trusted (the socket may appear or be reused)
_TCP, _UDP = 6, 17

FlowKey = tuple[int, int, bytes, int]


# Flow-tuple fields in one unpack each: IPv4 version/IHL, flags+fragment offset, protocol, source, and the first
# L4 half-word (the source port) when there are no options (RFC 791 §3.1); IPv6 next header, source, source port
# (RFC 8200 §3; TCP RFC 9293 §3.1 and UDP RFC 768 both start with the source port).
_V4_KEY = struct.Struct("!B5xHxB2x4s4xH")
_V6_KEY = struct.Struct("!6xBx16s16xH")
_PORT = struct.Struct("!H")


def flow_key(data: bytes) -> FlowKey | None:
    """``(version, protocol, source address, source port)`` of a TCP/UDP packet, else None.

    None for ICMP/ICMPv6 and anything without a port (no socket to attribute), non-first IPv4 fragments
    (RFC 791 §3.1: no L4 header), IPv6 packets whose first next-header is not TCP/UDP (extension headers are not
    walked), and packets too short to hold the port. Untrusted bytes: bounds-checked, never raises.
    """
    n = len(data)
    if n < _V4_KEY.size:
        return None
    version = data[0] >> 4
    if version == 4:
        version_ihl, fragment, protocol, source, port = _V4_KEY.unpack_from(data)
        if (protocol != _TCP and protocol != _UDP) or fragment & 0x1FFF:
            return None
        if version_ihl != 0x45:  # options: the L4 header starts at IHL * 4
            ihl = (version_ihl & 0x0F) * 4
            if ihl < 20 or n < ihl + 2:
                return None
            (port,) = _PORT.unpack_from(data, ihl)
        return 4, protocol, source, port
    if version == 6 and n >= _V6_KEY.size:
        protocol, source, port = _V6_KEY.unpack_from(data)
        if protocol != _TCP and protocol != _UDP:
            return None
        return 6, protocol, source, port
    return None


# IP version nibble -> Darwin family (0: not IP), indexed by data[0] >> 4; defined once in netsim.core.family.
_FAMILY_BY_NIBBLE = DARWIN_FAMILY_BY_NIBBLE
_MIN_HEADER_V4, _MIN_HEADER_V6 = 20, 40  # a write shorter than its version's fixed header is not an IP packet
_OUTBOUND = TrafficDirection.OUTBOUND


@dataclass(frozen=True, slots=True)
class FlowStatistics:
    """Counters of one `PacketTunnelFlow` (plain ints; every dropped packet is in exactly one ``*_dropped_*``).

    Attributes:
        read_batches: completed ``read_packet_objects``/``read_packets`` calls.
        packets_read / bytes_read: packets handed to the provider.
        read_dropped_malformed: packets read from the device that were empty or not IPv4/IPv6.
        write_calls: ``write_packet_objects``/``write_packets`` calls.
        packets_written / bytes_written: packets the device accepted.
        write_dropped_family: family not 2/30 or not matching the packet's IP version.
        write_dropped_malformed: packets shorter than their IP version's fixed header (20 B v4, 40 B v6), or empty.
        write_dropped_too_big: packets longer than the utun's MTU.
        write_dropped_refused: packets the device refused otherwise (queue full, kernel said no).
        write_dropped_no_device: packets written before the utun existed or after it went away.
        device: the device's own ``statistics()`` (no I/O), if it has any; from `PacketTunnelFlow.kernel_statistics`
            its ``kernel_statistics()`` instead (a TUN's ``kernel_tx_dropped`` backpressure drops read now).
        metadata_attributed / metadata_unattributed: packets read in SOURCE_APPLICATION mode with / without
            `FlowMetaData` (no port, unknown socket, or a uid no app rule names). Zero in other modes.
        metadata_cache_hits / metadata_lookups: flow-cache hits and owner lookups (``/proc/net`` reads).
    """

    read_batches: int
    packets_read: int
    bytes_read: int
    read_dropped_malformed: int
    write_calls: int
    packets_written: int
    bytes_written: int
    write_dropped_family: int
    write_dropped_malformed: int
    write_dropped_too_big: int
    write_dropped_refused: int
    write_dropped_no_device: int
    device: Any = None
    metadata_attributed: int = 0
    metadata_unattributed: int = 0
    metadata_cache_hits: int = 0
    metadata_lookups: int = 0


class PacketTunnelFlow:
    """Mirrors NEPacketTunnelFlow: batched reads from and writes to the utun (Apple: NEPacketTunnelFlow.h).

    Differences from Apple:
        * ``read_packet_objects`` / ``read_packets`` are ``async`` and return the batch instead of calling a
          completion handler; "call again after each completion" becomes "await again".
        * Only one task may read at a time (a second concurrent read raises `LocalProtocolError`); Google PPN
          guards against exactly this double read loop on iOS.
        * The write bool is defined (see module docstring). Count mismatches in ``write_packets`` raise
          `LocalProtocolError`, where Objective-C would throw an exception.
        * Protocol families are Darwin values (2, 30); Linux's AF_INET6 (10) is rejected and counted.
        * Read packets are tagged ``TrafficDirection.OUTBOUND`` (macOS behaviour). ``metadata`` is filled only
          after ``set_routing_method(SOURCE_APPLICATION, rules)`` and only for TCP/UDP packets whose socket belongs
          to a listed uid; ICMP and unknown owners get None (Apple attributes every flow).
        * Before settings create the utun, reads wait and writes drop (``write_dropped_no_device``).
    """

    def __init__(self, device: PacketDevice | None = None, *, batch_limit: int = DEFAULT_BATCH_LIMIT) -> None:
        if batch_limit < 1:
            raise ValueError(f"batch_limit must be at least 1, got {batch_limit}")
        self.batch_limit = batch_limit
        self._device: PacketDevice | None = None
        self._offload = False
        self._attached = trio.Event()
        self._reading = False
        self._read_batches = 0
        self._packets_read = 0
        self._bytes_read = 0
        self._read_malformed = 0
        self._write_calls = 0
        self._packets_written = 0
        self._bytes_written = 0
        self._write_family = 0
        self._write_malformed = 0
        self._write_too_big = 0
        self._write_refused = 0
        self._write_no_device = 0
        self.routing_method = RoutingMethod.DESTINATION_IP
        self._apps: dict[int, FlowMetaData] | None = None  # uid -> shared metadata; None: no per-app work at all
        self._owner_lookup: OwnerLookup | None = None
        self._meta_cache: dict[FlowKey, tuple[FlowMetaData | None, float]] = {}
        self._meta_cache_size = METADATA_CACHE_SIZE
        self._meta_attributed = 0
        self._meta_unattributed = 0
        self._meta_hits = 0
        self._meta_lookups = 0
        self._read_stage: Stage | None = None
        if device is not None:
            self.attach(device)

    def count_reads_in(self, stage: Stage | None) -> None:
        """Count packets the read path drops into ``stage`` (read, and dropped ``malformed``); None stops it.

        The caller counts the packets it is handed in the same stage, so ``stage.read`` covers every packet
        read from the device (netsim addition: Apple's flow has no ledger).
        """
        self._read_stage = stage

    # -- device lifecycle (called by the provider host, not by providers) -----------------------------------
    @property
    def device(self) -> PacketDevice | None:
        """The utun stand-in this flow reads and writes, once settings have created it."""
        return self._device

    def attach(self, device: PacketDevice) -> None:
        """Bind the flow to ``device`` and wake readers waiting for it."""
        self._device = device
        self._offload = bool(getattr(device, "offload", False))  # a vnet TUN (module docstring, TUN offloads)
        self._attached.set()

    def detach(self) -> None:
        """Forget the device (it was closed); later writes count as ``write_dropped_no_device``."""
        self._device = None
        self._offload = False
        self._attached = trio.Event()

    def set_routing_method(
        self,
        routing_method: RoutingMethod,
        app_rules: Sequence[AppRule] | None = None,
        *,
        owner_lookup: OwnerLookup | None = None,
        cache_size: int = METADATA_CACHE_SIZE,
    ) -> None:
        """Choose whether read packets carry `FlowMetaData` (called by the provider host from the protocol).

        Args:
            routing_method: ``SOURCE_APPLICATION`` turns attribution on; any other method turns it off.
            app_rules: the apps (by uid) that may be named; required for ``SOURCE_APPLICATION``.
            owner_lookup: maps a flow tuple to a uid; default reads this process's namespace's ``/proc/net``.
            cache_size: flow tuples remembered (bounded; oldest evicted).

        Raises:
            ConfigError: ``SOURCE_APPLICATION`` without rules, a rule without a uid, or a uid used twice.
        """
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self._meta_cache = {}
        self._meta_cache_size = cache_size
        self.routing_method = RoutingMethod(routing_method)
        if self.routing_method is not RoutingMethod.SOURCE_APPLICATION:
            self._apps = None
            self._owner_lookup = None
            return
        rules = app_rules_by_uid(app_rules)
        self._owner_lookup = owner_lookup if owner_lookup is not None else ProcNetOwnerLookup()
        self._apps = {uid: FlowMetaData(rule.signing_identifier, rule.unique_identifier) for uid, rule in rules.items()}

    # -- reads ----------------------------------------------------------------------------------------------
    async def read_packet_objects(self) -> list[Packet]:
        """Return the next batch of packets leaving the host through the tunnel (Apple: readPacketObjects).

        Returns everything ready, up to ``batch_limit``; waits only when nothing is ready.

        Raises:
            TunnelDown: the device was closed while waiting or reading.
            LocalProtocolError: another task is already reading this flow.
        """
        datas = await self._read_batch()
        if self._apps is None:
            return [Packet(data, _FAMILY_BY_NIBBLE[data[0] >> 4], _OUTBOUND) for data in datas]
        return self._attributed(datas)

    def _attributed(self, datas: list[bytes]) -> list[Packet]:
        """Packets with per-app metadata (SOURCE_APPLICATION mode only; see the module docstring)."""
        apps = self._apps
        lookup = self._owner_lookup
        assert apps is not None and lookup is not None
        cache = self._meta_cache
        now = trio.current_time()
        out = []
        attributed = hits = 0
        v4_key = _V4_KEY.unpack_from
        for data in datas:
            # flow_key() inlined for the common IPv4 packet without options (saves a call per packet).
            key: FlowKey | None
            if data[0] == 0x45 and len(data) >= 22:
                _, fragment, protocol, source, port = v4_key(data)
                key = (
                    (4, protocol, source, port) if (protocol == 6 or protocol == 17) and not fragment & 0x1FFF else None
                )
            else:
                key = flow_key(data)
            meta: FlowMetaData | None = None
            if key is not None:
                cached = cache.get(key)
                if cached is not None and cached[1] > now:
                    meta = cached[0]
                    hits += 1
                else:
                    self._meta_lookups += 1
                    uid = lookup(*key)
                    meta = None if uid is None else apps.get(uid)
                    if cached is not None:
                        del cache[key]  # re-insert at the young end
                    elif len(cache) >= self._meta_cache_size:
                        del cache[next(iter(cache))]  # dicts keep insertion order: the oldest entry
                    cache[key] = (meta, now + (METADATA_TTL if meta is not None else METADATA_NEGATIVE_TTL))
                if meta is not None:
                    attributed += 1
            out.append(Packet(data, _FAMILY_BY_NIBBLE[data[0] >> 4], _OUTBOUND, meta))
        self._meta_hits += hits
        self._meta_attributed += attributed
        self._meta_unattributed += len(datas) - attributed
        return out

    async def read_packets(self) -> tuple[list[bytes], list[int]]:
        """Return the next batch as parallel lists ``(packets, protocols)`` (Apple: readPackets)."""
        datas = await self._read_batch()
        return datas, [_FAMILY_BY_NIBBLE[data[0] >> 4] for data in datas]

    async def _read_batch(self) -> list[bytes]:
        if self._reading:
            raise LocalProtocolError(
                "another task is already awaiting read_packet_objects()/read_packets() on this flow; "
                "use one read loop (Apple delivers one completion per read call)"
            )
        self._reading = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                device = self._device
                if device is None:
                    await self._attached.wait()
                    waited = True
                    continue
                if self._offload:  # a vnet TUN: super-packets are cut to wire packets
                    datas: list[bytes] = []
                    if not device.read_offload_packets(self.batch_limit, datas):  # type: ignore[attr-defined]
                        await device.wait_readable()
                        waited = True
                        continue
                    if not datas:
                        continue  # every read was a counted drop (the device's vnet_* reasons)
                else:
                    datas = device.read_packets(self.batch_limit)
                if datas:
                    datas = self._keep_ip(datas)
                    if datas:
                        if not waited:  # trio: every async call yields once; a wait already did
                            await trio.lowlevel.cancel_shielded_checkpoint()
                        return datas
                    continue
                await device.wait_readable()
                waited = True
        finally:
            self._reading = False

    def _keep_ip(self, datas: list[bytes]) -> list[bytes]:
        """Count the batch and drop (counted) anything that is not an IPv4/IPv6 packet."""
        good = datas
        for data in datas:
            if not data or not _FAMILY_BY_NIBBLE[data[0] >> 4]:
                good = [d for d in datas if d and _FAMILY_BY_NIBBLE[d[0] >> 4]]
                bad = len(datas) - len(good)
                self._read_malformed += bad
                stage = self._read_stage
                if stage is not None:
                    stage.count_read(bad)
                    stage.count_dropped("malformed", bad)
                break
        if good:
            self._read_batches += 1
            self._packets_read += len(good)
            self._bytes_read += sum(map(len, good))
        return good

    # -- writes ---------------------------------------------------------------------------------------------
    def write_packet_objects(self, packets: Sequence[Packet]) -> bool:
        """Inject packets into the host's stack as if they arrived through the tunnel (Apple: writePacketObjects).

        Returns:
            True if every packet was accepted by the device, False if any was dropped (see the module docstring;
            the reason is counted in `statistics`).
        """
        try:
            datas = [p.data for p in packets]
        except AttributeError:
            bad = next(p for p in packets if not isinstance(p, Packet))
            raise TypeError(
                f"write_packet_objects takes Packet objects, got {type(bad).__name__}; for raw bytes call "
                "write_packets(packets, protocols) with one Darwin family per packet"
            ) from None
        return self._write(datas, [p.protocol_family for p in packets])

    def write_packets(self, packets: Sequence[bytes | bytearray | memoryview], protocols: Sequence[int]) -> bool:
        """Write parallel lists of packets and Darwin families (Apple: writePackets(_:withProtocols:)).

        Raises:
            LocalProtocolError: ``packets`` and ``protocols`` differ in length (Apple requires equal counts).
        """
        if len(packets) != len(protocols):
            raise LocalProtocolError(
                f"write_packets got {len(packets)} packets but {len(protocols)} protocols; "
                "pass one Darwin family (AF_INET=2 / AF_INET6=30) per packet"
            )
        return self._write(packets, protocols)

    def _write(self, datas: Sequence[bytes | bytearray | memoryview], families: Sequence[int]) -> bool:
        self._write_calls += 1
        if not datas:
            return True
        device = self._device
        mtu = device.mtu if device is not None else 0
        ok = True
        batch = []
        size = 0
        if not all(isinstance(d, BYTES_LIKE) for d in datas):
            i, bad = next((i, d) for i, d in enumerate(datas) if not isinstance(d, BYTES_LIKE))
            raise TypeError(
                f"write_packets: packet {i} is {type(bad).__name__}, expected bytes, bytearray or memoryview"
            )
        for data, family in zip(datas, families, strict=True):
            if not data:
                self._write_malformed += 1
                ok = False
            elif _FAMILY_BY_NIBBLE[data[0] >> 4] != family or not family:
                self._write_family += 1
                ok = False
            elif len(data) < (_MIN_HEADER_V4 if family == DARWIN_AF_INET else _MIN_HEADER_V6):
                self._write_malformed += 1  # too short to be an IP packet at all: never reaches the utun
                ok = False
            elif device is not None and len(data) > mtu:
                self._write_too_big += 1
                ok = False
            else:
                batch.append(data)
                size += len(data)
        if not batch:
            return ok
        if device is None:
            self._write_no_device += len(batch)
            return False
        try:
            # checked above: the device need not re-check; a vnet TUN writes runs of one TCP flow at once (GRO)
            accepted = (
                device.write_coalesced(batch)  # type: ignore[attr-defined]
                if self._offload
                else device.write_packets(batch, validated=True)
            )
        except TunnelDown:
            self._write_no_device += len(batch)
            return False
        self._packets_written += accepted
        if accepted == len(batch):
            self._bytes_written += size
            return ok
        # Rare (queue full): the device does not say which packets it refused; attribute bytes proportionally.
        self._write_refused += len(batch) - accepted
        self._bytes_written += size * accepted // len(batch)
        return False

    @property
    def packets_written(self) -> int:
        """Packets the device accepted so far (a plain int; what `statistics` reports, without the snapshot).

        netsim addition: a writer that got False from a write reads this to learn how many were taken.
        """
        return self._packets_written

    def statistics(self) -> FlowStatistics:
        """A snapshot of the counters; no I/O (safe on the event loop, under load)."""
        device = self._device
        stats_fn = getattr(device, "statistics", None)
        return self._snapshot(stats_fn() if callable(stats_fn) else None)

    def kernel_statistics(self) -> FlowStatistics:
        """`statistics` with the device's kernel counters read now (``device.kernel_statistics()``, if it has it).

        Blocking I/O for a TUN (``/proc/net/dev`` read inside the namespace): call it when a report is wanted,
        never per batch. Devices without kernel counters (`MemoryTun`) give their ``statistics()``.
        """
        device = self._device
        stats_fn = getattr(device, "kernel_statistics", None) or getattr(device, "statistics", None)
        return self._snapshot(stats_fn() if callable(stats_fn) else None)

    def _snapshot(self, device_stats: Any) -> FlowStatistics:
        return FlowStatistics(
            read_batches=self._read_batches,
            packets_read=self._packets_read,
            bytes_read=self._bytes_read,
            read_dropped_malformed=self._read_malformed,
            write_calls=self._write_calls,
            packets_written=self._packets_written,
            bytes_written=self._bytes_written,
            write_dropped_family=self._write_family,
            write_dropped_malformed=self._write_malformed,
            write_dropped_too_big=self._write_too_big,
            write_dropped_refused=self._write_refused,
            write_dropped_no_device=self._write_no_device,
            device=device_stats,
            metadata_attributed=self._meta_attributed,
            metadata_unattributed=self._meta_unattributed,
            metadata_cache_hits=self._meta_hits,
            metadata_lookups=self._meta_lookups,
        )
