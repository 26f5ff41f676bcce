"""The target verifier: prefill + verify in one batched forward, rollback by truncation."""

from __future__ import annotations

import pytest
import torch

from specsplit.runtime.runner import ModelRunner
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.session import SessionError, UnknownSession
from specsplit.speculation.target import TargetVerifier, VerifyItem

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def verifier(tiny_target) -> TargetVerifier:
    runner = ModelRunner.from_folder(tiny_target, block_size=4, kv_cache_bytes=1 << 22, max_model_len=64)
    return TargetVerifier(runner)


@pytest.fixture(scope="module")
def greedy(tiny_target):
    """The target's greedy continuation by full recomputation in transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)

    @torch.inference_mode()
    def run(ids: list[int], n: int) -> list[int]:
        out = list(ids)
        for _ in range(n):
            out.append(int(hf(torch.tensor([out])).logits[0, -1].argmax()))
        return out[len(ids) :]

    return run


def test_perfect_draft_accepted_with_bonus(verifier, greedy):
    prompt = [5, 6, 7, 8]
    cont = greedy(prompt, 5)
    verifier.open(1, prompt, GREEDY)
    (r,) = verifier.step([VerifyItem(1, cont[:4])])  # prefill and verify together
    assert (r.num_accepted, r.emitted) == (4, cont)
    assert verifier.runner.length(1) == len(prompt) + 4  # the bonus is not fed yet
    assert verifier.sessions[1].history == prompt + cont
    verifier.close(1)


def test_early_mismatch_rolls_back_and_recovers(verifier, greedy):
    prompt = [9, 8, 7]
    cont = greedy(prompt, 8)
    verifier.open(2, prompt, GREEDY)
    (r,) = verifier.step([VerifyItem(2, [])])  # plain prefill: one token
    assert r.emitted == cont[:1]
    wrong = cont[1:4] + [(cont[4] + 1) % 384, cont[5]]
    (r,) = verifier.step([VerifyItem(2, wrong)])
    assert (r.num_accepted, r.emitted) == (3, cont[1:5])  # recovered = the target's own token
    assert verifier.runner.length(2) == len(prompt) + 4
    (r,) = verifier.step([VerifyItem(2, cont[5:8])])  # the cache holds no trace of the rejection
    assert (r.num_accepted, r.emitted[:3]) == (3, cont[5:8])
    verifier.close(2)


def test_ragged_batch_of_sessions_in_one_step(verifier, greedy):
    prompts = {10: [1, 2, 3], 11: [40, 41, 42, 43, 44, 45, 46], 12: [100]}
    conts = {s: greedy(p, 6) for s, p in prompts.items()}
    for s, p in prompts.items():
        verifier.open(s, p, GREEDY)
    items = [VerifyItem(10, conts[10][:5]), VerifyItem(11, []),
             VerifyItem(12, [conts[12][0], (conts[12][1] + 1) % 384])]
    r10, r11, r12 = verifier.step(items)
    assert (r10.num_accepted, r10.emitted) == (5, conts[10][:6])
    assert (r11.num_accepted, r11.emitted) == (0, conts[11][:1])
    assert (r12.num_accepted, r12.emitted) == (1, conts[12][:2])
    for s in prompts:
        verifier.close(s)


def test_logprobs_of_emitted_tokens(verifier, greedy):
    prompt = [3, 1, 4, 1, 5]
    cont = greedy(prompt, 3)
    verifier.open(20, prompt, SamplingParams(temperature=0.0, logprobs=2))
    (r,) = verifier.step([VerifyItem(20, cont[:2])])
    verifier.close(20)
    assert len(r.logprobs) == 3
    for tok, lp in zip(r.emitted, r.logprobs, strict=True):
        assert tok in lp and len(lp) == 2  # greedy: the chosen token is the top one
        assert lp[tok] == max(lp.values()) <= 0.0


def test_sessions_are_validated(verifier):
    with pytest.raises(UnknownSession):
        verifier.step([VerifyItem(999, [])])
    verifier.open(30, [1, 2], GREEDY)
    with pytest.raises(SessionError, match="already open"):
        verifier.open(30, [1, 2], GREEDY)
    with pytest.raises(SessionError, match="outside the vocabulary"):
        verifier.step([VerifyItem(30, [1, -1])])
    with pytest.raises(SessionError, match="empty"):
        verifier.open(31, [], GREEDY)
    with pytest.raises(SessionError, match="max_model_len"):
        verifier.open(32, [1] * 64, GREEDY)
    verifier.open(33, [1, 2], SamplingParams(temperature=1.0))
    with pytest.raises(SessionError, match="needs the draft distribution"):
        verifier.step([VerifyItem(33, [4])])
    assert verifier.runner.length(30) == 0  # nothing was fed by the failed steps
    for s in (30, 33):
        verifier.close(s)
    assert not verifier.runner.cache.seqs


def test_greedy_fast_path_matches_general_path():
    """The argmax shortcut for plain greedy rows decides exactly as the full processing does."""
    from specsplit.speculation.target import TargetSession

    torch.manual_seed(0)
    v = TargetVerifier.__new__(TargetVerifier)
    v.vocab_size = 50
    ks = [0, 3, 5, 1]
    logits = torch.randn(sum(k + 1 for k in ks), 50)  # [sum(k_i + 1), V]
    best = logits.argmax(-1).tolist()
    items, row = [], 0
    for i, k in enumerate(ks):
        drafts = best[row : row + k]
        if k >= 3:  # a mismatch inside the block
            drafts[2] = (drafts[2] + 1) % 50
        items.append(VerifyItem(i, drafts))
        row += k + 1
    fast = TargetVerifier._accept_greedy(items, logits)
    # asking for logprobs (0 alternatives) takes the general path
    general = TargetVerifier._accept(v, items, [TargetSession(i, GREEDY, None, [1], [1], 0) for i in range(len(ks))],
                                     logits)
    assert [(r.num_accepted, r.emitted) for r in fast] == [(r.num_accepted, r.emitted) for r in general]
    assert [r.num_accepted for r in fast] == [0, 2, 2, 1]


def test_prompt_logprobs_on_the_first_step_only(verifier, tiny_target):
    from transformers import AutoModelForCausalLM

    prompt = [3, 1, 4, 1, 5, 9]
    verifier.open(40, prompt, SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=2))
    (first,) = verifier.step([VerifyItem(40, [])])
    (second,) = verifier.step([VerifyItem(40, [])])
    verifier.close(40)
    hf = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].double().log_softmax(-1)  # [L, V]
    assert len(first.prompt_logprobs) == len(prompt) - 1 and second.prompt_logprobs is None
    for i, d in enumerate(first.prompt_logprobs):
        tok = prompt[i + 1]
        assert d[tok] == pytest.approx(float(ref[i, tok]), abs=1e-4)
        assert len(d) in (2, 3) and max(d.values()) == pytest.approx(float(ref[i].max()), abs=1e-4)
    assert len(first.logprobs) == 1  # the verify rows are unchanged by the extra prompt rows


def test_output_penalties_count_only_generated_tokens_after_a_reopen(verifier):
    """A session re-opened with prompt + generated tokens (failover) continues exactly as the
    original would: the frequency / presence penalties see the same generated tokens."""
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=1.0)
    prompt = [7, 7, 7, 2, 9]
    verifier.open(50, prompt, params)
    generated = []
    for _ in range(6):
        (r,) = verifier.step([VerifyItem(50, [])])
        generated += r.emitted
    verifier.close(50)
    verifier.open(51, prompt + generated[:3], params, prompt_len=len(prompt))
    resumed = []
    for _ in range(3):
        (r,) = verifier.step([VerifyItem(51, [])])
        resumed += r.emitted
    verifier.close(51)
    assert resumed == generated[3:]
    with pytest.raises(SessionError, match="prompt_len"):
        verifier.open(53, prompt, params, prompt_len=0)
    with pytest.raises(SessionError, match="logit_bias"):
        verifier.open(54, prompt, SamplingParams(logit_bias={10**6: 1.0}))
