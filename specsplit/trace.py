"""Timestamps of a round's steps in every process, to find where a served round's time goes.

Off unless `SPECSPLIT_TRACE` names a folder: then each process keeps its last events in memory
(`mark`) and writes them to `<folder>/trace-<pid>.jsonl` at exit. The clock is
`time.perf_counter_ns`, which is CLOCK_MONOTONIC on Linux: one clock for every process of a
host, so the tiers' events line up (`benchmarks/trace_report.py` reads them). A disabled mark
costs one global lookup; the round timing every delta carries (`RoundTiming`) stays the
always-on measure.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections import deque
from pathlib import Path

FOLDER = os.environ.get("SPECSPLIT_TRACE", "")
ENABLED = bool(FOLDER)
_events: deque[tuple[int, str, str, int]] = deque(maxlen=400_000)


def mark(event: str, key: int = 0) -> None:
    """Record `event` (for session or round `key`) now, on this thread."""
    if ENABLED:
        _events.append((time.perf_counter_ns(), threading.current_thread().name, event, key))


def dump(folder: str | os.PathLike[str] | None = None) -> Path | None:
    """Write this process's events (one JSON object per line); None when tracing is off."""
    folder = folder or FOLDER
    if not folder or not _events:
        return None
    pid = os.getpid()
    path = Path(folder) / f"trace-{pid}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for t, thread, event, key in list(_events):
            f.write(json.dumps({"t": t, "pid": pid, "thread": thread, "event": event, "key": key}) + "\n")
    return path


if ENABLED:
    atexit.register(dump)
