"""netsim.transports."""
