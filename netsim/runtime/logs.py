"""Logging for netsim processes and the ``netsim`` command, through the standard `logging` module.

Nothing here is a logger of its own: modules log with ``logging.getLogger("netsim.<part>")`` and ``extra=``
fields. `configure_logging` is the one place a handler is installed, on the ``netsim`` logger, writing to stderr:
``text`` (time, level, logger, message) for people, ``json`` (`JsonLogFormatter`, one object per line) for tools
and tests. The helper process always logs JSON (`configure_json_logging`); the ``netsim`` command picks with
``-v``/``-q``/``--log-format`` (`verbosity_level`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Literal, TextIO

__all__ = [
    "LOG_FORMATS",
    "JsonLogFormatter",
    "LogFormat",
    "configure_json_logging",
    "configure_logging",
    "verbosity_level",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
_TEXT = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
# -q -q ... ERROR ... WARNING (default) ... INFO (-v) ... DEBUG (-vv)
_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


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


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at each record (as `logging.lastResort` does), so a test harness
    that swaps stderr around one command (click's ``CliRunner``) does not leave a handler on a closed stream."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr


def verbosity_level(verbose: int = 0, quiet: int = 0) -> int:
    """The level for ``-v``/``-q`` counts: WARNING by default, each -v one step finer, each -q one coarser."""
    index = _LEVELS.index(logging.WARNING) - verbose + quiet
    return _LEVELS[max(0, min(index, len(_LEVELS) - 1))]


def configure_logging(level: int = logging.WARNING, fmt: LogFormat = "text", *, propagate: bool = False) -> None:
    """Send every ``netsim`` logger at ``level`` and above to stderr, as ``text`` or ``json`` lines.

    Replaces the handlers an earlier call installed (a command may configure twice: group options, then its own).
    ``propagate=True`` also hands records to the root logger's handlers (pytest's log capture, an embedding app).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {LOG_FORMATS}")
    handler = _StderrHandler()
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else _TEXT)
    logger = logging.getLogger("netsim")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = propagate


def configure_json_logging(level: int = logging.INFO) -> None:
    """Send every ``netsim`` logger to stderr as JSON lines (the helper process's log format)."""
    configure_logging(level, "json")
