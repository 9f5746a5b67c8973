"""The end-to-end bed: doublenat between a real NAT-PMP client and a real upstream, in
five network namespaces joined by veth pairs, with packets crossing both NATs.

    inet   wan 11.22.33.1/24 ─────────── wan 11.22.33.44/24   vpn
           (a host on the internet)       (the VPN gateway: miniupnpd with NAT-PMP, or the
                                           lab's gateway emulator in `proton` profile with
                                           an nftables mirror of its mappings)
                                          tun 10.2.0.1/24
                                             │
                                          tun 10.2.0.2/24     rtr
                                          (the MikroTik: the RouterOS API emulator on
                                           192.168.77.1:8728, its NAT table mirrored to
                                           nftables; RouterOS names wg-proton=tun, bridge=lan)
                          lan 192.168.88.1/24      svc 192.168.77.1/24
                                 │                          │
    lan    eth0 192.168.88.20/24 ┘                          └ eth0 192.168.77.2/24   svc
           (natpmpc -g 192.168.88.1,                           (doublenat serve)
            the listeners)

The router's own configuration is two RouterOS rules, exactly as an operator types them:
masquerade out of the tunnel (the VPN hides the LAN behind 10.2.0.2), and the redirect of
the LAN's NAT-PMP packets, UDP 5351 to the router's LAN address, to doublenat on its own
subnet. Conntrack un-NATs doublenat's replies, so natpmpc sees them come from
192.168.88.1:5351. doublenat talks to the router's API at 192.168.77.1:8728 and to the
gateway at 10.2.0.1:5351 through the router.

The NAT-PMP client (natpmpc) and the upstream (miniupnpd) are a Debian release's: the
host's own, or, for another release, those of its chroot (tests/packaging/chroots.py), run
in the bed's namespaces with `nsenter --net=/run/netns/NAME chroot ...`: a chroot shares
the network of the namespace it is entered in. Everything else (doublenat, the emulators,
the probes) is this checkout's.

Names carry a random suffix (dn-<6 hex>-<role>), every process runs in its own process
group, and `close()` (also called when `start()` fails half way) kills them, deletes the
namespaces, and with them every link and nft table of the run.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doublenat.lab import miniupnpd
from tests.packaging.chroots import Instance, Spec, host_arch, host_release

REPO = Path(__file__).resolve().parents[2]
TOOLS = str(Path(__file__).with_name("tools.py"))
CLIENTS = str(Path(__file__).with_name("clients.py"))

ROLES = ("inet", "vpn", "rtr", "svc", "lan")
INTERNET = "11.22.33.1"
PUBLIC = "11.22.33.44"
TUNNEL_GATEWAY = "10.2.0.1"
TUNNEL_ROUTER = "10.2.0.2"
ROUTER_LAN = "192.168.88.1"
LAN_CLIENT = "192.168.88.20"
ROUTER_SVC = "192.168.77.1"
SVC = "192.168.77.2"
API_PORT = 8728
API_USER = "doublenat"
ROUTER_TABLE = "doublenat_lab"
GATEWAY_TABLE = "doublenat_lab_gw"
RULE_MARK = "double-natpmp-"

# (namespace, link, peer namespace, peer link)
LINKS = (
    ("inet", "wan", "vpn", "wan"),
    ("vpn", "tun", "rtr", "tun"),
    ("rtr", "lan", "lan", "eth0"),
    ("rtr", "svc", "svc", "eth0"),
)
ADDRESSES = {
    ("inet", "wan"): f"{INTERNET}/24",
    ("vpn", "wan"): f"{PUBLIC}/24",
    ("vpn", "tun"): f"{TUNNEL_GATEWAY}/24",
    ("rtr", "tun"): f"{TUNNEL_ROUTER}/24",
    ("rtr", "lan"): f"{ROUTER_LAN}/24",
    ("rtr", "svc"): f"{ROUTER_SVC}/24",
    ("lan", "eth0"): f"{LAN_CLIENT}/24",
    ("svc", "eth0"): f"{SVC}/24",
}
DEFAULT_ROUTES = {"vpn": INTERNET, "rtr": TUNNEL_GATEWAY, "lan": ROUTER_LAN, "svc": ROUTER_SVC}

# The MikroTik's own configuration, as the README tells operators to type it.
ROUTER_RULES = (
    "chain=srcnat action=masquerade out-interface=wg-proton "
    "comment='VPN: the LAN leaves through the tunnel address'",
    f"chain=dstnat action=dst-nat in-interface=bridge dst-address={ROUTER_LAN} protocol=udp "
    f"dst-port=5351 to-addresses={SVC} to-ports=5351 comment='NAT-PMP to doublenat'",
)
ROUTER_INTERFACES = "wg-proton=tun,bridge=lan"

# Debian's nft_init.sh needs iptables; this is the same skeleton, loaded by hand, plus the
MINIUPNPD_CHAINS = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")

_MAPPED = re.compile(
    r"Mapped public port (\d+) protocol (TCP|UDP) to local port (\d+) li(?:f|)e?time (\d+)"
)
_PUBLIC = re.compile(r"Public IP address\s*:\s*(\S+)")

_LIVE: set[Bed] = set()


class BedError(RuntimeError):
    pass


@dataclass
class Proc:
    """A background process in a namespace, in a process group of its own."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Signal the group, wait; SIGKILL the group if it does not go. The exit status.

        A process already reaped is left alone: its group id may belong to someone else by now.
        """
        if self.popen.poll() is not None:
            return self.popen.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            return self.popen.wait(5)

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def tail(self, lines: int = 40) -> str:
        parts = []
        for label, path in (("stdout", self.out), ("stderr", self.err)):
            text = path.read_text(errors="replace") if path.exists() else ""
            if text.strip():
                parts.append(f"--- {self.name} {label} (last {lines} lines) ---")
                parts += text.splitlines()[-lines:]
        return "\n".join(parts)


@dataclass
class Natpmpc:
    returncode: int
    output: str
    public_address: str | None = None
    mappings: list[tuple[str, int, int, int]] = field(default_factory=list)

    @property
    def mapped(self) -> tuple[str, int, int, int]:
        """(protocol, external port, internal port, lifetime) of the one mapping."""
        if self.returncode != 0 or len(self.mappings) != 1:
            raise AssertionError(f"natpmpc did not map (status {self.returncode}):\n"
                                 f"{self.output}")
        return self.mappings[0]


@dataclass
class Delivery:
    """What a send from the internet came to."""

    sent: dict[str, Any]
    arrivals: list[dict[str, Any]]

    @property
    def arrived(self) -> bool:
        return bool(self.arrivals)


class Bed:
    """The five namespaces and their processes. `upstream` is "miniupnpd" or "proton";
    `release` whose natpmpc and miniupnpd run (default: the host's)."""

    def __init__(self, upstream: str, workdir: Path, port_mode: str | None = None,
                 release: str | None = None) -> None:
        if upstream not in ("miniupnpd", "proton"):
            raise ValueError(f"unknown upstream {upstream!r}")
        self.upstream = upstream
        self.release = release or host_release() or "host"
        # The release's programs come from its chroot unless it is the host's own.
        self.chroot: Instance | None = None
        if self.release not in (host_release(), "host"):
            self.chroot = Instance(Spec(self.release, host_arch()),
                                   workdir.with_name(workdir.name + "-chroot"),
                                   binds=[workdir])
        self.port_mode = port_mode or ("external" if upstream == "proton" else "internal")
        self.workdir = workdir
        self.prefix = f"dn-{secrets.token_hex(3)}"
        self.ns = {role: f"{self.prefix}-{role}" for role in ROLES}
        self.password = secrets.token_hex(12)
        self.procs: dict[str, Proc] = {}
        self.created: list[str] = []
        self.doublenat_runs = 0
        self.doublenat: Proc | None = None
        self.leases = workdir / "miniupnpd.leases"
        self._sports = itertools.count(random.randrange(20000, 40000, 1000))
        self._spawned = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Bed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        _LIVE.add(self)
        try:
            if self.chroot is not None:
                self.chroot.start()
            self._build_network()
            if self.upstream == "miniupnpd":
                self._start_miniupnpd()
            else:
                self._start_gateway_emulator()
            self._start_router()
            self.start_doublenat()
        except BaseException as exc:
            report = self.diagnostics()
            self.close()
            if isinstance(exc, Exception) and not isinstance(exc, BedError):
                raise BedError(f"bed setup failed: {exc}\n{report}") from exc
            if isinstance(exc, BedError):
                raise BedError(f"{exc}\n{report}") from None
            raise

    def close(self) -> None:
        """Stop every process, delete every namespace; safe to call twice."""
        for name in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.procs[name].stop(timeout=10 if name.startswith("doublenat") else 3)
        for ns in self.created:
            self._kill_namespace_pids(ns)
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.created = [ns for ns in self.created if ns in self.namespaces_left()]
        if self.chroot is not None:
            self.chroot.close()  # ends what still ran in it, drops its mounts
        _LIVE.discard(self)

    def namespaces_left(self) -> list[str]:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                 check=False).stdout
        return [line.split()[0] for line in listing.splitlines()
                if line.startswith(self.prefix + "-")]

    # ------------------------------------------------------------------- building

    def _build_network(self) -> None:
        for role in ROLES:
            name = self.ns[role]
            self._ip("netns", "add", name)
            self.created.append(name)
            self._ip("-n", name, "link", "set", "lo", "up")
        for ns_a, link_a, ns_b, link_b in LINKS:
            self._ip("link", "add", link_a, "netns", self.ns[ns_a], "type", "veth",
                     "peer", "name", link_b, "netns", self.ns[ns_b])
        for (role, link), address in ADDRESSES.items():
            self._ip("-n", self.ns[role], "addr", "add", address, "dev", link)
            self._ip("-n", self.ns[role], "link", "set", link, "up")
        for role, via in DEFAULT_ROUTES.items():
            self._ip("-n", self.ns[role], "route", "add", "default", "via", via)
        for role in ("vpn", "rtr"):
            self.run(role, [sys.executable, "-c",
                            "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')"])

    def _start_miniupnpd(self) -> None:
        self.nft("vpn", "-f", "-", script=miniupnpd.ruleset([
            # what any real gateway has: replies of forwarded connections get out
            "ct state established,related accept",
            'iifname "tun" oifname "wan" accept',
        ]))
        conf = self.workdir / "miniupnpd.conf"
        # NAT-PMP clients: the router's tunnel address (doublenat, masqueraded). Every
        # external port is allowed: with the sample's 1024-65535, a suggestion below 1024
        # makes 2.3.1 walk up from it, one nft lookup per refused port (about 1 s), and
        # doublenat's retransmissions pile up behind.
        conf.write_text(miniupnpd.config("wan", "tun", "10.2.0.0/24", self.leases,
                                         external_ports="1-65535"))
        self.spawn("miniupnpd", "vpn",
                   ["miniupnpd", "-f", str(conf), "-d", "-P", str(self.workdir / "mu.pid")],
                   release_program=True)
        self._wait_upstream()

    def restart_miniupnpd(self, keep_leases: bool = False) -> None:
        """Stop miniupnpd and start it again; without its lease file it comes back with
        no mapping and a new epoch, as a VPN server that lost its state."""
        self.procs.pop("miniupnpd").stop()
        if not keep_leases:
            self.leases.unlink(missing_ok=True)
            # miniupnpd leaves its nft rules behind when it stops: a new server has none.
            for chain in MINIUPNPD_CHAINS:
                self.nft("vpn", "flush", "chain", "inet", "filter", chain)
        self._start_miniupnpd()

    def _start_gateway_emulator(self) -> None:
        self.spawn("gateway", "vpn", [
            sys.executable, "-m", "doublenat.lab.standalone",
            "--gateway", f"{TUNNEL_GATEWAY}:5351", "--profile", "proton",
            "--public-address", PUBLIC, "--nft-gateway", "wan",
        ])
        self._wait_json_line(self.procs["gateway"], 20)
        self._wait_upstream()

    def _wait_upstream(self) -> None:
        """The gateway answers opcode 0 to the router with the public address."""
        def ready() -> bool:
            reply = self.address(role="rtr", gateway=TUNNEL_GATEWAY)
            return reply.get("result") == 0 and reply.get("address") == PUBLIC

        self._wait(ready, 20, f"the upstream ({self.upstream}) to answer opcode 0")

    def _start_router(self) -> None:
        password_file = self.workdir / "api.password"
        password_file.write_text(self.password)
        password_file.chmod(0o600)
        argv = [
            sys.executable, "-m", "doublenat.lab.standalone",
            "--router", f"{ROUTER_SVC}:{API_PORT}", "--user", API_USER,
            "--password-file", str(password_file),
            "--interface", "wg-proton", "--interface", "bridge",
            "--route", "10.2.0.0/24=wg-proton",
            "--nft-router", ROUTER_INTERFACES,
        ]
        for rule in ROUTER_RULES:
            argv += ["--nat-rule", rule]
        self.spawn("router", "rtr", argv)
        self._wait_json_line(self.procs["router"], 20)

    def doublenat_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "VPN_GATEWAY": TUNNEL_GATEWAY,
            "MIKROTIK_API_ADDRESS": f"{ROUTER_SVC}:{API_PORT}",
            "MIKROTIK_API_USER": API_USER,
            "MIKROTIK_API_PASSWORD": self.password,
            "ALLOWED_CLIENTS": "192.168.88.0/24",
            "VPN_PORT_MODE": self.port_mode,
            "LISTEN_ADDR": "0.0.0.0:5351",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "DEBUG",
            # A reconnect of the upstream is noticed within 2 s (test_vpn_reconnect).
            "UPSTREAM_PROBE_INTERVAL": "2",
        }

    def start_doublenat(self) -> Proc:
        self.doublenat_runs += 1
        name = f"doublenat-{self.doublenat_runs}"
        proc = self.spawn(name, "svc", [sys.executable, "-m", "doublenat.cli", "serve"],
                          env=self.doublenat_env())
        self.doublenat = proc

        def synchronised() -> bool:
            if not proc.alive():
                raise BedError(f"doublenat exited with status {proc.popen.returncode}")
            return '"reconcile.done"' in proc.err.read_text(errors="replace")

        self._wait(synchronised, 30, "doublenat to load the router's rules")

        def answering() -> bool:
            reply = self.address()
            return reply.get("result") == 0 and reply.get("address") == PUBLIC

        self._wait(answering, 20, "doublenat to answer opcode 0 through the redirect")
        return proc

    def stop_doublenat(self, timeout: float = 40.0) -> int:
        """SIGTERM, as supervisord or docker would; the exit status."""
        assert self.doublenat is not None
        return self.doublenat.stop(signal.SIGTERM, timeout)

    # ------------------------------------------------------------------ processes

    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BedError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def _command(self, role: str, argv: list[str], release_program: bool) -> list[str]:
        """The command line running `argv` in `role`'s namespace; a release program (natpmpc,
        miniupnpd) from the release's chroot when the bed has one."""
        if release_program and self.chroot is not None:
            return self.chroot.command(argv, network=f"/run/netns/{self.ns[role]}")
        return ["ip", "netns", "exec", self.ns[role], *argv]

    def run(
        self,
        role: str,
        argv: list[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        stdin: str | None = None,
        release_program: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        command = self._command(role, argv, release_program)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  input=stdin, cwd=REPO, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BedError(f"timed out after {timeout} s: {' '.join(command)}") from exc
        if check and done.returncode != 0:
            raise BedError(f"status {done.returncode}: {' '.join(command)}\n"
                           f"{done.stdout}{done.stderr}")
        return done

    def spawn(self, name: str, role: str, argv: list[str],
              env: dict[str, str] | None = None, release_program: bool = False) -> Proc:
        self._spawned += 1
        out = self.workdir / f"{name}.out"
        err = self.workdir / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                self._command(role, argv, release_program),
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                start_new_session=True, cwd=REPO, env=env,
            )
        proc = Proc(name, popen, out, err)
        self.procs[name] = proc
        return proc

    def _kill_namespace_pids(self, ns: str) -> None:
        listing = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                 check=False).stdout
        for pid in listing.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    @staticmethod
    def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if check():
                return
            if time.monotonic() > deadline:
                raise BedError(f"gave up after {timeout} s waiting for {what}")
            time.sleep(0.1)

    def _wait_json_line(self, proc: Proc, timeout: float) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def line() -> bool:
            if not proc.alive():
                raise BedError(f"{proc.name} exited with status {proc.popen.returncode}")
            text = proc.output()
            if "\n" in text:
                found.append(json.loads(text.splitlines()[0]))
                return True
            return False

        self._wait(line, timeout, f"{proc.name} to be ready")
        return found[0]

    # ------------------------------------------------------------------ clients

    def natpmpc(self, *args: str, timeout: float = 40.0) -> Natpmpc:
        """The release's natpmpc in the LAN, with -g the router's LAN address."""
        done = self.run("lan", ["natpmpc", "-g", ROUTER_LAN, *args], timeout=timeout,
                        check=False, release_program=True)
        output = done.stdout + done.stderr
        public = _PUBLIC.search(output)
        return Natpmpc(
            done.returncode,
            output,
            public.group(1) if public else None,
            [(p.lower(), int(e), int(i), int(t)) for e, p, i, t in _MAPPED.findall(output)],
        )

    def address(self, role: str = "lan", gateway: str = ROUTER_LAN) -> dict[str, Any]:
        done = self.run(role, [sys.executable, TOOLS, "address", "--gateway", gateway,
                               "--timeout", "0.5"], check=False)
        lines = done.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else {"error": done.stderr}

    def client(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """A probe of clients.py in the LAN; its JSON report."""
        done = self.run("lan", [sys.executable, CLIENTS, *args], timeout=timeout, check=False)
        lines = done.stdout.strip().splitlines()
        if not lines:
            raise BedError(f"clients.py {' '.join(args)} printed nothing:\n{done.stderr}")
        return dict(json.loads(lines[-1]))

    def deliver(
        self,
        proto: str,
        external_port: int,
        internal_port: int,
        *,
        expect: bool = True,
        data: str | None = None,
    ) -> Delivery:
        """Listen on the LAN client's internal port, send from the internet to the
        gateway's public address at the external port; what arrived.

        With expect=False the listener waits a while for nothing, so a packet that is
        merely slow still counts as arrived.
        """
        data = data or f"{proto}-{external_port}-{secrets.token_hex(4)}"
        self._spawned += 1
        name = f"listen-{self._spawned}"
        listen_args = ["--tcp" if proto == "tcp" else "--udp", str(internal_port)]
        seconds = "6" if expect else "1.5"
        listener = self.spawn(name, "lan", [sys.executable, TOOLS, "listen", *listen_args,
                                            "--expect", "1", "--seconds", seconds])
        try:
            self._wait(lambda: '"ready"' in listener.output() or not listener.alive(), 10,
                       "the LAN listener")
            if not listener.alive():
                raise BedError(f"listener failed:\n{listener.tail()}")
            sent = self.send(proto, external_port, data, timeout=2.0 if expect else 1.0)
            try:
                listener.popen.wait(8)
            except subprocess.TimeoutExpired:
                listener.stop()
        finally:
            listener.stop(timeout=2)
            self.procs.pop(name, None)
        arrivals = [json.loads(line) for line in listener.output().splitlines()[1:]]
        return Delivery(sent, [a for a in arrivals if a.get("data") == data])

    def send(self, proto: str, port: int, data: str, timeout: float = 2.0) -> dict[str, Any]:
        done = self.run("inet", [
            sys.executable, TOOLS, "send", "--proto", proto, "--to", f"{PUBLIC}:{port}",
            "--sport", str(next(self._sports)), "--data", data, "--timeout", str(timeout),
        ])
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    # ------------------------------------------------------------------- state

    def nft(self, role: str, *args: str, script: str | None = None) -> str:
        return self.run(role, ["nft", *args], stdin=script).stdout

    def _rules(self, role: str, family: str, table: str,
               chains: Iterable[str] | None = None) -> list[dict[str, Any]]:
        listing = json.loads(self.nft(role, "-j", "list", "table", family, table))
        rules = [item["rule"] for item in listing["nftables"] if "rule" in item]
        return [r for r in rules if chains is None or r.get("chain") in chains]

    def router_rules(self) -> list[dict[str, Any]]:
        """doublenat's rules as applied in the router namespace's nftables."""
        return [r for r in self._rules("rtr", "ip", ROUTER_TABLE)
                if RULE_MARK in r.get("comment", "")]

    def static_router_rules(self) -> list[dict[str, Any]]:
        return [r for r in self._rules("rtr", "ip", ROUTER_TABLE)
                if RULE_MARK not in r.get("comment", "")]

    def upstream_rules(self) -> list[dict[str, Any]]:
        """Forwarding the upstream holds: miniupnpd's chains, or the emulator's mirror."""
        if self.upstream == "miniupnpd":
            return self._rules("vpn", "inet", "filter", MINIUPNPD_CHAINS)
        return self._rules("vpn", "ip", GATEWAY_TABLE)

    def upstream_leases(self) -> list[str]:
        """miniupnpd's lease file (NAT-PMP mappings it holds); [] for the emulator."""
        if not self.leases.exists():
            return []
        return [line for line in self.leases.read_text().splitlines() if line.strip()]

    def leftovers(self) -> dict[str, Any]:
        """Everything doublenat should have removed; all empty when nothing is left."""
        return {
            "router nft": self.router_rules(),
            "upstream nft": self.upstream_rules(),
            "upstream leases": self.upstream_leases(),
        }

    def diagnostics(self) -> str:
        """Logs and tables, for a failure report."""
        parts = [f"=== bed {self.prefix} ({self.upstream}, {self.port_mode} mode, "
                 f"{self.release}'s natpmpc{' and miniupnpd' * (self.upstream == 'miniupnpd')}"
                 ") ==="]
        for proc in self.procs.values():
            tail = proc.tail(80 if proc.name.startswith("doublenat") else 30)
            if tail:
                parts.append(tail)
        for role in ("rtr", "vpn"):
            if self.ns[role] in self.created:
                with contextlib.suppress(Exception):
                    listing = self.run(role, ["nft", "list", "ruleset"], check=False)
                    parts.append(f"--- nft list ruleset in {role} ---\n{listing.stdout}"
                                 f"{listing.stderr}")
        with contextlib.suppress(Exception):
            parts.append("--- miniupnpd leases ---\n" + "\n".join(self.upstream_leases()))
        return "\n".join(parts)


@atexit.register
def _close_leftover_beds() -> None:
    for bed in list(_LIVE):
        with contextlib.suppress(Exception):
            bed.close()
