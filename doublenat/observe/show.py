"""`doublenat status`: ask a running daemon's /status and show it to a person.

`fetch_status` is the only I/O (one HTTP GET); `format_status` is pure, from the /status
document to lines.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from doublenat.settings import Endpoint

TIMEOUT = 5.0


class StatusUnavailable(Exception):
    """Nothing usable answered at METRICS_ADDR; `str()` is the line for the operator."""


def status_url(address: Endpoint) -> str:
    # A daemon listening on every address is asked on loopback.
    host = "127.0.0.1" if address.host == "0.0.0.0" else address.host
    return f"http://{host}:{address.port}/status"


def fetch_status(address: Endpoint, timeout: float = TIMEOUT) -> dict[str, Any]:
    url = status_url(address)
    try:
        # No proxy from the environment: the daemon is asked directly.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=timeout) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StatusUnavailable(f"{url} answered {exc.code} {exc.reason}; is METRICS_ADDR "
                                "doublenat's?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason)
        raise StatusUnavailable(f"nothing answers at {url} ({text}); is doublenat running "
                                f"with METRICS_ADDR={address}?") from None
    except ValueError:
        raise StatusUnavailable(f"{url} did not answer JSON; is METRICS_ADDR "
                                "doublenat's?") from None
    if not isinstance(document, dict) or "router" not in document:
        raise StatusUnavailable(f"{url} did not answer doublenat's status")
    return document


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def format_status(doc: dict[str, Any], now: float) -> list[str]:
    """Lines for a person; `now` is the Unix time the uptime is counted to."""
    lines = []
    started = doc.get("started_at")
    head = f"doublenat {doc.get('version', '?')}"
    if isinstance(started, int | float):
        since = datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        head += f", running for {_duration(max(0.0, now - started))} (since {since})"
    lines.append(f"{head}; epoch {doc.get('epoch')} s")
    lines.append(f"health    {'ok' if doc.get('healthy') else 'UNHEALTHY'}: {doc.get('health')}")

    router = doc["router"]
    state = "synchronised" if router.get("synchronised") else (
        "connected, not synchronised" if router.get("connected") else "not connected")
    parts = [state]
    if router.get("interface"):
        source = router.get("interface_source")
        parts.append(f"interface {router['interface']}"
                     + (f" (from {source})" if source else ""))
    if router.get("version"):
        parts.append(f"RouterOS {router['version']}"
                     + (f" on {router['board']}" if router.get("board") else ""))
    if router.get("problem"):
        parts.append(f"problem: {router['problem']}")
    lines.append("router    " + "; ".join(parts))

    up = doc["upstream"]
    parts = [f"{up.get('gateway')} {'up' if up.get('up') else 'DOWN'}",
             f"public address {_or_dash(up.get('public_address'))}",
             f"epoch {_or_dash(up.get('epoch'))}"]
    ago = up.get("last_answer_seconds_ago")
    parts.append("never answered" if ago is None else f"last answer {_duration(ago)} ago")
    lines.append("gateway   " + "; ".join(parts))

    counts = doc.get("mapping_counts", {})
    mappings = doc.get("mappings", [])
    by_proto = ", ".join(f"{proto} {count}" for proto, count in sorted(counts.items()))
    lines.append(f"mappings  {sum(counts.values())}" + (f" ({by_proto})" if by_proto else ""))

    counters = doc.get("counters", {})
    answered = sum(c["count"] for c in counters.get("requests", []))
    failed = sum(c["count"] for c in counters.get("requests", []) if c["result"] != 0)
    dropped = sum(counters.get("dropped", {}).values())
    lines.append(f"requests  {answered} answered ({failed} with an error result), "
                 f"{dropped} not answered; port changes {counters.get('port_changes', 0)}, "
                 f"upstream losses {counters.get('upstream_losses', 0)}, "
                 f"hook failures {counters.get('hook_failures', 0)}")
    if mappings:
        lines.append("")
        lines.extend(_table(mappings))
    return lines


_COLUMNS = ("PROTO", "CLIENT", "INTERNAL", "EXTERNAL", "ROUTER", "EXPIRES IN", "LIFETIME",
            "STATIC", "RULE")


def _table(mappings: list[dict[str, Any]]) -> list[str]:
    rows = [_COLUMNS]
    for m in mappings:
        rows.append((m["protocol"], m["client"], str(m["internal_port"]),
                     str(m["external_port"]), str(m["router_port"]),
                     _duration(m["expires_in"]), _or_dash(m.get("lifetime")),
                     "yes" if m.get("static") else "no", m["rule_id"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
