"""WireGuard's protocol constants (whitepaper §6.1, wireguard-go ``device/constants.go``), overridable.

Tests lower them (a rekey after 5 messages or 3 seconds) through a `Timers` instance passed to the device; the
defaults are the protocol's and must be kept for interop with real peers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "COOKIE_REFRESH_TIME",
    "HANDSHAKE_INITIATION_RATE",
    "KEEPALIVE_TIMEOUT",
    "MAX_STAGED_PACKETS",
    "MAX_TIMER_HANDSHAKES",
    "PADDING_MULTIPLE",
    "REJECT_AFTER_MESSAGES",
    "REJECT_AFTER_TIME",
    "REKEY_AFTER_MESSAGES",
    "REKEY_AFTER_TIME",
    "REKEY_ATTEMPT_TIME",
    "REKEY_TIMEOUT",
    "REKEY_TIMEOUT_JITTER_MAX",
    "Timers",
]

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334  # wireguard-go: up to 334 ms of jitter on each retransmission
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 1.0 / 50  # wireguard-go: at most 50 initiations/s accepted per peer
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
MAX_STAGED_PACKETS = 128  # wireguard-go's QueueStagedSize
PADDING_MULTIPLE = 16


@dataclass(frozen=True, slots=True)
class Timers:
    """Per-device protocol thresholds. Defaults are WireGuard's; lower them only in tests."""

    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_attempt_time: float = REKEY_ATTEMPT_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    rekey_timeout_jitter_max: float = REKEY_TIMEOUT_JITTER_MAX
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    cookie_refresh_time: float = COOKIE_REFRESH_TIME
    handshake_initiation_rate: float = HANDSHAKE_INITIATION_RATE
    max_staged_packets: int = MAX_STAGED_PACKETS
