"""Fixtures for the fuzz tests: the services tests' in-process cluster, plus outcome checks.

Every fuzzed call must end in OK or a status that blames the caller, with a message; never
INTERNAL / UNKNOWN (a server bug), UNAVAILABLE (a crashed tier) or a deadline (a hang).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from tests.services import conftest as services
from tests.services.conftest import Cluster, sample

# the services tests' fixtures, re-registered for this package (its own instances)
aio = services.aio
models = services.models
reference = services.reference
cluster = services.cluster
_one_torch_thread = services._one_torch_thread

# statuses a well-behaved server may answer a random request with
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION}


def check_status(e: grpc.RpcError) -> None:
    code = e.code()  # type: ignore[attr-defined]
    assert code in PROPER, f"improper status {code}: {e.details()}"  # type: ignore[attr-defined]
    assert e.details(), f"{code} without a message"  # type: ignore[attr-defined]


def rss_bytes() -> int:
    """Resident memory of this process (the servers run in it), from /proc."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def assert_idle(c: Cluster, timeout: float = 10.0) -> None:
    """No session, no KV block left on any tier; no gateway holds a tier session or a slot."""
    c.wait_idle(timeout)
    for t in c.tiers():
        assert sample(t, "specsplit_queue_depth") == 0
    for g in c._gateways.values():
        pools = [g.core.targets] + ([g.core.drafts] if g.core.drafts is not None else [])
        assert all(n == 0 for p in pools for n in p.load.values()), "a gateway kept a tier session open"
        assert g.core._running == 0 and g.core._waiting == 0


@pytest.fixture(scope="package")
def memory_baseline(cluster: Cluster) -> Iterator[dict[str, int]]:
    """RSS once the cluster has served a request, for the growth check at the end."""
    return {"rss": rss_bytes()}
