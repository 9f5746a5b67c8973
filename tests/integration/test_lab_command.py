"""`make lab` (the README's first command): the lab answers natpmpc and cleans up on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.needs import need_program

ROOT = Path(__file__).resolve().parents[2]


def test_make_lab_serves_natpmpc_and_leaves_nothing(tmp_path: Path) -> None:
    need_program("natpmpc", "make")
    venv = Path(sys.executable).parent.parent
    log = tmp_path / "lab.log"
    with log.open("w") as out:
        lab = subprocess.Popen(["make", "-s", "lab", f"VENV={venv}"], cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # make may (re)install the virtualenv first
        while "doublenat lab is running" not in log.read_text():
            assert lab.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        done = subprocess.run(["natpmpc", "-g", "127.0.0.1", "-a", "6881", "6881", "tcp", "60"],
                              capture_output=True, text=True, timeout=30)
        assert "Mapped public port 6881 protocol TCP to local port 6881" in done.stdout
        assert "router add rule" in log.read_text()
    finally:
        # Ctrl-C, as the lab itself gets it (make would add its own "Interrupt" line)
        children = subprocess.run(["pgrep", "-P", str(lab.pid)], capture_output=True,
                                  text=True).stdout.split()
        for child in children or [str(lab.pid)]:
            os.kill(int(child), signal.SIGINT)
        try:
            status = lab.wait(30)
        finally:
            if lab.poll() is None:
                os.killpg(lab.pid, signal.SIGKILL)
    text = log.read_text()
    assert status == 0, text
    assert "router remove rule" in text
    assert "doublenat rules left on the emulated router: 0" in text
