"""The gateway's OpenAI-compatible HTTP API, driven by the official `openai` client, and /metrics."""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.services.conftest import Cluster, Reference

openai = pytest.importorskip("openai")

CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def fibonacci(n):"}]


def client(port: int) -> Any:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)


def http(port: int, path: str, body: bytes | dict | list | None = None, method: str | None = None
         ) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON or text) of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read()
    text = raw.decode()
    return status, headers, json.loads(text) if headers.get("Content-Type", "").startswith("application/json") else text


def metrics(port: int) -> dict[str, Any]:
    """name -> metric family from a /metrics page."""
    status, headers, text = http(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    for f in families.values():
        for s in f.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{sample_name}{labels} not exported")


@pytest.mark.timeout(60)
def test_openai_client_streams_a_chat_completion(cluster: Cluster, reference: Reference) -> None:
    gw = cluster.gateway("draft_model")
    ref = reference.chat(CHAT, 24)
    stream = client(gw.http_port).chat.completions.create(
        model=str(cluster.models.target), messages=CHAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1].usage
    prompt = reference.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert usage.completion_tokens == 24
    assert usage.prompt_tokens == len(reference.tokenizer.encode(prompt, add_special_tokens=False))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_openai_client_non_streamed_completion(cluster: Cluster, reference: Reference, method: str) -> None:
    gw = cluster.gateway(method)
    ref = reference.greedy("The quick brown fox", 20)
    r = client(gw.http_port).completions.create(
        model=str(cluster.models.target), prompt="The quick brown fox", max_tokens=20, temperature=0,
        extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20 and r.usage.total_tokens == 20 + r.usage.prompt_tokens
    spec = r.model_extra["speculation"]
    assert spec["rounds"] >= 1 and spec["drafted_tokens"] >= spec["accepted_tokens"] >= 0


@pytest.mark.timeout(60)
def test_openai_client_chat_non_streamed_and_models(cluster: Cluster, reference: Reference) -> None:
    gw = cluster.gateway("ngram")
    c = client(gw.http_port)
    models = c.models.list()
    assert [m.id for m in models.data] == [str(cluster.models.target)]
    assert models.data[0].model_extra["speculative"] == "ngram"
    r = c.chat.completions.create(model=models.data[0].id, messages=CHAT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == reference.chat(CHAT, 12).text
    assert r.choices[0].message.role == "assistant"


GATEWAY_METRICS = {
    "specsplit_requests": "counter", "specsplit_tokens": "counter", "specsplit_drafted_tokens": "counter",
    "specsplit_accepted_tokens": "counter", "specsplit_rounds": "counter", "specsplit_pipelined_rounds": "counter",
    "specsplit_acceptance_rate": "gauge", "specsplit_mean_accepted_length": "gauge",
    "specsplit_round_part_seconds": "histogram", "specsplit_queue_depth": "gauge",
    "specsplit_active_sessions": "gauge", "specsplit_replica_sessions": "gauge", "specsplit_failovers": "counter",
}
TIER_METRICS = {
    "specsplit_queue_depth": "gauge", "specsplit_kv_cache_usage_ratio": "gauge", "specsplit_active_sessions": "gauge",
    "specsplit_sessions_opened": "counter", "specsplit_sessions_closed": "counter", "specsplit_steps": "counter",
    "specsplit_batch_size": "histogram", "specsplit_step_seconds": "histogram", "specsplit_errors": "counter",
}


@pytest.mark.timeout(60)
def test_metrics_of_gateway_and_tiers(cluster: Cluster) -> None:
    gw = cluster.gateway("draft_model")
    client(gw.http_port).completions.create(model=str(cluster.models.target), prompt="def fibonacci(n):",
                                            max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
    fam = metrics(gw.http_port)
    for name, kind in GATEWAY_METRICS.items():
        assert name in fam and fam[name].type == kind, name
    assert value(fam, "specsplit_requests_total", outcome="ok") >= 1
    assert value(fam, "specsplit_tokens_total", kind="completion") >= 32
    assert value(fam, "specsplit_tokens_total", kind="prompt") >= 1
    drafted, accepted = value(fam, "specsplit_drafted_tokens_total"), value(fam, "specsplit_accepted_tokens_total")
    assert drafted > 0 and value(fam, "specsplit_acceptance_rate") == pytest.approx(accepted / drafted)
    assert 0 < value(fam, "specsplit_acceptance_rate") <= 1
    assert value(fam, "specsplit_mean_accepted_length") >= 1
    for part in ("draft", "verify", "overhead"):
        assert value(fam, "specsplit_round_part_seconds_count", part=part) >= 1
    assert value(fam, "specsplit_round_part_seconds_sum", part="verify") > 0
    assert value(fam, "specsplit_queue_depth") == 0 and value(fam, "specsplit_active_sessions") == 0
    target_addr = f"127.0.0.1:{cluster.target.port}"
    assert value(fam, "specsplit_replica_sessions", tier="target", replica=target_addr) == 0
    assert value(fam, "specsplit_failovers_total") == 0

    # the tiers' own /metrics ports (the n-gram draft runs without one)
    for handle in (cluster.target, cluster.drafts["draft_model"]):
        assert handle.metrics_port > 0
        fam = metrics(handle.metrics_port)
        for name, kind in TIER_METRICS.items():
            assert name in fam and fam[name].type == kind, (handle.metrics.tier, name)
        steps = value(fam, "specsplit_steps_total")
        assert steps > 0 and steps == value(fam, "specsplit_batch_size_count")
        assert value(fam, "specsplit_step_seconds_count") >= steps  # failed steps (bad input) are timed too
        assert value(fam, "specsplit_sessions_opened_total") >= 1
        assert value(fam, "specsplit_active_sessions") == 0 and value(fam, "specsplit_kv_cache_usage_ratio") == 0
        assert value(fam, "specsplit_queue_depth") == 0


@pytest.mark.timeout(30)
def test_kv_usage_metric_is_live_during_a_stream(cluster: Cluster) -> None:
    gw = cluster.gateway("draft_model")
    stream = client(gw.http_port).completions.create(model=str(cluster.models.target), prompt="hello " * 50,
                                                     max_tokens=300, temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True})
    for _ in itertools.islice(stream, 3):
        pass
    for handle in (cluster.target, cluster.drafts["draft_model"]):
        fam = metrics(handle.metrics_port)
        assert value(fam, "specsplit_kv_cache_usage_ratio") > 0 and value(fam, "specsplit_active_sessions") == 1
    stream.close()  # the client hangs up: both tiers free the session


HTTP_ERRORS: dict[str, tuple[str, bytes | dict | list, int, str]] = {
    "bad_json": ("/v1/completions", b"{not json", 400, "JSON"),
    "not_an_object": ("/v1/completions", [1, 2], 400, "object"),
    "unknown_field": ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    "no_prompt": ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    "empty_prompt": ("/v1/completions", {"prompt": ""}, 400, "empty"),
    "mixed_prompts": ("/v1/completions", {"prompt": ["a", [1, 2]]}, 400, "prompt"),
    "token_id_out_of_range": ("/v1/completions", {"prompt": [1, 99999]}, 400, "vocabulary"),
    "over_long_prompt": ("/v1/completions", {"prompt": [5] * 600}, 400, "limit"),
    "negative_temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    "top_p_zero": ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    "max_tokens_not_a_number": ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    "max_tokens_zero": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    "unknown_model": ("/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404, "gpt-17"),
    "unknown_model_streamed": ("/v1/completions", {"model": "gpt-17", "prompt": "hi", "stream": True}, 404, "gpt-17"),
    "chat_messages_not_a_list": ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    "chat_no_messages": ("/v1/chat/completions", {"messages": []}, 400, "empty"),
    "chat_bad_role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    "chat_bad_temperature_streamed": ("/v1/chat/completions", {"messages": CHAT, "temperature": -1, "stream": True},
                                      400, "temperature"),
    "chat_unknown_model": ("/v1/chat/completions", {"model": "gpt-17", "messages": CHAT}, 404, "gpt-17"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(HTTP_ERRORS))
def test_http_rejects_bad_requests_with_json_errors(cluster: Cluster, reference: Reference, case: str) -> None:
    path, body, status, word = HTTP_ERRORS[case]
    gw = cluster.gateway("draft_model")
    got, headers, err = http(gw.http_port, path, body, "POST")
    assert got == status, err
    assert headers["Content-Type"].startswith("application/json")
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["code"] == status
    assert word.lower() in err["error"]["message"].lower(), err
    # still serving
    ok, _, body = http(gw.http_port, "/v1/completions",
                       {"prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}, "POST")
    assert ok == 200 and body["choices"][0]["text"] == reference.greedy("hello", 5).text


@pytest.mark.timeout(60)
def test_http_full_queue_is_429(cluster: Cluster) -> None:
    gw = cluster.gateway("draft_model", max_concurrent_requests=1, max_queued_requests=0)
    c = client(gw.http_port)
    stream = c.completions.create(model=str(cluster.models.target), prompt="hello", max_tokens=400, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # the only slot is taken
    status, headers, err = http(gw.http_port, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, "POST")
    assert status == 429 and headers.get("Retry-After") == "1"
    assert err["error"]["type"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=str(cluster.models.target), messages=CHAT, max_tokens=2, stream=True)
    stream.close()
    deadline = time.monotonic() + 10
    while True:  # the slot comes back once the gateway notices the hang-up
        status, _, _ = http(gw.http_port, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, "POST")
        if status == 200:
            break
        assert status == 429 and time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_http_unknown_path_and_health(cluster: Cluster) -> None:
    gw = cluster.gateway("draft_model")
    status, _, err = http(gw.http_port, "/v1/nothing")
    assert status == 404 and err["error"]["code"] == 404
    assert http(gw.http_port, "/health")[2] == {"status": "ok"}
    status, _, body = http(gw.http_port, "/v1/models")
    assert status == 200 and body["data"][0]["id"] == str(cluster.models.target)
