"""Removing and changing a rule by id, safely across router restarts.

An id is only used in the router session it was learned in. When the adapter reports the
session changed (`StaleSession`, nothing was sent), the rule is looked up again by its
comment, which doublenat wrote and only doublenat's rules carry, and the command goes to
the id found: a rule whose comment is not confirmed is never removed or changed.
"""

from __future__ import annotations

import contextlib

from doublenat.engine.contracts import NoSuchItem, Router, RuleRef, StaleSession

# A lookup, then the command: the session can change once more in between (a restart
# exactly then); after that, give up and let reconciliation finish the job.
_ATTEMPTS = 3


def remove(router: Router, ref: RuleRef, comment: str) -> list[RuleRef]:
    """Remove the rule (and any copy with the same comment found on re-identification);
    returns the ids the router was told to remove (the re-identified ones included).
    Gone already is fine. Raises RouterError if the router could not be asked."""
    refs = [ref]
    for _ in range(_ATTEMPTS):
        try:
            for each in refs:
                with contextlib.suppress(NoSuchItem):  # gone already: fine
                    router.remove_rule(each)
            return refs
        except StaleSession:
            refs = [rule.ref for rule in router.find_rules(comment)]
    raise StaleSession(f"router restarted repeatedly while removing {comment!r}")


def update(router: Router, ref: RuleRef, comment: str, **changes: str) -> RuleRef | None:
    """Change the rule; returns its (possibly re-identified) reference, or None if the
    router no longer holds it."""
    for _ in range(_ATTEMPTS):
        try:
            router.update_rule(ref, **changes)
            return ref
        except NoSuchItem:
            return None
        except StaleSession:
            found = router.find_rules(comment)
            if not found:
                return None
            ref = found[0].ref
    raise StaleSession(f"router restarted repeatedly while changing {comment!r}")
