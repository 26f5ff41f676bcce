"""Paged KV cache: one pool of fixed-size blocks shared by every sequence.

Each sequence owns a block table (list of block ids) and a length. Rolling back after a
rejected draft is a length change plus freeing the blocks past the new end, so it costs
nothing on the device and is exact: positions past the length are never read.

Forking (the draft tier's tree of guesses, docs/architecture.md): a child sequence borrows its
parent's full blocks (a reference count per block) and gets its own copy of the partial last
one, so neither can write where the other reads. A block returns to the pool only when its last
holder frees or truncates it; a write into a block still shared (a holder truncated into it) is
copied first, so sharing is never visible to the model.
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
        self._refs: dict[int, int] = {}  # block id -> holders beyond the first (only shared blocks)
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
        seq = self.seqs.get(seq_id)
        have = len(seq.blocks) if seq is not None else 0
        cow = 1 if seq is not None and new_len > seq.length and self._shared_tail(seq) is not None else 0
        return max(0, -(-new_len // self.block_size) - have) + cow

    def _shared_tail(self, seq: SequenceBlocks) -> int | None:
        """Index in seq.blocks of the block the next write lands in, when another sequence holds it too."""
        i = seq.length // self.block_size
        if self._refs and i < len(seq.blocks) and seq.blocks[i] in self._refs:
            return i
        return None

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
        i = self._shared_tail(seq) if new_len > seq.length else None
        if i is not None:  # copy on write: the other holders keep the original
            old, seq.blocks[i] = seq.blocks[i], self._free.pop()
            self._copy_blocks([old], [seq.blocks[i]])
            self._release([old])
            need -= 1
        for _ in range(need):
            seq.blocks.append(self._free.pop())

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll back to `length` tokens and return the blocks past it to the pool."""
        seq = self.seqs[seq_id]
        if length > seq.length:
            raise ValueError(f"cannot truncate sequence {seq_id} of length {seq.length} to {length}")
        seq.length = length
        keep = -(-length // self.block_size)
        self._release(seq.blocks[keep:])
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
            self._release(seq.blocks)

    # ---- forks -----------------------------------------------------------------------------
    def fork(self, forks: list[tuple[int, int, int]]) -> list[int]:
        """Children sharing their parents' first tokens: (parent, child, length) each.

        A child borrows the parent's full blocks below `length` and gets a copy of the partial
        block holding the rest, in one batched copy for all children. Forks that do not fit the
        free blocks are skipped (never an error: a fork is optional); returns the children made.
        """
        made, src, dst = [], [], []
        for parent, child, length in forks:
            p = self.seqs[parent]
            if child in self.seqs:
                raise ValueError(f"sequence {child} already has a cache")
            if not 0 <= length <= p.length:
                raise ValueError(f"cannot fork {length} tokens of sequence {parent} of length {p.length}")
            full, partial = divmod(length, self.block_size)
            if partial and not self._free:
                continue
            blocks = p.blocks[:full]
            for b in blocks:
                self._refs[b] = self._refs.get(b, 0) + 1
            if partial:
                src.append(p.blocks[full])
                dst.append(self._free.pop())
                blocks = [*blocks, dst[-1]]
            self.seqs[child] = SequenceBlocks(blocks, length)
            made.append(child)
        self._copy_blocks(src, dst)
        return made

    def rename(self, old: int, new: int) -> None:
        """Give sequence `old`'s blocks to id `new` (a fork that replaces its parent, freed first)."""
        if new in self.seqs:
            raise ValueError(f"sequence {new} already has a cache")
        self.seqs[new] = self.seqs.pop(old)

    def _release(self, blocks: list[int]) -> None:
        """Drop one holder of each block; blocks nobody holds any more go back to the pool."""
        for b in reversed(blocks):
            n = self._refs.get(b)
            if n is None:
                self._free.append(b)
            elif n == 1:
                del self._refs[b]
            else:
                self._refs[b] = n - 1

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        if not src:
            return
        device = self.layers[0][0].device
        s = torch.tensor(src, dtype=torch.int64).to(device, non_blocking=True)
        d = torch.tensor(dst, dtype=torch.int64).to(device, non_blocking=True)
        for k, v in self.layers:
            k.index_copy_(0, d, k.index_select(0, s))
            v.index_copy_(0, d, v.index_select(0, s))
