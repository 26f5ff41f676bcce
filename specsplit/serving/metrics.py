"""Prometheus metrics, one registry per server so several servers can share a process (tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

ROUND_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class TierMetrics:
    """The load signals every tier exports (and an HPA would scale on)."""

    def __init__(self, tier: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tier = tier
        self.queue_depth = Gauge("specsplit_queue_depth", "Requests waiting for a batch slot or admission", registry=r)
        self.kv_usage = Gauge("specsplit_kv_cache_usage_ratio", "Share of KV cache blocks in use", registry=r)
        self.sessions = Gauge("specsplit_active_sessions", "Open sessions (streams)", registry=r)
        self.sessions_opened = Counter("specsplit_sessions_opened_total", "Sessions opened", registry=r)
        self.sessions_closed = Counter("specsplit_sessions_closed_total", "Sessions closed (incl. cancelled)", registry=r)
        self.steps = Counter("specsplit_steps_total", "Batched steps run", registry=r)
        self.batch_size = Histogram("specsplit_batch_size", "Sessions per batched step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.step_seconds = Histogram("specsplit_step_seconds", "Time of one batched step", registry=r,
                                      buckets=ROUND_BUCKETS)
        self.errors = Counter("specsplit_errors_total", "Requests answered with an error status", ["code"], registry=r)

    def bind(self, queue_depth: Callable[[], float], kv_usage: Callable[[], float], sessions: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.kv_usage.set_function(kv_usage)
        self.sessions.set_function(sessions)


def governor_gauge(registry: CollectorRegistry, allowed: Callable[[], bool]) -> Gauge:
    """The load governor's decision, where a server runs rounds (target tier, gateway)."""
    g = Gauge("specsplit_drafting_allowed", "1 while the load governor lets adaptive-k completions draft "
              "(it measured drafting to pay at the current load), 0 while it holds them to plain rounds",
              registry=registry)
    g.set_function(lambda: float(allowed()))
    return g


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, threading.Thread] | None:
    """Expose /metrics on its own HTTP port (draft and target tiers); port 0 = off."""
    if port <= 0:
        return None
    return start_http_server(port, addr=host, registry=registry)
