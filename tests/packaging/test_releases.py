"""The unit and integration suites under each Debian release's own python3 and libraries.

The package depends on Debian's python3-gevent, python3-click, python3-pythonjsonlogger and
python3-prometheus-client, whose versions differ from PyPI's newest that the virtualenv
runs (bookworm: Python 3.11, gevent 22.10, python-json-logger 2.0, click 8.1.3; trixie:
Python 3.13, gevent 24.11, python-json-logger 3.3, click 8.1.8). So the suites also run in
an amd64 chroot of each release, where `apt-get install ./doublenat_*.deb` pulled those
libraries in, with routeros-api from the package's private copy and Debian's
python3-pytest and python3-hypothesis (tests/packaging/prepare.py: `run_suite`, started in
the background at collection; which tests and why: `SUITE_ARGS` there). CI=true inside,
so nothing skips there either.
"""

from __future__ import annotations

import pytest

from tests.packaging import chroots
from tests.packaging.conftest import Prepared

pytestmark = [pytest.mark.deb, pytest.mark.slow]


@pytest.mark.parametrize("release", [
    pytest.param(release, marks=pytest.mark.prepare(f"suite:{release}"))
    for release in chroots.RELEASES])
def test_suites_pass_under_the_releases_python(release: str, prepared: Prepared) -> None:
    status = prepared.wait(f"suite:{release}", timeout=3600)
    summary = status["summary"]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, \
        summary
    versions = status["versions"]
    print(f"\n{release}: {summary}; suite {status['suite_seconds']} s, install "
          f"{status['install_seconds']} s; {versions}")
    python = versions["python3"]
    assert python.startswith({"bookworm": "3.11.", "trixie": "3.13."}[release]), versions
