"""netsim: a macOS NetworkExtension packet-tunnel data plane, simulated on Linux with real packets."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
