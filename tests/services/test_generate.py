"""Lossless generation through the gateway: greedy output equals plain decoding of the target."""

from __future__ import annotations

import threading

import grpc
import pytest

from specsplit.client import Client
from specsplit.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from specsplit.sampling.params import SamplingParams
from specsplit.serving.tier import TierHandle
from tests.services.conftest import Cluster, Reference, Streamed, greedy_pb, sample, stream_text

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "for i in range(10):\n    print("]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed_k", "adaptive_k"])
@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "sequential"])
@pytest.mark.parametrize("method", ["draft_model", "ngram"])
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
def test_greedy_equals_plain_decoding(cluster: Cluster, reference: Reference, method: str, pipeline: bool,
                                      adaptive: bool, round_mode: str) -> None:
    gw = cluster.gateway(method, pipeline, adaptive, round_mode=round_mode)
    drafted = accepted = pipelined = 0
    for prompt in PROMPTS:
        ref = reference.greedy(prompt, 48)
        out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(48))
        assert out.token_ids == ref.token_ids, prompt
        assert out.text == ref.text
        assert out.final.usage.completion_tokens == 48
        assert out.final.finish_reason == gateway_pb2.FINISH_REASON_LENGTH
        stats = out.final.stats
        assert stats.accepted_tokens <= stats.drafted_tokens
        assert stats.rounds == 48 - stats.accepted_tokens  # each round emits accepted + 1
        assert not stats.draft_fallback
        if not pipeline:
            assert stats.pipelined_rounds == 0
        drafted, accepted, pipelined = (drafted + stats.drafted_tokens, accepted + stats.accepted_tokens,
                                        pipelined + stats.pipelined_rounds)
    if adaptive:  # k follows measured costs, which say drafting does not pay here: equality is the point
        return
    assert drafted > 0, f"{method} drafted nothing: not speculating"
    if method == "draft_model":  # n-gram lookup rarely matches a random model's non-repeating output
        assert accepted > 0, "no drafted token was ever accepted"
        if pipeline:
            assert pipelined > 0, "no block was drafted ahead during verification"


@pytest.mark.timeout(60)
def test_plain_gateway_without_draft_tier_equals_plain_decoding(cluster: Cluster, reference: Reference) -> None:
    gw = cluster.gateway(None)
    ref = reference.greedy(PROMPTS[0], 24)
    out = stream_text(f"127.0.0.1:{gw.port}", PROMPTS[0], greedy_pb(24))
    assert out.token_ids == ref.token_ids
    assert out.final.stats.drafted_tokens == 0 and out.final.stats.rounds == 24


@pytest.mark.timeout(60)
def test_python_client_generate_matches_llm_shape(cluster: Cluster, reference: Reference) -> None:
    gw = cluster.gateway("draft_model")
    ref = reference.greedy(PROMPTS[1], 32)
    with Client(f"127.0.0.1:{gw.port}", timeout=30) as c:
        assert c.list_models() == [str(cluster.models.target)]
        out = c.generate(PROMPTS[1], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == ref.token_ids and out.text == ref.text
    assert out.finish_reason == "length"
    assert out.metrics.num_rounds > 0 and out.metrics.num_emitted_tokens == 32


@pytest.mark.timeout(60)
def test_unary_generate_equals_stream(cluster: Cluster, reference: Reference) -> None:
    gw = cluster.gateway("ngram")
    ref = reference.greedy(PROMPTS[2], 32)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        r = gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(text=PROMPTS[2], params=greedy_pb(32)), timeout=30)
    assert list(r.token_ids) == ref.token_ids and r.text == ref.text
    assert r.usage.completion_tokens == 32 and r.stats.rounds > 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_seeded_sampling_is_reproducible(cluster: Cluster, method: str) -> None:
    # adaptive k: were k chosen from measured timings, each run would draw different random numbers
    address = f"127.0.0.1:{cluster.gateway(method, adaptive=True).port}"

    def sampled(seed: int) -> list[int]:
        params = common_pb2.SamplingParams(max_tokens=40, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        out = stream_text(address, PROMPTS[0], params)
        assert len(out.token_ids) == 40
        return out.token_ids

    first = sampled(7)
    assert sampled(7) == first
    assert sampled(7) == first
    assert any(sampled(s) != first for s in (8, 9, 10))


def _batches(handle: TierHandle) -> dict[str, float]:
    """Cumulative batch-size histogram of a tier: steps with at most 1, 4 sessions, and all."""
    return {le: sample(handle, "specsplit_batch_size_bucket", {"le": le}) for le in ("1.0", "4.0", "+Inf")}


@pytest.mark.timeout(120)
def test_concurrent_streams_share_target_batches(cluster: Cluster, reference: Reference) -> None:
    gw = cluster.gateway("draft_model")
    address = f"127.0.0.1:{gw.port}"
    n = 16
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(n)]
    refs = [reference.greedy(p, 32) for p in prompts]
    before = {t.metrics.tier: _batches(t) for t in (cluster.target, cluster.drafts["draft_model"])}
    results: list[object] = [None] * n
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait(10)
        try:
            results[i] = stream_text(address, prompts[i], greedy_pb(32))
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    for i, (r, ref) in enumerate(zip(results, refs, strict=True)):
        assert isinstance(r, Streamed), f"stream {i}: {r!r}"
        assert r.token_ids == ref.token_ids, f"stream {i} differs from plain decoding"
        assert r.final is not None and r.final.usage.completion_tokens == 32
    for handle in (cluster.target, cluster.drafts["draft_model"]):
        after = _batches(handle)
        d = {le: after[le] - before[handle.metrics.tier][le] for le in after}
        assert d["+Inf"] - d["1.0"] > 0, f"no {handle.metrics.tier} step served more than one session: {d}"
        assert d["+Inf"] - d["4.0"] > 0, f"no {handle.metrics.tier} step served more than four sessions: {d}"


