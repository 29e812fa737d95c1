"""JSON-lines logging for netsim processes, through the standard `logging` module.

The helper process logs one JSON object per record on stderr so tests and tools parse its log line by line.
Nothing here is a logger of its own: modules log with ``logging.getLogger("netsim.<part>")`` and ``extra=``
fields; `configure_json_logging` only installs a `logging.StreamHandler` with `JsonLogFormatter` on the
``netsim`` logger.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["JsonLogFormatter", "configure_json_logging"]


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (Unix time), ``level``, ``logger``, ``msg`` and any ``extra`` fields."""

    _STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """Send every ``netsim`` logger to stderr as JSON lines (the helper process's log format)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("netsim")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
