"""OpenAI API fidelity: what a client asks for is honoured or refused, never dropped.

Driven by the official `openai` client where it has the shape, raw HTTP for the rest.
Greedy speculative runs are compared with plain decoding through the same tiers.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from specsplit import SamplingParams
from tests.services.conftest import Cluster, Reference
from tests.services.test_http import CHAT, client, http

openai = pytest.importorskip("openai")

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def _model(cluster: Cluster) -> str:
    return str(cluster.models.target)


# --- streams (issue 12.2) ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_without_include_usage_has_a_choice_in_every_chunk(cluster: Cluster, chat: bool) -> None:
    c = client(cluster.gateway("draft_model").http_port)
    if chat:
        stream = c.chat.completions.create(model=_model(cluster), messages=CHAT, max_tokens=10, stream=True, **GREEDY)
    else:
        stream = c.completions.create(model=_model(cluster), prompt=PROMPT, max_tokens=10, stream=True, **GREEDY)
    chunks = list(stream)
    assert all(len(ch.choices) == 1 for ch in chunks)  # `ch.choices[0]` never raises
    assert all(ch.usage is None and "usage" not in ch.model_extra for ch in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.model_extra["speculation"]["rounds"] >= 1  # the stats ride on the chunk that ends a choice


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_with_include_usage_ends_with_a_usage_chunk(cluster: Cluster, reference: Reference,
                                                           chat: bool) -> None:
    c = client(cluster.gateway("draft_model").http_port)
    opts = {"stream_options": {"include_usage": True}, "n": 2}
    if chat:
        stream = c.chat.completions.create(model=_model(cluster), messages=CHAT, max_tokens=6, stream=True,
                                           **GREEDY, **opts)
    else:
        stream = c.completions.create(model=_model(cluster), prompt=PROMPT, max_tokens=6, stream=True,
                                      **GREEDY, **opts)
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.model_extra["speculation"]["rounds"] >= 2
    assert all(len(ch.choices) == 1 and ch.usage is None for ch in body)
    assert sorted({ch.choices[0].index for ch in body}) == [0, 1]
    if not chat:
        assert last.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPT))


def test_stream_options_without_stream_is_refused(cluster: Cluster) -> None:
    status, _, err = http(cluster.gateway("draft_model").http_port, "/v1/completions",
                          {"prompt": "hi", "stream_options": {"include_usage": True}}, "POST")
    assert status == 400 and err["error"]["param"] == "stream_options"


# --- logprobs (issue 16.1) ---------------------------------------------------------------------------


def _completion_logprobs(cluster: Cluster, method: str | None, stream: bool) -> tuple[str, Any]:
    c = client(cluster.gateway(method).http_port)
    kw = {"model": _model(cluster), "prompt": PROMPT, "max_tokens": 16, "logprobs": 3, **GREEDY}
    if not stream:
        r = c.completions.create(**kw)
        return r.choices[0].text, r.choices[0].logprobs
    text, lps = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in c.completions.create(stream=True, **kw):
        text += ch.choices[0].text
        if ch.choices[0].logprobs is not None:
            for k in lps:
                lps[k] += getattr(ch.choices[0].logprobs, k)
    return text, type("L", (), lps)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_completion_logprobs_of_speculation_equal_plain_decoding(cluster: Cluster, reference: Reference,
                                                                method: str, stream: bool) -> None:
    text, lp = _completion_logprobs(cluster, method, stream)
    plain_text, plain = _completion_logprobs(cluster, None, stream)
    assert text == plain_text == reference.greedy(PROMPT, 16).text
    assert lp.tokens == plain.tokens and len(lp.tokens) == 16
    assert lp.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-4)
    for a, b in zip(lp.top_logprobs, plain.top_logprobs, strict=True):
        assert a.keys() == b.keys() and 1 <= len(a) <= 4  # fewer: byte tokens that decode alike
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert tok in top and max(top.values()) <= chosen + 1e-6  # greedy: the best of all
    # the target's distribution: in-process plain decoding gives the same numbers
    ref = reference.llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3),
                                 use_tqdm=False)[0].outputs[0]
    assert lp.token_logprobs == pytest.approx([d[t].logprob for t, d in zip(ref.token_ids, ref.logprobs,
                                                                            strict=True)], abs=1e-4)
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_with_top_logprobs(cluster: Cluster, stream: bool) -> None:
    c = client(cluster.gateway("draft_model").http_port)
    kw = {"model": _model(cluster), "messages": CHAT, "max_tokens": 10, "logprobs": True, "top_logprobs": 2,
          **GREEDY}
    if stream:
        text, content = "", []
        for ch in c.chat.completions.create(stream=True, **kw):
            text += ch.choices[0].delta.content or ""
            if ch.choices[0].logprobs is not None:
                content += ch.choices[0].logprobs.content
    else:
        r = c.chat.completions.create(**kw)
        text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    plain = client(cluster.gateway(None).http_port).chat.completions.create(**kw)
    assert len(content) == 10 and text == plain.choices[0].message.content
    assert [x.token for x in content] == [x.token for x in plain.choices[0].logprobs.content]
    for x, y in zip(content, plain.choices[0].logprobs.content, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4) and x.logprob <= 0
        assert len(x.top_logprobs) == 2 and x.top_logprobs[0].token == x.token
        assert x.top_logprobs[0].logprob >= x.top_logprobs[1].logprob
        assert bytes(x.bytes).decode() == x.token


def test_sampled_logprobs_are_those_of_the_processed_distribution(cluster: Cluster) -> None:
    """top_k = 2: every alternative beyond the two kept tokens has probability 0 (-9999 on the wire)."""
    r = client(cluster.gateway("draft_model").http_port).completions.create(
        model=_model(cluster), prompt=PROMPT, max_tokens=8, logprobs=4, temperature=0.8, seed=3,
        extra_body={"top_k": 2, "ignore_eos": True})
    for top in r.choices[0].logprobs.top_logprobs:
        kept = sorted(top.values(), reverse=True)
        assert math.log(1e-30) < kept[1] and kept[2] == kept[3] == -9999.0
        assert sum(math.exp(v) for v in kept[:2]) == pytest.approx(1.0, abs=1e-4)


# --- echo and prompt logprobs, several prompts (issue 16.2) ----------------------------------------


def _hf_prompt_logprobs(cluster: Cluster, ids: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(cluster.models.target, dtype=torch.float32).eval()
    with torch.inference_mode():
        lp = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # [L, V]
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_echo_returns_the_prompt_with_its_logprobs(cluster: Cluster, reference: Reference, stream: bool) -> None:
    ids = reference.tokenizer.encode(PROMPT)
    c = client(cluster.gateway("draft_model").http_port)
    kw = {"model": _model(cluster), "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 1, **GREEDY}
    if stream:
        chunks = list(c.completions.create(stream=True, **kw))
        text = "".join(ch.choices[0].text for ch in chunks)
        tokens, token_lps = [], []
        for ch in chunks:
            if ch.choices[0].logprobs is not None:
                tokens += ch.choices[0].logprobs.tokens
                token_lps += ch.choices[0].logprobs.token_logprobs
        assert chunks[0].choices[0].text == PROMPT  # the prompt comes first, alone
    else:
        r = c.completions.create(**kw)
        text, tokens, token_lps = r.choices[0].text, r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs
    assert text == PROMPT + reference.greedy(PROMPT, 3).text
    assert len(tokens) == len(ids) + 3 and token_lps[0] is None
    assert token_lps[1 : len(ids)] == pytest.approx(_hf_prompt_logprobs(cluster, ids), abs=1e-4)


@pytest.mark.timeout(120)
def test_a_list_of_prompts_gets_n_choices_each_indexed_as_openai(cluster: Cluster, reference: Reference) -> None:
    prompts = ["hello", "def fibonacci(n):", "The quick brown fox"]
    r = client(cluster.gateway("ngram").http_port).completions.create(
        model=_model(cluster), prompt=prompts, n=2, max_tokens=5, **GREEDY)
    assert [ch.index for ch in r.choices] == list(range(6))
    for ch in r.choices:
        assert ch.text == reference.greedy(prompts[ch.index // 2], 5).text
    assert r.usage.prompt_tokens == sum(len(reference.tokenizer.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 30
    ids = [reference.tokenizer.encode(p) for p in prompts[:2]]
    r = client(cluster.gateway("ngram").http_port).completions.create(
        model=_model(cluster), prompt=ids, max_tokens=4, echo=True, **GREEDY)
    assert [ch.text for ch in r.choices] == [reference.tokenizer.decode(i) + reference.greedy(p, 4).text
                                             for i, p in zip(ids, prompts, strict=False)]


# --- penalties and bias (issue 16.3) ----------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_penalties_and_logit_bias_are_applied_and_lossless(cluster: Cluster, reference: Reference,
                                                           method: str) -> None:
    prompt = "hello hello hello hello"
    fields = {"presence_penalty": 1.5, "frequency_penalty": 0.7, "logit_bias": {"5": 4.0, "17": -100}}
    c = client(cluster.gateway(method).http_port)
    r = c.completions.create(model=_model(cluster), prompt=prompt, max_tokens=24, **GREEDY,
                             **{k: v for k, v in fields.items()})
    plain = client(cluster.gateway(None).http_port).completions.create(
        model=_model(cluster), prompt=prompt, max_tokens=24, **GREEDY, **fields)
    ref = reference.llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                          presence_penalty=1.5, frequency_penalty=0.7,
                                                          logit_bias={5: 4.0, 17: -100.0}),
                                 use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == plain.choices[0].text == ref.text
    assert ref.text != reference.greedy(prompt, 24).text  # they really change the output
    assert 17 not in ref.token_ids


# --- chat content (issue 12.3) ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_chat_text_parts_and_developer_role_equal_plain_strings(cluster: Cluster, reference: Reference) -> None:
    c = client(cluster.gateway("ngram").http_port)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You write Python."}]},
             {"role": "user", "content": [{"type": "text", "text": "def fibonacci"}, {"type": "text", "text": "(n):"}]}]
    r = c.chat.completions.create(model=_model(cluster), messages=parts, max_tokens=8, **GREEDY)
    same = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def fibonacci\n(n):"}]
    assert r.choices[0].message.content == reference.chat(same, 8).text


# --- refusals and types (issues 12.4, 16.4) --------------------------------------------------------

REFUSED: dict[str, tuple[str, dict[str, Any], int, str]] = {
    "stream_not_bool": ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    "echo_not_bool": ("/v1/completions", {"prompt": "hi", "echo": 1}, 400, "echo"),
    "n_not_int": ("/v1/completions", {"prompt": "hi", "n": "2"}, 400, "n"),
    "temperature_not_number": ("/v1/completions", {"prompt": "hi", "temperature": "0"}, 400, "temperature"),
    "completion_logprobs_bool": ("/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    "chat_logprobs_int": ("/v1/chat/completions", {"messages": CHAT, "logprobs": 2}, 400, "logprobs"),
    "top_logprobs_without_logprobs": ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400,
                                      "top_logprobs"),
    "top_logprobs_too_many": ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
                              400, "top_logprobs"),
    "best_of": ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    "suffix": ("/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    "tools": ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
              400, "tools"),
    "tool_choice": ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "auto"}, 400, "tool_choice"),
    "json_mode": ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400,
                  "response_format"),
    "functions": ("/v1/chat/completions", {"messages": CHAT, "functions": []}, 400, "functions"),
    "image_part": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages"),
    "logit_bias_outside_vocab": ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, 400,
                                 "vocabulary"),
    "logit_bias_too_large": ("/v1/completions", {"prompt": "hi", "logit_bias": {"3": 101}}, 400, "logit_bias"),
    "presence_penalty_range": ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    "metadata_not_strings": ("/v1/completions", {"prompt": "hi", "metadata": {"a": 1}}, 400, "metadata"),
    "include_usage_not_bool": ("/v1/completions", {"prompt": "hi", "stream": True,
                                                   "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    "too_many_completions": ("/v1/completions", {"prompt": ["a"] * 5, "n": 16}, 400, "completions"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unhonoured_or_mistyped_fields_are_refused_by_name(cluster: Cluster, case: str) -> None:
    path, body, status, word = REFUSED[case]
    got, headers, err = http(cluster.gateway("draft_model").http_port, path, body, "POST")
    assert got == status, err
    assert headers["Content-Type"].startswith("application/json")
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["code"] == status
    assert word in err["error"]["message"] or word == err["error"]["param"], err


def test_fields_that_change_nothing_are_accepted(cluster: Cluster, reference: Reference) -> None:
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "user": "u1",
            "metadata": {"team": "a"}, "store": False, "service_tier": "auto", "best_of": 1, "echo": False,
            "suffix": None, "stream": False}
    status, _, r = http(cluster.gateway("draft_model").http_port, "/v1/completions", body, "POST")
    assert status == 200 and r["choices"][0]["text"] == reference.greedy("hello", 4).text


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/nothing", 404), ("POST", "/v2/completions", 404), ("GET", "/v1/completions", 405),
    ("DELETE", "/v1/chat/completions", 405), ("POST", "/v1/models", 405),
])
def test_unknown_routes_and_methods_answer_openai_json(cluster: Cluster, method: str, path: str, status: int) -> None:
    got, headers, err = http(cluster.gateway("draft_model").http_port, path, None, method)
    assert got == status and headers["Content-Type"].startswith("application/json")
    assert err["error"]["code"] == status and path in err["error"]["message"]
    if status == 405:
        assert headers["Allow"]