@pytest.mark.timeout(120)
def test_adaptive_k_does_not_count_a_draft_catch_up_as_draft_cost(cluster: Cluster, reference: Reference,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """After rounds with k = 0 the draft tier first catches up on the skipped tokens; that call
    must not be recorded as the cost of a draft step, or k would stay at 0 for good."""
    import asyncio

    from specsplit.serving.completion_loop import CompletionLoop
    from specsplit.speculation.adaptive import AdaptiveK, CostModel

    gw = cluster.gateway("draft_model", pipeline=False, adaptive=True)
    plan = iter([0] * 8 + [1] * 100)  # 8 rounds without drafting, then drafting resumes
    monkeypatch.setattr(AdaptiveK, "choose", lambda self, costs, limit: min(next(plan), limit))
    real_propose = CompletionLoop._propose

    async def propose(self, prefix_len, new_tokens, k, block_len=None):
        if len(new_tokens) > self.adaptive.k_max + 1:
            await asyncio.sleep(0.3)  # the catch-up: dearer than any draft step of the tiny model
        return await real_propose(self, prefix_len, new_tokens, k, block_len)

    monkeypatch.setattr(CompletionLoop, "_propose", propose)
    seen: list[float] = []
    real_observe = CostModel.observe_draft
    monkeypatch.setattr(CostModel, "observe_draft", lambda self, s: (seen.append(s), real_observe(self, s))[1])
    ref = reference.greedy(PROMPTS[0], 20)
    out = stream_text(f"127.0.0.1:{gw.port}", PROMPTS[0], greedy_pb(20))
    assert out.token_ids == ref.token_ids
    assert out.final.stats.drafted_tokens > 0  # drafting did resume
    assert seen, "plain draft steps after the catch-up are measured"
    assert max(seen) < 0.1, seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
def test_probe_after_plain_rounds_is_drafted_beside_the_verify(cluster: Cluster, reference: Reference,
                                                               monkeypatch: pytest.MonkeyPatch, round_mode: str) -> None:
    """With adaptive k at 0 (plain rounds), the draft falls behind. When drafting resumes (a
    probe), its catch-up and first block are drafted beside a verify, guessing the target's next
    token, never as a draft call between verifies that the round (and, at load, everyone's
    next step) waits for. Output stays token-identical."""
    from specsplit.serving.completion_loop import CompletionLoop
    from specsplit.speculation.adaptive import AdaptiveK

    gw = cluster.gateway("draft_model", pipeline=True, adaptive=True, round_mode=round_mode)
    plan = iter(([0] * 6 + [1] * 3) * 20)  # plain rounds, then a few drafting ones, over and over
    monkeypatch.setattr(AdaptiveK, "choose", lambda self, costs, limit: min(next(plan), limit))
    calls: list[tuple[int, int | None]] = []  # (tokens caught up, block_len) of each propose
    real_propose = CompletionLoop._propose

    async def propose(self, prefix_len, new_tokens, k, block_len=None):
        calls.append((len(new_tokens), block_len))
        return await real_propose(self, prefix_len, new_tokens, k, block_len)

    monkeypatch.setattr(CompletionLoop, "_propose", propose)
    for prompt in PROMPTS:
        ref = reference.greedy(prompt, 40)
        out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(40))
        assert out.token_ids == ref.token_ids, prompt
        assert out.final.stats.drafted_tokens > 0
    catch_ups = [(n, b) for n, b in calls if n > 1]
    assert catch_ups, calls
    assert all(b == 0 for n, b in catch_ups), calls  # beside a verify, guessing its token


