"""Paged attention over a ragged batch: one place that picks and runs the backend.

A batch is flattened into T tokens from B sequences with different query lengths (prefill
chunks, verify blocks of k+1, single decode tokens). The new keys/values are written into
the paged cache first; attention then reads each sequence's whole context from the cache.

Backends: flash-attn's `flash_attn_with_kvcache` (reads the block table directly) on CUDA
when installed; PyTorch SDPA otherwise, which gathers each sequence's blocks into a padded
[B, L] view with a causal+length mask. The choice is made once by `select_backend`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def select_backend(device: torch.device, requested: str = "auto") -> str:
    """Return "flash" or "sdpa": flash-attn only on CUDA and only when importable."""
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if requested == "flash" and not has_flash:
        raise ValueError("attention backend 'flash' requested but flash-attn is not usable here")
    if requested not in ("auto", "flash", "sdpa"):
        raise ValueError(f"unknown attention backend {requested!r} (auto, flash, sdpa)")
    backend = "flash" if (requested == "flash" or (requested == "auto" and has_flash)) else "sdpa"
    return backend


@dataclass
class AttentionMetadata:
    """Index tensors shared by every layer of one forward pass."""

    slot_mapping: Tensor  # [T] int64 cache slot (block * block_size + offset) of each new token
    query_lens: Tensor  # [B] int64 new tokens per sequence
    seq_lens: Tensor  # [B] int64 context length per sequence after this step (cached + new)
    block_tables: Tensor  # [B, max_blocks] int32 physical block ids, padded with 0
    # SDPA view: padded query positions and gathered cache slots.
    query_index: Tensor  # [B, Qmax] int64 flat token index of each padded query (pad -> 0)
    query_valid: Tensor  # [B, Qmax] bool
    kv_slots: Tensor  # [B, Lmax] int64 cache slot of each context position (pad -> 0)
    mask: Tensor  # [B, 1, Qmax, Lmax] bool, True = may attend
    token_seq: Tensor  # [T] int64 sequence of each flat token
    token_pos_in_seq: Tensor  # [T] int64 position of each flat token within its padded query row
    # flash view: queries right-aligned so causal masking lines up with each context's end
    query_index_right: Tensor  # [B, Qmax] int64
    token_pos_right: Tensor  # [T] int64
    max_query_len: int
    cu_query_lens: Tensor  # [B+1] int32 cumulative query lengths (flash varlen layout)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        pad_context_to: int | None = None,
    ) -> AttentionMetadata:
        """Derive every index tensor once on the host, then move them in one go.

        `pad_context_to` fixes the padded context length (static shapes for CUDA graphs).
        """
        b = len(query_lens)
        q = torch.tensor(query_lens, dtype=torch.int64)
        s = torch.tensor(seq_lens, dtype=torch.int64)
        max_blocks = max(len(t) for t in block_tables)
        bt = torch.zeros(b, max_blocks, dtype=torch.int64)
        for i, t in enumerate(block_tables):
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int64)
        qmax, lmax = int(q.max()), max(int(s.max()), pad_context_to or 0)
        # positions of new tokens: seq_len - query_len + j
        starts = s - q  # [B]
        cu = torch.zeros(b + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(q, 0)
        j = torch.arange(qmax)
        query_valid = j[None, :] < q[:, None]  # [B, Qmax]
        query_index = torch.where(query_valid, cu[:-1, None] + j[None, :], 0)
        token_seq = torch.repeat_interleave(torch.arange(b), q)  # [T]
        token_pos_in_seq = torch.arange(int(cu[-1])) - cu[:-1][token_seq]  # [T]
        shift = qmax - q  # [B] left padding per row in the right-aligned view
        jr = j[None, :] - shift[:, None]
        query_index_right = torch.where(jr >= 0, cu[:-1, None] + jr, 0)
        token_pos_right = token_pos_in_seq + shift[token_seq]
        token_abs_pos = starts[token_seq] + token_pos_in_seq  # [T]
        token_block = bt[token_seq, token_abs_pos // block_size]
        slot_mapping = token_block * block_size + token_abs_pos % block_size
        ctx_pos = torch.arange(lmax)
        ctx_valid = ctx_pos[None, :] < s[:, None]  # [B, Lmax]
        kv_block = bt.gather(1, torch.clamp(ctx_pos // block_size, max=max_blocks - 1).expand(b, -1))
        kv_slots = torch.where(ctx_valid, kv_block * block_size + ctx_pos % block_size, 0)
        qpos = starts[:, None] + j[None, :]  # [B, Qmax]
        mask = (ctx_pos[None, None, :] <= qpos[:, :, None]) & ctx_valid[:, None, :]
        mask = mask & query_valid[:, :, None]
        # padded query rows attend to position 0 so softmax never sees an all-masked row
        mask[:, :, 0] |= ~query_valid
        to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return cls(
            slot_mapping=to(slot_mapping),
            query_lens=to(q),
            seq_lens=to(s),
            block_tables=to(bt.to(torch.int32)),
            query_index=to(query_index),
            query_valid=to(query_valid),
            kv_slots=to(kv_slots),
            mask=to(mask[:, None]),
            token_seq=to(token_seq),
            token_pos_in_seq=to(token_pos_in_seq),
            query_index_right=to(query_index_right),
            token_pos_right=to(token_pos_right),
            max_query_len=qmax,
            cu_query_lens=to(cu.to(torch.int32)),
        )


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store new keys/values. caches: [num_blocks, block_size, Hkv, D]; k, v: [T, Hkv, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def sdpa_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """q: [T, Hq, D] -> [T, Hq, D], reading context from the paged cache."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    qp = q[meta.query_index]  # [B, Qmax, Hq, D]
    kp = k_cache.view(-1, hkv, d)[meta.kv_slots]  # [B, Lmax, Hkv, D]
    vp = v_cache.view(-1, hkv, d)[meta.kv_slots]
    if hkv != hq:
        kp = kp.repeat_interleave(hq // hkv, dim=2)
        vp = vp.repeat_interleave(hq // hkv, dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(
        qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=meta.mask, scale=scale
    )  # [B, Hq, Qmax, D]
    out = out.transpose(1, 2)  # [B, Qmax, Hq, D]
    return out[meta.token_seq, meta.token_pos_in_seq]  # [T, Hq, D]


def flash_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """flash-attn over the paged cache (block_size must be a multiple of 256 for flash-attn 2)."""
    from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]

    qp = q[meta.query_index_right]  # [B, Qmax, Hq, D] right-aligned
    out = flash_attn_with_kvcache(
        qp,
        k_cache,
        v_cache,
        cache_seqlens=meta.seq_lens.to(torch.int32),
        block_table=meta.block_tables,
        softmax_scale=scale,
        causal=True,
    )  # [B, Qmax, Hq, D]; causal aligns queries to the end of each context
    return out[meta.token_seq, meta.token_pos_right]


def attention(
    backend: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    if backend == "flash":
        return flash_attention(q, k_cache, v_cache, meta, scale)
    return sdpa_attention(q, k_cache, v_cache, meta, scale)
