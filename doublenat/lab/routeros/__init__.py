"""A RouterOS API emulator: wire format, `print` queries, router state, server with faults.

Where no real transcript was found, its wording is a guess, kept plausible: `missing
value(s) of argument(s) <x>`, `invalid value for argument <x>`, `invalid internal item
number`, `input does not match any value of <x>` for bad booleans and choices, the route
check's no-route answer (`status=unreachable`, no interface), `unknown query operation`,
`/cancel` of an unknown tag answering only `!done`, and `count-only` sending no `!empty`.
Not emulated: `/ip/route/print`, `listen`, `move`, out-of-order replies to pipelined
commands. Duplicate NAT rules are accepted, as on a real router.
"""

from doublenat.lab.routeros.commands import Command, Outcome, Router
from doublenat.lab.routeros.faults import Fault, FaultKind, FaultPlan, FaultSpec, Match
from doublenat.lab.routeros.profile import Profile
from doublenat.lab.routeros.query import Query, QueryError
from doublenat.lab.routeros.recorder import (
    READ_COMMANDS,
    WRITE_COMMANDS,
    Counters,
    TranscriptEntry,
)
from doublenat.lab.routeros.server import ConnectionInfo, RouterOsEmulator
from doublenat.lab.routeros.state import (
    DEFAULT_INTERFACES,
    NAT_SCHEMA,
    NO_ROUTE,
    Column,
    Kind,
    NoSuchItemError,
    RouteCheck,
    RouteOracle,
    RouterError,
    RouterState,
    Schema,
    Table,
    UnknownParameterError,
)
from doublenat.lab.routeros.wire import ProtocolError, SentenceReader

__all__ = [
    "DEFAULT_INTERFACES",
    "NAT_SCHEMA",
    "NO_ROUTE",
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
    "RouteOracle",
    "Router",
    "RouterError",
    "RouterOsEmulator",
    "RouterState",
    "Schema",
    "SentenceReader",
    "Table",
    "TranscriptEntry",
    "UnknownParameterError",
]
