"""Per-type dispatch tables for the policy decoders (a handler per value type instead of an ``isinstance`` chain).

A policy document reaches the parser as whatever ``tomllib``, PyYAML or a caller produced, so the decoders
branch on the type of each value. Declaring those branches as a table keeps each type's handling in one named
function and makes the set of accepted types visible in one place (as h11 keeps its state machine in tables).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

__all__ = ["TypeTable"]

T = TypeVar("T")


class TypeTable(Generic[T]):
    """Handlers keyed by type, resolved the way ``isinstance`` would.

    A lookup walks the value type's MRO and takes the first class with an entry, so the most specific entry wins
    (``bool`` finds its own before ``int``; a ``str`` subclass finds ``str``). Types that match only virtually
    (a ``Mapping`` that is not a ``dict``, e.g. ``types.MappingProxyType``) are then tried against ``abstract``
    in order; anything else gets ``default``. For concrete builtin types this is the same answer as the chain of
    ``isinstance`` checks it replaces; the common types resolve on the first MRO step.

    Args:
        exact: handler per concrete type.
        abstract: ``(abc, handler)`` pairs tried with ``isinstance`` when no MRO entry matched.
        default: handler for every other type.

    Handlers must not be ``None`` (a ``None`` entry reads as "no entry").
    """

    __slots__ = ("_abstract", "_default", "_exact")

    def __init__(self, exact: Mapping[type, T], *, abstract: Sequence[tuple[type, T]] = (), default: T) -> None:
        self._exact = dict(exact)
        self._abstract = tuple(abstract)
        self._default = default

    def __call__(self, value: object) -> T:
        """The handler for ``value``'s type."""
        exact = self._exact
        value_type = type(value)
        hit = exact.get(value_type)  # the common case: an entry for the type itself
        if hit is not None:
            return hit
        for cls in value_type.__mro__[1:]:
            hit = exact.get(cls)
            if hit is not None:
                return hit
        for abc, handler in self._abstract:
            if isinstance(value, abc):
                return handler
        return self._default
