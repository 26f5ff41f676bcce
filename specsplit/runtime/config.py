"""Model shape configuration for the Llama-family runtime, read from a Hugging Face config.

Only the fields the runtime needs, named once, so the model code never touches a
transformers object (whose attribute names move between releases).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder."""

    model_type: str  # "llama" | "qwen2" | "mistral": picks the few places they differ
    vocab_size: int  # rows of the embedding and the LM head
    hidden_size: int  # residual stream width
    intermediate_size: int  # MLP inner width (SwiGLU)
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int  # per-head width (not always hidden_size / num_heads)
    rms_norm_eps: float  # RMSNorm epsilon, must match training
    rope_theta: float  # rotary base frequency
    max_position_embeddings: int  # context the model was trained for
    tie_word_embeddings: bool  # LM head shares the embedding matrix
    qkv_bias: bool  # Qwen2 has biases on q/k/v projections
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # e.g. Llama 3.1 "llama3" scaling
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # every id that ends generation (config, then generation config)

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Build from a transformers PretrainedConfig (any 4.5x or 5.x release)."""
        model_type = getattr(hf, "model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r}; specsplit runs {SUPPORTED_ARCHITECTURES}"
            )
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        legacy_scaling = getattr(hf, "rope_scaling", None) or {}
        if isinstance(legacy_scaling, dict):
            rope = {**legacy_scaling, **rope}
        theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope_type != "default" else {}
        if scaling and rope_type != "llama3":
            raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: default, llama3")
        num_heads = int(hf.num_attention_heads)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        qkv_bias = True if model_type == "qwen2" else bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(hf.vocab_size),
            hidden_size=int(hf.hidden_size),
            intermediate_size=int(hf.intermediate_size),
            num_layers=int(hf.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=theta,
            max_position_embeddings=int(hf.max_position_embeddings),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rope_scaling=scaling,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )


def generation_eos_ids(folder: str | Path) -> tuple[int, ...]:
    """The end tokens of `generation_config.json` (Qwen2.5 ends on <|im_end|> *and* <|endoftext|>
    there, while config.json names one); vLLM stops on these too."""
    try:
        eos = json.loads((Path(folder) / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(int(i) for i in ids if isinstance(i, int))


def with_generation_eos(cfg: ModelConfig, folder: str | Path) -> ModelConfig:
    """`cfg` whose end tokens also hold the generation config's, config.json's first."""
    extra = tuple(i for i in generation_eos_ids(folder) if i not in cfg.eos_token_ids)
    return dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + extra) if extra else cfg
