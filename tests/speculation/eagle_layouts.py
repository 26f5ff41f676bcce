"""EAGLE heads written exactly as the EAGLE authors publish them (key names included), with
random weights, for the loader and engine tests. Written by hand, not by our own writer, so
a loader that only reads what specsplit writes would fail here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

STD = 0.2


def _llama_config(target: Path, **extra) -> dict:
    t = json.loads((target / "config.json").read_text())
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
            "rope_theta", "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
            "hidden_act": "silu", "torch_dtype": "float32", **{k: t[k] for k in keep if k in t}, **extra}


def _layer(prefix: str, h: int, inter: int, heads: int, kv: int, q_in: int, gen: torch.Generator) -> dict:
    d = h // heads

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * STD

    return {
        f"{prefix}self_attn.q_proj.weight": r(heads * d, q_in), f"{prefix}self_attn.k_proj.weight": r(kv * d, q_in),
        f"{prefix}self_attn.v_proj.weight": r(kv * d, q_in), f"{prefix}self_attn.o_proj.weight": r(h, heads * d),
        f"{prefix}mlp.gate_proj.weight": r(inter, h), f"{prefix}mlp.up_proj.weight": r(inter, h),
        f"{prefix}mlp.down_proj.weight": r(h, inter),
        f"{prefix}post_attention_layernorm.weight": 1 + r(h),
    }


def _save(folder: Path, config: dict, tensors: dict, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def write_eagle1(folder: Path, target: Path, fmt: str = "bin", seed: int = 0, with_embed: bool = False) -> Path:
    """EAGLE-1: fc [H, 2H] + bias over [embedding, state], layers.0.* without input_layernorm."""
    cfg = _llama_config(target)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    gen = torch.Generator().manual_seed(seed)
    t = {"fc.weight": torch.randn(h, 2 * h, generator=gen) * STD, "fc.bias": torch.randn(h, generator=gen) * STD}
    t |= _layer("layers.0.", h, inter, cfg["num_attention_heads"], cfg["num_key_value_heads"], h, gen)
    if with_embed:
        t["embed_tokens.weight"] = torch.randn(cfg["vocab_size"], h, generator=gen)
    return _save(folder, cfg, t, fmt)


def write_eagle3(folder: Path, target: Path, draft_ids: list[int], fmt: str = "bin", seed: int = 0,
                 aux_layers: list[int] | None = None) -> Path:
    """EAGLE-3: fc [H, 3H], midlayer.* (q/k/v over 2H, hidden_norm), norm, lm_head over a
    reduced vocabulary `draft_ids` (ascending target ids), d2t and t2d."""
    extra = {"draft_vocab_size": len(draft_ids), "architectures": ["LlamaForCausalLMEagle3"]}
    if aux_layers is not None:
        extra["eagle_aux_hidden_state_layer_ids"] = aux_layers
    cfg = _llama_config(target, **extra)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    t = {"fc.weight": torch.randn(h, 3 * h, generator=gen) * STD}
    t |= _layer("midlayer.", h, inter, cfg["num_attention_heads"], cfg["num_key_value_heads"], 2 * h, gen)
    t["midlayer.input_layernorm.weight"] = 1 + torch.randn(h, generator=gen) * STD
    t["midlayer.hidden_norm.weight"] = 1 + torch.randn(h, generator=gen) * STD
    t["norm.weight"] = 1 + torch.randn(h, generator=gen) * STD
    t["lm_head.weight"] = torch.randn(len(draft_ids), h, generator=gen)
    ids = torch.tensor(sorted(draft_ids))
    t["d2t"] = ids - torch.arange(len(draft_ids))
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[ids] = True
    t["t2d"] = t2d
    return _save(folder, cfg, t, fmt)
