"""The anti-replay sliding window for transport counters (whitepaper §5.4.6, RFC 6479).

WireGuard keeps a 2048-bit ring of 64-bit blocks; one block is always being recycled, so the usable window is
2048 - 64 = 1984 counters behind the highest one seen. Here the ring is a 2048-byte ``bytearray`` with one byte
per counter slot (``counter & 2047``), which gives identical accept/reject decisions with O(1) work per
in-order packet and no big-int arithmetic:

* invariant: for every counter ``x`` in ``(highest - 2048, highest]``, ``ring[x & 2047]`` is 1 iff ``x`` was
  accepted; slots outside that range are stale and never consulted (``highest - x > WINDOW_SIZE`` is refused
  first);
* advancing ``highest`` to ``c`` clears the slots of ``highest + 1 .. c - 1`` (nothing at all for the usual
  ``c == highest + 1``) and sets ``c``'s, which keeps the invariant.

The window is only updated for packets that *authenticated* (the caller checks after AEAD decryption), so a
forged counter cannot advance it. `WireGuardDevice.receive_datagrams_untrusted` inlines the in-order case
(``c == highest + 1 < limit``: set one byte) and calls `ReplayWindow.check_and_update` for everything else.
"""

from __future__ import annotations

__all__ = ["RING_MASK", "RING_SIZE", "WINDOW_SIZE", "ReplayWindow"]

RING_SIZE = 2048
RING_MASK = RING_SIZE - 1
WINDOW_SIZE = RING_SIZE - 64
_ZEROS = bytes(RING_SIZE)


class ReplayWindow:
    """Accepts each counter at most once, out of order within `WINDOW_SIZE`, never below the window.

    Attributes:
        highest: the highest counter accepted so far (0 before any).
        ring: one byte per counter slot (see the module docstring); the device's inline fast path writes it.
        limit: counters ``>= limit`` (REJECT_AFTER_MESSAGES) are always refused.
    """

    __slots__ = ("highest", "limit", "ring")

    def __init__(self, limit: int) -> None:
        """Create an empty window; counters ``>= limit`` (REJECT_AFTER_MESSAGES) are always refused."""
        self.highest = 0
        self.ring = bytearray(RING_SIZE)
        self.limit = limit

    def check_and_update(self, counter: int) -> bool:
        """Return True and remember ``counter`` if it is new and inside the window, else False."""
        if counter >= self.limit:
            return False
        highest = self.highest
        ring = self.ring
        if counter > highest:
            gap = counter - highest - 1  # counters skipped over: their slots now belong to the new window
            if gap >= RING_SIZE:
                ring[:] = _ZEROS
            elif gap:
                start = (highest + 1) & RING_MASK
                end = start + gap
                if end <= RING_SIZE:
                    ring[start:end] = _ZEROS[:gap]
                else:
                    ring[start:] = _ZEROS[: RING_SIZE - start]
                    ring[: end - RING_SIZE] = _ZEROS[: end - RING_SIZE]
            ring[counter & RING_MASK] = 1
            self.highest = counter
            return True
        if highest - counter > WINDOW_SIZE:
            return False
        slot = counter & RING_MASK
        if ring[slot]:
            return False
        ring[slot] = 1
        return True
