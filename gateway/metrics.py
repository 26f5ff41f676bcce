"""The gateway's Prometheus metrics: requests, tokens, and speculation statistics since start."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from specsplit.outputs import SpecMetrics
from specsplit.serving.completion_loop import Delta
from specsplit.serving.metrics import ROUND_BUCKETS

# SpecMetrics field -> the counter that adds it up over every finished completion
SPEC_COUNTERS = {
    "num_drafted_tokens": ("specsplit_drafted_tokens_total", "Tokens proposed by the draft tier"),
    "num_accepted_tokens": ("specsplit_accepted_tokens_total", "Drafted tokens accepted"),
    "num_rounds": ("specsplit_rounds_total", "Verify rounds"),
    "num_pipelined_rounds": ("specsplit_pipelined_rounds_total",
                             "Rounds served by a block drafted ahead: a guess of the tree matched the verdict (hits)"),
    "num_drafted_ahead_rounds": ("specsplit_drafted_ahead_rounds_total",
                                 "Rounds for which a block was drafted ahead beside the previous verify"),
    "num_failovers": ("specsplit_failovers_total", "Sessions moved to another replica"),
    "num_preemptions": ("specsplit_preemptions_total",
                        "Sessions a tier refused or dropped for lack of KV memory, re-opened later"),
}


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("specsplit_requests_total", "Requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("specsplit_tokens_total", "Tokens by kind", ["kind"], registry=r)
        self.spec = {f: Counter(name, text, registry=r) for f, (name, text) in SPEC_COUNTERS.items()}
        self.acceptance = Gauge("specsplit_acceptance_rate", "Accepted / drafted tokens (since start)", registry=r)
        self.branch_hit_rate = Gauge("specsplit_branch_hit_rate",
                                     "Pipelined / drafted-ahead rounds: how often the tree of guesses held (since start)",
                                     registry=r)
        self.mean_len = Gauge("specsplit_mean_accepted_length", "Tokens per round (since start)", registry=r)
        self.round_seconds = Histogram("specsplit_round_part_seconds", "Per-round time by part", ["part"],
                                       registry=r, buckets=ROUND_BUCKETS)
        self.queue_depth = Gauge("specsplit_queue_depth", "Requests waiting for admission", registry=r)
        self.sessions = Gauge("specsplit_active_sessions", "Completions running", registry=r)
        self.replica_sessions = Gauge("specsplit_replica_sessions", "Live sessions per replica",
                                      ["tier", "replica"], registry=r)
        self.tier_failures = Counter("specsplit_tier_failures_total",
                                     "Tier sessions that broke (round timeout, replica gone, ...), by status",
                                     ["tier", "code"], registry=r)
        self.total = SpecMetrics()  # every finished completion since start: the gauges' source

    def observe_round(self, d: Delta) -> None:
        """One sample per round and part; the last round, which drafts nothing, adds only its verify."""
        t = d.timing
        if t is None:
            return
        self.round_seconds.labels("verify").observe(t.verify_wait_ns / 1e9)
        if d.finish_reason is None:
            self.round_seconds.labels("draft").observe(t.draft_wait_ns / 1e9)
            overhead = max(0, t.round_ns - t.verify_wait_ns - t.draft_wait_ns)
            self.round_seconds.labels("overhead").observe(overhead / 1e9)

    def record(self, m: SpecMetrics, failures: dict[tuple[str, str], int] | None = None) -> None:
        """Add one completion's statistics (finished or failed) and its broken tier sessions."""
        for (tier, code), n in (failures or {}).items():
            self.tier_failures.labels(tier, code).inc(n)
        self.total.add(m)
        for f, counter in self.spec.items():
            counter.inc(getattr(m, f))
        self.acceptance.set(self.total.acceptance_rate)
        self.mean_len.set(self.total.mean_accepted_length)
        t = self.total
        self.branch_hit_rate.set(t.num_pipelined_rounds / t.num_drafted_ahead_rounds if t.num_drafted_ahead_rounds else 0.0)
