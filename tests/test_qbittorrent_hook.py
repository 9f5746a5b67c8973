"""packaging/examples/qbittorrent-port-hook, run by the HookRunner against a tiny fake
qBittorrent WebUI on loopback.

The fake follows qBittorrent's own source (qbittorrent/qBittorrent, src/webui/):
`auth/login` takes the form fields username and password and answers "Ok." or "Fails."
(authcontroller.cpp) or, since 5.2, 204 with a QBT_SID_<port> cookie instead of SID
(webapplication.cpp); every other call needs the session cookie or, since 5.2, an
`Authorization: Bearer` API key; a request whose Origin or Referer names another host
than Host is refused as cross-site (isCrossSiteRequest); `app/setPreferences` takes a
form field `json` and applies only the keys it knows, ignoring the rest, and
`app/preferences` lists them (appcontroller.cpp).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from gevent.pywsgi import WSGIServer

from doublenat.engine.events import ChangeKind, MappingChange
from doublenat.hooks import HookRunner
from doublenat.protocol.natpmp import Proto
from tests.logcapture import attached
from tests.test_hooks import JsonRecords, wait_until

HOOK = Path(__file__).resolve().parent.parent / "packaging" / "examples" / "qbittorrent-port-hook"
QBT_CLIENT = "192.168.88.20"
USER, PASSWORD, API_KEY = "admin", "webui-Pass word", "qbt_0123456789abcdef"


@dataclass
class FakeQbittorrent:
    """Just enough of qBittorrent's WebUI API for the hook; records every request."""

    style: str = "5.1"  # "5.1": SID cookie, login "Ok."; "5.2": QBT_SID_<port>, 204
    knows_announce_port: bool = True
    bypass_auth: bool = False
    preferences: dict[str, Any] = field(default_factory=lambda: {"listen_port": 6881})
    requests: list[dict[str, Any]] = field(default_factory=list)
    sessions: set[str] = field(default_factory=set)
    port: int = 0

    def __post_init__(self) -> None:
        if self.knows_announce_port:
            self.preferences["announce_port"] = 0

    @property
    def cookie_name(self) -> str:
        return "SID" if self.style == "5.1" else f"QBT_SID_{self.port}"

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def __call__(self, environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length).decode() if length else ""
        form = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        self.requests.append({"method": method, "path": path, "form": form,
                              "headers": headers})

        def answer(status: str, text: str = "", extra: list[tuple[str, str]] | None = None,
                   ) -> list[bytes]:
            start(status, [("Content-Type", "text/plain"), *(extra or [])])
            return [text.encode()]

        origin = headers.get("Origin") or headers.get("Referer")
        if origin and urllib.parse.urlsplit(origin).netloc != headers.get("Host"):
            return answer("401 Unauthorized", "Unauthorized")
        if path == "/api/v2/auth/login":
            if form.get("username") == USER and form.get("password") == PASSWORD:
                sid = f"session{len(self.sessions)}"
                self.sessions.add(sid)
                cookie = ("Set-Cookie", f"{self.cookie_name}={sid}; HttpOnly; path=/")
                if self.style == "5.1":
                    return answer("200 OK", "Ok.", [cookie])
                return answer("204 No Content", "", [cookie])
            return answer("200 OK", "Fails.")
        cookies = SimpleCookie(headers.get("Cookie", ""))
        session = cookies[self.cookie_name].value if self.cookie_name in cookies else None
        bearer = headers.get("Authorization") == f"Bearer {API_KEY}" and self.style == "5.2"
        if not (self.bypass_auth or bearer or session in self.sessions):
            return answer("403 Forbidden", "Forbidden")
        if path == "/api/v2/auth/logout":
            self.sessions.discard(session or "")
            return answer("200 OK")
        if path == "/api/v2/app/setPreferences":
            if method != "POST" or "json" not in form:
                return answer("400 Bad Request", "Missing required parameters")
            for key, value in json.loads(form["json"]).items():
                if key in self.preferences:  # unknown keys are ignored, as qBittorrent does
                    self.preferences[key] = value
            return answer("200 OK")
        if path == "/api/v2/app/preferences":
            start("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(self.preferences).encode()]
        return answer("404 Not Found", "Not Found")


@pytest.fixture
def records() -> Iterator[JsonRecords]:
    with attached(JsonRecords()) as handler:
        yield handler


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeQbittorrent]]:
    servers: list[WSGIServer] = []

    def start(**kwargs: Any) -> FakeQbittorrent:
        app = FakeQbittorrent(**kwargs)
        server = WSGIServer(("127.0.0.1", 0), app, log=None)
        server.start()
        app.port = server.server_port
        servers.append(server)
        return app

    yield start
    for server in servers:
        server.stop()


