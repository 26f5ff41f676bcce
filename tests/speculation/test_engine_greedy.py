"""Greedy speculative decoding is token-identical to plain greedy decoding of the target.

Every test compares `LLM(target, speculative_config=...)` with `LLM(target)` (k = 0, the
same engine without a drafter): batched and single prompts, k in {1, 3, 5, 8}, both
drafting methods, fixed and adaptive k, and every way a sequence can end inside a drafted
block (EOS, stop token, stop string, max_tokens). A draft identical to the target accepts
every block in full, which is how a stop is made to land inside an accepted block.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from specsplit import SamplingParams
from specsplit.speculation.engine import SpecEngine
from specsplit.speculation.sequence import Sequence
from tests.conftest import with_eos

PROMPTS = [
    "def fibonacci(n):",
    "The quick brown",
    "for i in range(10):\n",
    "import numpy as np",
    "la la la la la la la",  # repeats: the n-gram drafter finds matches
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
METHODS = ["draft_model", "ngram"]


def spec_config(method: str, k: int, draft: Path | None = None, adaptive: bool = False) -> dict:
    cfg = {"method": method, "num_speculative_tokens": k, "adaptive": adaptive}
    if method == "draft_model":
        cfg["model"] = str(draft)
    return cfg


def ids(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def same(a, b) -> None:
    """Token ids, text and finish/stop reasons of two generate() results are equal."""
    fields = lambda outs: [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for o in outs for c in o.outputs]  # noqa: E731
    assert fields(a) == fields(b)


@pytest.fixture(scope="module")
def plain(make_llm, tiny_target):
    return make_llm(tiny_target)


@pytest.fixture(scope="module")
def reference(plain):
    return plain.generate(PROMPTS, GREEDY, use_tqdm=False)


@pytest.fixture
def commits(monkeypatch) -> list[tuple[int, int, int | str | None, str | None]]:
    """Record every Sequence.commit: (tokens offered, tokens kept, stop_reason, finish_reason)."""
    calls = []
    original = Sequence.commit

    def spy(self, tokens, logprobs=None):
        kept, delta = original(self, tokens, logprobs)
        calls.append((len(tokens), len(kept), self.stop_reason, self.finish_reason))
        return kept, delta

    monkeypatch.setattr(Sequence, "commit", spy)
    return calls


def ended_inside_accepted_block(calls, k: int) -> bool:
    """Some sequence ended on an accepted draft of a fully accepted block, before its end."""
    return any(n == k + 1 and 1 <= kept < n and fin is not None for n, kept, _, fin in calls)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_spec_equals_plain(make_llm, tiny_target, tiny_draft, reference, method, k):
    llm = make_llm(tiny_target, spec_config(method, k, tiny_draft))
    batched = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    same(batched, reference)
    single = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    same(single, reference[:1])
    drafted = sum(o.metrics.num_drafted_tokens for o in batched)
    accepted = sum(o.metrics.num_accepted_tokens for o in batched)
    assert drafted > 0 and accepted > 0  # speculation really happened
    if method == "draft_model":
        assert accepted < drafted  # and rollbacks too
        assert max(o.metrics.mean_accepted_length for o in batched) > 1.2


@pytest.mark.parametrize("method", METHODS)
def test_greedy_spec_with_adaptive_k_equals_plain(make_llm, tiny_target, tiny_draft, reference, method):
    llm = make_llm(tiny_target, spec_config(method, 5, tiny_draft, adaptive=True))
    same(llm.generate(PROMPTS, GREEDY, use_tqdm=False), reference)


def test_draft_equal_to_target_accepts_every_block(make_llm, tiny_target, reference):
    llm = make_llm(tiny_target, spec_config("draft_model", 4, tiny_target))
    out = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    same(out, reference)
    for o in out:
        assert o.metrics.acceptance_rate == 1.0
        assert o.metrics.num_rounds == 8  # 40 tokens in blocks of 4 + 1


@pytest.mark.parametrize("method", METHODS)
def test_greedy_with_repetition_penalty_equals_plain(make_llm, tiny_target, tiny_draft, plain, method):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.5)
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    assert ids(ref) != ids(plain.generate(PROMPTS, GREEDY, use_tqdm=False))  # the penalty matters
    llm = make_llm(tiny_target, spec_config(method, 3, tiny_draft))
    same(llm.generate(PROMPTS, params, use_tqdm=False), ref)


@pytest.mark.parametrize("max_tokens", [1, 2, 13])
@pytest.mark.parametrize("method", METHODS)
def test_max_tokens_inside_a_block_equals_plain(make_llm, tiny_target, tiny_draft, plain, method, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    out = make_llm(tiny_target, spec_config(method, 5, tiny_draft)).generate(PROMPTS, params, use_tqdm=False)
    same(out, ref)
    assert all(len(c.token_ids) == max_tokens and c.finish_reason == "length" for o in out for c in o.outputs)


@pytest.mark.parametrize("method", METHODS)
def test_context_limit_inside_a_block_equals_plain(make_llm, tiny_target, tiny_draft, method):
    """max_tokens=None runs into max_model_len; the last block must shrink to fit it."""
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    ref = make_llm(tiny_target, max_model_len=37).generate(PROMPTS, params, use_tqdm=False)
    out = make_llm(tiny_target, spec_config(method, 5, tiny_draft), max_model_len=37).generate(
        PROMPTS, params, use_tqdm=False)
    same(out, ref)
    for o in out:
        assert len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 37
        assert o.outputs[0].finish_reason == "length"


# --- EOS and stop tokens ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_case(model_root, tiny_target, reference):
    """A copy of the target whose EOS is a token its greedy output reaches mid-block.

    Picks, in the reference output of PROMPTS[0], the first token at index i >= 8 that did not
    occur earlier and sits at position 1..4 of a 6-token block (k = 5), so that with a draft
    equal to the target the EOS is an accepted draft with more drafts after it.
    """
    out = reference[0].outputs[0].token_ids
    i = next(i for i in range(8, len(out)) if out[i] not in out[:i] and i % 6 in (1, 2, 3, 4) and out[i] != 0)
    folder = with_eos(tiny_target, model_root / "target-eos", out[i])
    return folder, out[i], i


@pytest.mark.parametrize("draft", ["self", "draft_model", "ngram"])
def test_eos_inside_a_block_equals_plain(make_llm, tiny_draft, eos_case, commits, draft):
    folder, eos, index = eos_case
    params = SamplingParams(temperature=0.0, max_tokens=40)  # EOS respected
    ref = make_llm(folder).generate(PROMPTS, params, use_tqdm=False)
    first = ref[0].outputs[0]
    assert first.token_ids[-1] == eos and len(first.token_ids) == index + 1
    assert (first.finish_reason, first.stop_reason) == ("stop", None)
    commits.clear()
    method = "ngram" if draft == "ngram" else "draft_model"
    llm = make_llm(folder, spec_config(method, 5, folder if draft == "self" else tiny_draft))
    same(llm.generate(PROMPTS, params, use_tqdm=False), ref)
    if draft == "self":
        assert ended_inside_accepted_block(commits, 5)


@pytest.mark.parametrize("method", METHODS)
def test_stop_token_ids_equal_plain(make_llm, tiny_target, tiny_draft, plain, reference, method):
    # stop on the 11th token of the first prompt's output (other prompts stop where they meet it)
    stop_id = reference[0].outputs[0].token_ids[10]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id])
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    assert ref[0].outputs[0].stop_reason == stop_id
    same(make_llm(tiny_target, spec_config(method, 5, tiny_draft)).generate(PROMPTS, params, use_tqdm=False), ref)


# --- stop strings ------------------------------------------------------------------------------


def mid_text_stop(text: str) -> str:
    """A 3-character substring whose first occurrence is in the middle third of `text`."""
    for pos in range(len(text) // 3, 2 * len(text) // 3):
        s = text[pos : pos + 3]
        if text.find(s) == pos and "\ufffd" not in s and s.strip():
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("draft", ["self", "draft_model", "ngram"])
def test_stop_string_inside_a_block_equals_plain(make_llm, tiny_target, tiny_draft, plain, reference, commits, draft):
    stops = [mid_text_stop(o.outputs[0].text) for o in reference]
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[s]) for s in stops]
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    for o, s, full in zip(ref, stops, reference, strict=True):
        c = o.outputs[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", s)
        assert c.text == full.outputs[0].text[: full.outputs[0].text.find(s)]
    method = "ngram" if draft == "ngram" else "draft_model"
    llm = make_llm(tiny_target, spec_config(method, 5, tiny_target if draft == "self" else tiny_draft))
    commits.clear()
    same(llm.generate(PROMPTS, params, use_tqdm=False), ref)
    if draft == "self":
        assert ended_inside_accepted_block(commits, 5)


# --- scheduling --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_more_prompts_than_max_num_seqs_equal_plain(make_llm, tiny_target, tiny_draft, plain, method):
    prompts = [*PROMPTS, "class Tree:", "return sorted(values"]  # 7 prompts, 3 slots
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 5 * i, ignore_eos=True) for i in range(7)]
    ref = plain.generate(prompts, params, use_tqdm=False)
    llm = make_llm(tiny_target, spec_config(method, 3, tiny_draft), max_num_seqs=3)
    same(llm.generate(prompts, params, use_tqdm=False), ref)


@pytest.fixture
def preemptions(monkeypatch) -> list[int]:
    count = []
    original = SpecEngine._preempt_one

    def spy(self):
        count.append(1)
        return original(self)

    monkeypatch.setattr(SpecEngine, "_preempt_one", spy)
    return count


@pytest.mark.parametrize("method", [None, *METHODS])
def test_kv_preemption_completes_every_request_equal_to_plain(make_llm, tiny_target, tiny_draft, reference,
                                                              preemptions, method):
    # 8 blocks of 16 tokens (the floor for max_model_len=128); each sequence grows to ~48
    # tokens (3-4 blocks), so five of them cannot all stay resident.
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    spec = spec_config(method, 3, tiny_draft) if method else None
    llm = make_llm(tiny_target, spec, kv_cache_memory_bytes=8 * per_block, max_model_len=128)
    assert llm.target.runner.cache.num_blocks == 8
    same(llm.generate(PROMPTS, GREEDY, use_tqdm=False), reference)
    assert preemptions, "the KV cache was never full: the test proves nothing"


# --- request shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_n_greater_than_one_greedy_all_equal_plain(make_llm, tiny_target, tiny_draft, reference, method):
    params = SamplingParams(n=3, temperature=0.0, max_tokens=40, ignore_eos=True)
    out = make_llm(tiny_target, spec_config(method, 3, tiny_draft)).generate(PROMPTS[:2], params, use_tqdm=False)
    for o, r in zip(out, reference[:2], strict=True):
        assert [c.index for c in o.outputs] == [0, 1, 2]
        assert all(c.token_ids == r.outputs[0].token_ids and c.text == r.outputs[0].text for c in o.outputs)


def test_prompt_token_ids_equal_text_prompts(make_llm, tiny_target, tiny_draft, plain, reference):
    tok = plain.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(p)} for p in PROMPTS]
    llm = make_llm(tiny_target, spec_config("draft_model", 3, tiny_draft))
    out = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert ids(out) == ids(reference)
    assert [o.prompt_token_ids for o in out] == [o.prompt_token_ids for o in reference]
    assert all(o.prompt is None for o in out)


@pytest.mark.parametrize("method", METHODS)
def test_chat_equals_plain(make_llm, tiny_target, tiny_draft, plain, method):
    convs = [[{"role": "user", "content": "def fibonacci(n):"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "The quick brown fox"}]]
    ref = plain.chat(convs, GREEDY, use_tqdm=False)
    assert ref[0].prompt.endswith("<|im_start|>assistant\n")
    tok = plain.get_tokenizer()
    assert ref[0].prompt_token_ids == tok.encode(ref[0].prompt, add_special_tokens=False)
    same(make_llm(tiny_target, spec_config(method, 3, tiny_draft)).chat(convs, GREEDY, use_tqdm=False), ref)


def test_greedy_rows_unaffected_by_sampled_neighbours(make_llm, tiny_target, tiny_draft, reference):
    llm = make_llm(tiny_target, spec_config("draft_model", 3, tiny_draft))
    sampled = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=5)
    out = llm.generate(PROMPTS[:2] * 2, [GREEDY, GREEDY, sampled, sampled], use_tqdm=False)
    assert ids(out[:2]) == ids(reference[:2])


def test_logprobs_equal_plain(make_llm, tiny_target, tiny_draft, plain):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3)
    ref = plain.generate(PROMPTS[:2], params, use_tqdm=False)
    out = make_llm(tiny_target, spec_config("draft_model", 3, tiny_draft)).generate(PROMPTS[:2], params, use_tqdm=False)
    for o, r in zip(out, ref, strict=True):
        a, b = o.outputs[0], r.outputs[0]
        assert a.token_ids == b.token_ids and len(a.logprobs) == len(b.logprobs) == 20
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 and la[t].rank == lb[t].rank for t in la)
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_greedy_ngram_equals_plain(make_llm):
    """The real SmolLM2-135M with its real tokenizer and chat template (EOS = <|im_end|>)."""
    from specsplit.models import resolve_model

    folder = resolve_model("smollm2-135m", progress=False)
    conv = [{"role": "user", "content": "List the first five prime numbers, separated by commas."}]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    kw = dict(max_model_len=256, kv_cache_memory_bytes=1 << 26)
    ref = make_llm(folder, **kw).chat(conv, params, use_tqdm=False)
    out = make_llm(folder, spec_config("ngram", 4), **kw).chat(conv, params, use_tqdm=False)
    same(out, ref)
    assert "2" in ref[0].outputs[0].text and "3" in ref[0].outputs[0].text  # real weights answer
