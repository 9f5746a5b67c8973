"""Seeing doublenat work: /metrics, /status and /healthz over HTTP (SPEC §10).

Everything here reads one `Snapshot` (snapshot.py), built from the daemon by
`snapshot_of`, the only code that knows where the daemon keeps what is shown.
"""
