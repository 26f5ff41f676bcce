"""Per-sequence ground truth: incremental text, stop strings, stop tokens, EOS, max_tokens.

Uses the tiny models' trained byte-level BPE tokenizer, in which "é€😀" is nine byte tokens
and "The quick brown fox jumps" splits as The| qu|ick| br|ow|n| fo|x| jump|s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from specsplit.sampling.params import SamplingParams
from specsplit.speculation.sequence import IncrementalDetokenizer, Sequence

EOS = 0
TEXT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def tok(tiny_target: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_target)


def make_seq(tok, prompt: str = "Hello", max_model_len: int = 512, **params) -> Sequence:
    prompt_ids = tok.encode(prompt)
    params.setdefault("max_tokens", 100)
    return Sequence(0, prompt_ids, SamplingParams(**params), (EOS,), max_model_len,
                    IncrementalDetokenizer(tok, prompt_ids))


def commit_one_by_one(seq: Sequence, ids: list[int]) -> list[str]:
    return [seq.commit([t])[1] for t in ids]


def test_tokenizer_splits_as_the_tests_assume(tok):
    assert len(tok.encode("é€😀")) > 3  # byte tokens, so characters span tokens
    assert [tok.decode([i]) for i in tok.encode(TEXT)][:4] == ["The", " qu", "ick", " br"]


def test_multibyte_characters_not_split(tok):
    text = "é€😀 naïve"
    ids = tok.encode(text)
    seq = make_seq(tok)
    deltas = commit_one_by_one(seq, ids)
    assert "".join(deltas) == seq.text == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[0] == ""  # the first byte of "é" alone is no character yet
    assert deltas[1] == "é"


def test_whole_block_committed_at_once_gives_same_text(tok):
    ids = tok.encode("é€😀 " + TEXT)
    seq = make_seq(tok)
    kept, delta = seq.commit(ids)
    assert kept == ids and delta == seq.text == "é€😀 " + TEXT


def test_stop_string_spanning_two_tokens(tok):
    ids = tok.encode(TEXT)
    stop = "ick br"  # the end of " qu|ick" and the start of " br"
    seq = make_seq(tok, stop=[stop])
    deltas = commit_one_by_one(seq, ids)
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert seq.text == "".join(deltas) == "The qu"
    assert seq.output_ids == ids[:4]  # up to the token that completed the stop, as vLLM


def test_stop_string_inside_a_block_drops_the_rest(tok):
    ids = tok.encode(TEXT)
    seq = make_seq(tok, stop=["brown"])
    kept, delta = seq.commit(ids[:2])
    assert kept == ids[:2] and delta == "The qu"
    kept, delta = seq.commit(ids[2:])  # one round of several tokens: the stop ends mid-block
    assert kept == ids[2:6]
    assert delta == "ick " and seq.text == "The quick "
    assert seq.commit(ids[6:]) == ([], "")  # finished: nothing more is taken


def test_text_withheld_while_a_stop_string_may_be_starting(tok):
    ids = tok.encode(TEXT)  # The| qu|ick| br|ow|n| fo|x| jump|s
    seq = make_seq(tok, stop=[" brown cow"])
    deltas = commit_one_by_one(seq, ids)
    assert deltas[:3] == ["The", " qu", "ick"]
    assert deltas[3:6] == ["", "", ""]  # " br", "ow", "n" could start " brown cow"
    assert deltas[6] == " brown fo"  # " fo" rules the stop out: the held text is released
    assert seq.text == "".join(deltas) == TEXT
    assert seq.finish_reason is None


def test_held_text_released_when_length_ends_the_sequence(tok):
    ids = tok.encode(TEXT)
    seq = make_seq(tok, stop=[" brown cow"], max_tokens=5)
    deltas = commit_one_by_one(seq, ids[:5])
    assert seq.finish_reason == "length" and seq.stop_reason is None
    assert seq.text == "".join(deltas) == "The quick brow"


def test_earliest_of_several_stop_strings_wins(tok):
    seq = make_seq(tok, stop=["fox", "quick"])
    seq.commit(tok.encode(TEXT))
    assert seq.stop_reason == "quick" and seq.text == "The "


def test_eos_ends_the_sequence_without_text(tok):
    a, b = tok.encode("The quick")[:2]
    seq = make_seq(tok)
    kept, delta = seq.commit([a, EOS, b])
    assert kept == [a, EOS] and delta == seq.text == "The"  # a = "The", b = " qu"
    assert seq.finish_reason == "stop" and seq.stop_reason is None


def test_ignore_eos_keeps_going(tok):
    a, b = tok.encode("The quick")[:2]
    seq = make_seq(tok, ignore_eos=True)
    kept, _ = seq.commit([a, EOS, b])
    assert kept == [a, EOS, b] and seq.finish_reason is None


def test_stop_token_id_ends_the_sequence(tok):
    ids = tok.encode(TEXT)
    seq = make_seq(tok, stop_token_ids=[ids[2]])
    kept, _ = seq.commit(ids)
    assert kept == ids[:3]
    assert seq.finish_reason == "stop" and seq.stop_reason == ids[2]


def test_max_tokens_inside_a_block(tok):
    ids = tok.encode(TEXT)
    seq = make_seq(tok, max_tokens=3)
    assert seq.max_new_tokens() == 3
    kept, _ = seq.commit(ids)
    assert kept == ids[:3] and seq.finish_reason == "length"
    assert seq.max_new_tokens() == 0


def test_context_length_bounds_new_tokens(tok):
    seq = make_seq(tok, prompt="Hello", max_model_len=7, max_tokens=None)  # 4-token prompt
    assert seq.max_new_tokens() == 3
    kept, _ = seq.commit(tok.encode(TEXT))
    assert len(kept) == 3 and seq.finish_reason == "length"


def test_logprobs_accumulate_over_kept_tokens(tok):
    ids = tok.encode(TEXT)[:3]
    seq = make_seq(tok, max_tokens=2)
    lps = [{t: -0.5 * (i + 1)} for i, t in enumerate(ids)]
    seq.commit(ids, lps)
    assert seq.logprobs == lps[:2]
    assert seq.cumulative_logprob == pytest.approx(-1.5)


def test_a_further_end_token_ends_the_sequence_and_is_named_as_stop_reason(tok):
    a, b, c = tok.encode("The quick")[:3]
    prompt_ids = tok.encode("Hello")
    seq = Sequence(0, prompt_ids, SamplingParams(max_tokens=100), (EOS, b), 512, IncrementalDetokenizer(tok, prompt_ids))
    kept, delta = seq.commit([a, b, c])
    assert kept == [a, b] and delta == seq.text == "The"  # b (" qu") ends it: in the ids, not the text
    assert seq.finish_reason == "stop" and seq.stop_reason == b  # vLLM: None only for the primary EOS


def test_stop_token_id_stays_out_of_the_text_as_in_vllm(tok):
    ids = tok.encode(TEXT)
    seq = make_seq(tok, stop_token_ids=[ids[2]])
    kept, delta = seq.commit(ids)
    assert kept == ids[:3] and delta == seq.text == "The qu"  # "ick" ended it


def test_end_token_ids_put_the_models_eos_first_and_add_the_tokenizers(tok):
    from specsplit.speculation.sequence import end_token_ids

    assert tok.eos_token_id == EOS
    assert end_token_ids((7, 0, 9), tok) == (7, 0, 9)
    assert end_token_ids((7, 9), tok) == (7, 9, 0)
    assert end_token_ids((), tok) == (0,)
