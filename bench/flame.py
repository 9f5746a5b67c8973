"""Summaries of a py-spy collapsed-stack file (`py-spy record -f raw`): where the samples
are, by function (self and inclusive), so a bench note can quote them.

    python -m bench.flame profile.txt [--top 25] [--seconds 6 --rate 500]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def frame_name(frame: str, keep_line: bool = False) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    line = f":{match['line']}" if keep_line and match["line"] else ""
    return f"{match['func']} ({file}{line})"


def summarise(path: Path, top: int = 25) -> dict[str, object]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return {
        "samples": total,
        "self": self_time.most_common(top),
        "inclusive": inclusive.most_common(top),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flame")
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    summary = summarise(args.path, args.top)
    total = summary["samples"] or 1
    print(f"{summary['samples']} samples")
    for title in ("self", "inclusive"):
        print(f"\n{title}:")
        for name, count in summary[title]:  # type: ignore[union-attr]
            print(f"  {count / total:6.1%}  {count:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
