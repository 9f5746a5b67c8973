"""Keeping the API password out of every text doublenat writes: one redaction for all.

routeros-api quotes whole sentences in its errors, `/login`'s `=password=` word included,
and Python writes a secret into messages and tracebacks in several quotings. Both the log
formatter (the last line of defence) and the router adapter (so its exception texts are
clean before anyone sees them) use the same `Redactor`.
"""

from __future__ import annotations

import json
import re

MASK = "***"
# The value of an API `=password=` word, up to a blank, quote, comma or bracket.
_PASSWORD_WORD = re.compile(r"(=password=)[^\s'\",\]]*")


def _forms(secret: str) -> set[str]:
    """The secret as given, and as repr() writes it (str and bytes), each also as the JSON
    formatter escapes it. repr() escapes a ' only when it quotes with ', which a " elsewhere
    in the same value decides: both quotings."""
    raw = secret.encode("utf-8")
    written = {secret, repr(secret)[1:-1], repr(secret + '"')[1:-2], repr(raw)[2:-1],
               repr(raw + b'"')[2:-2]}
    return written | {json.dumps(form)[1:-1] for form in written}


class Redactor:
    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        if not secret:
            return
        self._secrets = sorted(set(self._secrets) | _forms(secret), key=len, reverse=True)

    def __call__(self, text: str | bytes) -> str:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        # Known secrets first, longest first: the =password= pattern stops at a blank or a
        # quote, so run first it would mask only the start of such a password.
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return _PASSWORD_WORD.sub(r"\1" + MASK, text)
