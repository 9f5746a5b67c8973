"""What the engine tells the outside world about a mapping's life (hooks, metrics, logs).

A `MappingChange` is emitted once per created, changed (the gateway moved the external
port) or deleted mapping, in the order the mapping went through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address

from doublenat.engine.model import Lease, MappingKey
from doublenat.protocol.natpmp import Proto, Result


class ChangeKind(StrEnum):
    CREATED = "created"
    CHANGED = "changed"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class MappingChange:
    kind: ChangeKind
    proto: Proto
    client: IPv4Address
    internal_port: int
    external_port: int
    lifetime: int  # what the client was last told, 0 for a deleted mapping
    static: bool  # a STATIC_MAPPINGS entry rather than a client's request
    previous_external_port: int | None = None  # for CHANGED
    public_address: IPv4Address | None = None  # the gateway's, when known
    reason: str = ""  # why: "client request", "expired", "upstream moved the port", ...


def mapping_fields(event: str, key: MappingKey | None, lease: Lease | None = None,
                   fields: dict[str, object] | None = None) -> dict[str, object]:
    """The fields every record about mappings carries, None when unknown, so a log
    aggregator can graph and filter them without parsing messages."""
    record: dict[str, object] = {
        "event": event,
        "client": str(key.client) if key else None,
        "protocol": key.proto.label if key else None,
        "internal_port": key.internal_port if key else None,
        "router_port": None,
        "upstream_port": None,
        "external_port": None,
        "rule_id": None,
        "interface": None,
        "lifetime": None,
        "static": None,
        "result": None,
    }
    if lease is not None:
        record.update(router_port=lease.router_port, upstream_port=lease.upstream_port,
                      external_port=lease.external_port, rule_id=lease.rule.rule_id,
                      interface=lease.interface, static=lease.static)
    for name, value in (fields or {}).items():
        record[name] = int(value) if isinstance(value, Result) else value
    return record


def change_fields(event: str, change: MappingChange) -> dict[str, object]:
    """`mapping_fields` for a record about a MappingChange (the hook's records)."""
    key = MappingKey(change.client, change.proto, change.internal_port)
    return mapping_fields(event, key, None, {
        "change": str(change.kind), "external_port": change.external_port,
        "previous_external_port": change.previous_external_port, "static": change.static,
        "lifetime": change.lifetime})
