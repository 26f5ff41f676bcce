"""`specsplit_round_part_seconds` is a per-round histogram: one verify sample per round."""

from __future__ import annotations

import pytest

from tests.services.conftest import Cluster, greedy_pb, stream_text
from tests.services.test_http import metrics, value


def count(port: int, part: str) -> float:
    try:
        return value(metrics(port), "specsplit_round_part_seconds_count", part=part)
    except KeyError:  # no sample yet
        return 0.0


@pytest.mark.timeout(60)
def test_round_part_seconds_counts_one_verify_sample_per_round(cluster: Cluster) -> None:
    gw = cluster.gateway("draft_model", pipeline=False)
    before = {part: count(gw.http_port, part) for part in ("verify", "draft")}
    out = stream_text(f"127.0.0.1:{gw.port}", "def fibonacci(n):", greedy_pb(40))
    rounds = out.final.stats.rounds  # type: ignore[union-attr]
    assert rounds > 1
    assert count(gw.http_port, "verify") - before["verify"] == rounds
    assert count(gw.http_port, "draft") - before["draft"] == rounds - 1  # the last round drafts nothing
    fam = metrics(gw.http_port)
    assert value(fam, "specsplit_rounds_total") >= rounds


@pytest.mark.timeout(60)
def test_the_load_governors_decision_is_exported(cluster: Cluster) -> None:
    """`specsplit_drafting_allowed` on the gateway (gateway rounds) and the target tier (direct
    rounds): 1 while adaptive-k completions may draft, 0 while the governor holds them plain."""
    from prometheus_client import CollectorRegistry

    from specsplit.serving.metrics import governor_gauge
    from specsplit.speculation.adaptive import LoadGovernor
    from tests.services.conftest import sample

    gw = cluster.gateway("draft_model")
    assert value(metrics(gw.http_port), "specsplit_drafting_allowed") == 1.0  # idle: nothing to decide
    assert sample(cluster.target, "specsplit_drafting_allowed") == 1.0
    gov, reg = LoadGovernor(), CollectorRegistry()
    governor_gauge(reg, lambda: gov.allowed)
    gov.active, gov.drafting = 8, False
    assert reg.get_sample_value("specsplit_drafting_allowed") == 0.0
    gov.active = 1  # below two completions the governor stays out of the way
    assert reg.get_sample_value("specsplit_drafting_allowed") == 1.0
