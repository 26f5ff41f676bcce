import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from specsplit.sampling import (
    SamplingBatch,
    SamplingParams,
    extend_counts_with_drafts,
    extend_seen_with_drafts,
    logprobs_of,
    output_counts,
    process_logits,
    processed_logprobs,
    sample,
    sample_sparse,
    seen_mask,
    topk_truncate,
)

V = 12


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def reference_penalised(logits: np.ndarray, p: SamplingParams, seen: set[int], output: list[int]) -> np.ndarray:
    """One row's bias and penalties, the obvious way (vLLM's order)."""
    x = logits.astype(np.float64).copy()
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in seen:
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


def reference_probs(logits: np.ndarray, p: SamplingParams, seen: set[int], output: list[int] = ()) -> np.ndarray:
    """One row, step by step, the obvious way (vLLM's order)."""
    x = reference_penalised(logits, p, seen, list(output))
    if p.greedy:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1.0
        return out
    x = x / p.temperature
    if p.top_k > 0:
        kth = np.sort(x)[::-1][min(p.top_k, len(x)) - 1]
        x[x < kth] = -np.inf
    if p.top_p < 1.0:
        probs = _softmax(x)
        order = np.argsort(-probs)
        keep, total = [], 0.0
        for i in order:
            keep.append(i)
            total += probs[i]
            if total >= p.top_p:
                break
        mask = np.full_like(x, -np.inf)
        mask[keep] = 0.0
        x = x + mask
    if p.min_p > 0.0:
        probs = _softmax(x)
        x[probs < p.min_p * probs.max()] = -np.inf
    return _softmax(x)


def _check_against_reference(params, logits, histories, outputs=None):
    """histories: prompt + output per row (repetition penalty); outputs: output only."""
    outputs = outputs if outputs is not None else [[]] * len(params)
    batch = SamplingBatch.from_params(params, "cpu")
    seen = seen_mask([torch.tensor(h, dtype=torch.int64) for h in histories], V, "cpu")
    counts = output_counts([torch.tensor(o, dtype=torch.int64) for o in outputs], V, "cpu")
    probs = process_logits(logits, batch, seen, counts)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    for i, p in enumerate(params):
        ref = reference_probs(logits[i].numpy(), p, set(histories[i]), outputs[i])
        np.testing.assert_allclose(probs[i].numpy(), ref, atol=1e-5)


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_temperature_matches_reference():
    params = [SamplingParams(temperature=t) for t in (0.3, 1.0, 2.5)]
    _check_against_reference(params, _logits(3), [[]] * 3)


def test_top_k_matches_reference():
    params = [SamplingParams(top_k=k) for k in (1, 3, -1, 0, 50)]
    _check_against_reference(params, _logits(5), [[]] * 5)


def test_top_p_matches_reference():
    params = [SamplingParams(top_p=p, temperature=0.8) for p in (0.1, 0.5, 0.9, 1.0)]
    _check_against_reference(params, _logits(4), [[]] * 4)


def test_min_p_matches_reference():
    params = [SamplingParams(min_p=m) for m in (0.0, 0.05, 0.3, 1.0)]
    _check_against_reference(params, _logits(4), [[]] * 4)


def test_repetition_penalty_matches_reference():
    params = [SamplingParams(repetition_penalty=r) for r in (1.0, 1.3, 0.7)]
    histories = [[0, 1, 2], [0, 1, 2, 5, 5, 7], [3, 4, 11]]
    _check_against_reference(params, _logits(3), histories)


def test_repetition_penalty_moves_greedy_argmax():
    logits = torch.tensor([[3.0, 2.0, -1.0, 0.0]])
    batch = SamplingBatch.from_params([SamplingParams(temperature=0, repetition_penalty=2)], "cpu")
    seen = seen_mask([torch.tensor([0])], 4, "cpu")
    probs = process_logits(logits, batch, seen)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_penalty_without_seen_is_an_error():
    batch = SamplingBatch.from_params([SamplingParams(repetition_penalty=1.2)], "cpu")
    with pytest.raises(ValueError, match="seen"):
        process_logits(_logits(1), batch)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.builds(
            SamplingParams,
            temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
            top_k=st.sampled_from([-1, 0, 1, 2, 5, 20]),
            top_p=st.sampled_from([0.2, 0.6, 0.95, 1.0]),
            min_p=st.sampled_from([0.0, 0.1, 0.5]),
            repetition_penalty=st.sampled_from([1.0, 0.8, 1.5]),
            presence_penalty=st.sampled_from([0.0, 0.7, -1.0]),
            frequency_penalty=st.sampled_from([0.0, 0.4, -0.5]),
            logit_bias=st.sampled_from([None, {3: 5.0}, {0: -100.0, 7: 2.5}]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 2**31),
)
def test_mixed_batch_matches_reference(params, seed):
    n = len(params)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, V, size=rng.integers(0, 4)).tolist() for _ in range(n)]
    outputs = [rng.integers(0, V, size=rng.integers(0, 5)).tolist() for _ in range(n)]
    histories = [a + b for a, b in zip(prompts, outputs, strict=True)]
    _check_against_reference(params, _logits(n, seed), histories, outputs)


