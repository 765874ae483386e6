"""Field values of the on-disk record dataclasses, in declaration order.

Each record in this package declares its fields in the order of its ``struct`` layout
(``cls(*S.unpack_from(...))`` builds one), so :func:`field_values` is what ``S.pack``
takes back. Stateless and thread-safe.
"""

from __future__ import annotations

from dataclasses import fields
from functools import cache
from operator import attrgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@cache
def _getter(cls: type[DataclassInstance]) -> attrgetter[Any]:
    return attrgetter(*(f.name for f in fields(cls)))


def field_values(rec: DataclassInstance) -> tuple[Any, ...]:
    """``rec``'s field values in declaration (= struct) order."""
    values: tuple[Any, ...] = _getter(type(rec))(rec)
    return values
