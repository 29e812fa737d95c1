"""Sans-IO WireGuard (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s), interoperable with wireguard-go.

The public face is `WireGuardDevice` (see its module for the theory of operation), configured with
`PeerConfig` and tuned with `Timers`. The layer does no I/O and reads no clock: ``now`` is passed in.
"""

from __future__ import annotations

from netsim.core.wireguard.config import PeerConfig, TunnelConfig, parse_config
from netsim.core.wireguard.device import (
    DROP_REASONS,
    DeviceStatistics,
    HandshakeCompleted,
    HandshakeTimeout,
    KeysZeroed,
    WireGuardDevice,
)
from netsim.core.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from netsim.core.wireguard.peer import Endpoint, Peer
from netsim.core.wireguard.timers import Timers

__all__ = [
    "DROP_REASONS",
    "DeviceStatistics",
    "Endpoint",
    "HandshakeCompleted",
    "HandshakeTimeout",
    "KeysZeroed",
    "Peer",
    "PeerConfig",
    "PresharedKey",
    "PrivateKey",
    "PublicKey",
    "Timers",
    "TunnelConfig",
    "WireGuardDevice",
    "parse_config",
]
