"""The NEAppProxyFlow life cycle as a transition table, sans-IO (Apple: NEAppProxyFlow.h).

Theory of operation. A flow is handed to ``handle_new_flow`` unopened (``NEW``); the provider claims it by
returning True and then opens it; reads and writes are valid only while open; ``close_read`` and
``close_write`` close one direction each (Apple: "When you are finished with a flow, you should call
closeReadWithError and closeWriteWithError"), and the flow is ``CLOSED`` when both are. Each (state, operation)
pair maps to the next state, or to the `AppProxyFlowError` raw value Apple's completion handlers report
(``NOT_CONNECTED`` = 1 for data before open or after close; ``INVALID_ARGUMENT`` = 4 for a second open).
Closing an already closed direction is a no-op, as Apple documents none.
"""

from __future__ import annotations

__all__ = [
    "CLOSED",
    "ERROR_INVALID_ARGUMENT",
    "ERROR_NOT_CONNECTED",
    "NEW",
    "OPEN",
    "OPERATIONS",
    "READ_CLOSED",
    "STATES",
    "TRANSITIONS",
    "WRITE_CLOSED",
    "next_state",
]

NEW, OPEN, READ_CLOSED, WRITE_CLOSED, CLOSED = "new", "open", "read-closed", "write-closed", "closed"
STATES = (NEW, OPEN, READ_CLOSED, WRITE_CLOSED, CLOSED)
OPERATIONS = ("open", "read", "write", "close_read", "close_write")
# NEAppProxyFlowError raw values (NEAppProxyFlow.h)
ERROR_NOT_CONNECTED = 1
ERROR_INVALID_ARGUMENT = 4

# (state, operation) -> next state (str) or error raw value (int)
TRANSITIONS: dict[tuple[str, str], str | int] = {
    (NEW, "open"): OPEN,
    (NEW, "read"): ERROR_NOT_CONNECTED,
    (NEW, "write"): ERROR_NOT_CONNECTED,
    (NEW, "close_read"): CLOSED,  # closing an unopened flow ends it: it never carried data
    (NEW, "close_write"): CLOSED,
    (OPEN, "open"): ERROR_INVALID_ARGUMENT,
    (OPEN, "read"): OPEN,
    (OPEN, "write"): OPEN,
    (OPEN, "close_read"): READ_CLOSED,
    (OPEN, "close_write"): WRITE_CLOSED,
    (READ_CLOSED, "open"): ERROR_INVALID_ARGUMENT,
    (READ_CLOSED, "read"): ERROR_NOT_CONNECTED,
    (READ_CLOSED, "write"): READ_CLOSED,
    (READ_CLOSED, "close_read"): READ_CLOSED,
    (READ_CLOSED, "close_write"): CLOSED,
    (WRITE_CLOSED, "open"): ERROR_INVALID_ARGUMENT,
    (WRITE_CLOSED, "read"): WRITE_CLOSED,
    (WRITE_CLOSED, "write"): ERROR_NOT_CONNECTED,
    (WRITE_CLOSED, "close_read"): CLOSED,
    (WRITE_CLOSED, "close_write"): WRITE_CLOSED,
    (CLOSED, "open"): ERROR_INVALID_ARGUMENT,
    (CLOSED, "read"): ERROR_NOT_CONNECTED,
    (CLOSED, "write"): ERROR_NOT_CONNECTED,
    (CLOSED, "close_read"): CLOSED,
    (CLOSED, "close_write"): CLOSED,
}


def next_state(state: str, operation: str) -> str | int:
    """The table's answer for ``operation`` in ``state``: the next state, or an error raw value."""
    return TRANSITIONS[(state, operation)]