def test_presence_and_frequency_penalties_match_reference():
    params = [SamplingParams(presence_penalty=1.5), SamplingParams(frequency_penalty=0.8),
              SamplingParams(presence_penalty=-0.5, frequency_penalty=2.0, temperature=0.6)]
    outputs = [[1, 1, 4], [2, 2, 2, 9], [5, 6, 5]]
    # the prompt (here 0 and 3) counts for the repetition penalty only, never for these two
    histories = [[0, 3] + o for o in outputs]
    _check_against_reference(params, _logits(3), histories, outputs)


def test_logit_bias_matches_reference_and_bans_a_token():
    logits = _logits(2)
    params = [SamplingParams(logit_bias={int(logits[0].argmax()): -100.0, 2: 1.0}), SamplingParams(logit_bias={"4": 3})]
    assert params[1].logit_bias == {4: 3.0}  # JSON keys are strings
    _check_against_reference(params, logits, [[]] * 2)
    probs = process_logits(logits, SamplingBatch.from_params(params, "cpu"))
    assert probs[0, logits[0].argmax()] < 1e-30


def test_output_penalties_and_logit_bias_move_greedy_argmax():
    logits = torch.tensor([[3.0, 2.0, -1.0, 0.0]] * 3)
    params = [SamplingParams(temperature=0, presence_penalty=2.0), SamplingParams(temperature=0, frequency_penalty=0.6),
              SamplingParams(temperature=0, logit_bias={3: 3.5})]
    counts = output_counts([torch.tensor([0]), torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64)], 4, "cpu")
    probs = process_logits(logits, SamplingBatch.from_params(params, "cpu"), counts=counts)
    assert probs.argmax(1).tolist() == [1, 1, 3]


def test_output_penalty_without_counts_is_an_error():
    batch = SamplingBatch.from_params([SamplingParams(frequency_penalty=0.5)], "cpu")
    with pytest.raises(ValueError, match="counts"):
        process_logits(_logits(1), batch)


def test_processed_logprobs_are_log_of_what_rows_sample_from():
    logits = _logits(3)
    params = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0, top_k=3, logit_bias={1: 4.0}),
              SamplingParams(min_p=0.2)]
    batch = SamplingBatch.from_params(params, "cpu")
    lp = processed_logprobs(logits, batch)
    probs = process_logits(logits, batch)
    torch.testing.assert_close(lp[[0, 2]].exp(), probs[[0, 2]])  # sampled rows: the same distribution
    assert torch.isinf(lp[0]).sum() == V - 3  # cut by top-k
    # a greedy row: the biased distribution at temperature 1, untruncated (not its one-hot)
    ref = reference_penalised(logits[1].numpy(), params[1], set(), [])
    np.testing.assert_allclose(lp[1].numpy(), ref - np.log(np.exp(ref).sum()), atol=1e-5)


def test_greedy_rows_are_one_hot_at_argmax():
    logits = _logits(4)
    params = [SamplingParams(temperature=0, top_k=2), SamplingParams(top_p=0.5)] * 2
    probs = process_logits(logits, SamplingBatch.from_params(params, "cpu"))
    for i in (0, 2):
        expected = torch.zeros(V)
        expected[logits[i].argmax()] = 1.0
        assert torch.equal(probs[i], expected)
    assert (probs[1] > 0).sum() < V  # the sampled row was truncated
    all_greedy = SamplingBatch.from_params([SamplingParams(temperature=0)] * 4, "cpu")
    assert all_greedy.all_greedy
    assert torch.equal(process_logits(logits, all_greedy).argmax(1), logits.argmax(1))


