"""Tensor-parallel linear layers (Megatron style) with world size 1 as the ordinary case.

Column-parallel layers split output features across ranks; row-parallel layers split input
features and all-reduce their partial sums. An attention block and an MLP block each end
in one row-parallel layer, so each costs exactly one all-reduce. With world size 1 the
all-reduce is skipped and the layers are plain linears: TP is not a separate code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from specsplit.runtime.cpu_kernels import pack, packed_linear


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in its tensor-parallel group."""

    rank: int = 0  # this process's shard index
    world_size: int = 1  # number of shards of every parallel layer
    group: object | None = None  # torch.distributed process group; None = default/world

    def shard(self, size: int, what: str) -> tuple[int, int]:
        """Return (start, length) of this rank's slice of a dimension of `size`."""
        if size % self.world_size:
            raise ValueError(f"{what}={size} is not divisible by tensor_parallel_size={self.world_size}")
        part = size // self.world_size
        return self.rank * part, part

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: Tensor) -> Tensor:
        """Concatenate each rank's slice of the last dimension (used for vocab-parallel logits)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()


class _Linear(nn.Module):
    """Shared forward: oneDNN packed weights on CPU once `prepack()` ran, else F.linear."""

    weight: nn.Parameter
    packed: tuple[Tensor, Tensor | None] | None = None
    # a kernel for inputs of at most `skinny_rows` rows (decode/verify steps), set by the runner
    skinny: Callable[[Tensor, Tensor, Tensor | None], Tensor] | None = None
    skinny_rows: int = 0

    def _matmul(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed)
        if self.skinny is not None and x.shape[0] <= self.skinny_rows:
            return self.skinny(x, self.weight, getattr(self, "bias", None))
        return nn.functional.linear(x, self.weight, getattr(self, "bias", None))

    def prepack(self) -> None:
        """Pack for oneDNN and drop the dense copy (call after weights are loaded)."""
        bias = getattr(self, "bias", None)
        self.packed = pack(self.weight, bias)
        self.weight.data = self.weight.data.new_empty(0)
        if bias is not None:
            bias.data = bias.data.new_empty(0)


class ColumnParallelLinear(_Linear):
    """y = x W^T + b with W's output rows split across ranks; no communication.

    `output_sizes` lists the logical matrices fused into this one (q, k, v or gate, up);
    each is split separately so every rank holds matching slices of all of them.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.output_sizes = output_sizes
        self.local_sizes = [ctx.shard(s, "output features")[1] for s in output_sizes]
        out = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:  # x: [T, in] -> [T, out_local]
        return self._matmul(x)

    def load_shards(self, full: list[Tensor], bias: bool = False) -> None:
        """Copy this rank's slice of each logical full weight (or bias), in `output_sizes` order."""
        parts = []
        for t, size in zip(full, self.output_sizes, strict=True):
            start, length = self.ctx.shard(size, "output features")
            parts.append(t[start : start + length])
        target = self.bias if bias else self.weight
        if target is None:
            raise ValueError("checkpoint has a bias this layer was not built with")
        target.data.copy_(torch.cat(parts, dim=0))


class RowParallelLinear(_Linear):
    """y = all_reduce(x_local W_local^T): input features split across ranks."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.in_start, local_in = ctx.shard(in_features, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local_in), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [T, in_local] -> [T, out]
        return self.ctx.all_reduce(self._matmul(x))

    def load_full(self, w: Tensor) -> None:
        self.weight.data.copy_(w[:, self.in_start : self.in_start + self.weight.shape[1]])


class VocabParallelHead(_Linear):
    """LM head with the vocabulary split across ranks; logits are gathered on every rank."""

    def __init__(self, hidden: int, vocab_size: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        padded = -(-vocab_size // ctx.world_size) * ctx.world_size
        self.local = padded // ctx.world_size
        self.start = ctx.rank * self.local
        self.weight = nn.Parameter(torch.zeros(self.local, hidden), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, hidden] -> [N, vocab]
        logits = self.ctx.all_gather_last_dim(self._matmul(x))
        return logits[..., : self.vocab_size]

    def load_full(self, w: Tensor) -> None:
        part = w[self.start : self.start + self.local]
        self.weight.data[: part.shape[0]].copy_(part)
