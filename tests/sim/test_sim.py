"""A short run of the seeded simulation (tests/sim/harness.py); `make simulate` runs a
million steps. A failure names its seed and the command that replays it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from doublenat.engine import mapper as mapper_module
from tests.sim.harness import SimFailure, run_seed

SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)
STEPS = 1500
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("seed", SEEDS)
def test_invariants_hold_through_a_seeded_run(seed: int) -> None:
    sim = run_seed(seed, STEPS)  # SimFailure (seed, replay command, last steps) if not
    assert sim.stats["steps"] == STEPS
    assert sim.stats["requests"] > STEPS // 4  # it did drive the engine
    assert sim.stats["shutdowns"] >= 1


def test_the_runs_exercise_every_kind_of_event() -> None:
    """Across the short run's seeds, each kind of fault and check happened (a change
    that silently stopped injecting one would otherwise pass)."""
    totals: dict[str, int] = {}
    for seed in SEEDS[:4]:
        for name, count in run_seed(seed, STEPS).stats.items():
            totals[name] = totals.get(name, 0) + count
    for name in ("kills", "router restarts", "gateway restarts", "admin removals",
                 "healthy reconciliations", "converged", "shutdowns", "answered at once",
                 "result 0", "result 3"):
        assert totals.get(name, 0) > 0, (name, totals)


def test_a_seed_replays_exactly() -> None:
    assert run_seed(11, 800).digest() == run_seed(11, 800).digest()
    assert run_seed(11, 800).digest() != run_seed(12, 800).digest()


def test_a_seed_replays_exactly_in_another_process_and_hash_seed() -> None:
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-m", "tests.sim.run", "--steps", "800", "--per-seed", "800",
             "--seed", "11", "--digest"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
        digests.add(next(line for line in out.stdout.splitlines()
                         if line.startswith("seed 11:")))
    assert len(digests) == 1, digests
    assert digests == {f"seed 11: {run_seed(11, 800).digest()}"}


def test_a_planted_defect_is_caught_and_its_seed_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The invariants can fail: a removal that forgets to tell the router (the record
    goes, the rule stays) is reported with the seed that shows it."""

    def forgetful_remove(self, doomed):  # type: ignore[no-untyped-def]
        self.table.removed(doomed)
        return True

    monkeypatch.setattr(mapper_module.Mapper, "_remove", forgetful_remove)
    with pytest.raises(SimFailure) as failure:
        for seed in SEEDS:
            run_seed(seed, STEPS)
    message = str(failure.value)
    assert f"seed {failure.value.seed}" in message and "no record owns it" in message
    assert f"--seed {failure.value.seed}" in message  # the replay command