def configure(tmp_path: Path, app: FakeQbittorrent | int, **options: str) -> str:
    """A configuration file for `app` (or a bare port); the HOOK_COMMAND that uses it."""
    port = app if isinstance(app, int) else app.port
    lines = [f"QBT_URL=http://127.0.0.1:{port}  # the fake WebUI",
             f"QBT_CLIENT={QBT_CLIENT}", "QBT_INTERNAL_PORT=6881"]
    lines += [f"{name}='{value}'" for name, value in options.items()]
    conf = tmp_path / "qbittorrent hook.conf"
    conf.write_text("# written by the test\n" + "\n".join(lines) + "\n")
    conf.chmod(0o600)
    return wrapper(tmp_path, conf)


def wrapper(tmp_path: Path, conf: Path) -> str:
    """HOOK_COMMAND takes no arguments: the README's two-line wrapper names the file."""
    wrap = tmp_path / "qbittorrent-hook-wrapper"
    wrap.write_text(f"#!/bin/sh\nexec '{HOOK}' '{conf}'\n")
    wrap.chmod(0o755)
    return str(wrap)


def change(kind: str, external: int, *, client: str = QBT_CLIENT, internal: int = 6881,
           proto: Proto = Proto.TCP, previous: int | None = None) -> MappingChange:
    return MappingChange(ChangeKind(kind), proto, IPv4Address(client), internal, external,
                         0 if kind == "deleted" else 60, True, previous,
                         IPv4Address("198.51.100.7"))


def run(command: str, *changes: MappingChange) -> HookRunner:
    runner = HookRunner(command, timeout=30)
    for each in changes:
        runner.submit(each)
    wait_until(lambda: runner.queued == 0 and runner.running == 0, timeout=30)
    runner.close(0)
    return runner


def outputs(records: JsonRecords) -> list[tuple[str, object, str]]:
    return [(str(r["event"]), r["exit_status"], str(r["output"]).strip())
            for r in records.records if r["event"] in ("hook.finished", "hook.failed")]


@pytest.mark.parametrize("style", ["5.1", "5.2"])
def test_created_changed_deleted_with_a_webui_login(
    tmp_path: Path, serve: Callable[..., FakeQbittorrent], records: JsonRecords, style: str
) -> None:
    app = serve(style=style)
    command = configure(tmp_path, app, QBT_USERNAME=USER, QBT_PASSWORD=PASSWORD)
    seen: list[int] = []
    run(command, change("created", 41234))
    seen.append(app.preferences["announce_port"])
    run(command, change("changed", 52000, previous=41234))
    seen.append(app.preferences["announce_port"])
    run(command, change("deleted", 52000))
    seen.append(app.preferences["announce_port"])
    assert seen == [41234, 52000, 0]
    assert app.preferences["listen_port"] == 6881  # the port qBittorrent listens on stays
    one_run = [("POST", "/api/v2/auth/login"), ("POST", "/api/v2/app/setPreferences"),
               ("GET", "/api/v2/app/preferences"), ("POST", "/api/v2/auth/logout")]
    assert app.calls() == one_run * 3
    login, set_prefs = app.requests[0], app.requests[1]
    assert login["form"] == {"username": USER, "password": PASSWORD}
    assert json.loads(set_prefs["form"]["json"]) == {"announce_port": 41234}
    assert set(set_prefs["form"]) == {"json"}
    assert not app.sessions  # logged out every time
    assert outputs(records) == [
        ("hook.finished", 0, "created tcp 192.168.88.20:6881 -> external 41234: "
                             "qBittorrent announce_port set to 41234"),
        ("hook.finished", 0, "changed tcp 192.168.88.20:6881 -> external 52000: "
                             "qBittorrent announce_port set to 52000"),
        ("hook.finished", 0, "deleted tcp 192.168.88.20:6881 -> external 52000: "
                             "qBittorrent announce_port set to 0"),
    ]


def test_an_api_key_needs_no_login(
    tmp_path: Path, serve: Callable[..., FakeQbittorrent], records: JsonRecords
) -> None:
    app = serve(style="5.2")
    run(configure(tmp_path, app, QBT_API_KEY=API_KEY, QBT_USERNAME=USER), change("created",
                                                                                 40001))
    assert app.calls() == [("POST", "/api/v2/app/setPreferences"),
                           ("GET", "/api/v2/app/preferences")]
    assert app.requests[0]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert app.preferences["announce_port"] == 40001


