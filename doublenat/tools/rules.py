"""doublenat's rules on the router, for `doublenat list` and `doublenat cleanup`.

A rule is doublenat's when its comment starts with the prefix (`double-natpmp-`); one whose
comment has the prefix but cannot be parsed is still doublenat's (listed, marked, and
removed by cleanup). Everyone else's rules are neither listed nor touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from doublenat.engine.contracts import NatRule, NoSuchItem, Router, RouterError, RuleRef
from doublenat.engine.model import parse_owned
from doublenat.settings import RULE_PREFIX

UNREADABLE = "comment not understood"


@dataclass(frozen=True, slots=True)
class ListedRule:
    """One of doublenat's rules, as the router holds it.

    `client`, `protocol` and `internal_port` come from the comment (the mapping the rule
    belongs to); for a rule whose comment cannot be read (`readable` False) they fall back
    to the rule's own to-addresses, protocol and to-ports, or None.
    """

    rule_id: str
    client: str | None
    protocol: str | None
    internal_port: int | None
    router_port: int | None  # dst-port on the VPN interface
    upstream_port: int | None  # the internal port doublenat holds at the gateway
    interface: str
    to_address: str
    to_port: int | None
    disabled: bool
    comment: str
    readable: bool
    session: int = 0  # the router session the listing was made in

    @property
    def ref(self) -> RuleRef:
        return RuleRef(self.rule_id, self.session)

    def as_dict(self) -> dict[str, object]:
        return {
            "rule_id": self.rule_id,
            "client": self.client,
            "protocol": self.protocol,
            "internal_port": self.internal_port,
            "router_port": self.router_port,
            "upstream_port": self.upstream_port,
            "interface": self.interface,
            "to_address": self.to_address,
            "to_port": self.to_port,
            "disabled": self.disabled,
            "comment": self.comment,
            "readable": self.readable,
        }

    def describe(self) -> str:
        """One line for cleanup's report."""
        what = (f"{self.protocol or '?'} {self.client or '?'}:"
                f"{_show(self.internal_port)} router port {_show(self.router_port)}")
        return f"{self.rule_id} {what} ({self.comment!r})"


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _show(value: object) -> str:
    return "?" if value is None else str(value)


def owned_rules(rules: Iterable[NatRule]) -> list[ListedRule]:
    """doublenat's rules among `rules` (router order kept)."""
    out = []
    for rule in rules:
        if not rule.comment.startswith(RULE_PREFIX):
            continue
        owned = parse_owned(rule)
        if owned is not None:
            client: str | None = str(owned.key.client)
            protocol: str | None = owned.key.proto.label
            internal: int | None = owned.key.internal_port
            upstream: int | None = owned.upstream_port
        else:
            client = rule.to_addresses or None
            protocol = rule.protocol or None
            internal = _number(rule.to_ports)
            upstream = None
        out.append(ListedRule(
            rule_id=rule.rule_id,
            client=client,
            protocol=protocol,
            internal_port=internal,
            router_port=_number(rule.dst_port),
            upstream_port=upstream,
            interface=rule.in_interface,
            to_address=rule.to_addresses,
            to_port=_number(rule.to_ports),
            disabled=rule.disabled,
            comment=rule.comment,
            readable=owned is not None,
            session=rule.session,
        ))
    return out


_COLUMNS = ("RULE", "PROTO", "CLIENT", "INTERNAL", "ROUTER PORT", "UPSTREAM", "INTERFACE",
            "COMMENT")


def format_table(rules: Sequence[ListedRule]) -> list[str]:
    """Aligned columns, a header first; notes (unreadable, disabled) after the comment."""
    rows = [_COLUMNS]
    for rule in rules:
        notes = ([] if rule.readable else [UNREADABLE]) + (["disabled"] if rule.disabled else [])
        comment = rule.comment + "".join(f"  [{note}]" for note in notes)
        rows.append((rule.rule_id, _show(rule.protocol), _show(rule.client),
                     _show(rule.internal_port), _show(rule.router_port),
                     _show(rule.upstream_port), rule.interface or "-", comment))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)),
                       row[-1]]).rstrip() for row in rows]


# ------------------------------------------------------------------- cleanup


class Outcome(StrEnum):
    REMOVED = "removed"
    GONE = "already gone"  # someone (a running daemon) removed it first: fine
    FAILED = "failed"
    WOULD_REMOVE = "would remove"  # --dry-run


@dataclass(frozen=True, slots=True)
class Removal:
    rule: ListedRule
    outcome: Outcome
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is not Outcome.FAILED

    def line(self) -> str:
        text = f"{self.outcome.value} {self.rule.describe()}"
        return text + (f": {self.error}" if self.error else "")


def cleanup(router: Router, rules: Iterable[ListedRule], dry_run: bool = False
            ) -> Iterator[Removal]:
    """Remove each rule by id, one at a time, yielding what happened as it happens."""
    for rule in rules:
        if dry_run:
            yield Removal(rule, Outcome.WOULD_REMOVE)
            continue
        try:
            router.remove_rule(rule.ref)
        except NoSuchItem:
            yield Removal(rule, Outcome.GONE)
            continue
        except RouterError as exc:
            yield Removal(rule, Outcome.FAILED, str(exc))
            continue
        yield Removal(rule, Outcome.REMOVED)
