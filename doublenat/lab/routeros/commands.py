"""Router commands as pure functions of the state: a parsed sentence in, reply sentences out.

Session matters (login, `/cancel`, `/quit`, tags, faults) live in the server; this module
knows menus, verbs, attributes and what the router answers to them. Replies carry no tag:
the server adds it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from doublenat.lab.routeros.profile import Profile
from doublenat.lab.routeros.query import Query, QueryError, parse_proplist, project
from doublenat.lab.routeros.state import (
    NoSuchItemError,
    RouterError,
    RouterState,
    Row,
    Table,
    UnknownParameterError,
    User,
    split_ids,
)
from doublenat.lab.routeros.wire import Sentence

DONE: Sentence = ("!done",)
EMPTY: Sentence = ("!empty",)

# Attributes print accepts besides .proplist; they change only console formatting.
_PRINT_FLAGS = frozenset(
    [
        "count-only",
        "detail",
        "without-paging",
        "as-value",
        "terse",
        "brief",
        "show-ids",
        "value-list",
        "stats",
    ]
)
_ROUTE_CHECK_ARGS = frozenset(
    ["dst-ip", "src-ip", "once", "interval", "duration", "as-value", "without-paging", ".proplist"]
)
# Verbs that change the configuration: they need the `write` policy; the rest need `read`.
_WRITE_VERBS = frozenset(["add", "set", "remove", "unset", "enable", "disable", "move"])
NO_PERMISSION = "not enough permissions (9)"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


@dataclass(frozen=True)
class Command:
    """One API sentence from the client, decoded."""

    word: str
    attrs: Mapping[str, str] = field(default_factory=dict)
    queries: tuple[str, ...] = ()
    tag: str | None = None
    # Words that are neither attributes, queries nor API attributes.
    stray: tuple[str, ...] = ()

    @classmethod
    def parse(cls, words: Sequence[str]) -> Command:
        attrs: dict[str, str] = {}
        queries: list[str] = []
        stray: list[str] = []
        tag: str | None = None
        for word in words[1:]:
            if word.startswith("="):
                # "=name" (no second "=") is how routeros-api writes an empty value.
                name, _, value = word[1:].partition("=")
                attrs[name] = value
            elif word.startswith("?"):
                queries.append(word)
            elif word.startswith(".tag="):
                tag = word[5:] or None
            elif word.startswith("."):
                continue
            else:
                stray.append(word)
        return cls(words[0], attrs, tuple(queries), tag, tuple(stray))

    @property
    def menu(self) -> str:
        return self.word.rsplit("/", 1)[0]

    @property
    def verb(self) -> str:
        return self.word.rsplit("/", 1)[-1]


def trap(message: str | None, category: int | None = None) -> Sentence:
    words = ["!trap"]
    if category is not None:
        words.append(f"=category={category}")
    if message is not None:
        words.append(f"=message={message}")
    return tuple(words)


def row_sentence(kind: str, row: Mapping[str, str]) -> Sentence:
    return (kind, *(f"={k}={v}" for k, v in row.items()))


def parse_duration(text: str) -> float:
    """RouterOS time text (`1s`, `500ms`, `1m30s`, `00:00:01`, a bare number of seconds)."""
    if ":" in text:
        total = 0.0
        for part in text.split(":"):
            total = total * 60 + float(part)
        return total
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(text)
    return total


@dataclass(frozen=True)
class Stream:
    """A command that keeps answering (`/ip/route/check` without `once`)."""

    rows: Callable[[], list[Row]]
    interval: float
    duration: float | None


@dataclass(frozen=True)
class Outcome:
    sentences: tuple[Sentence, ...]
    stream: Stream | None = None


Handler = Callable[["Router", Command], Outcome]


def _done(*sentences: Sentence) -> Outcome:
    return Outcome((*sentences, DONE))


class Router:
    """Dispatches commands to menus; all answers follow the state's version profile."""

    def __init__(self, state: RouterState, route_check_interval: float) -> None:
        self.state = state
        self.route_check_interval = route_check_interval
        self._tree: tuple[object, dict[str, dict[str, Handler]], frozenset[str]] | None = None

    @property
    def profile(self) -> Profile:
        return self.state.profile

    @profile.setter
    def profile(self, value: Profile) -> None:
        self.state.profile = value

    def _menu_tree(self) -> tuple[dict[str, dict[str, Handler]], frozenset[str]]:
        """Menus and every directory on their paths, rebuilt when the profile or tables change."""
        key = (self.profile, tuple(self.state.tables))
        if self._tree is None or self._tree[0] != key:
            menus = self.menus()
            directories = {""}
            for path in menus:
                parts = path.split("/")
                directories.update("/".join(parts[:i]) for i in range(2, len(parts) + 1))
            self._tree = (key, menus, frozenset(directories))
        return self._tree[1], self._tree[2]

    # -- dispatch ----------------------------------------------------------------------

    def menus(self) -> dict[str, dict[str, Handler]]:
        table_verbs: dict[str, Handler] = {
            "add": Router._table_add,
            "print": Router._table_print,
            "getall": Router._table_print,
            "set": Router._table_set,
            "remove": Router._table_remove,
            "unset": Router._table_unset,
            "enable": Router._table_enable,
            "disable": Router._table_disable,
        }
        menus: dict[str, dict[str, Handler]] = {path: table_verbs for path in self.state.tables}
        route: dict[str, Handler] = {"print": Router._route_print, "getall": Router._route_print}
        if self.profile.route_check:
            route["check"] = Router._route_check
        menus["/ip/route"] = route
        menus["/ip/address"] = {"print": Router._address_print, "getall": Router._address_print}
        menus["/system/identity"] = {
            "print": Router._identity_print,
            "getall": Router._identity_print,
            "set": Router._identity_set,
        }
        menus["/system/resource"] = {
            "print": Router._resource_print,
            "getall": Router._resource_print,
        }
        menus["/interface"] = {"print": Router._interface_print, "getall": Router._interface_print}
        return menus

    def execute(self, command: Command, user: User | None = None) -> Outcome:
        """Run one command; `user` (None: no policy checks) decides what it may do."""
        menus, directories = self._menu_tree()
        if not command.word.startswith("/"):
            return _done(trap("no such command prefix"))
        segments = command.word.split("/")[1:]
        current = ""
        for segment in segments[:-1]:
            current = f"{current}/{segment}"
            if current not in directories:
                return _done(
                    trap(f"no such command or directory ({segment})", 0),
                    trap("no such command prefix"),
                )
        handler = menus.get(command.menu, {}).get(command.verb)
        if handler is None:
            return _done(trap("no such command"))
        if user is not None:
            needed = "write" if command.verb in _WRITE_VERBS else "read"
            if needed not in user.policies:
                return _done(trap(NO_PERMISSION))
        try:
            if command.stray:
                raise UnknownParameterError(command.stray[0])
            return handler(self, command)
        except UnknownParameterError as exc:
            message = exc.message if self.profile.named_unknown_parameter else "unknown parameter"
            return _done(trap(message, exc.category))
        except NoSuchItemError:
            return _done(trap(self.profile.no_such_item))
        except RouterError as exc:
            return _done(trap(exc.message, exc.category))

    # -- print, shared by every menu ---------------------------------------------------

    def _print(self, command: Command, rows: Callable[[Query], list[Mapping[str, str]]]) -> Outcome:
        for name in command.attrs:
            if name != ".proplist" and name not in _PRINT_FLAGS:
                raise UnknownParameterError(name)
        try:
            query = Query.parse(command.queries)
        except QueryError as exc:
            raise RouterError(str(exc), 1) from exc
        selected = rows(query)
        if "count-only" in command.attrs:
            return Outcome((("!done", f"=ret={len(selected)}"),))
        proplist = (
            parse_proplist(command.attrs[".proplist"]) if ".proplist" in command.attrs else None
        )
        sentences = [row_sentence("!re", project(r, proplist)) for r in selected]
        if not sentences and self.profile.empty_sentence:
            sentences.append(EMPTY)
        return _done(*sentences)

    # -- tables ------------------------------------------------------------------------

    def _table(self, command: Command) -> Table:
        return self.state.tables[command.menu]

    @staticmethod
    def _ids(command: Command) -> list[str]:
        value = command.attrs.get(".id", command.attrs.get("numbers"))
        if value is None:
            raise RouterError("missing value(s) of argument(s) numbers", 1)
        return split_ids(value)

    @staticmethod
    def _without_ids(command: Command) -> dict[str, str]:
        return {k: v for k, v in command.attrs.items() if k not in (".id", "numbers")}

    def _known_to_version(self, command: Command) -> None:
        if command.menu == "/ip/firewall/nat":
            for name in command.attrs:
                if name in self.profile.nat_unknown:
                    raise UnknownParameterError(name)

    def _table_add(self, command: Command) -> Outcome:
        self._known_to_version(command)
        attrs = dict(command.attrs)
        place_before = attrs.pop("place-before", None) or None
        new_id = self._table(command).add(attrs, place_before=place_before)
        return Outcome((("!done", f"=ret={new_id}"),))

    def _table_print(self, command: Command) -> Outcome:
        return self._print(command, self._table(command).select)

    def _table_set(self, command: Command) -> Outcome:
        self._known_to_version(command)
        self._table(command).set(self._ids(command), self._without_ids(command))
        return _done()

    def _table_remove(self, command: Command) -> Outcome:
        extra = self._without_ids(command)
        if extra:
            raise UnknownParameterError(next(iter(extra)))
        self._table(command).remove(self._ids(command))
        return _done()

    def _table_unset(self, command: Command) -> Outcome:
        extra = self._without_ids(command)
        names = extra.pop("value-name", None)
        if extra:
            raise UnknownParameterError(next(iter(extra)))
        if not names:
            raise RouterError("missing value(s) of argument(s) value-name", 1)
        self._table(command).unset(self._ids(command), names.split(","))
        return _done()

    def _table_enable(self, command: Command) -> Outcome:
        return self._toggle(command, "false")

    def _table_disable(self, command: Command) -> Outcome:
        return self._toggle(command, "true")

    def _toggle(self, command: Command, disabled: str) -> Outcome:
        extra = self._without_ids(command)
        if extra:
            raise UnknownParameterError(next(iter(extra)))
        self._table(command).set(self._ids(command), {"disabled": disabled})
        return _done()

    # -- /ip/route/check ---------------------------------------------------------------

    def _route_check(self, command: Command) -> Outcome:
        attrs = command.attrs
        for name in attrs:
            if name not in _ROUTE_CHECK_ARGS:
                raise UnknownParameterError(name)
        destination = attrs.get("dst-ip")
        if not destination:
            raise RouterError("missing value(s) of argument(s) dst-ip", 1)
        for name in ("dst-ip", "src-ip"):
            if attrs.get(name):
                try:
                    ipaddress.ip_address(attrs[name])
                except ValueError as exc:
                    raise RouterError(f"invalid value for argument {name}", 1) from exc
        proplist = parse_proplist(attrs[".proplist"]) if ".proplist" in attrs else None
        state = self.state

        def rows() -> list[Row]:
            return [project(state.route_check(destination).render(), proplist)]

        if "once" in attrs:
            return _done(*(row_sentence("!re", r) for r in rows()))
        try:
            interval = (
                parse_duration(attrs["interval"])
                if attrs.get("interval")
                else self.route_check_interval
            )
            duration = parse_duration(attrs["duration"]) if attrs.get("duration") else None
        except ValueError as exc:
            raise RouterError("invalid value for argument interval", 1) from exc
        return Outcome((), Stream(rows, max(interval, 0.001), duration))

    # -- singletons and interfaces -----------------------------------------------------

    def _identity_print(self, command: Command) -> Outcome:
        return self._print(command, lambda q: q.select([{"name": self.state.identity}]))

    def _identity_set(self, command: Command) -> Outcome:
        for name in command.attrs:
            if name != "name":
                raise UnknownParameterError(name)
        if "name" in command.attrs:
            self.state.identity = command.attrs["name"]
        return _done()

    def _resource_print(self, command: Command) -> Outcome:
        return self._print(command, lambda q: q.select([self.state.resource_row()]))

    def _interface_print(self, command: Command) -> Outcome:
        rows = self.state.routing.interface_rows(self.profile)
        return self._print(command, lambda q: q.select(rows))

    def _address_print(self, command: Command) -> Outcome:
        rows = self.state.routing.address_rows(self.profile)
        return self._print(command, lambda q: q.select(rows))

    def _route_print(self, command: Command) -> Outcome:
        rows = self.state.routing.route_rows(self.profile)
        return self._print(command, lambda q: q.select(rows))
