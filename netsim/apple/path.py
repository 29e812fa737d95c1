"""NWPath: the provider's default network path (Apple: ``NEProvider.defaultPath``), with Apple's raw values.

``NEProvider.defaultPath`` is an ``NWPath`` (NetworkExtension's, not Network.framework's): "the current default
network path used for connections created by the provider", observed with KVO to learn when the physical
interface changes (Apple: NEProvider/defaultPath). netsim computes it from the simulated Mac's main routing table
(`netsim.runtime.netconfig`) and updates it on every path change; `PacketTunnelProvider.default_path_did_change`
stands in for the KVO notification.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["NWInterfaceType", "NWPath", "NWPathStatus"]


class NWPathStatus(enum.IntEnum):
    """Mirrors NWPathStatus (NetworkExtension's NWPath.h): whether the path can be used.

    Differences from Apple: none in values. netsim produces only SATISFIED (a default route exists) and
    UNSATISFIED (none); INVALID and SATISFIABLE (an on-demand interface such as cellular that would come up on a
    connection attempt) exist for ported code and for the memory backend's `set_path`.
    """

    INVALID = 0
    SATISFIED = 1
    UNSATISFIED = 2
    SATISFIABLE = 3


class NWInterfaceType(enum.IntEnum):
    """Mirrors Network.framework's ``nw_interface_type_t`` / ``NWInterface.InterfaceType`` (a netsim addition
    to the NetworkExtension NWPath, which has no interface type).

    Differences from Apple: the kernel backend reports WIRED_ETHERNET for an Ethernet-like link (the lab's veth
    pairs), LOOPBACK for ``lo`` and OTHER for anything else: Linux cannot tell a Wi-Fi stand-in from a cable.
    The memory backend can report any value.
    """

    OTHER = 0
    WIFI = 1
    CELLULAR = 2
    WIRED_ETHERNET = 3
    LOOPBACK = 4


@dataclass(frozen=True)
class NWPath:
    """Mirrors NetworkExtension's NWPath: a static snapshot of a path (Apple: "properties of the path will never
    change"; a change is a new object).

    Attributes:
        status: `NWPathStatus`.
        is_expensive: Apple's ``isExpensive`` (e.g. cellular).
        is_constrained: Apple's ``isConstrained`` (Low Data Mode).
        interface_type: netsim addition from Network.framework: the type of the interface the default route
            uses, None when unsatisfied.
        interface_name: netsim addition: that interface's name (``en0``), None when unsatisfied.

    Differences from Apple:
        * ``isEqualToPath(_:)`` is ``==`` (a frozen dataclass compares every field).
        * The interface type and name are not on NetworkExtension's NWPath; Network.framework's ``nw_path_t``
          has them (``availableInterfaces``, ``usesInterfaceType``). netsim adds them so a provider can re-bind
          without a second path monitor.
    """

    status: NWPathStatus
    is_expensive: bool = False
    is_constrained: bool = False
    interface_type: NWInterfaceType | None = None
    interface_name: str | None = None

    @property
    def is_satisfied(self) -> bool:
        """True when ``status`` is SATISFIED (netsim convenience)."""
        return self.status is NWPathStatus.SATISFIED

    def to_json(self) -> dict[str, object]:
        """The path as a JSON object (raw enum values), as the control channel and statistics carry it."""
        return {
            "status": int(self.status),
            "is_expensive": self.is_expensive,
            "is_constrained": self.is_constrained,
            "interface_type": None if self.interface_type is None else int(self.interface_type),
            "interface_name": self.interface_name,
        }
