"""A RouterOS API emulator: wire format, `print` queries, router state, server with faults.

Version profiles (`Profile`, `PROFILES`) decide what differs between releases; the routing
model (`Routing`, reached through `RouterState`) derives active routes, `immediate-gw`
and route-check answers from interfaces, addresses and routes. NOTES.md beside this file
lists every behaviour with its source, or says GUESS.
"""

from doublenat.lab.routeros.commands import NO_PERMISSION, Command, Outcome, Router
from doublenat.lab.routeros.faults import Fault, FaultKind, FaultPlan, FaultSpec, Match
from doublenat.lab.routeros.profile import CURRENT, LAB_VERSIONS, PROFILES, Profile
from doublenat.lab.routeros.query import Query, QueryError
from doublenat.lab.routeros.recorder import (
    READ_COMMANDS,
    WRITE_COMMANDS,
    Counters,
    TranscriptEntry,
)
from doublenat.lab.routeros.routing import (
    MAIN,
    NO_ROUTE,
    PSEUDO_INTERFACES,
    RouteCheck,
    Routing,
    RoutingError,
)
from doublenat.lab.routeros.server import ConnectionInfo, RouterOsEmulator
from doublenat.lab.routeros.state import (
    GROUPS,
    NAT_SCHEMA,
    POLICIES,
    Column,
    Kind,
    NoSuchItemError,
    RouterError,
    RouterState,
    Schema,
    Table,
    UnknownParameterError,
    User,
)
from doublenat.lab.routeros.tls import anonymous_dh_client_context, anonymous_dh_context
from doublenat.lab.routeros.wire import ProtocolError, SentenceReader

__all__ = [
    "CURRENT",
    "GROUPS",
    "LAB_VERSIONS",
    "MAIN",
    "NAT_SCHEMA",
    "NO_PERMISSION",
    "NO_ROUTE",
    "POLICIES",
    "PROFILES",
    "PSEUDO_INTERFACES",
    "READ_COMMANDS",
    "WRITE_COMMANDS",
    "Column",
    "Command",
    "ConnectionInfo",
    "Counters",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "FaultSpec",
    "Kind",
    "Match",
    "NoSuchItemError",
    "Outcome",
    "Profile",
    "ProtocolError",
    "Query",
    "QueryError",
    "RouteCheck",
    "Router",
    "RouterError",
    "RouterOsEmulator",
    "RouterState",
    "Routing",
    "RoutingError",
    "Schema",
    "SentenceReader",
    "Table",
    "TranscriptEntry",
    "UnknownParameterError",
    "User",
    "anonymous_dh_client_context",
    "anonymous_dh_context",
]
