"""Asking the lab daemon's HTTP endpoint, and running `doublenat` beside it."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from doublenat.lab.run import Lab
from doublenat.settings import SETTINGS

DOUBLENAT = Path(sys.executable).with_name("doublenat")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def metrics_addr(lab: Lab) -> str:
    assert lab.daemon is not None and lab.daemon.observer is not None
    host, port = lab.daemon.observer.bound
    return f"{host}:{port}"


def get(lab: Lab, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of one GET; 4xx and 5xx are answers too."""
    try:
        with _NO_PROXY.open(f"http://{metrics_addr(lab)}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def samples(lab: Lab) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, _, body = get(lab, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def run_doublenat(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """The installed command, with only the given settings in its environment."""
    names = {spec.env for spec in SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(settings)
    return subprocess.run([str(DOUBLENAT), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def own_loopback() -> str:
    """A loopback address of this test process's own, for natpmpc (which only talks to
    port 5351): from the pid, so parallel runs on one machine do not meet."""
    pid = os.getpid()
    return f"127.{100 + (pid >> 16) % 150}.{(pid >> 8) & 255}.{max(2, pid & 255)}"
