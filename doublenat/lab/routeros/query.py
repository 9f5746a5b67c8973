"""The `print` query language: query words evaluated in order on a stack of booleans.

Each item starts with a stack that is, in effect, an endless run of `true`; every query word
pushes one value or rewrites the stack (`?#`). The item is returned when no `false` is left.
Values are compared by type the way the router appears to: integers numerically, booleans
with yes/true/no/false as synonyms, `*HEX` ids by number, anything else as text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

BOOLEANS = {"yes": True, "true": True, "no": False, "false": False}
_INTEGER = re.compile(r"-?[0-9]+\Z")
_ITEM_ID = re.compile(r"\*[0-9A-Fa-f]+\Z")
_DIGITS = frozenset("0123456789")


class QueryError(ValueError):
    """A query word the router would refuse."""


@dataclass(frozen=True)
class Has:
    """`?name`: the item has a value for `name`."""

    name: str


@dataclass(frozen=True)
class Lacks:
    """`?-name`: the item has no value for `name`."""

    name: str


@dataclass(frozen=True)
class Compare:
    """`?name=v`, `?=name=v`, `?<name=v`, `?>name=v`."""

    op: Literal["=", "<", ">"]
    name: str
    value: str


@dataclass(frozen=True)
class StackOps:
    """`?#ops`: operations on the stack itself."""

    ops: str


Term = Has | Lacks | Compare | StackOps


def parse_term(word: str) -> Term:
    if not word.startswith("?") or len(word) < 2:
        raise QueryError(f"bad query word {word!r}")
    body = word[1:]
    lead = body[0]
    if lead == "#":
        ops = body[1:]
        for char in ops:
            if char not in _DIGITS and char not in "!&|.":
                raise QueryError(f"unknown query operation {char!r}")
        return StackOps(ops)
    if lead == "-":
        return Lacks(body[1:])
    if lead in "=<>":
        name, _, value = body[1:].partition("=")
        if not name:
            raise QueryError(f"bad query word {word!r}")
        return Compare(lead, name, value)  # type: ignore[arg-type]
    if "=" in body:
        name, _, value = body.partition("=")
        return Compare("=", name, value)
    return Has(body)


def _typed(value: str) -> tuple[int, object]:
    """A sort key whose first element is the type class, so only like compares with like."""
    lowered = value.lower()
    if lowered in BOOLEANS:
        return (1, BOOLEANS[lowered])
    if _INTEGER.match(value):
        return (2, int(value))
    if _ITEM_ID.match(value):
        return (3, int(value[1:], 16))
    return (0, value)


def compare(op: str, actual: str, wanted: str) -> bool:
    left, right = _typed(actual), _typed(wanted)
    if left[0] != right[0]:
        # Mixed types fall back to text, as a string property would.
        left, right = (0, actual), (0, wanted)
    if op == "=":
        return left == right
    if op == "<":
        return left < right  # type: ignore[operator]
    return left > right  # type: ignore[operator]


def _apply_ops(stack: list[bool], ops: str) -> None:
    def at(index: int) -> bool:
        return stack[-1 - index] if index < len(stack) else True

    def pop() -> bool:
        return stack.pop() if stack else True

    i = 0
    after_index = False
    while i < len(ops):
        char = ops[i]
        if char in _DIGITS:
            j = i
            while j < len(ops) and ops[j] in _DIGITS:
                j += 1
            value = at(int(ops[i:j]))
            if j == len(ops):
                stack[:] = [value]
            else:
                stack.append(value)
            i = j
            after_index = True
            continue
        if char == "!":
            stack.append(not pop())
        elif char in "&|":
            right, left = pop(), pop()
            stack.append(left and right if char == "&" else left or right)
        elif char == "." and not after_index:
            stack.append(at(0))
        after_index = False
        i += 1


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...] = ()

    @classmethod
    def parse(cls, words: Iterable[str]) -> Query:
        return cls(tuple(parse_term(w) for w in words))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def matches(self, row: Mapping[str, str]) -> bool:
        stack: list[bool] = []
        for term in self.terms:
            if isinstance(term, Compare):
                actual = row.get(term.name)
                if actual is None:
                    # Absent equals only the empty value and is neither less nor greater
                    # than anything, so `?>comment=` means "has a non-empty comment".
                    stack.append(term.op == "=" and term.value == "")
                else:
                    stack.append(compare(term.op, actual, term.value))
            elif isinstance(term, Has):
                stack.append(term.name in row)
            elif isinstance(term, Lacks):
                stack.append(term.name not in row)
            else:
                _apply_ops(stack, term.ops)
        return all(stack)

    def select(self, rows: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
        if not self.terms:
            return list(rows)
        return [row for row in rows if self.matches(row)]


def parse_proplist(value: str) -> tuple[str, ...]:
    return tuple(name for name in (p.strip() for p in value.split(",")) if name)


def project(row: Mapping[str, str], proplist: Sequence[str] | None) -> dict[str, str]:
    """The row cut down to `proplist`; an item lacking every listed name gives an empty row."""
    if proplist is None:
        return dict(row)
    return {name: row[name] for name in proplist if name in row}
