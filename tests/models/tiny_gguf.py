"""Write a tiny but complete Llama GGUF (random weights, byte-level BPE tokenizer) for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HIDDEN = 16  # hidden size: 2 heads of 8
INTERMEDIATE = 32  # MLP width
LAYERS = 2  # transformer blocks


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 style byte-level BPE uses for the bytes 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_llama_gguf(
    path: Path, seed: int = 0, add_bos: bool = False
) -> dict[str, np.ndarray]:
    """Write the GGUF at `path`; return its float32 tensors by GGUF name."""
    import gguf

    rng = np.random.default_rng(seed)
    merged = ["hi", "th", "Ġth", "er", "Ġther", "Ġthere"]  # one token per merge below
    tokens = SPECIAL_TOKENS + _byte_level_alphabet() + merged
    merges = ["h i", "t h", "Ġ th", "e r", "Ġth er", "Ġther e"]
    vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(HIDDEN // 2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (vocab - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    tensors = {"token_embd.weight": rand(vocab, HIDDEN), "output_norm.weight": 1 + rand(HIDDEN)}
    kv_dim = HIDDEN // 2
    for i in range(LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": 1 + rand(HIDDEN),
            f"blk.{i}.attn_q.weight": rand(HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": rand(kv_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": rand(kv_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": rand(HIDDEN, HIDDEN),
            f"blk.{i}.ffn_norm.weight": 1 + rand(HIDDEN),
            f"blk.{i}.ffn_gate.weight": rand(INTERMEDIATE, HIDDEN),
            f"blk.{i}.ffn_up.weight": rand(INTERMEDIATE, HIDDEN),
            f"blk.{i}.ffn_down.weight": rand(HIDDEN, INTERMEDIATE),
        }
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
