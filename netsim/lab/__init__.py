"""netsim.lab: the simulated Mac / home router / VPN server / internet / LAN world in network namespaces.

Attributes are imported lazily (PEP 562) so the lab's child processes (``python -m netsim.lab.services``,
``python -m netsim.lab.runner``) start without importing trio and pyroute2: that keeps lab bring-up fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netsim.lab.addressing import ADDR, LAB_DOMAIN, ROLES, Addressing, HostName
    from netsim.lab.cleanup import CleanReport, clean, find_runs
    from netsim.lab.lab import Lab, NatMode
    from netsim.lab.netns import run_in_netns, run_in_netns_async, socket_in_netns
    from netsim.lab.pcap import Capture, read_pcap
    from netsim.lab.process import LabProcess
    from netsim.lab.services import HTTP_BODY, HTTP_SHA256

_EXPORTS = {
    "ADDR": "addressing",
    "LAB_DOMAIN": "addressing",
    "ROLES": "addressing",
    "Addressing": "addressing",
    "HostName": "addressing",
    "CleanReport": "cleanup",
    "clean": "cleanup",
    "find_runs": "cleanup",
    "Lab": "lab",
    "NatMode": "lab",
    "run_in_netns": "netns",
    "run_in_netns_async": "netns",
    "socket_in_netns": "netns",
    "Capture": "pcap",
    "read_pcap": "pcap",
    "LabProcess": "process",
    "HTTP_BODY": "services",
    "HTTP_SHA256": "services",
}

__all__ = [
    "ADDR",
    "HTTP_BODY",
    "HTTP_SHA256",
    "LAB_DOMAIN",
    "ROLES",
    "Addressing",
    "Capture",
    "CleanReport",
    "HostName",
    "Lab",
    "LabProcess",
    "NatMode",
    "clean",
    "find_runs",
    "read_pcap",
    "run_in_netns",
    "run_in_netns_async",
    "socket_in_netns",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'netsim.lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"netsim.lab.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
