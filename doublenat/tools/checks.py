"""`doublenat check`: is this host, router and VPN ready for `doublenat serve`?

Each check gives a frozen `CheckResult`; `run_checks` yields them in a fixed order, as
soon as each is known, so a slow check (a silent gateway) does not hide the earlier lines.
A check whose precondition failed (no login: the NAT checks are meaningless) is reported
as skipped, with the reason.

Nothing here leaves a trace on the router: the write check adds a *disabled* rule whose
comment does not carry doublenat's prefix (a running daemon ignores it) and removes it.
No text produced here carries the API password: router messages come redacted from the
client, and settings are shown through `Settings.redacted()` only.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address
from typing import Any

from doublenat.adapters.front import BindError, bind_udp
from doublenat.adapters.routeros import NAT, RouterOsClient
from doublenat.adapters.upstream import NatPmpClient
from doublenat.engine.contracts import (
    GatewayError,
    InvalidValue,
    NotPermitted,
    RouterError,
    RouterTrap,
    RouterUnavailable,
)
from doublenat.engine.interface import (
    Detection,
    detect_interface,
    has_route_check,
    read_resource,
    version_tuple,
)
from doublenat.protocol.natpmp import Result
from doublenat.settings import RULE_PREFIX, Settings

# Comment of the write check's throw-away rule: deliberately without RULE_PREFIX.
CHECK_COMMENT = "doublenat-check"
assert not CHECK_COMMENT.startswith(RULE_PREFIX)

POLICIES = "read,write,test,api"


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


_MARK = {Status.PASS: "✓", Status.FAIL: "✗", Status.SKIP: "-"}


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str  # stable key for machines, e.g. "router-login"
    title: str  # what is checked, for people, e.g. "login ok"
    status: Status
    detail: str = ""  # what was found (pass), what went wrong (fail), why not run (skip)
    hint: str = ""  # what to do about a failure

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL

    def line(self) -> str:
        mark = _MARK[self.status]
        if self.status is Status.PASS:
            return f"{mark} {self.title}" + (f" ({self.detail})" if self.detail else "")
        if self.status is Status.SKIP:
            return f"{mark} {self.title} — skipped" + (f": {self.detail}" if self.detail else "")
        text = f"{mark} {self.title}" + (f" — {self.detail}" if self.detail else "")
        return text + (f"; hint: {self.hint}" if self.hint else "")

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "title": self.title, "status": self.status.value,
                "detail": self.detail, "hint": self.hint}


# The checks, in the order they run and are printed.
SETTINGS = ("settings", "settings valid")
REACHABLE = ("router-reachable", "router reachable")
LOGIN = ("router-login", "login ok")
VERSION = ("router-version", "RouterOS version")
NAT_READ = ("nat-read", "API user can read /ip/firewall/nat")
ROUTE = ("vpn-route", "route toward the VPN gateway")
INTERFACE = ("vpn-interface", "VPN interface")
NAT_WRITE = ("nat-write", "API user can write /ip/firewall/nat")
GATEWAY = ("vpn-gateway", "VPN gateway answers NAT-PMP with a public address")
LISTEN = ("listen", "listen address can be bound")
ALL = (SETTINGS, REACHABLE, LOGIN, VERSION, NAT_READ, ROUTE, INTERFACE, NAT_WRITE, GATEWAY,
       LISTEN)
_ROUTER = (LOGIN, VERSION, NAT_READ, ROUTE, INTERFACE, NAT_WRITE)

Check = tuple[str, str]


def interface_check(settings: Settings) -> Check:
    """The interface check's title says which of its two forms runs."""
    form = "exists" if settings.in_interface else "is a tunnel"
    return (INTERFACE[0], f"{INTERFACE[1]} {form}")


def passed(check: Check, detail: str = "") -> CheckResult:
    return CheckResult(check[0], check[1], Status.PASS, detail)


def failed(check: Check, detail: str, hint: str = "") -> CheckResult:
    return CheckResult(check[0], check[1], Status.FAIL, detail, hint)


def skipped(check: Check, why: str) -> CheckResult:
    return CheckResult(check[0], check[1], Status.SKIP, why)


def _after(first: Check, settings: Settings) -> list[Check]:
    """The router checks from `first` on, with the interface check's proper title."""
    wanted = _ROUTER[_ROUTER.index(first):]
    return [interface_check(settings) if c is INTERFACE else c for c in wanted]


