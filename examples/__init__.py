"""Runnable examples of netsim providers (importable as ``examples.<name>``)."""
