import copy
import json
import math
import pickle

import pytest

from specsplit.sampling import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.min_p == 0.0
    assert p.seed is None
    assert p.max_tokens == 16
    assert p.stop == []
    assert p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.logprobs is None
    assert p.repetition_penalty == 1.0
    assert not p.greedy


@pytest.mark.parametrize(
    "temperature, greedy", [(0.0, True), (0.9e-5, True), (1e-5, False), (0.7, False)]
)
def test_greedy_threshold(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 16},
        {"temperature": 0},
        {"temperature": 100},
        {"top_p": 1e-6},
        {"top_k": 0},
        {"top_k": 50},
        {"min_p": 1.0},
        {"seed": 0},
        {"seed": -(2**63)},
        {"max_tokens": None},
        {"max_tokens": 1},
        {"logprobs": 0},
        {"logprobs": 20},
        {"repetition_penalty": 0.5},
        {"stop": ["x" * 256] * 16},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"logit_bias": {0: -100, "7": 100.0}},
        {"logit_bias": {}},
        {"prompt_logprobs": 0},
    ],
)
def test_valid_edges_accepted(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": 1.0}, "n"),
        ({"n": True}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"seed": 2**63}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {3: 100.5}}, "logit_bias"),
        ({"logit_bias": {3: "1"}}, "logit_bias"),
        ({"logit_bias": {i: 1 for i in range(1025)}}, "logit_bias"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_invalid_value_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_range_error_states_allowed_range():
    with pytest.raises(ValueError, match=r"n must be in \[1, 16\], got 17"):
        SamplingParams(n=17)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0.0)


def test_stop_string_normalised_to_list():
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_stop_token_ids_normalised_to_list():
    assert SamplingParams(stop_token_ids=(2, 3)).stop_token_ids == [2, 3]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


def test_integer_floats_converted():
    p = SamplingParams(temperature=1, top_p=1, min_p=0, repetition_penalty=2)
    assert isinstance(p.temperature, float)
    assert isinstance(p.repetition_penalty, float)


def test_to_dict_from_dict_round_trip_through_json():
    p = SamplingParams(
        n=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=1234,
        max_tokens=None,
        stop="END",
        stop_token_ids=[2],
        ignore_eos=True,
        logprobs=5,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        logit_bias={5: 2.0, 9: -100.0},
        prompt_logprobs=1,
    )
    d = json.loads(json.dumps(p.to_dict()))  # logit_bias keys become strings in JSON
    assert d["stop"] == ["END"]
    assert SamplingParams.from_dict(d) == p


def test_from_dict_partial_uses_defaults():
    assert SamplingParams.from_dict({"temperature": 0}) == SamplingParams(temperature=0.0)


def test_from_dict_unknown_key_named():
    with pytest.raises(ValueError, match="best_of, tempreature"):
        SamplingParams.from_dict({"tempreature": 0.5, "best_of": 2, "n": 1})


def test_from_dict_not_an_object():
    with pytest.raises(ValueError, match="object"):
        SamplingParams.from_dict([("n", 1)])  # type: ignore[arg-type]


def test_from_dict_validates():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})


def test_to_dict_is_a_copy():
    p = SamplingParams(stop=["a"])
    p.to_dict()["stop"].append("b")
    assert p.stop == ["a"]


def test_picklable_and_copyable():
    p = SamplingParams(temperature=0.5, stop=["x"], seed=3)
    assert pickle.loads(pickle.dumps(p)) == p
    q = copy.deepcopy(p)
    assert q == p and q.stop is not p.stop
    assert copy.copy(p) == p
