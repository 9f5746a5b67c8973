"""A NAT-PMP fuzzer against a running doublenat, with an oracle built on SPEC §3.

    .venv/bin/python -m tests.faults.fuzz --datagrams 1000000     # what `make fuzz` runs

It starts the lab's emulators (`python -m doublenat.lab.standalone`) and `doublenat serve`
as subprocesses, sends random and mutated datagrams (every length 0-1500, every version x
opcode) from several loopback sources with a window of requests in flight, and checks:

- every reply against what SPEC §3 says the request deserves (`expect` + `check`): exact
  sizes 8/12/16 or the unknown-opcode echo, version 0, opcode = request opcode | 128,
  result codes, internal port echoed, 0/0 on failures and deletes, lifetimes within what
  was asked and MAX_LIFETIME, the public address only with result 0;
- that datagrams which must be dropped get no reply (they go out on sockets that send
  nothing else, so any answer there is a violation), and that the others get exactly one;
- state rules seen from outside: a renewal of a mapping that is still alive returns the
  same external port, and two live mappings of one protocol never share an external port;
- the epoch: never backwards on one socket, never more than a second below the highest
  seen, never ahead of the time since the daemon started (no upstream reset happens here);
- the daemon: its RSS sampled from /proc over the run stays flat after warm-up; at the end
  it is alive, answers a fresh request and a fresh mapping, holds at most its quota of
  rules on the router, logged only JSON lines and no ERROR/CRITICAL, and after SIGTERM
  exits 0 leaving no rule behind.

Settings chosen for the daemon (and why):
- CLIENT_RATE_LIMIT=0: a rate-limited request gets no reply by design, which would make
  "no reply" unverifiable; the fuzzer paces itself with its window instead.
- MAX_MAPPINGS_PER_CLIENT=32 with 8 clients and a pool of 40 internal ports per protocol:
  creates run into the quota (result 4) all the time, while the router never holds more
  than 256 rules, so memory must stay flat.
- MAX_LIFETIME=3600 (below the gateway's 7200 cap, so the daemon's own clamp is checked),
  EXPIRY_GRACE=1 and many 1-5 s lifetimes: mappings expire and are re-created during the
  run; RECONCILE_INTERVAL=10: reconciliation runs alongside the fuzz. The router starts
  empty, so a rule reconciliation offers for adoption ("of an earlier run") is a violation.

`run(FuzzConfig(...))` is the same thing as a function (the bounded run of the test suite);
`expect()`/`check()` are the oracle alone, for in-process checks of the responder.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

MAX_ECHO = 1100  # SPEC/natpmp-research §5 #5: the unknown-opcode echo is capped here
MAX_DATAGRAM = 1500
EXHAUSTIVE_LENGTHS = (2, 12, 60)
EXHAUSTIVE_TOTAL = 256 * 256 * len(EXHAUSTIVE_LENGTHS)
PUBLIC_ADDRESS = "11.22.33.44"
RULE_PREFIX = "double-natpmp-"
# Internal ports most mapping requests use, so creates, renewals and deletes all happen.
PORT_POOL = tuple(range(40000, 40040))
_U32 = 0xFFFFFFFF


# =============================================================================== oracle


@dataclass(frozen=True, slots=True)
class Expect:
    """What SPEC §3 says a datagram deserves, decided from its bytes alone."""

    kind: str  # "drop" | "version" | "address" | "map" | "echo"
    opcode: int = 0
    size: int = 0  # exact size of the reply (0: no reply)
    internal_port: int = 0
    suggested_port: int = 0
    lifetime: int = 0
    echo: bytes = b""  # for "echo" of a request of 8 bytes or more: reply bytes 4..

    @property
    def signature(self) -> tuple[object, ...]:
        """What a reply to this request looks like, to match replies to requests."""
        if self.kind == "map":
            return ("map", self.opcode, self.internal_port)
        if self.kind == "echo":
            return ("echo", self.opcode, self.echo)
        return (self.kind,)


def expect(data: bytes) -> Expect:
    if len(data) < 2:
        return Expect("drop")
    version, opcode = data[0], data[1]
    if opcode >= 128:
        return Expect("drop", opcode)  # a response: never answered (nor v!=0 ones)
    if version != 0:
        return Expect("version", opcode, 8)
    if opcode == 0:
        return Expect("address", 0, 12)
    if opcode in (1, 2):
        if len(data) < 12:
            return Expect("drop", opcode)
        _, internal, suggested, lifetime = struct.unpack_from("!HHHI", data, 2)
        return Expect("map", opcode, 16, internal, suggested, lifetime)
    if len(data) < 8:
        return Expect("echo", opcode, 8)
    return Expect("echo", opcode, min(len(data), MAX_ECHO), echo=bytes(data[4:MAX_ECHO]))


def reply_signature(reply: bytes) -> list[tuple[object, ...]]:
    """The signatures a reply could answer (most specific first)."""
    if len(reply) < 2:
        return []
    op = reply[1]
    if op == 128:
        return [("version",)] if len(reply) == 8 else [("address",)]
    op &= 0x7F
    if op in (1, 2) and len(reply) >= 10:
        return [("map", op, struct.unpack_from("!H", reply, 8)[0])]
    return [("echo", op, bytes(reply[4:])), ("echo", op, b"")]


@dataclass(slots=True)
class Verdict:
    label: str  # "address/0", "map/4", "version/1", "echo/5", ...
    epoch: int | None
    problems: list[str]
    result: int = -1
    external_port: int = 0
    lifetime: int = 0


def check(
    exp: Expect,
    reply: bytes | None,
    *,
    max_lifetime: int,
    public_address: str = PUBLIC_ADDRESS,
) -> Verdict:
    """Does `reply` (None: nothing came) match SPEC §3 for a request that deserves `exp`?"""
    if exp.kind == "drop":
        problems = [] if reply is None else [f"reply {reply.hex()} to a datagram to be dropped"]
        return Verdict("dropped", None, problems)
    if reply is None:
        return Verdict(f"{exp.kind}/none", None, ["no reply"])
    problems: list[str] = []
    if len(reply) != exp.size:
        problems.append(f"{exp.kind} reply is {len(reply)} bytes, expected {exp.size}")
    if len(reply) < 8:
        return Verdict(f"{exp.kind}/short", None, problems or ["reply under 8 bytes"])
    version, opcode, result = struct.unpack_from("!BBH", reply)
    if version != 0:
        problems.append(f"reply version {version}")
    want_opcode = 128 if exp.kind == "version" else exp.opcode | 128
    if opcode != want_opcode:
        problems.append(f"reply opcode {opcode}, expected {want_opcode}")
    epoch = struct.unpack_from("!I", reply, 4)[0]
    verdict = Verdict(f"{exp.kind}/{result}", epoch, problems, result)
    if exp.kind == "version":
        if result != 1:
            problems.append(f"unsupported-version reply with result {result}")
    elif exp.kind == "echo":
        if result != 5:
            problems.append(f"unknown-opcode reply with result {result}")
        if exp.echo:
            verdict.epoch = None  # bytes 4.. are the request's, not an epoch
            if reply[4:] != exp.echo:
                problems.append("unknown-opcode reply does not echo the request")
    elif exp.kind == "address":
        if result not in (0, 3):
            problems.append(f"address reply with result {result}")
        if len(reply) == 12:
            address = str(IPv4Address(reply[8:12]))
            want = public_address if result == 0 else "0.0.0.0"
            if address != want:
                problems.append(f"address {address} with result {result}, expected {want}")
    elif exp.kind == "map":
        if result not in (0, 2, 3, 4):
            problems.append(f"mapping reply with result {result}")
        if len(reply) == 16:
            internal, external, lifetime = struct.unpack_from("!HHI", reply, 8)
            verdict.external_port, verdict.lifetime = external, lifetime
            if internal != exp.internal_port:
                problems.append(f"internal port {internal} not echoed ({exp.internal_port})")
            if result != 0 or exp.lifetime == 0:
                if (external, lifetime) != (0, 0):
                    what = "failure" if result else "delete"
                    problems.append(f"{what} reply with port {external}, lifetime {lifetime}")
            else:
                if external == 0:
                    problems.append("success without an external port")
                top = min(exp.lifetime, max_lifetime)
                if not 1 <= lifetime <= top:
                    problems.append(f"lifetime {lifetime} granted for {exp.lifetime} "
                                    f"(allowed 1..{top})")
    return verdict


# ============================================================================ datagrams


class Generator:
    """Valid requests, mutations of them, pure random bytes, and the exhaustive pass over
    every version x opcode at lengths 2, 12 and 60 (interleaved at random)."""

    def __init__(self, rng: random.Random, total: int, exhaustive: bool) -> None:
        self.rng = rng
        self.left = total
        self._exhaustive: list[int] = []
        if exhaustive:
            self._exhaustive = list(range(EXHAUSTIVE_TOTAL))
            rng.shuffle(self._exhaustive)
        self.counts: Counter[str] = Counter()
        self.lengths: set[int] = set()  # coverage, for the summary
        self.headers: set[int] = set()  # version << 8 | opcode

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        data = self._next()
        self.lengths.add(len(data))
        if len(data) >= 2:
            self.headers.add(data[0] << 8 | data[1])
        return data

    def _next(self) -> bytes:
        if self.left <= 0:
            raise StopIteration
        rng = self.rng
        if self._exhaustive and rng.random() * self.left < len(self._exhaustive):
            self.left -= 1
            self.counts["exhaustive"] += 1
            return self.exhaustive(self._exhaustive.pop())
        self.left -= 1
        roll = rng.random()
        if roll < 0.35:
            self.counts["valid"] += 1
            return self.valid()
        if roll < 0.75:
            self.counts["mutated"] += 1
            return self.mutate(self.valid())
        self.counts["random"] += 1
        return self.random_bytes()

    # -- pieces

    def lifetime(self) -> int:
        rng = self.rng
        roll = rng.random()
        if roll < 0.25:
            return 0
        if roll < 0.45:
            return rng.randint(1, 5)
        if roll < 0.65:
            return rng.choice((60, 120, 3600, 7200, 7201, 86400))
        if roll < 0.75:
            return _U32
        if roll < 0.80:
            return rng.choice((0x7FFFFFFF, 0x80000000, 0xFFFFFFFE))
        return rng.getrandbits(32)

    def port(self) -> int:
        roll = self.rng.random()
        if roll < 0.05:
            return 0
        if roll < 0.80:
            return self.rng.choice(PORT_POOL)
        return self.rng.getrandbits(16)

    def map_body(self) -> bytes:
        """Bytes 2..11 of a mapping request: reserved, internal, suggested, lifetime."""
        rng = self.rng
        internal = self.port()
        roll = rng.random()
        suggested = (0 if roll < 0.4 else internal if roll < 0.5
                     else rng.choice(PORT_POOL) if roll < 0.7 else rng.getrandbits(16))
        reserved = 0 if rng.random() < 0.9 else rng.getrandbits(16)
        lifetime = self.lifetime()
        if lifetime == 0 and rng.random() < 0.15:
            internal = 0  # delete-all
        return struct.pack("!HHHI", reserved, internal, suggested, lifetime)

    def valid(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.2:
            return b"\x00\x00"
        if roll < 0.85:
            return bytes((0, rng.choice((1, 2)))) + self.map_body()
        if roll < 0.95:
            return self.pcp_map()
        return bytes((1, rng.choice((0, 1, 2)))) + bytes(rng.choice((0, 10, 22)))

    def pcp_map(self) -> bytes:
        """A PCP (RFC 6887) version-2 MAP request, 60 bytes, as libtorrent sends first."""
        rng = self.rng
        client = b"\x00" * 10 + b"\xff\xff" + bytes((127, 0, 0, rng.randint(1, 9)))
        header = struct.pack("!BBHI", 2, 1, 0, rng.choice((0, 7200, _U32))) + client
        nonce = rng.randbytes(12)
        body = nonce + struct.pack("!B3xHH", rng.choice((6, 17)), self.port(), self.port())
        return header + body + b"\x00" * 16

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.3 and buf:
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            elif roll < 0.5 and buf:
                buf[rng.randrange(len(buf))] = rng.getrandbits(8)
            elif roll < 0.6:
                buf[rng.randint(0, len(buf)):0] = rng.randbytes(rng.randint(1, 8))
            elif roll < 0.7 and buf:
                del buf[rng.randrange(len(buf))]
            elif roll < 0.85:
                del buf[rng.randint(0, len(buf)):]
            elif roll < 0.95:
                buf += rng.randbytes(rng.randint(1, MAX_DATAGRAM - len(buf)) if
                                     len(buf) < MAX_DATAGRAM else 0)
            else:
                buf[0:2] = bytes((rng.choice((0, 0, 1, 2, 255)), rng.getrandbits(8)))
        return bytes(buf[:MAX_DATAGRAM])

    def random_bytes(self) -> bytes:
        rng = self.rng
        length = rng.randint(0, 64) if rng.random() < 0.5 else rng.randint(0, MAX_DATAGRAM)
        data = bytearray(rng.randbytes(length))
        if length >= 2 and rng.random() < 0.5:
            data[0] = 0  # version 0 with a random opcode: the interesting half
        return bytes(data)

    def exhaustive(self, index: int) -> bytes:
        length = EXHAUSTIVE_LENGTHS[index % len(EXHAUSTIVE_LENGTHS)]
        version, opcode = divmod(index // len(EXHAUSTIVE_LENGTHS), 256)
        if length == 2:
            tail = b""
        elif version == 0 and opcode in (1, 2):
            tail = self.map_body() + self.rng.randbytes(length - 12)
        else:
            tail = self.rng.randbytes(length - 2)
        return bytes((version, opcode)) + tail


def exhaustive_datagrams(rng: random.Random) -> Iterator[bytes]:
    """All 256 versions x 256 opcodes at lengths 2, 12 and 60, in order."""
    gen = Generator(rng, 0, exhaustive=False)
    for index in range(EXHAUSTIVE_TOTAL):
        yield gen.exhaustive(index)


# ============================================================================= harness


@dataclass
class FuzzConfig:
    datagrams: int = 1_000_000
    seed: int | None = None
    clients: int = 8  # source addresses 127.0.0.2 ...
    sockets_per_client: int = 6
    window: int = 64  # requests in flight (those awaiting a reply, plus fresh drops)
    exhaustive: bool | None = None  # None: when datagrams >= 2 x the exhaustive pass
    max_mappings_per_client: int = 32
    max_lifetime: int = 3600
    profile: str = "rfc"
    reconcile_interval: float = 10.0
    reply_timeout: float = 15.0
    rss_interval: float = 0.5  # seconds between RSS samples
    rss_slack_mb: float = 4.0  # "flat": last quarter's max - first quarter's max
    warmup: float = 0.2  # share of the samples left out of the memory verdict
    log_dir: Path | None = None  # keep the daemon's and emulators' logs here
    progress: bool = False
    python: str = sys.executable


@dataclass
class FuzzReport:
    config: FuzzConfig
    seed: int
    sent: int = 0
    seconds: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    lengths_covered: int = 0  # of the 1501 lengths 0..1500
    headers_covered: int = 0  # of the 65536 version x opcode pairs
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    violation_kinds: Counter[str] = field(default_factory=Counter)
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (s, sent, kB)
    rss_growth_kb: int | None = None
    log_levels: Counter[str] = field(default_factory=Counter)
    log_events: Counter[str] = field(default_factory=Counter)
    max_rules: int = 0
    rules_after_stop: int | None = None
    exit_status: int | None = None
    renewals_checked: int = 0
    epoch_max: int = 0

    def violate(self, message: str) -> None:
        self.violation_count += 1
        kind = _kind_of(message)
        self.violation_kinds[kind] += 1
        if self.violation_kinds[kind] <= 3 and len(self.violations) < 200:
            self.violations.append(message)  # a few examples of each kind

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    def summary(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        lines = [
            f"fuzz: {self.sent} datagrams in {self.seconds:.1f} s ({rate:,.0f}/s), "
            f"seed {self.seed}",
            "  sources: " + ", ".join(f"{k} {v}" for k, v in sorted(self.sources.items()))
            + f"; lengths covered {self.lengths_covered}/{MAX_DATAGRAM + 1}, "
            f"version x opcode covered {self.headers_covered}/65536",
            "  replies by kind: " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.kinds.items())),
            f"  renewals checked for the same external port: {self.renewals_checked}; "
            f"highest epoch {self.epoch_max}",
            f"  router rules: at most {self.max_rules} while running, "
            f"{self.rules_after_stop} after SIGTERM; exit status {self.exit_status}",
            "  daemon log: " + ", ".join(f"{k} {v}" for k, v in sorted(self.log_levels.items()))
            + "; events: " + ", ".join(
                f"{k} {v}" for k, v in self.log_events.most_common(12)),
        ]
        if self.rss:
            series = ", ".join(f"{kb / 1024:.1f}" for _, _, kb in _thin(self.rss, 16))
            growth = ("n/a" if self.rss_growth_kb is None
                      else f"{self.rss_growth_kb / 1024:+.1f} MB")
            lines.append(f"  RSS MB (start {self.rss[0][2] / 1024:.1f}, end "
                         f"{self.rss[-1][2] / 1024:.1f}, last-vs-first quarter {growth}): "
                         f"{series}")
        verdict = "OK" if self.ok else f"{self.violation_count} VIOLATIONS"
        lines.append(f"  verdict: {verdict}")
        lines += [f"    {n:6d} x {k}" for k, n in self.violation_kinds.most_common()]
        lines += [f"    - {v[:600]}" for v in self.violations[:40]]
        return "\n".join(lines)


def _kind_of(message: str) -> str:
    """A violation's kind: its text up to the first colon, numbers and ids blanked."""
    head = message.split(": ", 1)[0]
    return re.sub(r"\*[0-9A-F]+|\d+", "N", head)[:90]


def _thin(series: list[tuple[float, int, int]], n: int) -> list[tuple[float, int, int]]:
    if len(series) <= n:
        return series
    step = (len(series) - 1) / (n - 1)
    return [series[round(i * step)] for i in range(n)]


class _Processes:
    """The emulators and the daemon, as subprocesses, with their logs in `directory`."""

    def __init__(self, config: FuzzConfig, directory: Path) -> None:
        self.config = config
        self.dir = directory
        self.emulators: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.password = "fuzz-" + os.urandom(6).hex()
        self.router: tuple[str, int] = ("", 0)
        self.gateway: tuple[str, int] = ("", 0)
        self.listen: tuple[str, int] = ("", 0)
        self.started_at = 0.0

    def start(self) -> None:
        (self.dir / "password").write_text(self.password + "\n")
        (self.dir / "password").chmod(0o600)
        with open(self.dir / "emulators.log", "wb") as err:
            self.emulators = subprocess.Popen(
                [self.config.python, "-m", "doublenat.lab.standalone",
                 "--router", "127.0.0.1:0", "--password-file", str(self.dir / "password"),
                 "--gateway", "127.0.0.1:0", "--profile", self.config.profile,
                 "--public-address", PUBLIC_ADDRESS, "--route", "127.0.0.1=wg-proton"],
                stdout=subprocess.PIPE, stderr=err, env=_base_env(),
            )
        assert self.emulators.stdout is not None
        with selectors.DefaultSelector() as waiting:
            waiting.register(self.emulators.stdout, selectors.EVENT_READ)
            ready = waiting.select(30.0)
        line = self.emulators.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError("the emulators did not start; see " + str(self.dir))
        ready = json.loads(line)
        self.router = _endpoint(ready["router"])
        self.gateway = _endpoint(ready["gateway"])
        env = _base_env() | {
            "VPN_GATEWAY": "{}:{}".format(*self.gateway),
            "MIKROTIK_API_ADDRESS": "{}:{}".format(*self.router),
            "MIKROTIK_API_USER": "doublenat",
            "MIKROTIK_API_PASSWORD_FILE": str(self.dir / "password"),
            "VPN_PORT_MODE": "external" if self.config.profile == "proton" else "internal",
            "LISTEN_ADDR": "127.0.0.1:0",
            "ALLOWED_CLIENTS": "127.0.0.0/8",
            "MAX_MAPPINGS_PER_CLIENT": str(self.config.max_mappings_per_client),
            "CLIENT_RATE_LIMIT": "0",
            "MAX_LIFETIME": str(self.config.max_lifetime),
            "EXPIRY_GRACE": "1",
            "RECONCILE_INTERVAL": f"{self.config.reconcile_interval:g}",
            "SHUTDOWN_TIMEOUT": "20",
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "json",
        }
        self.started_at = time.monotonic()
        with open(self.dir / "daemon.log", "wb") as err:
            self.daemon = subprocess.Popen(
                [self.config.python, "-m", "doublenat.cli", "serve"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
            )
        self.listen = self._wait_listening(30.0)

    def _wait_listening(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.daemon is not None
            if self.daemon.poll() is not None:
                raise RuntimeError(f"doublenat exited with {self.daemon.returncode} at start:"
                                   f"\n{self.log_text()[-3000:]}")
            # Listening, and synchronised with the router (as the lab's start waits for).
            listen: tuple[str, int] | None = None
            synced = False
            for record in self.log_records():
                if record.get("event") == "daemon.started":
                    listen = _endpoint(str(record["listen"]))
                synced = synced or record.get("event") == "reconcile.done"
            if listen and synced:
                return listen
            time.sleep(0.05)
        raise RuntimeError("doublenat did not start and synchronise:\n"
                           + self.log_text()[-3000:])

    def log_text(self) -> str:
        path = self.dir / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_records(self) -> Iterator[dict[str, object]]:
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    yield record

    def rss_kb(self) -> int | None:
        assert self.daemon is not None
        try:
            with open(f"/proc/{self.daemon.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def router_rules(self) -> list[dict[str, str]]:
        import routeros_api

        pool = routeros_api.RouterOsApiPool(
            self.router[0], username="doublenat", password=self.password,
            port=self.router[1], plaintext_login=True)
        pool.set_timeout(10)
        try:
            rows = pool.get_api().get_resource("/ip/firewall/nat").get()
        finally:
            pool.disconnect()
        return [r for r in rows if str(r.get("comment", "")).startswith(RULE_PREFIX)]

    def stop_daemon(self, timeout: float = 40.0) -> int | None:
        if self.daemon is None or self.daemon.poll() is not None:
            return None if self.daemon is None else self.daemon.returncode
        self.daemon.send_signal(signal.SIGTERM)
        try:
            return self.daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
            return None

    def close(self) -> None:
        for proc in (self.daemon, self.emulators):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.emulators is not None and self.emulators.stdout is not None:
            self.emulators.stdout.close()


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    # The daemon and emulators import doublenat from this tree, whatever the cwd.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# ========================================================================== the run


@dataclass(slots=True)
class _Pending:
    seq: int
    data: bytes
    exp: Expect
    sent_at: float
    client: int
    key: tuple[object, ...] | None  # the mapping it concerns (ip, proto, internal port)
    prior: tuple[int, float] | None  # (external port, alive until) when it was sent


@dataclass(slots=True)
class _Socket:
    sock: socket.socket
    client: int
    drops: bool  # sends only datagrams that must go unanswered
    pending: dict[tuple[object, ...], _Pending] = field(default_factory=dict)
    last_epoch: int = -1
    recent: deque[bytes] = field(default_factory=lambda: deque(maxlen=8))


class _Fuzzer:
    def __init__(self, config: FuzzConfig, procs: _Processes, report: FuzzReport) -> None:
        self.config = config
        self.procs = procs
        self.report = report
        self.rng = random.Random(report.seed)
        self.selector = selectors.DefaultSelector()
        self.sockets: list[_Socket] = []
        self.reply_sockets: list[list[_Socket]] = []
        self.drop_sockets: list[_Socket] = []
        for client in range(config.clients):
            host = f"127.0.0.{client + 2}"
            mine = []
            for index in range(config.sockets_per_client + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((host, 0))
                sock.connect(procs.listen)
                sock.setblocking(False)
                entry = _Socket(sock, client, drops=index == 0)
                self.sockets.append(entry)
                self.selector.register(sock, selectors.EVENT_READ, entry)
                if entry.drops:
                    self.drop_sockets.append(entry)
                else:
                    mine.append(entry)
            self.reply_sockets.append(mine)
        self.seq = 0
        self.outstanding = 0
        self.fresh_drops: deque[tuple[int, float]] = deque()
        self.busy_keys: set[tuple[object, ...]] = set()
        self.busy_classes: Counter[tuple[int, int]] = Counter()  # (client, proto)
        self.deleting_all: set[tuple[int, int]] = set()
        # (client, proto, internal port) -> (external port, alive until)
        self.model: dict[tuple[object, ...], tuple[int, float]] = {}
        self.owners: dict[tuple[int, int], tuple[tuple[object, ...], float]] = {}
        self.epoch_max = 0
        self.epoch_drops: list[str] = []

    # -- sending

    def try_send(self, data: bytes) -> bool:
        """Send `data` from a client and socket where it cannot be confused; False: later."""
        exp = expect(data)
        now = time.monotonic()
        clients = list(range(self.config.clients))
        self.rng.shuffle(clients)
        if exp.kind == "drop":
            entry = self.drop_sockets[clients[0]]
            self._send(entry, data)
            entry.recent.append(data)
            self.fresh_drops.append((self.seq, now))
            return True
        for client in clients:
            key = self._key(client, exp)
            if key is not None and not self._key_free(client, exp, key):
                continue
            signature = exp.signature
            for entry in self.rng.sample(self.reply_sockets[client],
                                         len(self.reply_sockets[client])):
                if signature in entry.pending:
                    continue
                prior = self.model.get(key) if key is not None else None
                entry.pending[signature] = _Pending(self.seq, data, exp, now, client, key,
                                                    prior)
                self._hold(client, exp, key)
                self.outstanding += 1
                self._send(entry, data)
                return True
        return False

    def _send(self, entry: _Socket, data: bytes) -> None:
        try:
            entry.sock.send(data)
        except OSError as exc:
            self.report.violate(f"send failed: {exc}")  # e.g. ICMP unreachable: daemon gone
        self.seq += 1
        self.report.sent += 1

    @staticmethod
    def _key(client: int, exp: Expect) -> tuple[object, ...] | None:
        if exp.kind != "map":
            return None
        if exp.lifetime == 0 and exp.internal_port == 0:
            return ("all", client, exp.opcode)
        return (client, exp.opcode, exp.internal_port)

    def _key_free(self, client: int, exp: Expect, key: tuple[object, ...]) -> bool:
        cls = (client, exp.opcode)
        if key[0] == "all":
            return self.busy_classes[cls] == 0
        return key not in self.busy_keys and cls not in self.deleting_all

    def _hold(self, client: int, exp: Expect, key: tuple[object, ...] | None) -> None:
        if key is None:
            return
        cls = (client, exp.opcode)
        if key[0] == "all":
            self.deleting_all.add(cls)
        else:
            self.busy_keys.add(key)
        self.busy_classes[cls] += 1

    def _release(self, pending: _Pending) -> None:
        self.outstanding -= 1
        key = pending.key
        if key is None:
            return
        cls = (pending.client, pending.exp.opcode)
        if key[0] == "all":
            self.deleting_all.discard(cls)
        else:
            self.busy_keys.discard(key)
        self.busy_classes[cls] -= 1

    def in_flight(self) -> int:
        now = time.monotonic()
        while self.fresh_drops and now - self.fresh_drops[0][1] > 0.02:
            self.fresh_drops.popleft()
        return self.outstanding + len(self.fresh_drops)

    # -- receiving

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            entry: _Socket = key.data
            while True:
                try:
                    reply = entry.sock.recv(4096)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break
                    if exc.errno == errno.ECONNREFUSED:
                        self.report.violate("ICMP port unreachable: is the daemon gone?")
                        continue
                    raise
                self.received(entry, reply)

    def received(self, entry: _Socket, reply: bytes) -> None:
        now = time.monotonic()
        if entry.drops:
            self.report.kinds["unexpected"] += 1
            self.report.violate(f"reply {reply[:32].hex()} on a socket that sent only "
                                f"datagrams to be dropped; recent: "
                                f"{[d[:16].hex() for d in entry.recent]}")
            return
        pending = None
        for signature in reply_signature(reply):
            pending = entry.pending.pop(signature, None)
            if pending is not None:
                break
        if pending is None:
            self.report.kinds["unexpected"] += 1
            self.report.violate(f"reply {reply[:32].hex()} matches no request in flight")
            return
        self._release(pending)
        while self.fresh_drops and self.fresh_drops[0][0] < pending.seq:
            self.fresh_drops.popleft()
        verdict = check(pending.exp, reply, max_lifetime=self.config.max_lifetime)
        self.report.kinds[verdict.label] += 1
        problems = list(verdict.problems)
        if verdict.epoch is not None:
            problems += self._check_epoch(entry, verdict.epoch, now)
        if pending.exp.kind == "map" and not verdict.problems:
            problems += self._track(pending, verdict, now)
        for problem in problems:
            self.report.violate(f"{problem}: request {pending.data[:24].hex()} "
                                f"({len(pending.data)} bytes) from 127.0.0.{pending.client + 2}"
                                f" -> reply {reply[:24].hex()}")

    def _check_epoch(self, entry: _Socket, epoch: int, now: float) -> list[str]:
        problems = []
        if epoch < entry.last_epoch:
            self.epoch_drops.append(f"epoch {epoch} after {entry.last_epoch} on one socket")
        elif epoch < self.epoch_max - 1:
            self.epoch_drops.append(f"epoch {epoch} after {self.epoch_max} was seen")
        if epoch > now - self.procs.started_at + 1:
            problems.append(f"epoch {epoch} ahead of the daemon's "
                            f"{now - self.procs.started_at:.1f} s of life")
        entry.last_epoch = max(entry.last_epoch, epoch)
        self.epoch_max = max(self.epoch_max, epoch)
        return problems

    def _track(self, pending: _Pending, verdict: Verdict, now: float) -> list[str]:
        """Renewals keep their port; two live mappings of a protocol never share one."""
        exp, key, problems = pending.exp, pending.key, []
        assert key is not None
        margin = 1.0
        if key[0] == "all":
            if verdict.result == 0:
                for other in [k for k in self.model if k[:2] == key[1:]]:
                    self._forget(other)
            return problems
        prior = pending.prior
        alive = prior is not None and pending.sent_at < prior[1] - margin
        if exp.lifetime == 0:
            if verdict.result == 0:
                self._forget(key)
            return problems
        if verdict.result != 0:
            if alive and verdict.result in (2, 4):
                problems.append(f"renewal of a live mapping refused with {verdict.result}")
            self.model.pop(key, None)  # unknown from now on
            return problems
        port = verdict.external_port
        if alive:
            assert prior is not None
            self.report.renewals_checked += 1
            if port != prior[0]:
                problems.append(f"renewal moved the mapping from port {prior[0]} to {port}")
        owner = self.owners.get((exp.opcode, port))
        if owner is not None and owner[0] != key and pending.sent_at < owner[1] - margin \
                and self.model.get(owner[0], (None,))[0] == port and self._settled(owner[0]):
            problems.append(f"external port {port} given to {key} while {owner[0]} holds it")
        until = pending.sent_at + verdict.lifetime
        self.model[key] = (port, until)
        self.owners[(exp.opcode, port)] = (key, until)
        return problems

    def _settled(self, key: tuple[object, ...]) -> bool:
        """No request in flight may have removed this mapping (a delete, a delete-all:
        the daemon may act on it before its reply reaches us)."""
        client, proto = key[0], key[1]
        return key not in self.busy_keys and (client, proto) not in self.deleting_all

    def _forget(self, key: tuple[object, ...]) -> None:
        held = self.model.pop(key, None)
        if held is not None:
            owner = self.owners.get((key[1], held[0]))  # type: ignore[index]
            if owner is not None and owner[0] == key:
                del self.owners[(key[1], held[0])]  # type: ignore[index]

    def expire(self) -> None:
        now = time.monotonic()
        for entry in self.sockets:
            for signature, pending in list(entry.pending.items()):
                if now - pending.sent_at > self.config.reply_timeout:
                    del entry.pending[signature]
                    self._release(pending)
                    self.report.kinds[f"{pending.exp.kind}/none"] += 1
                    self.report.violate(f"no reply within {self.config.reply_timeout:g} s to "
                                        f"{pending.data[:24].hex()} ({len(pending.data)} "
                                        f"bytes) from 127.0.0.{pending.client + 2}")

    # -- the loop

    def run(self, generator: Generator) -> None:
        config, report = self.config, self.report
        started = time.monotonic()
        next_sample = started
        next_expire = started + 1.0
        next_progress = started + 10.0
        next_rules = started + 5.0
        waiting: bytes | None = None
        exhausted = False
        while True:
            if not exhausted:
                while self.in_flight() < config.window:
                    if waiting is None:
                        waiting = next(generator, None)
                        if waiting is None:
                            exhausted = True
                            break
                    if not self.try_send(waiting):
                        break
                    waiting = None
            if exhausted and self.outstanding == 0:
                break
            self.poll(0.05 if self.in_flight() >= config.window or exhausted else 0)
            now = time.monotonic()
            if now >= next_sample:
                rss = self.procs.rss_kb()
                if rss is not None:
                    report.rss.append((now - started, report.sent, rss))
                next_sample = now + config.rss_interval
            if now >= next_expire:
                self.expire()
                next_expire = now + 1.0
                if self.procs.daemon is not None and self.procs.daemon.poll() is not None:
                    report.violate(f"doublenat died with status {self.procs.daemon.returncode}")
                    return
            if now >= next_rules:
                with contextlib.suppress(Exception):
                    report.max_rules = max(report.max_rules, len(self.procs.router_rules()))
                next_rules = now + 5.0
            if config.progress and now >= next_progress:
                print(f"  ... {report.sent} sent, {self.outstanding} awaiting replies, "
                      f"{report.violation_count} violations, RSS "
                      f"{(report.rss[-1][2] / 1024) if report.rss else 0:.1f} MB",
                      file=sys.stderr, flush=True)
                next_progress = now + 10.0
        # Late answers to dropped datagrams would show up now.
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            self.poll(0.05)
        report.seconds = time.monotonic() - started
        report.epoch_max = self.epoch_max

    def close(self) -> None:
        self.selector.close()
        for entry in self.sockets:
            entry.sock.close()


def _final_checks(config: FuzzConfig, procs: _Processes, fuzzer: _Fuzzer,
                  report: FuzzReport) -> None:
    assert procs.daemon is not None
    if procs.daemon.poll() is not None:
        report.violate(f"doublenat is not running (status {procs.daemon.returncode})")
        return
    # A fresh client gets a correct address and a working mapping, deleted again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.250", 0))
        sock.connect(procs.listen)
        sock.settimeout(10)
        for request in (b"\x00\x00", struct.pack("!BBHHHI", 0, 2, 0, 4242, 0, 60),
                        struct.pack("!BBHHHI", 0, 2, 0, 4242, 0, 0)):
            sock.send(request)
            try:
                reply: bytes | None = sock.recv(64)
            except OSError:
                reply = None
            verdict = check(expect(request), reply, max_lifetime=config.max_lifetime)
            for problem in verdict.problems:
                report.violate(f"fresh request {request.hex()}: {problem}")
            if verdict.result != 0:
                report.violate(f"fresh request {request.hex()} answered with {verdict.label}")
    try:
        rules = procs.router_rules()
    except Exception as exc:
        report.violate(f"cannot list the router's rules: {exc}")
        rules = []
    report.max_rules = max(report.max_rules, len(rules))
    limit = config.clients * config.max_mappings_per_client
    if report.max_rules > limit:
        report.violate(f"{report.max_rules} rules on the router, over the quota total {limit}")
    resets = sum(1 for r in procs.log_records() if r.get("event") == "upstream.reset")
    if fuzzer.epoch_drops and not resets:
        for drop in fuzzer.epoch_drops[:10]:
            report.violate(f"{drop}, without an upstream reset")
    samples = [kb for _, _, kb in report.rss]
    skip = int(len(samples) * config.warmup)
    steady = samples[skip:]
    if len(steady) >= 8:
        quarter = len(steady) // 4
        report.rss_growth_kb = max(steady[-quarter:]) - max(steady[:quarter])
        if report.rss_growth_kb > config.rss_slack_mb * 1024:
            report.violate(f"RSS grew {report.rss_growth_kb / 1024:.1f} MB from the first to "
                           f"the last quarter (allowed {config.rss_slack_mb:g} MB)")


def _check_logs(procs: _Processes, report: FuzzReport) -> None:
    for number, line in enumerate(procs.log_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            report.violate(f"daemon log line {number} is not a JSON object: {line[:200]!r}")
            continue
        level = str(record.get("level", "?"))
        report.log_levels[level] += 1
        report.log_events[str(record.get("event", "-"))] += 1
        if level in ("ERROR", "CRITICAL"):
            report.violate(f"daemon logged {level}: {line[:400]}")
        if record.get("event") in ("rule.adoptable", "mapping.adopted"):
            # The router started empty: every rule is this run's, none is an earlier one's.
            report.violate(f"a rule of this run taken for one of an earlier run: {line[:300]}")
        if procs.password in line:
            report.violate(f"the API password appears in log line {number}")


def run(config: FuzzConfig) -> FuzzReport:
    seed = config.seed if config.seed is not None else random.randrange(2**32)
    report = FuzzReport(config, seed)
    exhaustive = (config.exhaustive if config.exhaustive is not None
                  else config.datagrams >= 2 * EXHAUSTIVE_TOTAL)
    if exhaustive and config.datagrams < EXHAUSTIVE_TOTAL:
        raise ValueError(f"the exhaustive pass alone is {EXHAUSTIVE_TOTAL} datagrams")
    with contextlib.ExitStack() as stack:
        if config.log_dir is not None:
            directory = config.log_dir
            directory.mkdir(parents=True, exist_ok=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-")))
        procs = _Processes(config, directory)
        stack.callback(procs.close)
        procs.start()
        fuzzer = _Fuzzer(config, procs, report)
        stack.callback(fuzzer.close)
        generator = Generator(random.Random(seed ^ 0x5EED), config.datagrams, exhaustive)
        fuzzer.run(generator)
        report.sources = generator.counts
        report.lengths_covered = len(generator.lengths)
        report.headers_covered = len(generator.headers)
        _final_checks(config, procs, fuzzer, report)
        report.exit_status = procs.stop_daemon()
        if report.exit_status != 0:
            report.violate(f"doublenat exited with {report.exit_status} after SIGTERM")
        try:
            report.rules_after_stop = len(procs.router_rules())
        except Exception as exc:
            report.violate(f"cannot list the router's rules after the stop: {exc}")
        if report.rules_after_stop:
            report.violate(f"{report.rules_after_stop} rules left on the router after SIGTERM")
        _check_logs(procs, report)  # the whole run, shutdown included
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.fuzz",
        description="Fuzz a doublenat daemon (started here against the lab's emulators) "
                    "with random and mutated NAT-PMP datagrams, checking every reply.")
    parser.add_argument("--datagrams", type=int, default=FuzzConfig.datagrams)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--window", type=int, default=FuzzConfig.window)
    parser.add_argument("--clients", type=int, default=FuzzConfig.clients)
    parser.add_argument("--profile", choices=("rfc", "proton"), default="rfc")
    parser.add_argument("--exhaustive", action=argparse.BooleanOptionalAction, default=None,
                        help="include every version x opcode at lengths 2, 12, 60 "
                             f"({EXHAUSTIVE_TOTAL} datagrams; default: when --datagrams is "
                             "at least twice that)")
    parser.add_argument("--reconcile-interval", type=float,
                        default=FuzzConfig.reconcile_interval)
    parser.add_argument("--rss-slack-mb", type=float, default=FuzzConfig.rss_slack_mb)
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="keep the daemon's and the emulators' logs here")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args(argv)
    config = FuzzConfig(datagrams=args.datagrams, seed=args.seed, window=args.window,
                        clients=args.clients, profile=args.profile,
                        exhaustive=args.exhaustive, rss_slack_mb=args.rss_slack_mb,
                        reconcile_interval=args.reconcile_interval,
                        log_dir=args.log_dir, progress=True)
    report = run(config)
    print(report.summary(), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "datagrams": report.sent, "seconds": round(report.seconds, 2), "seed": report.seed,
            "kinds": report.kinds, "sources": report.sources, "violations": report.violations,
            "violation_count": report.violation_count, "rss_kb": report.rss,
            "rss_growth_kb": report.rss_growth_kb, "log_levels": report.log_levels,
            "max_rules": report.max_rules, "rules_after_stop": report.rules_after_stop,
            "exit_status": report.exit_status}, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
