"""Our Transformer with random weights at real shapes, built directly on the device.

The GPU benchmarks measure real-shaped models without a checkpoint (none reaches those
machines), and a tensor-parallel worker builds its shard of such a model the same way.
"""

from __future__ import annotations

from typing import Any

import torch

# Real shapes of the models the GPU benchmarks stand in for.
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                   rope_theta=500000.0, rms_norm_eps=1e-5)
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def random_model(shape: dict, device: torch.device, dtype: torch.dtype, *, seed: int = 0,
                 ctx: Any = None, std: float = 0.02) -> tuple[Any, Any]:
    """Our Transformer with random weights built directly on `device`; returns (ModelConfig, model)."""
    from transformers import LlamaConfig

    from specsplit.runtime.config import ModelConfig
    from specsplit.runtime.model import Transformer, rope_inv_freq
    from specsplit.runtime.parallel import SINGLE

    cfg = ModelConfig.from_hf(LlamaConfig(**shape))
    with torch.device("meta"):
        model = Transformer(cfg, ctx or SINGLE)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif p.numel():
                p.normal_(0.0, std, generator=gen)
        model.inv_freq.copy_(rope_inv_freq(cfg).to(device))
    return cfg, model.eval()
