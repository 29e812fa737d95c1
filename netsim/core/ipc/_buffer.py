"""The IPC receive buffer: one ``bytearray`` with read/write offsets that never disturbs views it handed out.

Like h11's ``ReceiveBuffer``, but built for zero-copy batches: `netsim.core.ipc.PacketBatch` objects hold
memoryview slices of this buffer. The buffer is compacted only when it runs out of room (so receiving is O(n)
overall), and it is never resized or overwritten while such views are alive: CPython refuses to resize an exported
``bytearray``, so we probe for that and move to a fresh buffer instead, leaving the old one to the views.
"""

from __future__ import annotations

from typing import Final

from netsim.core.ipc._events import Buffer
from netsim.errors import LocalProtocolError

__all__ = ["ReceiveBuffer"]

INITIAL_SIZE: Final = 1 << 18


class ReceiveBuffer:
    """Bytes received and not yet parsed: ``data[start:end]``. ``eof`` once the peer closed."""

    __slots__ = ("data", "end", "eof", "start", "total")

    def __init__(self, size: int = INITIAL_SIZE) -> None:
        self.data = bytearray(size)
        self.start = 0
        self.end = 0
        self.eof = False
        self.total = 0  # bytes ever received

    def __len__(self) -> int:
        return self.end - self.start

    def feed(self, data: Buffer) -> None:
        """Append ``data``; ``b""`` means EOF."""
        n = len(data)
        if n == 0:
            self.eof = True
            return
        if self.eof:
            raise LocalProtocolError("receive_data after EOF")
        self.reserve(n)
        self.data[self.end : self.end + n] = data
        self.end += n
        self.total += n

    def writable(self, size_hint: int) -> memoryview:
        """Space for ``recv_into``; follow with `commit`."""
        if self.eof:
            raise LocalProtocolError("receive_buffer after EOF")
        self.reserve(size_hint)
        return memoryview(self.data)[self.end :]

    def commit(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last `writable` view; 0 means EOF."""
        if nbytes == 0:
            self.eof = True
            return
        if not 0 < nbytes <= len(self.data) - self.end:
            raise LocalProtocolError(f"receive_commit({nbytes}) exceeds the buffer handed out")
        self.end += nbytes
        self.total += nbytes

    def consume(self, nbytes: int) -> memoryview:
        """The next ``nbytes`` as a view (valid as long as referenced), removed from the buffer."""
        start = self.start
        self.start = start + nbytes
        return memoryview(self.data)[start : start + nbytes]

    def skip(self, nbytes: int) -> None:
        self.start += nbytes

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more bytes after ``end`` without disturbing views handed out earlier."""
        buf = self.data
        if len(buf) - self.end >= n:
            return
        live = self.end - self.start
        need = live + n
        if need <= len(buf) and not self._exported():
            buf[0:live] = buf[self.start : self.end]  # in-place move: no exported view points here
        else:
            size = len(buf)
            while size < need:
                size *= 2
            new = bytearray(size)
            new[0:live] = buf[self.start : self.end]
            self.data = new  # the old buffer now belongs to the views still exported from it
        self.start, self.end = 0, live

    def _exported(self) -> bool:
        try:
            self.data.append(0)
        except BufferError:
            return True
        del self.data[-1]
        return False