def all_passed(results: Iterable[CheckResult]) -> bool:
    """True when nothing failed (a check skipped as unneeded does not fail the run)."""
    return not any(r.failed for r in results)


def policy_hint(policy: str) -> str:
    return (f"the API user's group lacks the '{policy}' policy; doublenat needs "
            f"{POLICIES}: /user group add name=doublenat policy={POLICIES}; "
            "/user set <user> group=doublenat")


def _is_permission(exc: RouterError) -> bool:
    return isinstance(exc, NotPermitted)


# ------------------------------------------------------------------- the run


def settings_result(settings: Settings) -> CheckResult:
    interface = settings.in_interface or "auto"
    return passed(SETTINGS, f"router {settings.api_address} as {settings.api_user}, "
                            f"VPN gateway {settings.vpn_gateway}, interface {interface}")


def invalid_settings(problem: str) -> list[CheckResult]:
    """The whole report when the settings do not parse: nothing else can be checked."""
    return [failed(SETTINGS, problem, "fix the variable named above")] + [
        skipped(check, "settings invalid") for check in ALL[1:]
    ]


def run_checks(settings: Settings) -> Iterator[CheckResult]:
    yield settings_result(settings)
    yield from router_checks(settings)
    yield check_gateway(settings)
    yield check_listen(settings)


# -------------------------------------------------------------------- router


def router_checks(settings: Settings) -> Iterator[CheckResult]:
    """Reachable, login, then what the API user may do and the interface, in order."""
    try:
        router = RouterOsClient.from_settings(settings, size=1)
    except (ssl.SSLError, OSError) as exc:
        yield failed(REACHABLE, f"cannot use MIKROTIK_API_TLS_CA: {exc}",
                     "MIKROTIK_API_TLS_CA must be a PEM file of CA certificates")
        for check in _after(LOGIN, settings):
            yield skipped(check, "router not reachable")
        return
    try:
        reach = check_reachable(settings, router.tls_context)
        yield reach
        if reach.failed:
            for check in _after(LOGIN, settings):
                yield skipped(check, "router not reachable")
            return
        yield from _RouterSession(settings, router).run()
    finally:
        router.close()


def check_reachable(settings: Settings, tls: ssl.SSLContext | None = None) -> CheckResult:
    """A TCP connection to the API port (and the TLS handshake with TLS), nothing more."""
    address = settings.api_address
    service = "api-ssl" if settings.api_tls else "api"
    try:
        sock = socket.create_connection((address.host, address.port),
                                        timeout=settings.router_timeout)
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {settings.router_timeout:g} s"
        else:
            reason = exc.strerror or str(exc)
        return failed(
            REACHABLE, f"cannot connect to {address}: {reason}",
            f"check MIKROTIK_API_ADDRESS; on the router the {service} service must be "
            f"enabled (/ip service enable {service}), allowed from this host (its "
            "available-from list) and not dropped by the input firewall chain",
        )
    try:
        if tls is not None:
            with tls.wrap_socket(sock, server_hostname=address.host):
                pass
    except ssl.SSLCertVerificationError as exc:
        return failed(REACHABLE, f"{address}: TLS certificate rejected: {exc.verify_message}",
                      "set MIKROTIK_API_TLS_CA to the CA that signed the router's certificate, "
                      "or MIKROTIK_API_TLS_VERIFY=false for a self-signed one")
    except (ssl.SSLError, OSError) as exc:
        return failed(REACHABLE, f"{address}: TLS handshake failed: {exc}",
                      "is api-ssl enabled with a certificate, and is this its port "
                      "(8729)? MIKROTIK_API_TLS=false for the plain API")
    finally:
        sock.close()
    return passed(REACHABLE, f"{address}" + (" with TLS" if tls is not None else ""))


