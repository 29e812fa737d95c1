"""netsim.runtime."""
