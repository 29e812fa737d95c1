"""netsim.lab."""
