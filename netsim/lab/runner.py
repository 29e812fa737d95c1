"""``python -m netsim.lab.runner pkg.mod:func ARG...``: run a Python callable inside a lab namespace.

Used by `netsim.lab.Lab.spawn_python`; the callable gets the string arguments. An awaitable result is run with
trio, so ``async def`` targets work too. The return value, if not None, is printed on stdout.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

__all__ = ["main", "resolve"]


def resolve(spec: str) -> Any:
    """Import ``pkg.mod:qual.name``."""
    module_name, _, qualname = spec.partition(":")
    if not qualname:
        raise SystemExit(f"target {spec!r} must look like 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m netsim.lab.runner pkg.mod:func [ARG...]")
    fn = resolve(args[0])
    if inspect.iscoroutinefunction(fn):
        import trio

        result = trio.run(fn, *args[1:])
    else:
        result = fn(*args[1:])
    if result is not None:
        print(result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
