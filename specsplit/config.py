"""User-facing configuration objects shared by the LLM API, the CLI and the services."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from specsplit.sampling.params import unknown_fields
from specsplit.speculation.session import MAX_SPECULATIVE_TOKENS

METHODS = ("draft_model", "ngram", "eagle", "eagle3")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config`, validated on construction."""

    method: str = "draft_model"  # how blocks are proposed: a small LM or prompt lookup
    num_speculative_tokens: int = 5  # k, the longest block; adaptive k stays at or below it
    model: str | None = None  # draft model (folder, GGUF, hub id, catalogue name), or EAGLE head folder
    prompt_lookup_max: int = 4  # longest n-gram matched against the history (ngram)
    prompt_lookup_min: int = 1  # shortest n-gram that still counts as a match (ngram)
    draft_tensor_parallel_size: int = 1  # GPUs the draft model is sharded over
    draft_top_k: int = 32  # K of the sparse draft distribution sent for sampled requests
    adaptive: bool = True  # choose k per sequence from its recent acceptance and measured costs

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: unknown method {self.method!r}; choose one of {METHODS}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}, "
                             f"got {self.num_speculative_tokens}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config: method 'draft_model' needs 'model' (the draft model)")
        if self.method in ("eagle", "eagle3") and not self.model:
            raise ValueError(f"speculative_config: method {self.method!r} needs 'model' (the EAGLE head folder)")
        if self.method in ("eagle", "eagle3"):  # keys of other methods that would silently do nothing
            if (self.prompt_lookup_min, self.prompt_lookup_max) != (1, 4):
                raise ValueError(f"speculative_config: prompt_lookup_min/max are n-gram keys; method "
                                 f"{self.method!r} does not use them")
            if self.draft_tensor_parallel_size != 1:
                raise ValueError(f"speculative_config: an EAGLE head runs on one device; method {self.method!r} "
                                 "takes no draft_tensor_parallel_size")
        if self.method == "ngram" and self.model:
            raise ValueError("speculative_config: method 'ngram' takes no 'model'")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 32:
            raise ValueError("speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max <= 32, "
                             f"got {self.prompt_lookup_min}, {self.prompt_lookup_max}")
        if self.draft_tensor_parallel_size < 1:
            raise ValueError("speculative_config: draft_tensor_parallel_size must be >= 1")
        if not 1 <= self.draft_top_k <= 1024:
            raise ValueError(f"speculative_config: draft_top_k must be in 1..1024, got {self.draft_top_k}")

    @classmethod
    def from_any(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """Accept a config, a dict, or a JSON string (the CLI's --speculative-config)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or JSON object, got {type(value).__name__}")
        unknown = unknown_fields(cls, value)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; "
                             f"known keys: {sorted(f.name for f in fields(cls))}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
