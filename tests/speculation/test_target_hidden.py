"""Hidden states per session: a target step serves sessions that ask for different layers (or
none) in one batch, and each gets exactly its own layers' states of the positions it kept."""

from __future__ import annotations

import pytest
import torch

from specsplit.runtime.random_weights import random_model
from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.session import SessionError
from specsplit.speculation.target import TargetVerifier, VerifyItem

CPU = torch.device("cpu")
SHAPE = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
GREEDY = SamplingParams(temperature=0.0)


def _runner() -> ModelRunner:
    cfg, model = random_model(SHAPE, CPU, torch.float32, seed=3, std=0.3)
    return ModelRunner.from_model(cfg, model, device=CPU, kv_cache_bytes=1 << 22, max_model_len=512)


def _alone(tokens: list[int], layers: tuple[int, ...]) -> torch.Tensor:
    r = _runner()
    r.add(0)
    return r.forward_hidden([StepInput(0, tokens, 1, len(tokens))], layers)[1]


def test_sessions_asking_different_layers_share_a_step():
    v = TargetVerifier(_runner())
    prompts = {1: [5, 9, 14, 3, 7], 2: [8, 1, 2, 200, 31, 4], 3: [10, 11, 12]}
    layers = {1: (6,), 2: (2, 3, 4), 3: None}
    for sid, p in prompts.items():
        v.open(sid, p, GREEDY, hidden_layers=layers[sid] or ())
    first = v.step([VerifyItem(sid) for sid in prompts])  # prefill all three in one forward
    drafts = {1: [(first[0].emitted[-1] + 1) % 256], 2: [], 3: [4, 4]}
    second = v.step([VerifyItem(sid, drafts[sid]) for sid in prompts])
    for i, sid in enumerate(prompts):
        if layers[sid] is None:
            assert first[i].hidden_states is None and second[i].hidden_states is None
            continue
        seq = prompts[sid] + first[i].emitted + second[i].emitted
        ref = _alone(seq, layers[sid])  # [len(seq), D]
        got = torch.cat([first[i].hidden_states, second[i].hidden_states])
        # every position but the last (its state predicts the token after the last emitted)
        assert got.shape == (len(seq) - 1, 32 * len(layers[sid]))
        torch.testing.assert_close(got, ref[: len(seq) - 1], atol=1e-4, rtol=1e-4)


def test_hidden_layers_outside_the_model_are_refused():
    v = TargetVerifier(_runner())
    with pytest.raises(SessionError, match="hidden layers"):
        v.open(1, [1, 2], GREEDY, hidden_layers=(7,))
    with pytest.raises(SessionError, match="hidden layers"):
        v.open(1, [1, 2], GREEDY, hidden_layers=(0, 1, 2, 3, 4))


def test_a_session_told_to_stop_states_computes_none_and_keeps_its_tokens():
    """After the EAGLE draft is gone: no state rows, no hidden-state forward, the same tokens."""
    prompt = [5, 9, 14, 3, 7]
    plain, told = TargetVerifier(_runner()), TargetVerifier(_runner())
    plain.open(1, prompt, GREEDY)
    told.open(1, prompt, GREEDY, hidden_layers=(2, 3, 4))
    assert told.step([VerifyItem(1)])[0].hidden_states is not None
    plain.step([VerifyItem(1)])

    def no_hidden_forward(*a: object, **kw: object) -> None:
        raise AssertionError("a session that stopped its states ran the hidden-state forward")

    told.runner.forward_hidden = no_hidden_forward  # type: ignore[method-assign]
    got = told.step([VerifyItem(1, [4, 4], stop_states=True)])[0]
    ref = plain.step([VerifyItem(1, [4, 4])])[0]
    assert got.hidden_states is None and got.emitted == ref.emitted
    for _ in range(3):  # and from then on
        got, ref = told.step([VerifyItem(1)])[0], plain.step([VerifyItem(1)])[0]
        assert got.hidden_states is None and got.emitted == ref.emitted
