"""`UdpTransport.bind_to_device` on a real socket (root: SO_BINDTODEVICE needs CAP_NET_RAW).

The helper re-binds its one UDP socket when the default route moves (`netsim.runtime.helper.Helper.path_changed`):
the port stays, a bad interface is a `ConfigError` and leaves the old binding. Only ``lo`` is used and nothing is
sent, so no namespace's configuration changes.
"""

from __future__ import annotations

import socket

import pytest

from netsim.errors import ConfigError
from netsim.testing.require import require_root
from netsim.transports.udp import UdpTransport


def _bound(t: UdpTransport) -> bytes:
    return t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")


def test_rebinding_keeps_the_port_and_a_bad_interface_keeps_the_old_binding() -> None:
    require_root()
    t = UdpTransport.open(interface=None, fwmark=None)
    try:
        port = t.local_port
        assert _bound(t) == b""
        t.bind_to_device("lo")
        assert _bound(t) == b"lo" and t.local_port == port
        with pytest.raises(ConfigError, match="nosuchif0"):
            t.bind_to_device("nosuchif0")
        assert _bound(t) == b"lo" and t.local_port == port
    finally:
        t.close()
