"""Fixtures for transport conformance tests."""

from netsim.testing.fixtures import netns

__all__ = ["netns"]
