"""The published EAGLE / EAGLE-3 layouts load as they are, and the head's cached decoding
matches a dense recomputation over the whole sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specsplit.speculation.eagle.checkpoint import load_head, read_tensors, save_head
from specsplit.speculation.eagle.drafter import HeadRunner
from specsplit.testing import make_tiny_model
from tests.speculation.eagle_layouts import write_eagle1, write_eagle3

DRAFT_IDS = list(range(0, 384, 3))


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("eagle-ckpt") / "target", layers=8, init_std=0.5)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_eagle1_published_layout_loads(tmp_path, target, fmt):
    folder = write_eagle1(tmp_path / "e1", target, fmt=fmt)
    raw = read_tensors(folder)
    loaded = load_head(folder)
    head = loaded.head
    assert head.hc.method == "eagle" and head.hc.fc_bias
    assert not hasattr(head, "input_layernorm")  # layer 0 has no input norm
    assert torch.equal(head.fc.weight, raw["fc.weight"]) and torch.equal(head.fc.bias, raw["fc.bias"])
    qkv = torch.cat([raw[f"layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(head.self_attn.qkv_proj.weight, qkv)
    gate_up = torch.cat([raw["layers.0.mlp.gate_proj.weight"], raw["layers.0.mlp.up_proj.weight"]])
    assert torch.equal(head.mlp.gate_up_proj.weight, gate_up)
    assert loaded.embed is None and loaded.lm_head is None  # shared with the target
    assert head.hc.target_layers(32) == (32,)


def test_eagle1_own_embeddings_are_used_when_present(tmp_path, target):
    folder = write_eagle1(tmp_path / "e1", target, with_embed=True)
    assert torch.equal(load_head(folder).embed, read_tensors(folder)["embed_tokens.weight"])


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_eagle3_published_layout_loads(tmp_path, target, fmt):
    folder = write_eagle3(tmp_path / "e3", target, DRAFT_IDS, fmt=fmt)
    raw = read_tensors(folder)
    loaded = load_head(folder, "eagle3")
    head = loaded.head
    assert head.hc.method == "eagle3" and head.hc.draft_vocab_size == len(DRAFT_IDS) and not head.hc.fc_bias
    assert head.fc.weight.shape == (64, 3 * 64) and head.self_attn.qkv_proj.weight.shape[1] == 2 * 64
    assert torch.equal(head.hidden_norm.weight, raw["midlayer.hidden_norm.weight"])
    assert torch.equal(head.lm_head.weight, raw["lm_head.weight"])
    assert head.draft_to_target().tolist() == DRAFT_IDS
    assert loaded.t2d is not None and loaded.t2d.nonzero().flatten().tolist() == DRAFT_IDS
    assert head.hc.target_layers(32) == (2, 16, 29)  # vLLM's default choice


def test_eagle3_config_chooses_target_layers(tmp_path, target):
    folder = write_eagle3(tmp_path / "e3", target, DRAFT_IDS, aux_layers=[0, 1, 2])
    assert load_head(folder).head.hc.target_layers(2) == (0, 1, 2)
    with pytest.raises(ValueError, match="too shallow"):
        load_head(write_eagle3(tmp_path / "d", target, DRAFT_IDS)).head.hc.target_layers(2)


def test_method_must_match_layout(tmp_path, target):
    with pytest.raises(ValueError, match="holds an 'eagle3' head"):
        load_head(write_eagle3(tmp_path / "e3", target, DRAFT_IDS), "eagle")


def test_incomplete_checkpoint_is_refused(tmp_path, target):
    folder = write_eagle3(tmp_path / "e3", target, DRAFT_IDS)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["midlayer.hidden_norm.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing.*hidden_norm"):
        load_head(folder)


def test_not_an_eagle_head_is_refused(tmp_path, target):
    with pytest.raises(ValueError, match="not an EAGLE head"):
        load_head(target)


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_our_writer_round_trips(tmp_path, target, method):
    src = write_eagle3(tmp_path / "a", target, DRAFT_IDS) if method == "eagle3" else write_eagle1(tmp_path / "a", target)
    loaded = load_head(src)
    import json

    out = save_head(tmp_path / "b", loaded.head, json.loads((src / "config.json").read_text()), t2d=loaded.t2d)
    assert set(read_tensors(out)) == set(read_tensors(src))
    again = load_head(out).head.state_dict()
    for k, v in loaded.head.state_dict().items():
        assert torch.equal(again[k], v), k


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_cached_steps_match_dense_recomputation(tmp_path, target, method):
    """Entries fed in pieces, with a rollback, through the paged cache and at a shifted base
    position give the same output states as one causal pass over the whole sequence."""
    folder = write_eagle3(tmp_path / "h", target, DRAFT_IDS) if method == "eagle3" else write_eagle1(tmp_path / "h", target)
    head = load_head(folder).head
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(384, 64, generator=gen)
    t = 11
    toks = torch.randint(0, 384, (t,), generator=gen)
    states = head.project(torch.randn(t, head.hc.state_size, generator=gen))
    with torch.no_grad():
        dense, _ = head.forward_train(embed[toks][None], states[None], torch.arange(t) + 5, [])
    runner = HeadRunner(head, embed, torch.nn.Identity(), 384, device=torch.device("cpu"), max_model_len=64,
                        kv_cache_bytes=1 << 20)
    runner.cache.add(7)
    runner.step([7], [toks[:4].tolist()], states[:4], [5])
    runner.step([7], [toks[4:9].tolist()], states[4:9], [5])
    runner.cache.truncate(7, 6)  # drop entries 6..8 and feed them again with the rest
    last = runner.step([7], [toks[6:].tolist()], states[6:], [5])
    torch.testing.assert_close(last[0], dense[0, -1], rtol=1e-4, atol=1e-4)
    mid = runner.step  # a second sequence in the same batch with its own base
    runner.cache.add(8)
    outs = mid([7, 8], [[int(toks[0])], toks[:3].tolist()], torch.cat([states[:1], states[:3]]), [5, 5])
    with torch.no_grad():
        d3, _ = head.forward_train(embed[toks[:3]][None], states[None, :3], torch.arange(3) + 5, [])
    torch.testing.assert_close(outs[1], d3[0, -1], rtol=1e-4, atol=1e-4)


def test_wire_packing_round_trips_bf16_rows():
    from specsplit.speculation.eagle.wire import bytes_per_token, pack_states, unpack_states

    x = torch.randn(3, 12)
    data = pack_states(x)
    assert len(data) == 3 * 12 * 2
    assert torch.equal(unpack_states(data, 12), x.bfloat16())
    assert bytes_per_token(4096, 3) == 24576 and bytes_per_token(4096, 1) == 8192
    with pytest.raises(ValueError, match="whole rows"):
        unpack_states(data[:-2], 12)
