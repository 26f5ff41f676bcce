"""Our Transformer with random weights at real shapes, built directly on the device.

The GPU benchmarks measure real-shaped models without a checkpoint (none reaches those
machines), and a tensor-parallel worker builds its shard of such a model the same way: every
rank draws the same full tensors from per-tensor seeds and keeps its slice.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# Real shapes of the models the GPU benchmarks stand in for (random weights).
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                   rope_theta=500000.0, rms_norm_eps=1e-5)
LLAMA_31_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                    rope_theta=500000.0, rms_norm_eps=1e-5)
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


@dataclass(frozen=True)
class RandomWeights:
    """A random model by recipe, so each tensor-parallel rank can build its own shard of it."""

    shape: dict  # LlamaConfig keyword arguments (e.g. LLAMA_31_8B)
    seed: int = 0  # same seed = same logical model, whatever the tensor-parallel size
    std: float = 0.02  # of the projection weights
    confident: bool = False  # embeddings N(0, 1), LM head = permuted embeddings / sqrt(H): see below


def random_hf_tensors(cfg: Any, device: torch.device, dtype: torch.dtype, *, seed: int = 0, std: float = 0.02,
                      confident: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) checkpoint tensors with Hugging Face names, generated on `device`.

    Each tensor has its own generator seeded from (seed, name), so every rank draws the same
    full tensor and keeps its slice: TP = N and TP = 1 hold the same logical model.
    `confident`: the greedy next token is perm[current token] by a wide margin (the target of
    benchmarks/oracle.py: rounding differences can never flip it), with `std` small.
    """
    h, d = cfg.hidden_size, cfg.head_dim

    def rand(name: str, *size: int, scale: float = std) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return torch.empty(size, dtype=dtype, device=device).normal_(0.0, scale, generator=gen)

    emb = rand("embed", cfg.vocab_size, h, scale=1.0 if confident else std)  # [V, H]
    yield "model.embed_tokens.weight", emb
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for name, rows in (("q", cfg.num_heads * d), ("k", cfg.num_kv_heads * d), ("v", cfg.num_kv_heads * d)):
            yield f"{p}self_attn.{name}_proj.weight", rand(f"{p}{name}", rows, h)
            if cfg.qkv_bias:
                yield f"{p}self_attn.{name}_proj.bias", rand(f"{p}{name}.b", rows)
        yield f"{p}self_attn.o_proj.weight", rand(f"{p}o", h, cfg.num_heads * d)
        yield f"{p}mlp.gate_proj.weight", rand(f"{p}gate", cfg.intermediate_size, h)
        yield f"{p}mlp.up_proj.weight", rand(f"{p}up", cfg.intermediate_size, h)
        yield f"{p}mlp.down_proj.weight", rand(f"{p}down", h, cfg.intermediate_size)
        yield f"{p}input_layernorm.weight", torch.ones(h, dtype=dtype, device=device)
        yield f"{p}post_attention_layernorm.weight", torch.ones(h, dtype=dtype, device=device)
    yield "model.norm.weight", torch.ones(h, dtype=dtype, device=device)
    if confident:
        perm = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(seed + 1)).to(device)  # [V]
        head = torch.empty_like(emb)
        head[perm] = emb * (1.0 / h**0.5)
        yield "lm_head.weight", head
    elif not cfg.tie_word_embeddings:
        yield "lm_head.weight", rand("lm_head", cfg.vocab_size, h)


def confident_perm(vocab_size: int, seed: int = 0) -> list[int]:
    """The greedy successor of each token in `random_model(..., confident=True)`."""
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed + 1)).tolist()


def random_model(shape: dict, device: torch.device, dtype: torch.dtype, *, seed: int = 0,
                 ctx: Any = None, std: float = 0.02, confident: bool = False) -> tuple[Any, Any]:
    """Our Transformer with random weights built directly on `device`; returns (ModelConfig, model).

    With a tensor-parallel `ctx`, the model is this rank's shard of the same logical model.
    """
    from transformers import LlamaConfig

    from specsplit.runtime.config import ModelConfig
    from specsplit.runtime.model import Transformer, rope_inv_freq
    from specsplit.runtime.parallel import SINGLE
    from specsplit.runtime.weights import load_weights

    cfg = ModelConfig.from_hf(LlamaConfig(**(dict(shape, tie_word_embeddings=False) if confident else shape)))
    with torch.device("meta"):
        model = Transformer(cfg, ctx or SINGLE)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # rows past the vocabulary (padding to the TP size) stay zero
        load_weights(model, random_hf_tensors(cfg, device, dtype, seed=seed, std=std, confident=confident))
        model.inv_freq.copy_(rope_inv_freq(cfg).to(device))
    return cfg, model.eval()