class _RouterSession:
    """The checks that need a logged-in API connection; they share one."""

    def __init__(self, settings: Settings, router: RouterOsClient) -> None:
        self.settings = settings
        self.router = router
        self.lost: str | None = None  # set when the router went away mid-way

    def run(self) -> Iterator[CheckResult]:
        login = self.login()
        yield login
        if login.failed:
            for check in _after(VERSION, self.settings):
                yield skipped(check, "no login")
            return
        yield self.guarded(VERSION, self.version)
        yield self.guarded(NAT_READ, self.nat_read)
        detection = self.detect()
        yield self.route(detection)
        interface = self.interface(detection)
        yield interface
        usable = (detection.view.interface if isinstance(detection, Detection) and
                  detection.view is not None and interface.status is Status.PASS else None)
        yield self.guarded(NAT_WRITE, lambda: self.nat_write(usable))

    def guarded(self, check: Check, work: Any) -> CheckResult:
        """Run one check unless the router was lost; a lost router fails it."""
        if self.lost:
            return skipped(check, self.lost)
        try:
            result: CheckResult = work()
        except RouterUnavailable as exc:
            self.lost = "the router stopped answering"
            return failed(check, str(exc), "check the router and the network, then retry")
        return result

    # -- the checks ------------------------------------------------------------------

    def login(self) -> CheckResult:
        user = self.settings.api_user
        try:
            name = self.router.identity()
        except RouterTrap:
            # Logged in, but the identity is not readable: the read check will say more.
            return passed(LOGIN, f"as {user}")
        except RouterUnavailable as exc:
            message = str(exc)
            reason = message.split(" failed: ", 1)[1] if " failed: " in message else message
            return failed(LOGIN, reason,
                          "check MIKROTIK_API_USER and the password (MIKROTIK_API_PASSWORD or "
                          "MIKROTIK_API_PASSWORD_FILE); RouterOS older than 6.43 is not "
                          "supported")
        return passed(LOGIN, f"as {user} on router {name!r}" if name else f"as {user}")

    def version(self) -> CheckResult:
        resource = read_resource(self.router)
        version = resource.get("version")
        if not version:
            return failed(VERSION, "/system/resource cannot be read",
                          policy_hint("read") + "; without it a router restart is assumed at "
                          "every reconnect")
        board = resource.get("board-name")
        how = ("/ip/route/check" if has_route_check(version)
               else "the main routing table (this version has no /ip/route/check)")
        detail = f"{version}" + (f" on {board}" if board else "") + \
            f"; the VPN interface is found from {how}"
        numbers = version_tuple(version)
        if numbers is not None and numbers < (6, 43):
            return failed(VERSION, detail, "RouterOS 6.43 or later is needed (plaintext login)")
        return passed(VERSION, detail)

    def nat_read(self) -> CheckResult:
        try:
            rules = self.router.list_rules()
        except RouterTrap as exc:
            hint = policy_hint("read") if _is_permission(exc) else ""
            return failed(NAT_READ, str(exc), hint)
        owned = sum(1 for r in rules if r.comment.startswith(RULE_PREFIX))
        return passed(NAT_READ, f"{len(rules)} dstnat rules, {owned} of them doublenat's")

    def detect(self) -> Detection | RouterError | None:
        if self.lost:
            return None
        try:
            return detect_interface(self.router, self.settings.vpn_gateway.host,
                                    self.settings.in_interface)
        except RouterUnavailable as exc:
            self.lost = "the router stopped answering"
            return exc
        except RouterError as exc:
            return exc

    def route(self, detection: Detection | RouterError | None) -> CheckResult:
        gateway = self.settings.vpn_gateway.host
        if detection is None:
            return skipped(ROUTE, self.lost or "")
        if isinstance(detection, RouterError):
            # Which policy /ip/route/check needs is not recorded: name both candidates.
            hint = (policy_hint("read") + " (/ip/route/check may need 'test' instead)"
                    if _is_permission(detection)
                    else "set MIKROTIK_IN_INTERFACE to the VPN interface")
            return failed(ROUTE, str(detection), hint)
        if detection.source == "setting":
            return passed(ROUTE, "not needed: MIKROTIK_IN_INTERFACE is set")
        if detection.found is None:
            return failed(ROUTE, f"no active route toward VPN_GATEWAY {gateway} "
                                 f"(asked: {detection.source})",
                          "bring the VPN tunnel up and route the gateway through it: "
                          f"/ip route add dst-address={gateway}/32 gateway=<tunnel interface>; "
                          "or set MIKROTIK_IN_INTERFACE; doublenat never guesses")
        return passed(ROUTE, f"via {detection.found.interface} ({detection.found.detail})")

    def interface(self, detection: Detection | RouterError | None) -> CheckResult:
        configured = self.settings.in_interface
        check = interface_check(self.settings)
        if detection is None or isinstance(detection, RouterError):
            return skipped(check, self.lost or "the route toward the gateway is unknown")
        if configured:
            try:
                rows = self.router.read("/interface", queries={"name": configured})
            except RouterUnavailable as exc:
                self.lost = "the router stopped answering"
                return failed(check, str(exc))
            except RouterTrap as exc:
                hint = policy_hint("read") if _is_permission(exc) else ""
                return failed(check, f"cannot list interfaces: {exc}", hint)
            if not rows:
                return failed(check, f"the router has no interface named {configured!r}",
                              "check MIKROTIK_IN_INTERFACE (names are case-sensitive), or "
                              "unset it to detect the interface from the route toward "
                              "VPN_GATEWAY")
            kind = rows[0].get("type", "?")
            return passed(check, f"{configured} (type {kind}), configured: trusted as given")
        if detection.found is None:
            return skipped(check, "no route toward the gateway")
        if detection.problem is not None:
            return failed(check, detection.problem,
                          "doublenat creates no rule (and moves none) until the gateway is "
                          "reached through a tunnel")
        return passed(check, f"{detection.found.interface}, a tunnel, found by "
                             f"{detection.source}")

    def nat_write(self, interface: str | None) -> CheckResult:
        """Add a disabled, unprefixed rule on the VPN interface, then remove it by id."""
        comment = f"{CHECK_COMMENT} {secrets.token_hex(4)}"
        words = {"chain": "dstnat", "action": "accept", "disabled": "yes", "comment": comment}
        if interface:
            words["in-interface"] = interface
        try:
            ref = self.router.add_once(NAT, words)
        except RouterTrap as exc:
            hint = policy_hint("write") if _is_permission(exc) else ""
            if isinstance(exc, InvalidValue):
                hint = f"the router does not know the interface {interface!r}"
            return failed(NAT_WRITE, f"the router refused to add a rule: {exc}", hint)
        except RouterUnavailable:
            self._remove_by_comment(comment)  # the add may have taken effect
            raise
        try:
            self.router.remove_rule(ref)
        except RouterError as exc:
            self._remove_by_comment(comment)
            hint = policy_hint("write") if _is_permission(exc) else ""
            hint = (hint + "; " if hint else "") + \
                f"remove the disabled rule commented {comment!r} by hand if it is still there"
            return failed(NAT_WRITE, f"test rule {ref.rule_id} added but not removed: {exc}",
                          hint)
        where = f" on {interface}" if interface else ""
        return passed(NAT_WRITE, f"disabled test rule{where} added and removed")

    def _remove_by_comment(self, comment: str) -> None:
        try:
            for rule in self.router.find_rules(comment):
                self.router.remove_rule(rule.ref)
        except RouterError:
            pass


