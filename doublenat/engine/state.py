"""The one owner of the mapping state: `MappingTable`.

State rules (every transition below keeps them; nothing else writes these fields):

1. Every rule doublenat may have on the router belongs to exactly one record:
   - a `Lease` (a live mapping), by its comment and rule id;
   - a `Write` (a rule being created or restored, or one whose creation ended in an
     unknown outcome), by its comment; it is recorded *before* the call that creates
     the rule starts, so a killed or failed call leaves the record behind;
   - a `Candidate` (a rule of an earlier run waiting for its client to renew);
   - a `Doomed` rule (to remove: its mapping ended, or nobody owns it).
2. A router port is reserved by the record that uses it, and stays reserved until the
   router is known not to hold that record's rule: a rule being removed keeps its port
   until the removal is confirmed, and a write of unknown outcome keeps it until a
   listing of the router's rules shows the rule absent (twice) or present (then the rule
   is doomed and keeps the port until removed). One router port never forwards to two
   clients, not even for a moment.
3. An upstream port is reserved by its lease or write, then by a pending upstream
   delete (`upstream_ends`) until the delete was sent.
4. A client's quota counts its non-static leases and writes (derived here, not kept by
   callers). The router is either synchronised (`router` is a `RouterView`) or not
   (`router` is None and `problem` says why): one fact, one field.

No method here yields or does I/O: in gevent a transition is atomic. The workflows that
talk to the router and the gateway (engine.mapper, engine.reconcile) call these
transitions before and after each call.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from types import MappingProxyType
from typing import Literal

from doublenat.engine.contracts import NatRule, RuleRef
from doublenat.engine.model import (
    Candidate,
    Doomed,
    Lease,
    MappingKey,
    OwnedRule,
    Write,
    parse_owned,
)
from doublenat.engine.ports import PortBook
from doublenat.protocol.natpmp import Proto

InterfaceSource = Literal["setting", "route check", "route table"]
Refusal = Literal["quota", "no port", "not synchronised"]
# A write that a listing has not shown this many times (after its outcome became unknown)
# never happened: a stalled connection gets one more listing to land it late.
ABSENT_LISTINGS = 2


@dataclass(frozen=True, slots=True)
class RouterView:
    """What a successful synchronisation learned about the router."""

    interface: str
    source: InterfaceSource
    session: int
    version: str | None = None
    board: str | None = None


@dataclass(slots=True)
class ListingLog:
    """Rules removed while a listing of the router was in flight: such a rule may
    still be listed, yet nobody owns it any more (it is not an earlier run's rule). By id
    *and session*: after a router restart an old id may name another rule."""

    removed: set[RuleRef] = field(default_factory=set)


def _lease_owner(key: MappingKey) -> tuple[str, MappingKey]:
    return ("lease", key)


def _write_owner(comment: str) -> tuple[str, str]:
    return ("write", comment)


def _candidate_owner(key: MappingKey) -> tuple[str, MappingKey]:
    return ("candidate", key)


def _doomed_owner(token: int) -> tuple[str, int]:
    return ("doomed", token)


def _upstream_end_owner(proto: Proto, port: int) -> tuple[str, Proto, int]:
    return ("upstream-end", proto, port)


class StateError(AssertionError):
    """A workflow asked for a transition the state does not allow (a bug)."""


class MappingTable:
    def __init__(self, port_range: tuple[int, int] = (1024, 65535),
                 max_per_client: int = 64) -> None:
        self._ports = PortBook(*port_range)
        self.max_per_client = max_per_client
        self._leases: dict[MappingKey, Lease] = {}
        self._writes: dict[str, Write] = {}  # by comment
        self._candidates: dict[MappingKey, Candidate] = {}
        self._doomed: dict[int, Doomed] = {}  # by token
        self._doomed_tokens = itertools.count(1)
        self._upstream_ends: dict[tuple[Proto, int], MappingKey] = {}
        self._per_client: Counter[IPv4Address] = Counter()
        self._listings: list[ListingLog] = []
        self.router: RouterView | None = None
        self.problem: str | None = "not synchronised with the router yet"
        # Read-only views for workflows, status and tests.
        self.leases: Mapping[MappingKey, Lease] = MappingProxyType(self._leases)
        self.writes: Mapping[str, Write] = MappingProxyType(self._writes)
        self.candidates: Mapping[MappingKey, Candidate] = MappingProxyType(self._candidates)
        self.doomed: Mapping[int, Doomed] = MappingProxyType(self._doomed)
        self.upstream_ends: Mapping[tuple[Proto, int], MappingKey] = MappingProxyType(
            self._upstream_ends)

    # ----------------------------------------------------------------- queries

    def lease(self, key: MappingKey) -> Lease | None:
        return self._leases.get(key)

    @property
    def counted_clients(self) -> int:
        """Clients with a mapping or a write counted against their quota."""
        return len(self._per_client)

    def held_by(self, client: IPv4Address) -> int:
        """Mappings counted against the client's quota (leases and writes in flight)."""
        return self._per_client.get(client, 0)

    def writes_for(self, key: MappingKey) -> list[Write]:
        return [w for w in self._writes.values() if w.key == key]

    def keys_of(self, client: IPv4Address, proto: Proto) -> list[MappingKey]:
        keys = [k for k in self._leases if k.client == client and k.proto == proto]
        return keys + [k for k in self._candidates
                       if k.client == client and k.proto == proto and k not in self._leases]

    def router_free(self, proto: Proto, port: int, client: IPv4Address) -> bool:
        return self._ports.router_free(proto, port, client)

    def upstream_free(self, proto: Proto, port: int, client: IPv4Address) -> bool:
        return self._ports.upstream_free(proto, port, client)

    def in_range(self, port: int) -> bool:
        return self._ports.in_range(port)

    def lease_holding(self, proto: Proto, port: int) -> Lease | None:
        """The lease whose rule holds this router port, if a lease does."""
        key = self.owner_of_router_port(proto, port)
        return None if key is None else self._leases.get(key)

    def owner_of_router_port(self, proto: Proto, port: int) -> MappingKey | None:
        """The mapping whose lease holds this router port, if a lease does."""
        owner = self._ports.router_owner(proto, port)
        if isinstance(owner, tuple) and owner[0] == "lease":
            return owner[1]  # type: ignore[no-any-return]
        return None

    def leftovers(self) -> int:
        """Records that mean something may still be on the router or the gateway."""
        return (len(self._leases) + len(self._writes) + len(self._candidates)
                + len(self._doomed) + len(self._upstream_ends))

    def describe_leftovers(self) -> list[str]:
        """What may still be on the router or the gateway, rule ids included."""
        out = [f"mapping {k} rule {lease.rule.rule_id}" for k, lease in self._leases.items()]
        out += [f"rule {c.rule.rule_id} ({c.comment})" for c in self._candidates.values()]
        out += [f"rule {d.rule.rule_id} ({d.comment})" for d in self._doomed.values()]
        out += [f"rule {w.rule.rule_id if w.rule else 'of unknown id'} ({w.comment})"
                for w in self._writes.values()]
        out += [f"upstream mapping {p.label} {port}" for p, port in self._upstream_ends]
        return out

    # ------------------------------------------------------------- the router

    def synchronised(self, view: RouterView) -> None:
        self.router, self.problem = view, None

    def unsynchronised(self, problem: str) -> None:
        self.router, self.problem = None, problem

    def load_foreign(self, rules: Iterable[NatRule], interface: str) -> list[NatRule]:
        return self._ports.load_foreign(rules, interface)

    def mark_foreign(self, proto: Proto, port: int) -> None:
        self._ports.mark_foreign(proto, port)

    # ---------------------------------------------------------------- writes

    def reserve(
        self,
        key: MappingKey,
        preferred: Iterable[int],
        *,
        router_port: bool,
        static: bool = False,
    ) -> Write | Refusal:
        """Record a creation before it starts: ports chosen and reserved, quota counted."""
        if self.router is None:
            return "not synchronised"
        if not static and self.held_by(key.client) >= self.max_per_client:
            return "quota"
        upstream = self._allocate(key, preferred, router_port)
        if upstream is None:
            return "no port"
        write = Write(key, upstream, upstream if router_port else None,
                      self.router.interface, static=static)
        self._put_write(write)
        return write

    def _allocate(self, key: MappingKey, preferred: Iterable[int], router: bool) -> int | None:
        # The owner is the write's comment, which depends on the port: allocate under a
        # placeholder, then hand the reservation to the real owner.
        placeholder = ("allocating", key)
        port = self._ports.allocate(key.client, key.proto, preferred, placeholder,
                                    router=router, avoid=self._doomed_comment_ports(key))
        if port is not None:
            comment_owner = _write_owner(Write(key, port, None, "").comment)
            self._ports.hand_over(key.proto, port if router else None, port, placeholder,
                                  comment_owner)
        return port

    def _doomed_comment_ports(self, key: MappingKey) -> set[int]:
        """Upstream ports whose comment, for this key, a rule still to remove carries. A
        new rule must not carry it too: a removal that re-identifies its rule by comment
        (after a router restart) would remove both. (A doomed rule holds its router port,
        not its upstream port, which the upstream delete frees.)"""
        ports = set()
        for doomed in self._doomed.values():
            if doomed.key == key:
                owned = parse_owned(NatRule("", "", "", "", "", "", doomed.comment))
                if owned is not None:
                    ports.add(owned.upstream_port)
        return ports

    def reserve_router(self, write: Write, port: int) -> Write | None:
        """External mode: the rule's port is known once the gateway granted it."""
        current = self._current_write(write)
        if not self._ports.take_router(write.key.proto, port, write.key.client,
                                       _write_owner(write.comment)):
            return None
        updated = replace(current, router_port=port)
        self._writes[write.comment] = updated
        return updated

    def another_router_port(self, write: Write) -> Write | None:
        """The router refused the write's port (someone else's rule has it): remember
        that, reserve another one. Only for writes whose rule port is their upstream port
        (internal mode): the write then gets a new comment."""
        current = self._current_write(write)
        assert current.router_port is not None and current.rule is None
        self._ports.mark_foreign(current.key.proto, current.router_port)
        self._drop_write(current)
        port = self._allocate(current.key, (), True)
        if port is None:
            return None
        moved = replace(current, upstream_port=port, router_port=port)
        self._put_write(moved)
        return moved

    def written(self, write: Write, ref: RuleRef) -> Write:
        current = self._current_write(write)
        updated = replace(current, rule=ref)
        self._writes[write.comment] = updated
        return updated

    def cancel(self, write: Write, *, upstream_mapped: bool = False) -> None:
        """The router holds no rule of this write (never written, or refused): forget it.

        With `upstream_mapped`, the gateway holds a mapping for it: its port waits in
        `upstream_ends` until the delete is sent."""
        current = self._current_write(write)
        if current.rule is not None:
            raise StateError(f"cancel of a write whose rule exists: {write.comment}")
        self._drop_write(current, upstream_mapped=upstream_mapped)

    def unknown(self, write: Write) -> Write:
        """The add failed in a way that leaves open whether the router executed it."""
        current = self._writes.get(write.comment)
        if current is None:
            return write  # settled meanwhile
        updated = replace(current, unknown=True, absent_from=0)
        self._writes[write.comment] = updated
        return updated

    def abandon(self, write: Write, reason: str, *, upstream_mapped: bool = False
                ) -> Doomed | None:
        """A creation failed after its rule was written: the rule must go. Without a known
        id, the write stays as one of unknown outcome (a listing will find the rule)."""
        current = self._current_write(write)
        if current.rule is None:
            self.unknown(current)
            return None
        self._drop_write(current, keep_router=True, upstream_mapped=upstream_mapped)
        # A restore's port stays its lease's; a creation's goes with the doomed rule.
        port = None if current.restore else current.router_port
        return self._doom(current.rule, current.comment, current.key, port, reason,
                          from_owner=_write_owner(current.comment))

    def install(self, write: Write, lease: Lease) -> Lease:
        """The write's rule and upstream mapping both exist: the mapping is live."""
        current = self._current_write(write)
        if current.rule is None or lease.key != current.key or lease.key in self._leases:
            raise StateError(f"install of {write.comment} without a rule or twice")
        if lease.router_port != current.router_port or lease.upstream_port != write.upstream_port:
            raise StateError(f"install of {write.comment} with other ports")
        del self._writes[write.comment]
        self._ports.hand_over(lease.key.proto, lease.router_port, lease.upstream_port,
                              _write_owner(write.comment), _lease_owner(lease.key))
        self._leases[lease.key] = replace(lease, rule=current.rule, static=current.static)
        return self._leases[lease.key]

    def _current_write(self, write: Write) -> Write:
        current = self._writes.get(write.comment)
        if current is None:
            raise StateError(f"no write {write.comment}")
        return current

    def _put_write(self, write: Write) -> None:
        if write.comment in self._writes:
            raise StateError(f"write {write.comment} recorded twice")
        self._writes[write.comment] = write
        if not write.static and not write.restore:
            self._per_client[write.key.client] += 1

    def _drop_write(self, write: Write, *, keep_router: bool = False,
                    upstream_mapped: bool = False) -> None:
        del self._writes[write.comment]
        owner = _write_owner(write.comment)
        if not write.static and not write.restore:
            self._per_client[write.key.client] -= 1
            self._prune_count(write.key.client)
        if not keep_router:
            self._ports.release_router(write.key.proto, write.router_port, owner)
        if write.restore:
            return  # the lease keeps its upstream port
        if upstream_mapped:
            self._hand_to_upstream_end(write.key, write.upstream_port, owner)
        else:
            self._ports.release_upstream(write.key.proto, write.upstream_port, owner)

    def _prune_count(self, client: IPv4Address) -> None:
        if self._per_client.get(client, 0) <= 0:
            self._per_client.pop(client, None)

    # ----------------------------------------------------------------- leases

    def renewed(self, lease: Lease) -> Lease:
        """Store new times or a new external port; ports and rule must stay the same."""
        current = self._leases.get(lease.key)
        if current is None or (current.router_port, current.upstream_port) != (
                lease.router_port, lease.upstream_port):
            raise StateError(f"renewal of {lease.key} that changes its ports")
        self._leases[lease.key] = lease
        return lease

    def begin_move(self, key: MappingKey, router_port: int) -> bool:
        """Reserve the port a lease's rule is about to move to."""
        return self._ports.take_router(key.proto, router_port, key.client,
                                       ("moving", key, router_port))

    def moved(self, lease: Lease) -> Lease:
        """The rule now matches `lease.router_port` (and `to_port`), enabled: the old port
        (unless the lease was parked, which held none) is free, and so is the target of an
        earlier unsettled move, unless it is this one."""
        current = self._leases[lease.key]
        key = lease.key
        if lease.upstream_port != current.upstream_port or lease.parked or lease.moving_to:
            raise StateError(f"move of {key} that changes its upstream port or parks")
        if current.parked or current.router_port != lease.router_port:
            if not current.parked:
                self._ports.release_router(key.proto, current.router_port, _lease_owner(key))
            self._ports.hand_over(key.proto, lease.router_port, None,
                                  ("moving", key, lease.router_port), _lease_owner(key))
        if current.moving_to not in (None, lease.router_port):
            self._ports.release_router(key.proto, current.moving_to,
                                       ("moving", key, current.moving_to))
        self._leases[key] = lease
        return lease

    def move_failed(self, key: MappingKey, router_port: int) -> None:
        """The rule did not move: the port reserved for it is free again."""
        self._ports.release_router(key.proto, router_port, ("moving", key, router_port))
        lease = self._leases.get(key)
        if lease is not None and lease.moving_to == router_port:
            self._leases[key] = replace(lease, moving_to=None)

    def move_unknown(self, key: MappingKey, router_port: int | None) -> None:
        """An update of the lease's rule was sent and its outcome is unknown: if it moved
        the rule to `router_port`, that port stays reserved (with the old one) until a
        listing shows where the rule is."""
        lease = self._leases.get(key)
        if lease is None or router_port is None or router_port == lease.router_port:
            return
        if lease.moving_to not in (None, router_port):
            raise StateError(f"a second unsettled move of {key}")  # the mapper waits
        self._leases[key] = replace(lease, moving_to=router_port)

    def park(self, key: MappingKey) -> Lease | None:
        """The lease's rule was disabled because the gateway gave its port to another
        mapping (external mode, after an upstream loss): the port is free for that one."""
        lease = self._leases.get(key)
        if lease is None or lease.parked:
            return lease
        self._ports.release_router(key.proto, lease.router_port, _lease_owner(key))
        self._leases[key] = replace(lease, parked=True)
        return self._leases[key]

    def end(self, key: MappingKey, reason: str) -> tuple[Lease, Doomed] | None:
        """The mapping ends: its rule is doomed (port held until removed) and its upstream
        mapping waits in `upstream_ends` for its delete; both in one step."""
        lease = self._leases.pop(key, None)
        if lease is None:
            return None
        owner = _lease_owner(key)
        restore = self._writes.get(lease.comment)
        if restore is not None and restore.restore:
            return lease, self._end_restoring(lease, restore, reason)
        if not lease.static:
            self._per_client[key.client] -= 1
            self._prune_count(key.client)
        self._hand_to_upstream_end(key, lease.upstream_port, owner)
        doomed = self._doom(lease.rule, lease.comment, key, lease.held_router_port, reason,
                            from_owner=owner)
        if lease.moving_to is not None:
            # The rule may sit on the port an unsettled move aimed at: keep it reserved
            # until the rule is removed too.
            self._ports.hand_over(key.proto, lease.moving_to, None,
                                  ("moving", key, lease.moving_to),
                                  _doomed_owner(doomed.token))
            doomed = replace(doomed, also_port=lease.moving_to)
            self._doomed[doomed.token] = doomed
        return lease, doomed

    def _end_restoring(self, lease: Lease, restore: Write, reason: str) -> Doomed:
        """The mapping ends while the re-creation of its rule has an unknown outcome: the
        rule may exist. The write becomes an ordinary one of unknown outcome, holding the
        mapping's ports (and its place in the quota) until a listing settles it; without
        that, the port went free while the rule may still forward it. The lease's own
        rule (the one that had vanished) is doomed without a port."""
        owner, key = _lease_owner(lease.key), lease.key
        write = replace(restore, restore=False, unknown=True, static=lease.static,
                        upstream_port=lease.upstream_port, router_port=lease.held_router_port)
        self._writes[write.comment] = write
        self._ports.hand_over(key.proto, lease.held_router_port, lease.upstream_port, owner,
                              _write_owner(write.comment))
        return self._doom(lease.rule, lease.comment, key, None, reason, from_owner=owner)

    def rule_found(self, key: MappingKey, ref: RuleRef) -> None:
        """A lease's rule was re-identified (a listing, or a lookup by comment)."""
        lease = self._leases.get(key)
        if lease is not None:
            self._leases[key] = replace(lease, rule=ref)

    def retargeted(self, key: MappingKey, interface: str, ref: RuleRef) -> None:
        lease = self._leases.get(key)
        if lease is not None:
            self._leases[key] = replace(lease, interface=interface, rule=ref)

    # ---------------------------------------------------------------- restore

    def begin_restore(self, key: MappingKey, interface: str) -> Write | None:
        """Record the re-creation of a live lease's missing rule before it starts. It
        replaces an earlier restore of unknown outcome (the caller just found no rule with
        the comment; such writes hold no port and count in no quota)."""
        lease = self._leases.get(key)
        if lease is None:
            return None
        earlier = self._writes.get(lease.comment)
        if earlier is not None:
            if not (earlier.restore and earlier.unknown):
                return None
            del self._writes[earlier.comment]
        write = Write(key, lease.upstream_port, lease.router_port, interface, restore=True,
                      static=lease.static)
        self._put_write(write)
        return write

    def restored(self, write: Write, ref: RuleRef) -> None:
        current = self._current_write(write)
        del self._writes[current.comment]
        lease = self._leases.get(current.key)
        if lease is None:
            # The mapping ended meanwhile (it cannot under its key's lock): doom the rule.
            self._doom(ref, current.comment, current.key, None, "restored for an ended mapping",
                       from_owner=_write_owner(current.comment))
            return
        self._leases[current.key] = replace(lease, rule=ref, interface=current.interface)

    # ------------------------------------------------------------- candidates

    def add_candidate(self, owned: OwnedRule, ref: RuleRef, now: float) -> bool:
        """Keep a rule of an earlier run for adoption; False if its ports are taken (the
        caller removes it instead)."""
        key = owned.key
        if key in self._candidates or key in self._leases or owned.router_port is None:
            return False
        owner = _candidate_owner(key)
        if not self._ports.take_router(key.proto, owned.router_port, key.client, owner):
            return False
        if not self._ports.take_upstream(key.proto, owned.upstream_port, key.client, owner):
            self._ports.release_router(key.proto, owned.router_port, owner)
            return False
        self._candidates[key] = Candidate(owned, ref, now)
        return True

    def adopt(self, key: MappingKey, lease: Lease) -> Lease:
        """The client renewed: the earlier run's rule becomes this lease's rule."""
        candidate = self._candidates.pop(key)
        owned = candidate.owned
        if (lease.router_port, lease.upstream_port) != (owned.router_port, owned.upstream_port):
            raise StateError(f"adoption of {key} with other ports")
        self._ports.hand_over(key.proto, lease.router_port, lease.upstream_port,
                              _candidate_owner(key), _lease_owner(key))
        self._leases[key] = replace(lease, rule=candidate.rule)
        if not lease.static:
            self._per_client[key.client] += 1
        return self._leases[key]

    def drop_candidate(self, key: MappingKey, reason: str, *, rule_present: bool = True
                       ) -> Doomed | None:
        candidate = self._candidates.pop(key, None)
        if candidate is None:
            return None
        owner = _candidate_owner(key)
        self._hand_to_upstream_end(key, candidate.owned.upstream_port, owner)
        if not rule_present:
            self._ports.release_router(key.proto, candidate.owned.router_port, owner)
            return None
        return self._doom(candidate.rule, candidate.comment, key, candidate.owned.router_port,
                          reason, from_owner=owner)

    def candidate_found(self, key: MappingKey, ref: RuleRef) -> None:
        candidate = self._candidates.get(key)
        if candidate is not None:
            self._candidates[key] = replace(candidate, rule=ref)

    # ---------------------------------------------------------------- removal

    def doom_listed(self, rule: NatRule, ref: RuleRef, reason: str) -> Doomed:
        """A listed prefixed rule nobody owns: remove it. Its port is reserved meanwhile
        when it is free (a duplicate of a live rule's port stays the live rule's)."""
        owned = parse_owned(rule)
        key = owned.key if owned is not None else None
        port = owned.router_port if owned is not None else None
        doomed = self._doom(ref, rule.comment, key, None, reason, from_owner=None)
        if key is not None and port is not None and self._ports.take_router(
                key.proto, port, key.client, _doomed_owner(doomed.token)):
            doomed = replace(doomed, router_port=port)
            self._doomed[doomed.token] = doomed
        return doomed

    def _doom(self, ref: RuleRef, comment: str, key: MappingKey | None,
              router_port: int | None, reason: str, from_owner: object) -> Doomed:
        token = next(self._doomed_tokens)
        doomed = Doomed(ref, comment, key, router_port, reason, token)
        self._doomed[token] = doomed
        if key is not None and router_port is not None and from_owner is not None:
            self._ports.hand_over(key.proto, router_port, None, from_owner,
                                  _doomed_owner(token))
        return doomed

    def doomed_found(self, doomed: Doomed, ref: RuleRef) -> Doomed:
        current = self._doomed.get(doomed.token)
        if current is None:
            return doomed
        updated = replace(current, rule=ref)
        self._doomed[doomed.token] = updated
        return updated

    def removed(self, doomed: Doomed, refs: Iterable[RuleRef] = ()) -> None:
        """The router no longer holds the rule: its port is free again. `refs`: the ids
        the removal used (after a router restart, those found by the rule's comment): a
        listing in flight may show the rule under any of them."""
        current = self._doomed.pop(doomed.token, None)
        if current is None:
            return
        if current.key is not None:
            for port in (current.router_port, current.also_port):
                self._ports.release_router(current.key.proto, port,
                                           _doomed_owner(current.token))
        for log in self._listings:
            log.removed.add(current.rule)
            log.removed.update(refs)

    # ---------------------------------------------------------------- upstream

    def _hand_to_upstream_end(self, key: MappingKey, port: int, owner: object) -> None:
        end_owner = _upstream_end_owner(key.proto, port)
        if (key.proto, port) in self._upstream_ends:
            self._ports.release_upstream(key.proto, port, owner)
            return
        self._upstream_ends[(key.proto, port)] = key
        self._ports.hand_over(key.proto, None, port, owner, end_owner)

    def upstream_ended(self, proto: Proto, port: int) -> None:
        """The upstream delete was sent (or given up on): the port is free."""
        if self._upstream_ends.pop((proto, port), None) is not None:
            self._ports.release_upstream(proto, port, _upstream_end_owner(proto, port))

    # ---------------------------------------------------------------- listings

    @contextmanager
    def listing(self) -> Iterator[ListingLog]:
        log = ListingLog()
        self._listings.append(log)
        try:
            yield log
        finally:
            self._listings.remove(log)

    def settle_unknown(self, present: Mapping[str, list[NatRule]],
                       before: Iterable[str]) -> list[Doomed]:
        """Judge writes of unknown outcome by a listing: those whose comment is listed
        exist (doomed, or the lease's rule for a restore); those absent from enough
        listings never happened (forgotten, ports free). Only writes already unknown
        when the listing began (`before`) are judged."""
        doomed: list[Doomed] = []
        for comment in before:
            write = self._writes.get(comment)
            if write is None or not write.unknown:
                continue
            rules = present.get(comment, [])
            if rules or write.absent_from + 1 >= ABSENT_LISTINGS:
                doomed += self.settle_write(write, rules)
            else:
                self._writes[comment] = replace(write, absent_from=write.absent_from + 1)
        return doomed

    def settle_write(self, write: Write, rules: list[NatRule]) -> list[Doomed]:
        """The router was asked (a listing, a lookup by comment) which rules carry this
        write's comment: the write's outcome is known now."""
        current = self._writes.get(write.comment)
        if current is None:
            return []
        if not rules:
            # The rule never came to be (or is gone): the write is over.
            self._drop_write(current, upstream_mapped=not current.restore)
            return []
        doomed: list[Doomed] = []
        first, *extra = rules
        if current.restore and current.key in self._leases:
            self._writes[current.comment] = replace(current, rule=first.ref)
            self.restored(self._writes[current.comment], first.ref)
        else:
            self._writes[current.comment] = replace(current, rule=first.ref)
            found = self.abandon(self._writes[current.comment],
                                 "left by a write that failed midway",
                                 upstream_mapped=not current.restore)
            if found is not None:
                doomed.append(found)
        for rule in extra:
            doomed.append(self.doom_listed(rule, rule.ref, "duplicate of a rule being written"))
        return doomed

    # ------------------------------------------------------------ invariants

    def check(self) -> None:
        """Assert the state rules (for tests and the simulation)."""
        expected: dict[tuple[Proto, int], object] = {}
        for key, lease in self._leases.items():
            if not lease.parked:
                expected[(key.proto, lease.router_port)] = _lease_owner(key)
            if lease.moving_to is not None:
                expected[(key.proto, lease.moving_to)] = ("moving", key, lease.moving_to)
        for comment, write in self._writes.items():
            if write.router_port is not None and not write.restore:
                expected[(write.key.proto, write.router_port)] = _write_owner(comment)
        for key, candidate in self._candidates.items():
            expected[(key.proto, candidate.owned.router_port)] = _candidate_owner(key)  # type: ignore[index]
        for token, doomed in self._doomed.items():
            for port in (doomed.router_port, doomed.also_port):
                if doomed.key is not None and port is not None:
                    expected[(doomed.key.proto, port)] = _doomed_owner(token)
        held = {where: owner for where, (_, owner) in self._ports.router_held().items()}
        moving = {w: o for w, o in held.items() if isinstance(o, tuple) and o[0] == "moving"}
        for where, owner in expected.items():
            if held.get(where) != owner:
                raise StateError(f"router port {where} should be held by {owner}, "
                                 f"is held by {held.get(where)}")
        stray = set(held) - set(expected) - set(moving)
        if stray:
            raise StateError(f"router ports held by no record: {sorted(stray)}")
        comments = [lease.comment for lease in self._leases.values()]
        comments += [w.comment for w in self._writes.values() if not w.restore]
        if len(comments) != len(set(comments)):
            raise StateError("two records claim one comment")
        counts: Counter[IPv4Address] = Counter()
        for key, lease in self._leases.items():
            if not lease.static:
                counts[key.client] += 1
        for write in self._writes.values():
            if not write.static and not write.restore:
                counts[write.key.client] += 1
        if +counts != +self._per_client:
            raise StateError(f"quota counts {dict(self._per_client)} != {dict(counts)}")
