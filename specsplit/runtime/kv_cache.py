"""Paged KV cache: one pool of fixed-size blocks shared by every sequence.

Each sequence owns a block table (list of block ids) and a length. Rolling back after a
rejected draft is a length change plus freeing the blocks past the new end, so it costs
nothing on the device and is exact: positions past the length are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class OutOfKVMemory(RuntimeError):
    """The pool has too few free blocks for a request; callers map it to RESOURCE_EXHAUSTED."""


@dataclass
class SequenceBlocks:
    blocks: list[int] = field(default_factory=list)  # physical block ids in order
    length: int = 0  # tokens whose K/V are stored


class PagedKVCache:
    """Block allocator plus the per-layer K/V tensors."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
        head_dim: int, dtype: torch.dtype, device: torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # layers: list of (k, v), each [num_blocks, block_size, Hkv, D]
        self.layers: list[tuple[Tensor, Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self._free = list(range(num_blocks - 1, -1, -1))
        self.seqs: dict[int, SequenceBlocks] = {}

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (exported as a metric, used for admission)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq_id: int, new_len: int) -> int:
        have = len(self.seqs[seq_id].blocks) if seq_id in self.seqs else 0
        return max(0, -(-new_len // self.block_size) - have)

    def can_fit(self, needs: dict[int, int]) -> bool:
        """needs: seq_id -> total length wanted. True if every sequence can grow to it."""
        return sum(self.blocks_needed(s, n) for s, n in needs.items()) <= len(self._free)

    def add(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already has a cache")
        self.seqs[seq_id] = SequenceBlocks()

    def reserve(self, seq_id: int, new_len: int) -> None:
        """Make room for positions [0, new_len); raises OutOfKVMemory without side effects."""
        need = self.blocks_needed(seq_id, new_len)
        if need > len(self._free):
            raise OutOfKVMemory(
                f"KV cache full: need {need} blocks, {len(self._free)} of {self.num_blocks} free"
            )
        seq = self.seqs[seq_id]
        for _ in range(need):
            seq.blocks.append(self._free.pop())

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll back to `length` tokens and return the blocks past it to the pool."""
        seq = self.seqs[seq_id]
        if length > seq.length:
            raise ValueError(f"cannot truncate sequence {seq_id} of length {seq.length} to {length}")
        seq.length = length
        keep = -(-length // self.block_size)
        self._free.extend(reversed(seq.blocks[keep:]))
        del seq.blocks[keep:]

    def reserve_scratch(self) -> int:
        """Take one block out of the pool for writes nobody reads (padding tokens of CUDA graphs)."""
        if not self._free:
            raise OutOfKVMemory("no block left for the scratch block")
        self.num_blocks -= 1  # not part of the pool any more: usage counts only real blocks
        return self._free.pop()

    def free(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self._free.extend(reversed(seq.blocks))