# ------------------------------------------------------------------- gateway


def check_gateway(settings: Settings) -> CheckResult:
    """Ask the VPN gateway for its public address (opcode 0), as the daemon would."""
    gateway = settings.vpn_gateway
    client = NatPmpClient(gateway, settings.upstream_timeout)
    try:
        client.start()
        answer = client.public_address()
    except GatewayError as exc:
        return failed(GATEWAY, str(exc),
                      "is the VPN up, does this host reach VPN_GATEWAY through it, and does "
                      "the VPN offer NAT-PMP port forwarding (ProtonVPN: a P2P server, port "
                      "forwarding on)? UPSTREAM_TIMEOUT sets how long to wait")
    except OSError as exc:
        return failed(GATEWAY, f"cannot talk to VPN_GATEWAY {gateway}: {exc.strerror or exc}",
                      "check VPN_GATEWAY and this host's routes")
    finally:
        client.close()
    if answer.result != Result.SUCCESS:
        return failed(GATEWAY, f"{gateway} answered result {int(answer.result)} "
                               f"({answer.result.name})",
                      "the gateway refuses NAT-PMP; port forwarding may be off for this VPN "
                      "server or account")
    address = answer.address
    if not _public(address):
        return failed(GATEWAY, f"{gateway} reports {address}, not a public address",
                      "the gateway is itself behind NAT (or not connected yet); the ports it "
                      "grants would not be reachable from the internet")
    return passed(GATEWAY, f"{gateway} reports {address}")


def _public(address: IPv4Address) -> bool:
    return address.is_global and not address.is_multicast


# -------------------------------------------------------------------- listen


def check_listen(settings: Settings) -> CheckResult:
    """Bind the NAT-PMP socket the way `serve` does, then let it go."""
    try:
        sock = bind_udp(settings.listen)
    except BindError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return failed(LISTEN, f"{settings.listen}: {reason}",
                      "another program holds the port (a running doublenat or miniupnpd: "
                      "stop it first), or the address is not on this host; ports below 1024 "
                      "need root or CAP_NET_BIND_SERVICE")
    sock.close()
    return passed(LISTEN, f"UDP {settings.listen}")