@pytest.mark.timeout(120)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
def test_draft_session_opens_only_once_the_load_governor_allows_drafting(
        cluster: Cluster, reference: Reference, monkeypatch: pytest.MonkeyPatch, round_mode: str) -> None:
    """While the governor holds a load to plain rounds, a completion opens no draft session (no
    prefill, no KV on the draft tier for nothing); when drafting is allowed again mid-completion,
    the draft session opens beside a verify and drafting resumes. Output stays identical."""
    from specsplit.speculation.adaptive import AdaptiveK, LoadGovernor
    from tests.services.conftest import sample

    gw = cluster.gateway("draft_model", pipeline=True, adaptive=True, round_mode=round_mode)
    monkeypatch.setattr(AdaptiveK, "choose", lambda self, costs, limit: min(2, limit))  # draft whenever allowed
    draft = cluster.drafts["draft_model"]
    opened = sample(draft, "specsplit_sessions_opened_total")
    monkeypatch.setattr(LoadGovernor, "allows_drafting", lambda self: False)
    ref = reference.greedy(PROMPTS[0], 24)
    out = stream_text(f"127.0.0.1:{gw.port}", PROMPTS[0], greedy_pb(24))
    assert out.token_ids == ref.token_ids
    assert out.final.stats.drafted_tokens == 0
    assert sample(draft, "specsplit_sessions_opened_total") == opened  # held plain: never opened

    calls = iter(range(10**6))
    monkeypatch.setattr(LoadGovernor, "allows_drafting", lambda self: next(calls) >= 8)  # allowed after a few rounds
    out = stream_text(f"127.0.0.1:{gw.port}", PROMPTS[0], greedy_pb(24))
    assert out.token_ids == ref.token_ids
    assert out.final.stats.drafted_tokens > 0  # the lazily opened draft drafted
    assert sample(draft, "specsplit_sessions_opened_total") == opened + 1


@pytest.mark.timeout(120)
def test_pipelined_block_never_runs_past_max_tokens(cluster: Cluster, reference: Reference) -> None:
    """A block drafted ahead (during the previous verify) is cut to the tokens still allowed:
    every round then emits its accepted tokens plus one, the last one included."""
    gw = cluster.gateway("draft_model", pipeline=True)
    pipelined = 0
    for max_tokens in range(2, 15):
        ref = reference.greedy(PROMPTS[0], max_tokens)
        out = stream_text(f"127.0.0.1:{gw.port}", PROMPTS[0], greedy_pb(max_tokens))
        assert out.token_ids == ref.token_ids
        stats = out.final.stats
        assert stats.rounds == max_tokens - stats.accepted_tokens, (max_tokens, stats)
        pipelined += stats.pipelined_rounds
    assert pipelined > 0


@pytest.mark.timeout(60)
def test_grpc_prompt_logprobs_and_penalties(cluster: Cluster, reference: Reference) -> None:
    """The public proto carries what OpenAI's echo and penalties need: nothing is dropped."""
    params = greedy_pb(8)
    params.prompt_logprobs = 1
    params.logprobs = 1
    params.presence_penalty = 1.5
    params.logit_bias[17] = -100.0
    with grpc.insecure_channel(f"127.0.0.1:{cluster.gateway('draft_model').port}") as ch:
        r = gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(text=PROMPTS[0], params=params), timeout=30)
    prompt_ids = reference.tokenizer.encode(PROMPTS[0])
    assert len(r.prompt_logprobs) == len(prompt_ids) - 1 and len(r.logprobs) == 8
    assert all(lp.logprob <= 0 and len(lp.top_ids) >= 1 for lp in r.prompt_logprobs)
    ref = reference.llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                              presence_penalty=1.5, logit_bias={17: -100.0}),
                                 use_tqdm=False)[0].outputs[0]
    assert list(r.token_ids) == ref.token_ids
