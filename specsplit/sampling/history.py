"""The histories the penalties read, as dense per-row masks and counts.

`seen` (prompt + output, # [N, V] bool) drives the repetition penalty, as in HF; `counts`
(output only, # [N, V] float32) drives the frequency and presence penalties, as in OpenAI
and vLLM. At verify time row j of a block has also seen / generated drafts[:j]; the
`extend_*_with_drafts` helpers build those rows in one scatter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _row_slots(rows_of_ids: Sequence[Tensor], vocab_size: int, device: torch.device | str) -> Tensor:
    """Flat index row * V + id of every id in every row # [total]; ids outside [0, V) go to the
    dump slot N * V past the rows (callers allocate N * V + 1)."""
    n = len(rows_of_ids)
    ids = torch.cat([h.to(device=device, dtype=torch.int64).reshape(-1) for h in rows_of_ids])
    lengths = torch.tensor([h.numel() for h in rows_of_ids], device=device)  # [N]
    rows = torch.repeat_interleave(torch.arange(n, device=device), lengths)  # [total]
    valid = (ids >= 0) & (ids < vocab_size)  # [total]
    return torch.where(valid, rows * vocab_size + ids, n * vocab_size)


def _draft_slots(base: Tensor, draft_token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Row j of each block position sees drafts[:, :j]: `base` # [B, V] copied to every position
    (# [B * (k + 1) * V + 1] flat, the last entry a dump slot) and the flat index of every
    (row, position, earlier draft) # [B * k * (k + 1)], invalid ones at the dump slot."""
    b, v = base.shape
    k = draft_token_ids.shape[1]
    if draft_token_ids.shape[0] != b:
        raise ValueError(f"draft_token_ids must have {b} rows, got {draft_token_ids.shape[0]}")
    device = base.device
    out = torch.empty(b * (k + 1) * v + 1, dtype=base.dtype, device=device)  # +1: dump slot
    out[:-1].view(b, k + 1, v).copy_(base.unsqueeze(1))
    bi = torch.arange(b, device=device).view(b, 1, 1)  # [B, 1, 1]
    i = torch.arange(k, device=device).view(1, k, 1)  # [1, k, 1] draft position
    j = torch.arange(k + 1, device=device).view(1, 1, k + 1)  # [1, 1, k+1] verify position
    tok = draft_token_ids.view(b, k, 1)  # [B, k, 1]
    valid = (i < j) & (tok >= 0) & (tok < v)  # [B, k, k+1]
    return out, torch.where(valid, (bi * (k + 1) + j) * v + tok, b * (k + 1) * v).reshape(-1)


def seen_mask(histories: Sequence[Tensor], vocab_size: int, device: torch.device | str) -> Tensor:
    """Which ids occur in each row's history (prompt + output), for the repetition penalty.

    histories: N tensors of token ids, # [len_i] int64; ids outside [0, vocab_size) ignored.
    Returns # [N, vocab_size] bool.
    """
    n = len(histories)
    seen = torch.zeros(n * vocab_size + 1, dtype=torch.bool, device=device)  # +1: dump slot
    if n == 0:
        return seen[:-1].view(0, vocab_size)
    seen[_row_slots(histories, vocab_size, device)] = True
    return seen[:-1].view(n, vocab_size)


def extend_seen_with_drafts(seen: Tensor, draft_token_ids: Tensor) -> Tensor:
    """The seen mask at each verify position: row j has also seen drafts[:, :j].

    seen: # [B, V] bool; draft_token_ids: # [B, k] int64, negative = padding.
    Returns # [B, k + 1, V] bool.
    """
    out, flat = _draft_slots(seen, draft_token_ids)
    out[flat] = True
    return out[:-1].view(seen.shape[0], -1, seen.shape[1])


def output_counts(outputs: Sequence[Tensor], vocab_size: int, device: torch.device | str) -> Tensor:
    """How often each id occurs in each row's generated tokens (frequency / presence penalties).

    outputs: N tensors of token ids, # [len_i] int64; ids outside [0, vocab_size) ignored.
    Returns # [N, vocab_size] float32.
    """
    n = len(outputs)
    counts = torch.zeros(n * vocab_size + 1, dtype=torch.float32, device=device)  # +1: dump slot
    if n == 0:
        return counts[:-1].view(0, vocab_size)
    flat = _row_slots(outputs, vocab_size, device)
    counts.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32, device=device))
    return counts[:-1].view(n, vocab_size)


def extend_counts_with_drafts(counts: Tensor, draft_token_ids: Tensor) -> Tensor:
    """Output counts at each verify position: row j has also generated drafts[:, :j].

    counts: # [B, V] float32; draft_token_ids: # [B, k] int64, negative = padding.
    Returns # [B, k + 1, V] float32.
    """
    out, flat = _draft_slots(counts, draft_token_ids)
    out.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32, device=counts.device))
    return out[:-1].view(counts.shape[0], -1, counts.shape[1])
