"""Build targets, drafters and tokenizers from user-level names: one place for the LLM API,
the CLI and both services, so they all resolve and check models the same way."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from specsplit.config import SpeculativeConfig
from specsplit.runtime.runner import ModelRunner
from specsplit.speculation.drafters import Drafter, DraftModelDrafter, NgramDrafter
from specsplit.speculation.target import TargetVerifier

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def model_folder(spec: str | Path) -> Path:
    """A Hugging Face folder for a folder, GGUF file, catalogue name or hub id."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        return path
    from specsplit.models import resolve_model

    return Path(resolve_model(str(spec)))


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def check_same_vocabulary(target_tok: Any, draft_tok: Any, draft_name: str) -> None:
    """Speculation compares token ids, so both tokenizers must give every string the same id."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv != dv:
        only_t = len(set(tv.items()) - set(dv.items()))
        only_d = len(set(dv.items()) - set(tv.items()))
        raise ValueError(
            f"draft model {draft_name!r} has a different vocabulary from the target "
            f"({only_t} target entries and {only_d} draft entries differ); speculation needs the same tokenizer"
        )


def load_runner(
    spec: str | Path, *, dtype: str = "auto", device: torch.device | None = None,
    max_model_len: int | None = None, kv_cache_bytes: int | None = None,
    gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
    on_worker_death: Any = None, enforce_eager: bool = False,
) -> tuple[ModelRunner, Any]:
    """Load a model and its tokenizer; returns (runner, tokenizer)."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    folder = model_folder(spec)
    kw = dict(dtype=dtype, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
              gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
    device = device or default_device()
    if tensor_parallel_size > 1:
        from specsplit.runtime.tensor_parallel import TensorParallelRunner

        runner: Any = TensorParallelRunner(folder, tensor_parallel_size, device_type=device.type,
                                           on_worker_death=on_worker_death, **kw)
    else:
        runner = ModelRunner.from_folder(folder, device=device, **kw)
    return runner, load_tokenizer(folder)


def load_target(spec: str | Path, **kw: Any) -> tuple[TargetVerifier, Any]:
    """A TargetVerifier over a (possibly tensor-parallel) runner, and the tokenizer."""
    runner, tok = load_runner(spec, **kw)
    return TargetVerifier(runner), tok


def load_drafter(
    cfg: SpeculativeConfig, target_tokenizer: Any, target_vocab_size: int, *, dtype: str = "auto",
    device: torch.device | None = None, max_model_len: int | None = None,
    kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
    target: TargetVerifier | None = None, target_model: str | Path | None = None,
) -> Drafter:
    """The drafter named by a speculative config, checked against the target's vocabulary.

    EAGLE heads read the target's hidden states: `target` (in process) is told to expose them."""
    device = device or default_device()
    if cfg.method == "ngram":
        return NgramDrafter(target_vocab_size, device, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
    assert cfg.model is not None  # guaranteed by SpeculativeConfig
    if cfg.method in ("eagle", "eagle3"):
        return _load_eagle(cfg, target, target_model, target_vocab_size, device, max_model_len, kv_cache_bytes)
    runner, tok = load_runner(
        cfg.model, dtype=dtype, device=device, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
        gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=cfg.draft_tensor_parallel_size,
        enforce_eager=enforce_eager,
    )
    check_same_vocabulary(target_tokenizer, tok, cfg.model)
    if runner.cfg.vocab_size > target_vocab_size:
        raise ValueError(
            f"draft model {cfg.model!r} has {runner.cfg.vocab_size} embedding rows, more than the "
            f"target's {target_vocab_size}"
        )
    return DraftModelDrafter(runner, cfg.draft_top_k)


def _load_eagle(cfg: SpeculativeConfig, target: TargetVerifier | None, target_model: str | Path | None,
                vocab_size: int, device: torch.device, max_model_len: int | None,
                kv_cache_bytes: int | None) -> Drafter:
    from specsplit.speculation.eagle.build import load_eagle_drafter

    if target is None:
        raise ValueError(f"method {cfg.method!r} runs in process (LLM) only for now: the draft tier does not "
                         "receive the target's hidden states yet")
    runner = target.runner
    drafter = load_eagle_drafter(
        cfg.method, cfg.model, target=runner, target_folder=model_folder(target_model) if target_model else None,
        vocab_size=vocab_size, num_target_layers=runner.cfg.num_layers, device=device,
        dtype=runner.dtype if hasattr(runner, "dtype") else runner.local.dtype,  # the target's own
        max_model_len=min(max_model_len or runner.max_model_len, runner.max_model_len),
        kv_cache_bytes=kv_cache_bytes, top_k=cfg.draft_top_k,
    )
    target.expose_hidden(drafter.target_layers(runner.cfg.num_layers))
    return drafter
