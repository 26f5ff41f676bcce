"""Tiny, randomly initialised models with a real tokenizer, built offline in a second.

Used by the unit tests, the services' end-to-end tests and the GPU benchmarks (which build
real-shaped models with random weights because no checkpoint reaches those machines).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts tokens and verifies them.",
    "for i in range(10):\n    print(i * i)\nclass Tree:\n    def __init__(self, left, right):\n        self.left = left\n",
    "import numpy as np\nx = np.zeros((3, 4))\nreturn sorted(values, key=lambda v: -v)\n",
]


def make_tokenizer(folder: Path, vocab_size: int = 384) -> Any:
    """Train a small byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token=None, pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(
    folder: Path, arch: str = "llama", *, seed: int = 0, vocab_size: int = 384, hidden_size: int = 64,
    layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128, max_len: int = 512,
    init_std: float = 0.2, tokenizer: bool = True, base: Path | None = None, noise: float = 0.0,
) -> Path:
    """Save a random HF model (+ tokenizer). `base` + `noise` makes a correlated draft model.

    A larger init_std than the HF default gives peaked, input-dependent distributions, so
    greedy paths vary and sampled tests see more than a near-uniform distribution.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, eos_token_id=0, bos_token_id=None, tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if base is not None:
        ref = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
                p.copy_(q + noise * torch.randn_like(q) * q.std()) if name.endswith("weight") else p.copy_(q)
    model.save_pretrained(folder)
    if tokenizer:
        make_tokenizer(folder, vocab_size)
    return folder


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