def test_low_precision_logits_give_float32_probs():
    batch = SamplingBatch.from_params([SamplingParams(top_k=3)] * 2, "cpu")
    probs = process_logits(_logits(2).bfloat16(), batch)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_process_logits_leaves_input_untouched():
    logits = _logits(2)
    before = logits.clone()
    batch = SamplingBatch.from_params([SamplingParams(temperature=0.5, top_k=2)] * 2, "cpu")
    process_logits(logits, batch)
    assert torch.equal(logits, before)


def test_from_params_flags_ignore_truncation_on_greedy_rows():
    batch = SamplingBatch.from_params(
        [SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.1), SamplingParams()], "cpu"
    )
    assert not (batch.any_top_k or batch.any_top_p or batch.any_min_p or batch.any_penalty)
    assert batch.any_greedy and not batch.all_greedy
    assert batch.top_k.tolist() == [5, 0]
    assert batch.temperature.tolist() == [0.0, 1.0]


def test_repeat_interleave_and_select():
    g = torch.Generator().manual_seed(1)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=4, seed=9)]
    batch = SamplingBatch.from_params(params, "cpu", generators=[None, g])
    rep = batch.repeat_interleave(3)
    assert rep.is_greedy.tolist() == [True] * 3 + [False] * 3
    assert rep.top_k.tolist() == [0, 0, 0, 4, 4, 4]
    assert rep.generators == [None, None, None, g, g, g]
    assert rep.any_top_k and not rep.all_greedy
    sub = rep.select(torch.tensor([0, 2]))
    assert sub.all_greedy and not sub.any_top_k and sub.generators == [None, None]
    sub = rep.select(torch.tensor([5]))
    assert sub.any_top_k and not sub.any_greedy and sub.generators == [g]


def test_seeded_requests_get_generators():
    batch = SamplingBatch.from_params([SamplingParams(seed=3), SamplingParams()], "cpu")
    assert isinstance(batch.generators[0], torch.Generator) and batch.generators[1] is None


def test_seen_mask_matches_loop():
    histories = [
        torch.tensor([1, 1, 4]),
        torch.tensor([], dtype=torch.int64),
        torch.tensor([0, 11, -1, 99]),
    ]
    seen = seen_mask(histories, V, "cpu")
    expected = torch.zeros(3, V, dtype=torch.bool)
    for i, h in enumerate(histories):
        for t in h.tolist():
            if 0 <= t < V:
                expected[i, t] = True
    assert torch.equal(seen, expected)
    assert seen_mask([], V, "cpu").shape == (0, V)


def test_extend_seen_with_drafts_matches_loop():
    seen = torch.zeros(2, V, dtype=torch.bool)
    seen[0, 3] = True
    drafts = torch.tensor([[5, 6, 5], [7, -1, -1]])
    out = extend_seen_with_drafts(seen, drafts)
    assert out.shape == (2, 4, V)
    for b in range(2):
        for j in range(4):
            expected = seen[b].clone()
            for t in drafts[b, :j].tolist():
                if t >= 0:
                    expected[t] = True
            assert torch.equal(out[b, j], expected), (b, j)


def test_output_counts_and_extension_match_loop():
    outputs = [torch.tensor([1, 1, 4]), torch.tensor([], dtype=torch.int64), torch.tensor([0, 11, -1, 99, 0])]
    counts = output_counts(outputs, V, "cpu")
    expected = torch.zeros(3, V)
    for i, o in enumerate(outputs):
        for t in o.tolist():
            if 0 <= t < V:
                expected[i, t] += 1
    assert torch.equal(counts, expected)
    drafts = torch.tensor([[5, 1, 5], [7, -1, -1], [0, 0, 2]])
    out = extend_counts_with_drafts(counts, drafts)
    assert out.shape == (3, 4, V)
    for b in range(3):
        for j in range(4):
            row = counts[b].clone()
            for t in drafts[b, :j].tolist():
                if t >= 0:
                    row[t] += 1
            assert torch.equal(out[b, j], row), (b, j)


def test_logit_bias_rows_follow_repeat_interleave_and_select():
    params = [SamplingParams(), SamplingParams(logit_bias={2: 1.0, 5: -2.0}), SamplingParams(logit_bias={0: 3.0})]
    batch = SamplingBatch.from_params(params, "cpu")
    logits = torch.zeros(3 * 2, V)
    rep = process_logits(logits, batch.repeat_interleave(2))
    ref = process_logits(torch.zeros(3, V), batch)
    assert torch.equal(rep, ref.repeat_interleave(2, dim=0))
    sub = batch.select(torch.tensor([2, 1]))
    assert torch.equal(process_logits(torch.zeros(2, V), sub), ref[[2, 1]])


