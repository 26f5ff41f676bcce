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
        return _load_eagle(cfg, target, target_model, target_vocab_size, device, max_model_len, kv_cache_bytes, dtype)
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
                kv_cache_bytes: int | None, dtype: str = "auto") -> Drafter:
    """In process (`target` given): the head shares the target's embeddings and the target is
    told to return the head's states. On the draft tier (`target_model` only): the embeddings
    (and EAGLE-1's LM head) are read from the target's checkpoint, and the states arrive with
    each propose (the session asks the target tier for `eagle_target_layers`)."""
    from specsplit.speculation.eagle.build import load_eagle_drafter

    if target is None:
        if target_model is None:
            raise ValueError(f"method {cfg.method!r} on the draft tier needs the target model (the tier's MODEL): "
                             "the head reads the target's embeddings and hidden states")
        folder = model_folder(target_model)
        tcfg = _model_config(folder)
        from specsplit.runtime.runner import resolve_dtype

        head_dtype = resolve_dtype(dtype, device, _checkpoint_dtype(folder))
        limit = min(max_model_len or tcfg.max_position_embeddings, tcfg.max_position_embeddings)
        drafter = load_eagle_drafter(
            cfg.method, cfg.model, target=None, target_folder=folder, vocab_size=vocab_size,
            num_target_layers=tcfg.num_layers, device=device, dtype=head_dtype, max_model_len=limit,
            kv_cache_bytes=kv_cache_bytes, top_k=cfg.draft_top_k,
        )
        _check_head_width(drafter, tcfg.hidden_size, cfg.model)
        return drafter
    runner = target.runner
    drafter = load_eagle_drafter(
        cfg.method, cfg.model, target=runner, target_folder=model_folder(target_model) if target_model else None,
        vocab_size=vocab_size, num_target_layers=runner.cfg.num_layers, device=device,
        dtype=runner.dtype if hasattr(runner, "dtype") else runner.local.dtype,  # the target's own
        max_model_len=min(max_model_len or runner.max_model_len, runner.max_model_len),
        kv_cache_bytes=kv_cache_bytes, top_k=cfg.draft_top_k,
    )
    _check_head_width(drafter, runner.cfg.hidden_size, cfg.model)
    target.expose_hidden(drafter.target_layers(runner.cfg.num_layers))
    return drafter


def _model_config(folder: Path) -> Any:
    from transformers import AutoConfig

    from specsplit.runtime.config import ModelConfig

    return ModelConfig.from_hf(AutoConfig.from_pretrained(folder))


def _checkpoint_dtype(folder: Path) -> str | None:
    import json

    return json.loads((folder / "config.json").read_text()).get("torch_dtype")


def _check_head_width(drafter: Any, target_hidden: int, head: str | None) -> None:
    """The head's fc reads target states of its `target_hidden_size`: another target's would not fit."""
    hc = drafter.runner.head.hc
    if hc.target_hidden_size != target_hidden:
        raise ValueError(f"EAGLE head {head!r} reads target states of width {hc.target_hidden_size}, "
                         f"but the target's hidden size is {target_hidden}: a head trained for another target")


def eagle_target_layers(cfg: SpeculativeConfig, target_model: str | Path) -> tuple[tuple[int, ...], int]:
    """(the target layers whose states an EAGLE head reads, the target's hidden size): what the
    gateway asks the target tier to return, from the head's config.json and the target's; the
    same choice as the in-process drafter (HeadConfig.target_layers). Checks the head fits the
    target, so a mismatched deployment fails at start, not mid-request."""
    from specsplit.models.heads import resolve_head
    from specsplit.speculation.eagle.checkpoint import read_head_config

    assert cfg.model is not None
    tcfg = _model_config(model_folder(target_model))
    hc = read_head_config(resolve_head(cfg.model, config_only=True), cfg.method)
    if hc.target_hidden_size != tcfg.hidden_size:
        raise ValueError(f"EAGLE head {cfg.model!r} reads target states of width {hc.target_hidden_size}, "
                         f"but the target's hidden size is {tcfg.hidden_size}: a head trained for another target")
    return hc.target_layers(tcfg.num_layers), tcfg.hidden_size
