"""Fixtures of the end-to-end bed (tests/e2e/bed.py).

One bed per upstream, release and test module, shared by the tests of that module:
`miniupnpd` (Debian's, RFC semantics, doublenat in `internal` mode) and `proton` (the lab's
gateway emulator forwarding with nftables, doublenat in `external` mode), each with the
natpmpc (and miniupnpd) of every Debian release doublenat supports: the host's own, and the
others' from their chroots (trixie's natpmpc 20230423 checks the reply's internal port and
public address; its miniupnpd is 2.3.9). After each test the LAN client's mappings are
deleted and the bed is checked clean, so tests do not see each other's state. A failing
test's report carries the bed's logs and nft rulesets.

Without root or the Debian programs the tests skip with the reason; under CI=true they fail
instead, and so does any other skip in this directory.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.bed import Bed
from tests.needs import IN_CI, need_program, need_root
from tests.packaging.chroots import RELEASES, host_arch, host_release

UPSTREAMS = ("miniupnpd", "proton")
HOST = host_release() or "host"
# The host's programs first, then each other release's from its chroot (built in the
# background from the start of the session: tests/packaging/conftest.py).
BED_RELEASES = (HOST, *(r for r in RELEASES if r != HOST))


def _requirements(upstream: str, release: str) -> None:
    need_root()
    need_program("ip", "nft")
    if release != HOST:
        need_program("debootstrap", "unshare", "nsenter")  # the programs are the chroot's
        return
    need_program("natpmpc")
    if upstream == "miniupnpd":
        need_program("miniupnpd")


def _param(upstream: str, release: str) -> object:
    marks = [] if release == HOST else [pytest.mark.prepare(f"chroot:{release}-{host_arch()}")]
    return pytest.param((upstream, release), id=f"{upstream}-{release}", marks=marks)


@pytest.fixture(scope="module",
                params=[_param(u, r) for r in BED_RELEASES for u in UPSTREAMS])
def bed(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    # A test may choose its bed with an indirect parameter: the upstream alone (the host's
    # release), or (upstream, release).
    upstream, release = ((request.param, HOST) if isinstance(request.param, str)
                         else request.param)
    _requirements(upstream, release)
    workdir = tmp_path_factory.mktemp(f"bed-{upstream}-{release}")
    with Bed(upstream, workdir, release=release) as started:
        yield started
    assert not started.namespaces_left(), "namespaces of the bed survived its teardown"


@pytest.fixture(autouse=True)
def _clean_between_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    if "bed" not in request.fixturenames:
        yield
        return
    bed: Bed = request.getfixturevalue("bed")
    yield
    if bed.doublenat is None or not bed.doublenat.alive():
        return  # the test stopped it and did not restart it: it failed already
    for proto in ("tcp", "udp"):
        bed.natpmpc("-a", "0", "0", proto, "0")  # delete all of the client's mappings
    left = bed.leftovers()
    assert not any(left.values()), f"mappings survived a delete-all: {left}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    expected = hasattr(report, "wasxfail")
    if report.skipped and IN_CI and not expected and call.when in ("setup", "call"):
        # An end-to-end test that cannot run under CI is a failure, whatever skipped it.
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is a failure here: {report.longrepr}"
    if report.failed:
        bed = getattr(item, "funcargs", {}).get("bed")
        if isinstance(bed, Bed):
            report.sections.append((f"bed diagnostics ({call.when})", bed.diagnostics()))
