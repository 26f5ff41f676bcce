"""Build an EagleDrafter for a target: the head from its checkpoint, the embeddings (and
EAGLE-1's LM head) shared with an in-process target or read from the target's folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from specsplit.models.heads import resolve_head
from specsplit.speculation.eagle.checkpoint import load_head
from specsplit.speculation.eagle.drafter import EagleDrafter, HeadRunner


def read_target_tensors(folder: Path, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Just the named tensors of a Hugging Face safetensors folder (not the whole model)."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        sorted(p.name for p in folder.glob("*.safetensors"))
    out: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as g:
            for n in names:
                if n in g.keys():  # noqa: SIM118 - safe_open is not a dict
                    out[n] = g.get_tensor(n)
    return out


def target_embeddings(target: Any, folder: Path | None, want_head: bool) -> tuple[Tensor, nn.Module | None]:
    """(embedding [V, H], LM head module) of the target: shared with a one-device runner in
    this process (no copy), else read from its checkpoint (a sharded target's rank 0 holds
    only a slice of the LM head; a draft tier has no target at all)."""
    model = getattr(target, "model", None)
    if model is not None and model.ctx.world_size == 1:
        return model.embed_tokens.weight, model.lm_head if want_head else None
    if folder is None:
        raise ValueError("an EAGLE head needs the target's embeddings: give the target model")
    t = read_target_tensors(folder, ("model.embed_tokens.weight", "lm_head.weight"))
    if "model.embed_tokens.weight" not in t:
        raise ValueError(f"{folder} has no model.embed_tokens.weight")
    embed = t["model.embed_tokens.weight"]
    return embed, _linear(t.get("lm_head.weight", embed)) if want_head else None


def _linear(w: Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


def load_eagle_drafter(
    method: str, head_path: str | Path, *, target: Any = None, target_folder: Path | None = None,
    vocab_size: int, num_target_layers: int, device: torch.device, dtype: torch.dtype,
    max_model_len: int, kv_cache_bytes: int | None = None, top_k: int = 32,
) -> EagleDrafter:
    """The drafter of `speculative_config={"method": "eagle"|"eagle3", "model": head_path}`."""
    head_path = resolve_head(head_path)  # a folder, or a hub id fetched once into the cache
    loaded = load_head(head_path, method, dtype=dtype, device=device)
    hc = loaded.head.hc
    if hc.model.vocab_size != vocab_size and (hc.method == "eagle" or loaded.embed is not None):
        raise ValueError(f"EAGLE head {head_path} has a vocabulary of {hc.model.vocab_size}, the target {vocab_size}")
    hc.target_layers(num_target_layers)  # a too-shallow target fails here, before serving
    embed, lm_head = target_embeddings(target, target_folder, hc.method == "eagle" and loaded.lm_head is None)
    if loaded.embed is not None:
        embed = loaded.embed
    if loaded.lm_head is not None:
        lm_head = _linear(loaded.lm_head)
    embed = embed.to(device, dtype)
    if lm_head is not None:
        lm_head = lm_head.to(device)
    if embed.shape[1] != hc.model.hidden_size:
        raise ValueError(f"EAGLE head width {hc.model.hidden_size} does not match the target embeddings' {embed.shape[1]}")
    runner = HeadRunner(loaded.head, embed, lm_head, vocab_size, device=device, max_model_len=max_model_len,
                        kv_cache_bytes=kv_cache_bytes)
    return EagleDrafter(runner, top_k)
