"""netsim.lab: the simulated Mac / home router / VPN server / internet / LAN world in network namespaces."""

from netsim.lab.addressing import ADDR, LAB_DOMAIN, ROLES, Addressing, HostName
from netsim.lab.cleanup import CleanReport, clean, find_runs
from netsim.lab.lab import Lab, NatMode
from netsim.lab.netns import run_in_netns, run_in_netns_async, socket_in_netns
from netsim.lab.pcap import Capture, read_pcap
from netsim.lab.process import LabProcess
from netsim.lab.services import HTTP_BODY, HTTP_SHA256

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
