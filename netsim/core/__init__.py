"""netsim.core."""
