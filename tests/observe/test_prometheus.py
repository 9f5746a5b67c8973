"""A real Prometheus (Debian's) scraping the lab daemon, and the README's alert rules.

Prometheus runs on loopback with a port, a storage directory and a configuration of its
own (1 s scrapes of the lab daemon's METRICS_ADDR, the README's rules loaded), and the
test asks it through its HTTP API, as Grafana would.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from doublenat.lab.run import Lab
from doublenat.protocol.natpmp import Result
from tests.freeport import free_tcp_port
from tests.lab_support import MakeLab
from tests.needs import need_program
from tests.observe.support import metrics_addr
from tests.probe import probe

ROOT = Path(__file__).resolve().parents[2]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DEADLINE = 60.0  # seconds to wait for Prometheus to start, scrape, evaluate


def readme_alert_rules() -> str:
    """The alert rules block of the README, as an operator would copy it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Alert rules", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    [rules] = [b for b in blocks if b.startswith("groups:")]
    return rules


def test_promtool_checks_the_readme_rules(tmp_path: Path) -> None:
    need_program("promtool")
    rules = tmp_path / "doublenat.rules.yml"
    rules.write_text(readme_alert_rules())
    done = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


# promtool's unit tests: the rules fire when they should, and not before.
RULE_TESTS = """
rule_files: [doublenat.rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'doublenat_router_up{job="doublenat",instance="nat:9815"}'
        values: '1 1 0 0 0 0 0 0 0'
      - series: 'doublenat_upstream_up{job="doublenat",instance="nat:9815"}'
        values: '1 0 0 0 0 0'
      - series: 'doublenat_upstream_losses_total{job="doublenat",instance="nat:9815"}'
        values: '0 0 1 1 1'
      - series: 'doublenat_hook_failures_total{job="doublenat",instance="nat:9815"}'
        values: '0 0 0 0 0'
    alert_rule_test:
      - eval_time: 6m
        alertname: DoublenatNoRouter
        exp_alerts: []
      - eval_time: 7m
        alertname: DoublenatNoRouter
        exp_alerts:
          - exp_labels: {severity: critical, job: doublenat, instance: "nat:9815"}
            exp_annotations:
              summary: "doublenat on nat:9815 has had no router for 5 minutes"
              description: "New mappings get result 3. `doublenat status` or /healthz says why."
      - eval_time: 3m
        alertname: DoublenatGatewayDown
        exp_alerts:
          - exp_labels: {severity: critical, job: doublenat, instance: "nat:9815"}
            exp_annotations:
              summary: "the VPN gateway does not answer doublenat on nat:9815"
              description: "Is the VPN tunnel up? Valid leases are still renewed meanwhile."
      - eval_time: 3m
        alertname: DoublenatUpstreamLosses
        exp_alerts:
          - exp_labels: {severity: warning, job: doublenat, instance: "nat:9815"}
            exp_annotations:
              summary: "the VPN gateway lost doublenat's mappings (VPN reconnect?)"
              description: "1 losses in 15 minutes; external ports may have changed."
      - eval_time: 4m
        alertname: DoublenatHookFailures
        exp_alerts: []
"""


def test_the_readme_rules_fire_when_they_should(tmp_path: Path) -> None:
    need_program("promtool")
    (tmp_path / "doublenat.rules.yml").write_text(readme_alert_rules())
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    done = subprocess.run(["promtool", "test", "rules", "tests.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------ the real server


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def api(self, path: str, **params: str) -> dict[str, object]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with _NO_PROXY.open(f"{self.url}{path}{query}", timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]  # type: ignore[no-any-return]

    def value(self, query: str) -> float | None:
        """The single value of an instant query; None while it has no result."""
        result = self.api("/api/v1/query", query=query)["result"]
        assert isinstance(result, list)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, query: str, expected: float) -> float | None:
        deadline = time.monotonic() + DEADLINE
        value = self.value(query)
        while value != expected and time.monotonic() < deadline:
            time.sleep(0.5)
            value = self.value(query)
        return value


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[object]:
    started: list[Prometheus] = []

    def start(lab: Lab) -> Prometheus:
        need_program("prometheus")
        (tmp_path / "doublenat.rules.yml").write_text(readme_alert_rules())
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files: [doublenat.rules.yml]\n"
            "scrape_configs:\n  - job_name: doublenat\n    static_configs:\n"
            f"      - targets: ['{metrics_addr(lab)}']\n")
        port = free_tcp_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                stdout=out, stderr=subprocess.STDOUT)
        server = Prometheus(f"http://127.0.0.1:{port}", process, log)
        started.append(server)
        deadline = time.monotonic() + DEADLINE
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with _NO_PROXY.open(f"{server.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return server
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)


def test_prometheus_scrapes_the_lab_daemon(make_lab: MakeLab, prometheus_for) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab(settings={"METRICS_ADDR": "127.0.0.1:0"})
    assert lab.daemon is not None
    with probe(lab.daemon.address) as client:
        for port in (6881, 6882, 6883):
            assert client.tcp(port, port).result == Result.SUCCESS
        assert client.udp(6881, 6881).result == Result.SUCCESS
        assert client.tcp(6883, 0, 0).result == Result.SUCCESS  # deleted again
    server = prometheus_for(lab)
    assert server.wait_value('up{job="doublenat"}', 1) == 1, server.log.read_text()
    assert server.wait_value("sum(doublenat_mappings)", 3) == 3
    assert server.value('doublenat_mappings{protocol="udp"}') == 1
    # 3 TCP creations and a TCP delete (opcode 2), 1 UDP creation (opcode 1)
    assert server.value('doublenat_requests_total{opcode="2",result="success"}') == 4
    assert server.value('sum(doublenat_requests_total{opcode="1"})') == 1
    assert server.value("doublenat_router_up") == 1
    assert server.value("doublenat_router_call_seconds_count") >= 4  # type: ignore[operator]
    assert server.value('doublenat_router_call_seconds_bucket{le="+Inf"}') == \
        server.value("doublenat_router_call_seconds_count")
    # A counter that moves is seen moving.
    with probe(lab.daemon.address) as client:
        assert client.udp(6882, 6882).result == Result.SUCCESS
    assert server.wait_value('sum(doublenat_requests_total{opcode="1"})', 2) == 2
    assert server.wait_value("sum(doublenat_mappings)", 4) == 4
    # The README's rules are loaded and evaluated against the live series.
    groups = server.api("/api/v1/rules")["groups"]
    assert isinstance(groups, list)
    [group] = [g for g in groups if g["name"] == "doublenat"]
    assert len(group["rules"]) == 5
    assert all(rule["health"] in ("ok", "unknown") for rule in group["rules"]), group
