"""The `LLM` API: clear ValueErrors for every bad input, and vLLM-shaped results."""

from __future__ import annotations

import pytest
import torch

from specsplit import LLM, SamplingParams, SpeculativeConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_unknown_speculative_config_key(tiny_target):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_spec_tokens'\]"):
        LLM(str(tiny_target), speculative_config={"method": "ngram", "num_spec_tokens": 3})


def test_unknown_method(tiny_target):
    with pytest.raises(ValueError, match="unknown method 'medusa'"):
        LLM(str(tiny_target), speculative_config={"method": "medusa"})


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_without_head_is_refused(tiny_target, method):
    with pytest.raises(ValueError, match=f"method '{method}' needs 'model'"):
        LLM(str(tiny_target), speculative_config={"method": method})


def test_draft_model_without_model(tiny_target):
    with pytest.raises(ValueError, match="needs 'model'"):
        LLM(str(tiny_target), speculative_config={"method": "draft_model", "num_speculative_tokens": 3})


def test_draft_model_that_does_not_exist(tiny_target, tmp_path):
    with pytest.raises(ValueError, match="cannot resolve model"):
        LLM(str(tiny_target), speculative_config={"model": str(tmp_path / "no-such-draft")},
            kv_cache_memory_bytes=1 << 20)


def test_draft_with_other_vocabulary_rejected(tiny_target, other_vocab_model):
    with pytest.raises(ValueError, match="different vocabulary"):
        LLM(str(tiny_target), speculative_config={"model": str(other_vocab_model)}, kv_cache_memory_bytes=1 << 20)


@pytest.mark.parametrize("bad", [
    {"method": "ngram", "num_speculative_tokens": 0},
    {"method": "ngram", "num_speculative_tokens": 17},
    {"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2},
    {"method": "ngram", "model": "x"},
    {"model": "x", "draft_top_k": 0},
    "{not json",
    ["ngram"],
])
def test_bad_speculative_config(bad):
    with pytest.raises(ValueError, match="speculative_config"):
        SpeculativeConfig.from_any(bad)


def test_speculative_config_from_json_string():
    cfg = SpeculativeConfig.from_any('{"method": "ngram", "num_speculative_tokens": 4}')
    assert (cfg.method, cfg.num_speculative_tokens, cfg.adaptive) == ("ngram", 4, True)
    assert SpeculativeConfig.from_any("") is None and SpeculativeConfig.from_any(None) is None


def test_max_model_len_beyond_the_model(tiny_target):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        LLM(str(tiny_target), max_model_len=100_000, kv_cache_memory_bytes=1 << 20)


def test_unknown_dtype(tiny_target):
    with pytest.raises(ValueError, match="unknown dtype"):
        LLM(str(tiny_target), dtype="float8", kv_cache_memory_bytes=1 << 20)


@pytest.fixture(scope="module")
def llm(tiny_target, tiny_draft):
    return LLM(str(tiny_target), speculative_config={"model": str(tiny_draft), "num_speculative_tokens": 3},
               max_model_len=64, kv_cache_memory_bytes=1 << 22)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.generate({"prompt_token_ids": [5] * 64}, GREEDY, use_tqdm=False)
    llm.generate({"prompt_token_ids": [5] * 63}, GREEDY, use_tqdm=False)  # one token of room


def test_failed_generate_leaves_no_request_behind(llm):
    ok = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([ok, {"prompt_token_ids": [5] * 100}], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    out = llm.generate(ok, GREEDY, use_tqdm=False)  # and the engine is still usable
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize("prompt, match", [
    ({"prompt_token_ids": [5, 384]}, "outside the vocabulary"),
    ({"prompt_token_ids": [5, -1]}, "outside the vocabulary"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": "5 6"}, "list of ints"),
    ({"text": "hi"}, "a prompt must be"),
    (42, "a prompt must be"),
])
def test_bad_prompts(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("kw, match", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n must be"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "stop string"),
    ({"logprobs": 21}, "logprobs"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_bad_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_sampling_params_count_must_match_prompts(llm):
    with pytest.raises(ValueError, match="2 prompts but 3 sampling params"):
        llm.generate(["a", "b"], [GREEDY] * 3, use_tqdm=False)


def test_request_output_shape(llm):
    out = llm.generate(["def fibonacci(n):", {"prompt": "The quick", "prompt_token_ids": [317, 380]}],
                       SamplingParams(temperature=0.0, max_tokens=6, n=2, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in out] == ["def fibonacci(n):", "The quick"]
    assert out[0].prompt_token_ids == llm.get_tokenizer().encode("def fibonacci(n):")
    assert out[1].prompt_token_ids == [317, 380]
    for o in out:
        assert o.finished and len(o.outputs) == 2
        for c in o.outputs:
            assert len(c.token_ids) == 6 and c.finish_reason == "length" and c.stop_reason is None
            assert c.text == llm.get_tokenizer().decode(c.token_ids)
            assert c.logprobs is None and c.cumulative_logprob is None
            assert c.metrics.num_emitted_tokens == 6 and c.metrics.num_rounds >= 2
        assert o.metrics.num_emitted_tokens == 12  # summed over the n completions


def test_chat_template_applied(llm):
    conv = [{"role": "user", "content": "hi"}]
    assert llm.apply_chat_template(conv) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (out,) = llm.chat(conv, GREEDY, use_tqdm=False)
    assert out.prompt == llm.apply_chat_template(conv)
    two = llm.chat([conv, conv], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two] == [out.outputs[0].token_ids] * 2


def test_plain_greedy_equals_transformers_generate(make_llm, tiny_target):
    from transformers import AutoModelForCausalLM

    plain = make_llm(tiny_target)
    ids = plain.get_tokenizer().encode("def fibonacci(n):")
    hf = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(ids):].tolist()
    out = plain.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref
