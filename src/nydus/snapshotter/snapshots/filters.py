"""containerd's filter syntax, for the ``filters`` of ``Snapshots.List``.

Grammar (containerd ``filters`` package, which containerd uses when it looks for a remote
snapshot: ``labels."containerd.io/snapshot.ref"==sha256:...,parent=="ns/3/sha256:..."``)::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z_][A-Za-z0-9_]*
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := Go-style "..." string; after "~=" also /.../ or |...|

A filter string matches when all its selectors match; a list of filter strings matches when any
of them does (an empty list matches everything). Without an operator a selector tests presence.
``!=`` is true when the field is absent, as in containerd; ``~=`` is a regular-expression search.

For snapshots the fields are ``name``, ``parent``, ``kind`` (``active``, ``view``, ``committed``)
and ``labels.<key>`` (the rest of the path joined with dots is the label key).

Stateless; compiled filters are immutable and thread-safe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..containerd.errdefs import SnapshotInvalidArgument
from .store import Info

__all__ = ["Filter", "parse", "parse_all", "label_field", "snapshot_field"]

_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VALUE_RE = re.compile(r"[^\s,]+")
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
}

Adaptor = Callable[[Sequence[str]], tuple[str, bool]]


@dataclass(frozen=True)
class _Selector:
    fieldpath: tuple[str, ...]
    op: str  # "", "==", "!=", "~="
    value: str
    regex: re.Pattern[str] | None

    def match(self, field: Adaptor) -> bool:
        value, present = field(self.fieldpath)
        if self.op == "":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """An OR of ANDs of selectors (see module docstring)."""

    alternatives: tuple[tuple[_Selector, ...], ...]

    def match(self, field: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(field) for s in alt) for alt in self.alternatives)

    def match_snapshot(self, info: Info) -> bool:
        return self.match(lambda path: snapshot_field(info, path))


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def error(self, msg: str) -> SnapshotInvalidArgument:
        return SnapshotInvalidArgument(f"filter {self.s!r}: {msg} at offset {self.i}")

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_space()
        return self.s[self.i] if self.i < len(self.s) else ""

    def quoted(self, alt_ok: bool) -> str:
        q = self.s[self.i] if self.i < len(self.s) else ""
        if not q or (q not in "\"'" and not (alt_ok and q in "/|")):
            raise self.error("expected quoted string")
        self.i += 1
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                raise self.error("unterminated quoted string")
            c = self.s[self.i]
            self.i += 1
            if c == q:
                return "".join(out)
            if c != "\\":
                out.append(c)
                continue
            if self.i >= len(self.s):
                raise self.error("unterminated escape")
            e = self.s[self.i]
            self.i += 1
            if e == q:
                out.append(q)
            elif e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
            elif e in "xuU":
                n = {"x": 2, "u": 4, "U": 8}[e]
                digits = self.s[self.i : self.i + n]
                if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise self.error(f"bad \\{e} escape")
                out.append(chr(int(digits, 16)))
                self.i += n
            elif e in "01234567":
                digits = self.s[self.i - 1 : self.i + 2]
                if len(digits) != 3 or any(d not in "01234567" for d in digits):
                    raise self.error("bad octal escape")
                out.append(chr(int(digits, 8)))
                self.i += 2
            elif alt_ok and q in "/|":
                out.append("\\" + e)  # regex escapes pass through to the regex
            else:
                raise self.error(f"unknown escape \\{e}")

    def field(self) -> str:
        c = self.peek()
        if c and c in "\"'":
            return self.quoted(False)
        m = _FIELD_RE.match(self.s, self.i)
        if not m:
            raise self.error("expected field or quoted")
        self.i = m.end()
        return m.group(0)

    def selector(self) -> _Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.i += 1
            path.append(self.field())
        self.skip_space()
        op = self.s[self.i : self.i + 2]
        if op not in ("==", "!=", "~="):
            return _Selector(tuple(path), "", "", None)
        self.i += 2
        c = self.peek()
        if not c:
            raise self.error("expected value")
        if c in "\"'" or (op == "~=" and c in "/|"):
            value = self.quoted(op == "~=")
        else:
            m = _VALUE_RE.match(self.s, self.i)
            assert m is not None  # peek() saw a non-space character
            value = m.group(0)
            self.i = m.end()
        regex = None
        if op == "~=":
            try:
                regex = re.compile(value)
            except re.error as e:
                raise self.error(f"bad regular expression {value!r}: {e}") from e
        return _Selector(tuple(path), op, value, regex)

    def selectors(self) -> tuple[_Selector, ...]:
        out = [self.selector()]
        while True:
            c = self.peek()
            if not c:
                return tuple(out)
            if c != ",":
                raise self.error(f"unexpected {c!r}")
            self.i += 1
            out.append(self.selector())


def parse(text: str) -> Filter:
    """One filter string (an AND of selectors); an empty string matches everything."""
    if not text.strip():
        return Filter(())
    return Filter((_Parser(text).selectors(),))


def parse_all(texts: Sequence[str]) -> Filter:
    """Several filter strings, any of which may match; none matches everything."""
    alts: list[tuple[_Selector, ...]] = []
    for t in texts:
        f = parse(t)
        if not f.alternatives:
            return Filter(())
        alts.extend(f.alternatives)
    return Filter(tuple(alts))


def label_field(labels: Mapping[str, str], path: Sequence[str]) -> tuple[str, bool]:
    """(value, present) of the label a ``labels.<key>`` field path names (the rest of the path
    joined with dots is the key)."""
    key = ".".join(path[1:])
    if key in labels:
        return labels[key], True
    return "", False


def snapshot_field(info: Info, path: Sequence[str]) -> tuple[str, bool]:
    """(value, present) of a field path of a snapshot, as containerd's snapshot adaptor."""
    if not path:
        return "", False
    head = path[0]
    if head == "kind":
        return info.kind.label, True
    if head == "name":
        return info.name, True
    if head == "parent":
        return info.parent, True
    if head == "labels":
        return label_field(info.labels, path)
    return "", False
