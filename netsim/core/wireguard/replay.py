"""The anti-replay sliding window for transport counters (whitepaper §5.4.6, RFC 6479).

WireGuard keeps a 2048-bit ring of 64-bit blocks; one block is always being recycled, so the usable window is
2048 - 64 = 1984 counters behind the highest one seen. Here the same window is a Python int bitmap (bit ``i`` set
means ``highest - i`` was seen): a shift and an ``and`` per packet, with identical accept/reject decisions.

The window is only updated for packets that *authenticated* (the caller checks after AEAD decryption), so a
forged counter cannot advance it.
"""

from __future__ import annotations

__all__ = ["WINDOW_SIZE", "ReplayWindow"]

WINDOW_SIZE = 2048 - 64
_MASK = (1 << (WINDOW_SIZE + 1)) - 1


class ReplayWindow:
    """Accepts each counter at most once, out of order within `WINDOW_SIZE`, never below the window."""

    __slots__ = ("_bitmap", "_highest", "limit")

    def __init__(self, limit: int) -> None:
        """Create an empty window; counters ``>= limit`` (REJECT_AFTER_MESSAGES) are always refused."""
        self._highest = 0
        self._bitmap = 0
        self.limit = limit

    def check_and_update(self, counter: int) -> bool:
        """Return True and remember ``counter`` if it is new and inside the window, else False."""
        if counter >= self.limit:
            return False
        highest = self._highest
        if counter > highest:
            shift = counter - highest
            self._bitmap = 1 if shift > WINDOW_SIZE else ((self._bitmap << shift) | 1) & _MASK
            self._highest = counter
            return True
        back = highest - counter
        if back > WINDOW_SIZE:
            return False
        bit = 1 << back
        if self._bitmap & bit:
            return False
        self._bitmap |= bit
        return True

    @property
    def highest(self) -> int:
        """The highest counter accepted so far (0 before any)."""
        return self._highest
