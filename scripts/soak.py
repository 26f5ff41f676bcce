#!/usr/bin/env python3
"""Soak: minutes of steady load on the namespaced cluster, with rolling restarts.

Needs root (it reuses scripts/chaos.py's namespaces, links and load generator):

    sudo python3 scripts/soak.py --duration 600            # 10 minutes, tiny models
    sudo python3 scripts/soak.py --model smollm2-135m ...

Where chaos.py is about surviving violent faults, the soak is about what a long run shows:
throughput and latency that do not drift, memory that does not grow, sessions and KV that
always come back to zero, and rolling restarts (SIGTERM drain and SIGKILL in turn, one
replica at a time) that cost no request. Prints a JSON summary with per-minute buckets; the
exit code is 1 if any request was lost or wrong, or the gateway's memory kept growing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos  # noqa: E402 - a sibling script, not a package


def per_minute(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests started in each minute: how many, how many completed, tokens, latency p50/p99."""
    buckets: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        buckets.setdefault(int(r["t"] // 60), []).append(r)
    out = []
    for m in sorted(buckets):
        rs = buckets[m]
        ok = sorted(r["seconds"] for r in rs if r["status"] == "OK" and r["final"])
        out.append({"minute": m, "requests": len(rs), "completed": len(ok),
                    "tokens": sum(len(r["tokens"]) for r in rs),
                    "p50_s": round(ok[len(ok) // 2], 3) if ok else None,
                    "p99_s": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))], 3) if ok else None})
    return out


def main() -> int:
    ap = chaos.parser(__doc__.split("\n\n")[0], duration=600.0, interval=60.0, concurrency=12)
    ap.set_defaults(loss_pct=0.2, delay_ms=2.0, jitter_ms=1.0)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("soak.py needs root (ip netns, veth, tc/nft)", file=sys.stderr)
        return 2
    try:
        summary, events, results = chaos.run(a, gentle=True, rss_every_s=15.0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    summary["per_minute"] = per_minute(results)
    gw = summary["rss_mib"].get("gateway", {})
    # the gateway lives through the whole soak (replicas restart): its memory must level off
    summary["gateway_rss_growth_mib"] = round(gw.get("last", 0) - gw.get("first", 0), 1)
    summary["ok"] = summary["ok"] and summary["gateway_rss_growth_mib"] < 64
    print(json.dumps(summary, indent=2), flush=True)
    if a.out:
        a.out.write_text(json.dumps({"summary": summary, "events": events}, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
