"""netsim.testing: the public test kit (in-memory devices, gates, pytest fixtures)."""

from netsim.testing.memory_tun import MemoryTun

__all__ = ["MemoryTun"]