def test_seeded_sampling_reproducible():
    probs = torch.softmax(_logits(4), dim=1)
    params = [SamplingParams(seed=s) for s in (1, 2, 3, 4)]
    a = [sample(probs, SamplingBatch.from_params(params, "cpu")) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    # one generator kept across steps gives fresh numbers each step
    batch = SamplingBatch.from_params([SamplingParams(seed=7)] * 1, "cpu")
    draws = {sample(torch.full((1, 1000), 1e-3), batch).item() for _ in range(5)}
    assert len(draws) > 1


def test_sample_greedy_rows_take_argmax():
    probs = torch.softmax(_logits(3), dim=1)
    batch = SamplingBatch.from_params(
        [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0)], "cpu"
    )
    out = sample(probs, batch)
    assert out.dtype == torch.int64 and out.shape == (3,)
    assert out[0] == probs[0].argmax() and out[2] == probs[2].argmax()


def test_sample_follows_distribution():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    n = 40_000
    batch = SamplingBatch.from_params([SamplingParams()] * n, "cpu")
    counts = torch.bincount(sample(p.expand(n, -1), batch), minlength=6)
    assert counts[5] == 0
    assert chisquare(counts[:5].numpy(), (p[:5] * n).numpy()).pvalue > 1e-3


def test_topk_truncate_keeps_largest_and_sums_to_one():
    probs = torch.softmax(_logits(5), dim=1)
    ids, q = topk_truncate(probs, 4)
    assert ids.shape == q.shape == (5, 4) and ids.dtype == torch.int64
    torch.testing.assert_close(q.sum(1), torch.ones(5))
    for i in range(5):
        assert set(ids[i].tolist()) == set(probs[i].argsort(descending=True)[:4].tolist())
    assert torch.equal(ids[:, 0], probs.argmax(1))
    torch.testing.assert_close(q, probs.gather(1, ids) / probs.gather(1, ids).sum(1, keepdim=True))
    ids, q = topk_truncate(probs, 100)  # K larger than V is clamped
    assert ids.shape == (5, V)


def test_sample_sparse_greedy_and_support():
    probs = torch.softmax(_logits(4), dim=1)
    ids, q = topk_truncate(probs, 3)
    params = [SamplingParams(temperature=0), SamplingParams(seed=1)] * 2
    out = sample_sparse(ids, q, SamplingBatch.from_params(params, "cpu"))
    assert out[0] == probs[0].argmax() and out[2] == probs[2].argmax()
    for i in (1, 3):
        assert out[i].item() in ids[i].tolist()
    again = sample_sparse(ids, q, SamplingBatch.from_params(params, "cpu"))
    assert torch.equal(out, again)


def test_logprobs_of_matches_log_softmax():
    logits = _logits(3)
    tokens = torch.tensor([0, 5, 11])
    chosen, top_ids, top_lp = logprobs_of(logits, tokens, 4)
    ref = torch.log_softmax(logits.double(), dim=1)
    torch.testing.assert_close(chosen.double(), ref[torch.arange(3), tokens], atol=1e-5, rtol=0)
    assert top_ids.shape == top_lp.shape == (3, 4)
    assert torch.equal(top_ids[:, 0], logits.argmax(1))
    torch.testing.assert_close(top_lp.double(), ref.gather(1, top_ids), atol=1e-5, rtol=0)
    _, top_ids, top_lp = logprobs_of(logits, tokens, 0)
    assert top_ids.shape == top_lp.shape == (3, 0)


def test_sampling_with_penalties_and_bias_follows_reference_distribution():
    """Chi-square: tokens sampled through bias + all penalties follow the reference distribution."""
    torch.manual_seed(3)
    n = 40_000
    p = SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.8, frequency_penalty=0.6,
                       logit_bias={2: 1.5, 9: -2.0})
    logits, history, output = _logits(1, seed=5), [0, 3, 3, 7], [3, 3, 7]
    ref = reference_probs(logits[0].numpy(), p, set(history), output)
    batch = SamplingBatch.from_params([p] * n, "cpu")
    seen = seen_mask([torch.tensor(history)] * n, V, "cpu")
    counts = output_counts([torch.tensor(output)] * n, V, "cpu")
    probs = process_logits(logits.expand(n, -1), batch, seen, counts)
    drawn = torch.bincount(sample(probs, batch), minlength=V).numpy()
    big = ref * n >= 5
    assert chisquare(drawn[big], ref[big] / ref[big].sum() * drawn[big].sum()).pvalue > 1e-3
