"""Speculative sampling is lossless, end to end, and seeded sampling is reproducible.

For a fixed prompt P the exact distribution of the first two generated tokens is known:
p1(x) = p(x | P) and p2(y) = sum_x p1(x) p(y | P x), computed by transformers' model (one
batched forward over all V continuations x; an implementation independent of ours). The
engine generates 4,096 completions (256 requests with n = 16, all in one batch) with
speculation and a fixed block length, so both tokens come out of verified blocks: x1 is an
accepted draft or a recovered token of the first round, x2 an accepted draft, a recovered
or a bonus token. Each marginal is compared with its exact distribution by Pearson's
chi-square (tokens expected fewer than 5 times pooled into one cell) and must not be
rejected at the 1e-3 level. The same test with the recovered token drawn from p instead of
max(0, p - q) gets p-values below 1e-10, so the test has the power to see a broken sampler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specsplit import SamplingParams
from specsplit.sampling import rejection

PROMPT = [5, 6, 7, 8, 9, 10]  # draft_model: no repeats, the draft model does the guessing
NGRAM_PROMPT = [40, 41, 42, 43, 40, 41, 42, 43, 40, 41]  # the n-gram drafter proposes 42 43 40
NUM_REQUESTS, N = 256, 16
K = 3
ALPHA = 1e-3  # a correct sampler fails a test with probability 1e-3 per marginal


def exact_marginals(folder: Path, prompt: list[int], **params) -> tuple[np.ndarray, np.ndarray]:
    """(p1, p2) of the first two sampled tokens, by transformers' model and `target_probs`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    v = hf.config.vocab_size
    with torch.inference_mode():
        first = hf(torch.tensor([prompt])).logits[0, -1].double()  # [V]
        batch = torch.cat([torch.tensor([prompt] * v), torch.arange(v)[:, None]], dim=1)  # [V, len+1]
        second = hf(batch).logits[:, -1].double()  # [V, V]: row x = logits after P x
    seen = torch.zeros(v, dtype=torch.bool)
    seen[prompt] = True
    seen2 = seen.repeat(v, 1)  # [V, V]: row x has also seen x
    seen2[torch.arange(v), torch.arange(v)] = True
    out2 = torch.eye(v, dtype=torch.float64)  # [V, V]: row x has generated x once
    p1 = target_probs(first[None], seen[None], torch.zeros(1, v, dtype=torch.float64), **params)[0]  # [V]
    p2 = p1 @ target_probs(second, seen2, out2, **params)  # [V]
    return p1.numpy(), p2.numpy()


def target_probs(logits: torch.Tensor, seen: torch.Tensor, out: torch.Tensor, temperature: float = 1.0,
                 top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: tuple[tuple[int, float], ...] = ()) -> torch.Tensor:
    """The distribution sampling params define, written out independently of specsplit.sampling.

    logits: [N, V]; seen: [N, V] bool (prompt + output); out: [N, V] counts of generated
    tokens. vLLM order: logit bias, repetition penalty, frequency and presence penalties
    (output tokens only), temperature, top-k, then top-p (smallest head whose mass reaches
    top_p), then min-p.
    """
    logits = logits.clone()
    for t, b in logit_bias:
        logits[:, t] += b
    x = torch.where(seen & (logits > 0), logits / repetition_penalty, logits)
    x = torch.where(seen & (logits <= 0), logits * repetition_penalty, x)
    x = x - frequency_penalty * out - presence_penalty * (out > 0).double()
    p = (x / temperature).softmax(-1)
    p_sorted, order = p.sort(dim=-1, descending=True)  # [N, V]
    keep = torch.ones_like(p_sorted, dtype=torch.bool)
    if top_k > 0:
        keep[:, top_k:] = False
    q = torch.where(keep, p_sorted, 0.0)
    q = q / q.sum(-1, keepdim=True)
    keep &= (q.cumsum(-1) - q) < top_p  # the mass before the token is still short of top_p
    q = torch.where(keep, q, 0.0)
    q = q / q.sum(-1, keepdim=True)
    q = torch.where(q >= min_p * q[:, :1], q, 0.0)
    q = q / q.sum(-1, keepdim=True)
    return torch.empty_like(q).scatter_(-1, order, q)