def test_no_credentials_when_the_webui_lets_the_host_in(
    tmp_path: Path, serve: Callable[..., FakeQbittorrent], records: JsonRecords
) -> None:
    app = serve(bypass_auth=True)
    run(configure(tmp_path, app), change("created", 40002))
    assert app.preferences["announce_port"] == 40002
    assert ("POST", "/api/v2/auth/login") not in app.calls()


def test_other_mappings_are_ignored_without_a_request(
    tmp_path: Path, serve: Callable[..., FakeQbittorrent], records: JsonRecords
) -> None:
    app = serve()
    command = configure(tmp_path, app, QBT_USERNAME=USER, QBT_PASSWORD=PASSWORD)
    run(command, change("created", 40003, client="192.168.88.21"),
        change("created", 40004, internal=8080), change("created", 40005, proto=Proto.UDP))
    assert app.requests == []
    results = outputs(records)  # three mappings: their hooks ran in parallel
    assert [(event, status) for event, status, _ in results] == [("hook.finished", 0)] * 3
    assert {output.split("ignored ")[1] for _, _, output in results} == {
        "(DOUBLENAT_CLIENT=192.168.88.21 is not QBT_CLIENT=192.168.88.20)",
        "(DOUBLENAT_INTERNAL_PORT=8080 is not QBT_INTERNAL_PORT=6881)",
        "(DOUBLENAT_PROTOCOL=udp is not tcp)",
    }


def test_a_wrong_password_fails_the_hook_with_status_2(
    tmp_path: Path, serve: Callable[..., FakeQbittorrent], records: JsonRecords
) -> None:
    app = serve()
    password_file = tmp_path / "password"
    password_file.write_text("not-it\n")
    run(configure(tmp_path, app, QBT_USERNAME=USER, QBT_PASSWORD_FILE=str(password_file)),
        change("created", 40006))
    [(event, status, output)] = outputs(records)
    assert (event, status) == ("hook.failed", 2)
    assert "login as 'admin' refused" in output and "Fails." in output
    assert app.calls() == [("POST", "/api/v2/auth/login")]
    assert app.requests[0]["form"]["password"] == "not-it"


def test_a_qbittorrent_without_announce_port_is_reported(
    tmp_path: Path, serve: Callable[..., FakeQbittorrent], records: JsonRecords
) -> None:
    app = serve(knows_announce_port=False, bypass_auth=True)
    run(configure(tmp_path, app), change("created", 40007))
    [(event, status, output)] = outputs(records)
    assert (event, status) == ("hook.failed", 3)
    assert "no 'announce_port' preference" in output and "QBT_PREFERENCE=listen_port" in output


def test_listen_port_mode(
    tmp_path: Path, serve: Callable[..., FakeQbittorrent], records: JsonRecords
) -> None:
    app = serve(knows_announce_port=False, bypass_auth=True)
    command = configure(tmp_path, app, QBT_PREFERENCE="listen_port")
    run(command, change("created", 40008), change("deleted", 40008))
    assert app.preferences["listen_port"] == 40008  # a deleted mapping leaves it alone
    assert [status for _, status, _ in outputs(records)] == [0, 0]


def test_an_unreachable_webui_and_a_bad_configuration(
    tmp_path: Path, records: JsonRecords
) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    run(configure(tmp_path, port), change("created", 40009))
    run(wrapper(tmp_path, tmp_path / "missing.conf"), change("created", 40009))
    bad = tmp_path / "bad.conf"
    bad.write_text("QBT_URL=http://127.0.0.1:1\nQBT_PREFERENCE=web_ui_port\n")
    run(wrapper(tmp_path, bad), change("created", 40009))
    failures = outputs(records)
    assert [status for _, status, _ in failures] == [4, 1, 1]
    assert "cannot reach" in failures[0][2]
    assert "cannot read" in failures[1][2]
    assert "QBT_PREFERENCE must be" in failures[2][2]


def test_the_example_is_executable() -> None:
    assert os.access(HOOK, os.X_OK)
    assert HOOK.read_text().startswith("#!/usr/bin/env python3\n")


def test_without_arguments_it_reads_the_default_configuration() -> None:
    default = Path("/etc/doublenat/qbittorrent-hook.conf")
    if default.exists():
        pytest.skip(f"{default} exists on this machine")
    env = {"PATH": "/usr/bin:/bin", "DOUBLENAT_EVENT": "created"}
    done = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"cannot read {default}" in done.stderr
