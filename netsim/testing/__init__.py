"""netsim.testing: the public test kit (in-memory devices, gates, pytest fixtures, the IPC conformance checks)."""

from netsim.testing.conformance import CheckResult, ConformanceReport, check_helper
from netsim.testing.memory_tun import MemoryTun

__all__ = ["CheckResult", "ConformanceReport", "MemoryTun", "check_helper"]