def pvalue(tokens: np.ndarray, expected_p: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=expected_p.shape[0]).astype(float)
    expected = expected_p * counts.sum()
    big = expected >= 5
    assert counts[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
    c, e = counts[big], expected[big]
    if expected[~big].sum() > 0:  # the rare tokens, pooled into one cell
        c, e = np.append(c, counts[~big].sum()), np.append(e, expected[~big].sum())
    return float(chisquare(c, e).pvalue)


def first_two_tokens(llm, prompt: list[int], seeded: bool = False, **params) -> np.ndarray:
    """[NUM_REQUESTS * N, 2] first two generated tokens of many sampled completions."""
    params.setdefault("temperature", 1.0)
    if seeded:  # every completion has its own seed (request seed s: completions s .. s+15)
        sp = [SamplingParams(n=N, max_tokens=3, seed=1000 + N * i, **_kw(params)) for i in range(NUM_REQUESTS)]
    else:
        sp = SamplingParams(n=N, max_tokens=3, **_kw(params))
    outs = llm.generate([{"prompt_token_ids": prompt}] * NUM_REQUESTS, sp, use_tqdm=False)
    return np.array([c.token_ids[:2] for o in outs for c in o.outputs])


def _kw(params: dict) -> dict:
    """SamplingParams keywords: logit_bias travels as a hashable tuple of pairs in the tests."""
    return {k: dict(v) if k == "logit_bias" else v for k, v in params.items()}


@pytest.fixture(scope="module")
def spec_llm(make_llm, tiny_target, tiny_draft):
    def build(method: str):
        cfg = {"method": method, "num_speculative_tokens": K, "adaptive": False}
        if method == "draft_model":
            cfg["model"] = str(tiny_draft)
        return make_llm(tiny_target, cfg, max_num_seqs=512, kv_cache_memory_bytes=1 << 25)

    return build


@pytest.fixture(scope="module")
def exact(tiny_target):
    cache = {}

    def get(prompt: list[int], **params):
        key = (tuple(prompt), tuple(sorted(params.items())))
        if key not in cache:
            cache[key] = exact_marginals(tiny_target, prompt, **params)
        return cache[key]

    return get


def assert_follows(tokens: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> None:
    pv = (pvalue(tokens[:, 0], p1), pvalue(tokens[:, 1], p2))
    assert min(pv) > ALPHA, f"first/second-token chi-square p-values {pv}"


def test_plain_sampling_follows_target_distribution(make_llm, tiny_target, exact):
    """The control: the reference distributions are right for the engine without drafts."""
    llm = make_llm(tiny_target, max_num_seqs=512, kv_cache_memory_bytes=1 << 25)
    assert_follows(first_two_tokens(llm, PROMPT), *exact(PROMPT))


@pytest.mark.parametrize("seeded", [False, True], ids=["global_rng", "per_request_seeds"])
def test_draft_model_sampling_follows_target_distribution(spec_llm, exact, seeded):
    llm = spec_llm("draft_model")
    tokens = first_two_tokens(llm, PROMPT, seeded=seeded)
    assert_follows(tokens, *exact(PROMPT))


@pytest.mark.parametrize("params", [
    {"top_k": 12, "top_p": 0.8},
    {"temperature": 0.7, "min_p": 0.05, "repetition_penalty": 1.5},
    {"temperature": 0.8, "top_k": 20, "presence_penalty": 1.2, "frequency_penalty": 0.9,
     "logit_bias": ((5, 2.0), (11, -3.0), (40, 1.5))},
], ids=["top_k_top_p", "temperature_min_p_penalty", "presence_frequency_logit_bias"])
def test_draft_model_sampling_with_truncation_follows_target_distribution(spec_llm, exact, params):
    tokens = first_two_tokens(spec_llm("draft_model"), PROMPT, **params)
    p1, p2 = exact(PROMPT, **params)
    assert 1 < (p1 > 0).sum() < 30  # the truncation really removes tokens here
    assert_follows(tokens, p1, p2)


def test_ngram_sampling_follows_target_distribution(spec_llm, exact):
    llm = spec_llm("ngram")
    before = llm.engine.target.runner.cache.num_free_blocks
    tokens = first_two_tokens(llm, NGRAM_PROMPT)
    assert_follows(tokens, *exact(NGRAM_PROMPT))
    assert llm.engine.target.runner.cache.num_free_blocks == before  # every session freed


def test_some_drafts_accepted_and_some_rejected(spec_llm):
    llm = spec_llm("draft_model")
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 8, SamplingParams(n=N, temperature=1.0, max_tokens=3),
                        use_tqdm=False)
    rate = sum(o.metrics.num_accepted_tokens for o in outs) / sum(o.metrics.num_drafted_tokens for o in outs)
    assert 0.3 < rate < 0.97  # both branches of the rejection sampler carry weight


@pytest.mark.parametrize(
    "broken, fake",
    [
        ("_residual", lambda p, q: p),  # recovered token sampled from p, ignoring q
        ("_draft_prob", lambda ids, probs, tok: torch.ones_like(tok, dtype=torch.float32)),  # accept w.p. p
    ],
    ids=["residual_ignores_q", "acceptance_ignores_q"],
)
def test_chi_square_detects_broken_rejection_sampler(spec_llm, exact, monkeypatch, broken, fake):
    monkeypatch.setattr(rejection, broken, fake)
    tokens = first_two_tokens(spec_llm("draft_model"), PROMPT)
    p1, p2 = exact(PROMPT)
    assert min(pvalue(tokens[:, 0], p1), pvalue(tokens[:, 1], p2)) < 1e-10


# --- seeds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [None, "draft_model", "ngram"])
def test_same_seed_same_output(make_llm, tiny_target, tiny_draft, method):
    cfg = None
    if method:
        cfg = {"method": method, "num_speculative_tokens": K, "adaptive": False}
        if method == "draft_model":
            cfg["model"] = str(tiny_draft)
    llm = make_llm(tiny_target, cfg)
    prompts = ["def fibonacci(n):", "la la la la la la"]

    def run(seed: int) -> list[list[int]]:
        sp = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True, seed=seed)
        return [c.token_ids for o in llm.generate(prompts, sp, use_tqdm=False) for c in o.outputs]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert first[0] != first[1]  # the n completions differ from each other


def test_seeded_request_same_alone_or_batched(make_llm, tiny_target, tiny_draft):
    cfg = {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": K, "adaptive": False}
    llm = make_llm(tiny_target, cfg)
    seeded = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=3)
    alone = llm.generate("The quick brown", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True)
    batch = llm.generate(["def fibonacci(n):", "The quick brown", "import numpy as np"], [others, seeded, others],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
