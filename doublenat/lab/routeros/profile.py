"""RouterOS version profiles: the behaviours that changed between releases."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace


def version_tuple(version: str) -> tuple[int, ...]:
    numbers = re.findall(r"[0-9]+", version)
    if not numbers:
        raise ValueError(f"not a RouterOS version: {version!r}")
    return tuple(int(n) for n in numbers[:3])


@dataclass(frozen=True)
class Profile:
    version: str
    # 7.18 added "!empty" before "!done" when a print has nothing to return.
    empty_sentence: bool
    # 6.43 added "/login =name= =password="; older routers answer it with a challenge.
    plaintext_login: bool
    # 6.45.1 removed the MD5 challenge-response login (the challenge is still handed out).
    challenge_login: bool
    # v7 names the offending attribute: "unknown parameter <name>".
    named_unknown_parameter: bool
    # Early 7.x dropped /ip/route/check; it is on by default because the exact range is unknown.
    route_check: bool

    @classmethod
    def for_version(cls, version: str, **overrides: bool) -> Profile:
        v = version_tuple(version)
        profile = cls(
            version=version,
            empty_sentence=v >= (7, 18),
            plaintext_login=v >= (6, 43),
            challenge_login=v < (6, 45, 1),
            named_unknown_parameter=v >= (7,),
            route_check=True,
        )
        return replace(profile, **overrides) if overrides else profile
