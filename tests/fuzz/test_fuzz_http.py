"""Random JSON (and non-JSON) to every HTTP route of the gateway (hypothesis).

Bodies are random JSON values, objects shaped like OpenAI requests with random values
(mostly valid, so many reach generation), and raw bytes. Every answer is a 2xx or a 4xx
with an OpenAI-shaped error; never a 5xx (the tiers are up) and never a dropped
connection. A streamed answer that fails mid-way must say why in an error event.
"""

from __future__ import annotations

import http.client
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import assert_idle, rss_bytes
from tests.services.conftest import Cluster, Reference

# SPECSPLIT_FUZZ_EXAMPLES=5000 for a long run; 120 keeps CI fast
FUZZ = settings(max_examples=int(os.environ.get("SPECSPLIT_FUZZ_EXAMPLES", "120")), deadline=None,
                database=None, suppress_health_check=list(HealthCheck))
OTHER_ROUTES = [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/health"), ("GET", "/v1/completions"),
                ("POST", "/v1/models"), ("POST", "/v1/nope"), ("PUT", "/v1/chat/completions"), ("DELETE", "/health")]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def mostly(valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """About three in four draws valid (hypothesis favours the first branch of one_of otherwise)."""
    return st.integers(0, 3).flatmap(lambda i: wild if i == 3 else valid)


PROMPT = mostly(st.sampled_from(["hello", "def fibonacci(n):", ["hello"], [1, 2, 3]]),
                st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 400), max_size=8),
                          st.lists(st.text(max_size=5), max_size=2), JSON))
MESSAGES = mostly(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                    "content": st.text(max_size=30)}), min_size=1, max_size=3),
    st.one_of(st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), JSON, max_size=3), max_size=3),
              JSON))
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.just("nope"), JSON), "stream": st.one_of(st.booleans(), JSON),
    "max_tokens": mostly(st.integers(1, 6), JSON), "max_completion_tokens": mostly(st.integers(-1, 6), JSON),
    "temperature": mostly(st.floats(0, 2), JSON), "top_p": mostly(st.floats(0, 1), JSON),
    "top_k": mostly(st.integers(-2, 50), JSON), "min_p": JSON, "n": mostly(st.integers(0, 2), JSON),
    "stop": mostly(st.text(max_size=5), JSON), "seed": mostly(st.integers(-(2**64), 2**64), JSON),
    "logprobs": mostly(st.one_of(st.booleans(), st.integers(0, 3)), JSON),
    "top_logprobs": mostly(st.integers(0, 25), JSON), "repetition_penalty": JSON, "ignore_eos": JSON,
    "stop_token_ids": mostly(st.lists(st.integers(-1, 400), max_size=3), JSON), "user": JSON,
    "stream_options": JSON, "bogus_field": JSON,
}


@st.composite
def openai_body(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": draw(MESSAGES)} if chat else {"prompt": draw(PROMPT)}
    body["max_tokens"] = draw(st.integers(1, 6))  # may be replaced below
    body["stream"] = draw(st.booleans())
    for f in draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3)):
        body[f] = draw(FIELDS[f])
    if draw(st.integers(0, 9)) == 0:
        del body["messages" if chat else "prompt"]
    return body


def bodies(chat: bool) -> st.SearchStrategy[bytes]:
    shaped = openai_body(chat).map(lambda b: json.dumps(b).encode())
    return mostly(shaped, st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40), st.just(b""),
                                    st.just(b"{" * 5000 + b"}" * 5000), st.just(b"[" * 100_000)))


def request(port: int, method: str, path: str, body: bytes | None, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def check(status: int, data: bytes, method: str, path: str) -> None:
    assert status < 500, f"{method} {path}: HTTP {status}: {data[:300]!r}"
    if status >= 400:  # every route, 404 and 405 included: OpenAI's error shape
        err = json.loads(data)["error"]
        assert err["message"] and err["code"] == status, err
    if status == 200 and data.startswith(b"data: "):  # a stream: complete, and no failure hidden in it
        assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
        assert b'"error"' not in data, data[-500:]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_completion_routes_answer_random_bodies_properly(cluster: Cluster, reference: Reference, path: str) -> None:
    gw = cluster.gateway("draft_model", max_tokens_limit=8)

    @FUZZ
    @given(body=bodies(chat="chat" in path))
    def one(body: bytes) -> None:
        status, data = request(gw.http_port, "POST", path, body)
        check(status, data, "POST", path)

    one()
    status, data = request(gw.http_port, "POST", "/v1/completions",
                           json.dumps({"prompt": "hello", "max_tokens": 6, "temperature": 0}).encode())
    assert status == 200 and json.loads(data)["choices"][0]["text"] == reference.greedy("hello", 6).text
    assert_idle(cluster)


@pytest.mark.timeout(60)
def test_other_routes_and_methods_answer_properly(cluster: Cluster) -> None:
    gw = cluster.gateway("draft_model", max_tokens_limit=8)

    @settings(FUZZ, max_examples=40)
    @given(route=st.sampled_from(OTHER_ROUTES), body=st.one_of(st.none(), bodies(chat=False)))
    def one(route: tuple[str, str], body: bytes | None) -> None:
        status, data = request(gw.http_port, route[0], route[1], body)
        check(status, data, *route)

    one()


def test_memory_stays_bounded_over_the_fuzz_run(cluster: Cluster, memory_baseline: dict[str, int]) -> None:
    """Runs last in this package: every session closed, KV free, and RSS within a bound."""
    assert_idle(cluster)
    grown = rss_bytes() - memory_baseline["rss"]
    assert grown < 256 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB during the fuzz run"
