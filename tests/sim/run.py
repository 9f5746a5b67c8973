"""Long runs of the simulation: `python -m tests.sim.run --steps 1000000 --seed 1`.

Seeds seed, seed+1, ... each run `--per-seed` steps until `--steps` steps in all; the
first violation stops the run (unless --keep-going) and prints how to replay it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from tests.sim.harness import SimFailure, run_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.run", description=__doc__)
    parser.add_argument("--steps", type=int, default=1_000_000, help="steps in all")
    parser.add_argument("--seed", type=int, default=1, help="first seed")
    parser.add_argument("--per-seed", type=int, default=5000, help="steps per seed")
    parser.add_argument("--keep-going", action="store_true", help="go on after a violation")
    parser.add_argument("--digest", action="store_true", help="print each seed's fingerprint")
    parser.add_argument("--unmask", action="append", default=[], metavar="ISSUE",
                        help="inject the faults of a known issue too (tests.sim.world)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every step")
    args = parser.parse_args(argv)

    started = time.monotonic()
    totals: Counter[str] = Counter()
    failures: list[SimFailure] = []
    done, seed = 0, args.seed
    while done < args.steps:
        steps = min(args.per_seed, args.steps - done)
        try:
            sim = run_seed(seed, steps, verbose=args.verbose, unmask=args.unmask)
        except SimFailure as failure:
            failures.append(failure)
            print(f"VIOLATION {failure}", file=sys.stderr, flush=True)
            done += failure.step
            if not args.keep_going:
                break
        else:
            totals.update(sim.stats)
            done += steps
            if args.digest:
                print(f"seed {seed}: {sim.digest()}", flush=True)
        seed += 1
    elapsed = time.monotonic() - started
    seeds = f"{args.seed}..{seed - 1}" if seed - 1 > args.seed else str(args.seed)
    print(f"{done} steps, seeds {seeds}, {elapsed:.1f} s, {done / max(elapsed, 1e-9):.0f} "
          f"steps/s, {len(failures)} violation(s)")
    for name, count in sorted(totals.items()):
        print(f"  {name}: {count}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
