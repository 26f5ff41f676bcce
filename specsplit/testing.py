"""Tiny, randomly initialised models with a real tokenizer, built offline in a second.

Used by the unit tests, the services' end-to-end tests and the scripts. Real-shaped models
with random weights (the GPU benchmarks) are built by `specsplit.runtime.random_weights`.
"""

from __future__ import annotations

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
