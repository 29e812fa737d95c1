"""netsim.apple."""
