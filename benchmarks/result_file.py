"""Where a benchmark's JSON goes: `<out>/<name>_<date>.json`, the date without ':' or '+'
(the GPU machines refuse such names when results come back)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_result(res: dict, out: str | Path, name: str) -> Path:
    """Write `res` (whose "date" is an ISO timestamp) under `out`; returns the path."""
    path = Path(out) / f"{name}_{res['date'].replace(':', '').replace('+0000', 'Z')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}", file=sys.stderr)
    return path
