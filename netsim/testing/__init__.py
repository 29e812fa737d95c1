"""netsim.testing."""
