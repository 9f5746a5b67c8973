"""Operator tools: `doublenat check`, `doublenat list` and `doublenat cleanup`.

`commands.register(group)` adds them to the CLI group; the logic lives in `checks`
(pre-flight checks) and `rules` (doublenat's rules on the router), the router access the
tools need beyond the daemon's contract in `router`.
"""
