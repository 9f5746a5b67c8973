"""Requirements of tests that need root, network namespaces or Debian packages.

Outside CI a missing requirement skips the test with its reason; under CI=true it fails
the test, so such tests can never be skipped silently where they must run.
"""

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(condition: bool, reason: str) -> None:
    """Skip (or, in CI, fail) the calling test unless `condition` holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (network namespaces, nftables)")


def need_program(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None, f"needs {name} (run `make deps`)")
