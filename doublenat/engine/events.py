"""What the engine tells the outside world about a mapping's life (hooks, metrics, logs).

A `MappingChange` is emitted once per created, changed (the gateway moved the external
port) or deleted mapping, in the order the mapping went through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address

from doublenat.protocol.natpmp import Proto


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
