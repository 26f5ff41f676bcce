"""Where a served round's time goes, from the tiers' trace events (`SPECSPLIT_TRACE`).

Every process of a run writes `trace-<pid>.jsonl` (specsplit/trace.py) on one clock. At
batch 1 a round is one chain of events across the processes: merged in time order, the time from
each event to the next is one segment of the round (the request's transit, the draft tier's
hand-off to its step thread, the step, the hand-back, ...). This script lists the segments that
occur most, with their median and mean, so a gap between two tiers is seen as such.

    python3 benchmarks/trace_report.py TRACE_FOLDER [--start NS --end NS] [--top 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(folder: Path) -> list[dict[str, Any]]:
    """Every event of every process in `folder`, in time order."""
    events = []
    for path in sorted(folder.glob("trace-*.jsonl")):
        with path.open() as f:
            events.extend(json.loads(line) for line in f if line.strip())
    events.sort(key=lambda e: e["t"])
    return events


def segments(events: list[dict[str, Any]], start: int = 0, end: int = 1 << 62, top: int = 40
             ) -> list[dict[str, Any]]:
    """From each event to the next (any process) within [start, end]: count, median and mean µs.

    Meaningful at batch 1, where one chain of events is running at a time; the share of the
    window each segment covers says which ones matter."""
    inside = [e for e in events if start <= e["t"] <= end]
    gaps: dict[tuple[str, str], list[int]] = defaultdict(list)
    for a, b in zip(inside, inside[1:], strict=False):
        gaps[(a["event"], b["event"])].append(b["t"] - a["t"])
    span = (inside[-1]["t"] - inside[0]["t"]) if len(inside) > 1 else 0
    rows = [{"from": a, "to": b, "count": len(v), "median_us": statistics.median(v) / 1e3,
             "mean_us": statistics.fmean(v) / 1e3, "share": sum(v) / span if span else 0.0}
            for (a, b), v in gaps.items()]
    rows.sort(key=lambda r: -r["share"])
    return rows[:top]


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'from':28s} {'to':28s} {'count':>6s} {'median µs':>10s} {'mean µs':>9s} {'share':>6s}")
    for r in rows:
        print(f"{r['from']:28s} {r['to']:28s} {r['count']:6d} {r['median_us']:10.1f} {r['mean_us']:9.1f} "
              f"{r['share']:6.1%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--start", type=int, default=0, help="perf_counter_ns of the window's start")
    ap.add_argument("--end", type=int, default=1 << 62)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    print_rows(segments(load(a.folder), a.start, a.end, a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
