"""The RouterOS client of the operator tools: the daemon's pool, plus a few raw calls.

The tools need commands the daemon's `Router` contract does not offer (a disabled test
rule, `/interface/print` by name), so this subclass adds a generic read and a single-shot
write on top of the same connection handling, deadlines and password redaction.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, cast

from doublenat.adapters.routeros import RouterOsClient
from doublenat.engine.contracts import Clock, monotonic
from doublenat.settings import Settings


class ToolRouter(RouterOsClient):
    @classmethod
    def from_settings(
        cls, settings: Settings, size: int = 1, clock: Clock = monotonic
    ) -> ToolRouter:
        """A small pool (one connection is plenty for a tool) with the daemon's settings."""
        return cast(ToolRouter, super().from_settings(settings, size, clock))

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context the API connections use (None without TLS)."""
        return self._ssl_context

    def read(
        self,
        path: str,
        verb: str = "print",
        words: Mapping[str, str | None] | None = None,
        queries: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """A read-only command; retried once if a pooled connection turned out dead."""

        def run(api: Any, _session: int) -> list[dict[str, Any]]:
            rows = api.get_resource(path).call(verb, dict(words or {}), dict(queries or {}))
            return [dict(row) for row in rows]

        return self._with_retry(run)

    def add_once(self, path: str, words: Mapping[str, str]) -> str:
        """`add` without any retry (the caller cleans up by comment); returns the new id."""

        def run(api: Any, _session: int) -> str:
            response = api.get_resource(path).call("add", dict(words))
            return str(response.done_message["ret"])

        return self._call_or_raise(run)
