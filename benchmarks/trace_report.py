"""Where a served round's time goes, from the tiers' trace events (`SPECSPLIT_TRACE`).

Every process of a run writes `trace-<pid>.jsonl` (specsplit/trace.py) on one clock. At
batch 1 a round is one chain of events across the processes: merged in time order, the time from
each event to the next is one segment of the round (the request's transit, the draft tier's
hand-off to its step thread, the step, the hand-back, ...). This script lists the segments that
occur most, with their median and mean, so a gap between two tiers is seen as such.

    python3 benchmarks/trace_report.py TRACE_FOLDER [--start NS --end NS] [--top 30]
    python3 benchmarks/trace_report.py --plot OUT.png RESULT.json:MODE[:LABEL] [...]

The second form draws the rounds of part-6 rows (`gpu_services_bench.py` run with the trace on)
as stacked bars, ms per round by kind of segment: the rows side by side, before and after a change.
Sequential rounds only: in a pipelined one the draft's events interleave with the verify's, so the
segments no longer follow one chain.
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


# kind of each segment, by the events at its ends (first match wins); the rest is "other"
KINDS = (
    ("target step", lambda a, b: a in ("verify.forward", "verify.launched") and b in ("verify.launched", "verify.accepted")),
    ("head block: host", lambda a, b: (a, b) == ("head.chain", "head.launched")),
    ("head block: GPU", lambda a, b: (a, b) == ("head.launched", "head.synced")),
    ("transit", lambda a, b: (a, b) in (("loop.draft_send", "draft.received"), ("draft.reply", "loop.draft_answer"))),
    ("draft tier code", lambda a, b: a.startswith(("draft.", "head.")) and b.startswith(("draft.", "head."))),
    ("target hand-offs", lambda a, b: a.startswith(("verify.", "target.")) or b.startswith(("verify.", "target."))),
    ("loop", lambda a, b: a.startswith("loop.") and b.startswith("loop.")),
)


def kind(seg: dict[str, Any]) -> str:
    return next((name for name, match in KINDS if match(seg["from"], seg["to"])), "other")


def per_round_ms(segs: list[dict[str, Any]], rounds: int) -> dict[str, float]:
    """ms per round of each kind of segment (mean x count over the rounds)."""
    out: dict[str, float] = {}
    for s in segs:
        out[kind(s)] = out.get(kind(s), 0.0) + s["mean_us"] * s["count"] / 1e3 / max(1, rounds)
    return out


def plot(specs: list[str], path: Path) -> Path:
    """Stacked bars of ms per round by kind, one bar per RESULT.json:MODE[:LABEL] (its part-6 row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for spec in specs:
        file, mode, *name = spec.split(":")
        res = json.loads(Path(file).read_text())
        row = next(r for r in res["part6"]["rows"] if r["mode"] == mode)
        label = f"{name[0] if name else Path(file).stem.split('_')[-1]} {mode}\n" \
                f"{row['over_inprocess_plain']:.2f}x in-process plain"
        bars.append((label, per_round_ms(row["trace_segments"], row["rounds"])))
    kinds = [k for k, _ in KINDS] + ["other"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.8 * len(bars)))
    for i, (_, ms) in enumerate(bars):
        left = 0.0
        for j, k in enumerate(kinds):
            v = ms.get(k, 0.0)
            ax.barh(i, v, left=left, color=plt.cm.tab10(j), label=k if i == 0 else None)
            left += v
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("ms per round (segments of the trace, batch 1)")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'from':28s} {'to':28s} {'count':>6s} {'median µs':>10s} {'mean µs':>9s} {'share':>6s}")
    for r in rows:
        print(f"{r['from']:28s} {r['to']:28s} {r['count']:6d} {r['median_us']:10.1f} {r['mean_us']:9.1f} "
              f"{r['share']:6.1%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="+", help="the trace folder; with --plot, RESULT.json:MODE specs")
    ap.add_argument("--plot", type=Path, default=None, help="draw these part-6 rows' rounds into this PNG")
    ap.add_argument("--start", type=int, default=0, help="perf_counter_ns of the window's start")
    ap.add_argument("--end", type=int, default=1 << 62)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    if a.plot is not None:
        print(f"wrote {plot(a.folder, a.plot)}")
        return 0
    print_rows(segments(load(Path(a.folder[0])), a.start, a.end, a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
