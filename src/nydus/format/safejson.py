"""The one parser for JSON that comes from outside the process.

Registries (manifests, indexes, image configs, token answers), API clients, nydusd's API
replies, configuration files and state files all hand us JSON that may be hostile or broken.
``json.loads`` alone lets through a ``RecursionError`` (deep nesting), a ``ValueError`` about
integer digits (huge numbers), ``NaN``/``Infinity`` and undecodable bytes, each of which would
otherwise surface as a traceback. :func:`parse_json` turns every one of these into a one-line
:class:`~nydus.errors.NydusError` (a :class:`~nydus.errors.FormatError` unless the caller
names another family) that says what was being parsed.

Pure functions, no I/O, safe from any thread.
"""

from __future__ import annotations

import json
import math
from typing import Any

from nydus.errors import FormatError, NydusError

__all__ = ["MAX_JSON_DEPTH", "parse_json", "parse_json_object", "parse_json_object_or_none"]

#: Deepest nesting of arrays/objects accepted. Real manifests, configs and API bodies stay
#: under ten levels; the limit keeps parsing far from Python's recursion limit in any thread.
MAX_JSON_DEPTH = 64

_OPENERS = frozenset(b"[{")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


def _nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting of ``raw``, ignoring brackets inside strings.

    A quick byte scan that stops as soon as it passes :data:`MAX_JSON_DEPTH`, so the real
    parser never recurses deeper than that. Only called when the document holds more opening
    brackets than the limit (cheap to count), so ordinary documents are not scanned.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_json(
    data: bytes | bytearray | memoryview | str,
    what: str,
    *,
    max_size: int | None = None,
    error: type[NydusError] = FormatError,
) -> Any:
    """Parse ``data`` as JSON; raise ``error`` with a one-line message naming ``what``.

    ``max_size`` (bytes) refuses larger documents before parsing. Nesting deeper than
    :data:`MAX_JSON_DEPTH`, numbers that do not fit (huge integers, infinite floats),
    ``NaN``/``Infinity`` and invalid UTF-8 are all refused.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if max_size is not None and len(raw) > max_size:
        raise error(f"{what} is {len(raw)} bytes, over the {max_size}-byte limit")
    if (raw.count(b"[") + raw.count(b"{")) > MAX_JSON_DEPTH and (
        _nesting_depth(raw) > MAX_JSON_DEPTH
    ):
        raise error(f"{what} is not JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_float=_finite_float, parse_constant=_reject_constant)
    except RecursionError:
        raise error(f"{what} is not JSON: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} is not JSON: bad UTF-8 at byte {e.start}") from None
    except ValueError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise error(f"{what} is not JSON: {reason}") from None


def parse_json_object(
    data: bytes | bytearray | memoryview | str,
    what: str,
    *,
    max_size: int | None = None,
    error: type[NydusError] = FormatError,
) -> dict[str, Any]:
    """:func:`parse_json`, then require a JSON object at the top level."""
    doc = parse_json(data, what, max_size=max_size, error=error)
    if not isinstance(doc, dict):
        raise error(f"{what} is not a JSON object")
    return doc


def parse_json_object_or_none(data: bytes | None, max_size: int) -> dict[str, Any] | None:
    """:func:`parse_json_object` for content that merely may be JSON: None when ``data`` is
    None, over ``max_size`` bytes, not JSON or not an object."""
    if data is None or len(data) > max_size:
        return None
    try:
        return parse_json_object(data, "content")
    except FormatError:
        return None
