"""Timing of a tensor-parallel group's pieces, run by every rank together (benchmarks only).

`TensorParallelRunner.all_reduce_ms` / `.replay_ms` send the request to the workers and call
these on rank 0; each rank runs the same collectives, so they pair up across ranks.
- all-reduce of a hidden-state-sized tensor, captured in a CUDA graph as the model's are:
  NCCL (what the model uses), or PyTorch's symmetric-memory one-shot all-reduce over peer
  memory (loads from every peer's buffer; no NVLink multicast, which stays off), to see
  which is faster for small messages before the model switches to it;
- replay of a captured step (compute + collectives, no host work in between).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from specsplit.runtime.cuda_graphs import time_in_graph
from specsplit.runtime.parallel import ParallelContext

ALL_REDUCE_METHODS = ("nccl", "symm_mem_one_shot")


def _one_shot(numel: int, device: torch.device) -> Callable[[], Tensor]:
    """PyTorch's one-shot all-reduce over a symmetric-memory buffer (peer loads, no multicast)."""
    from torch.distributed import _symmetric_memory as symm_mem

    group = dist.group.WORLD
    name = group.group_name  # type: ignore[union-attr]
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed before torch 2.7, a no-op or gone after
        enable(name)
    buf = symm_mem.empty(numel, dtype=torch.bfloat16, device=device)
    buf.fill_(1.0)
    symm_mem.rendezvous(buf, name)
    return lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)


def all_reduce_ms(ctx: ParallelContext, device: torch.device, numel: int, iters: int, method: str = "nccl") -> float:
    """Time of one all-reduce of `numel` elements (bf16 in a CUDA graph on CUDA; float32 eager
    on CPU). Every rank of the group must call it together, with the same arguments."""
    if device.type != "cuda":
        x = torch.ones(numel)
        ctx.all_reduce(x)
        t = time.perf_counter()
        for _ in range(iters):
            ctx.all_reduce(x)
        return (time.perf_counter() - t) / iters * 1000
    if method == "nccl":
        x = torch.ones(numel, dtype=torch.bfloat16, device=device)
        return time_in_graph(lambda: ctx.all_reduce(x), device, iters, replays=10) / 1000
    if method == "symm_mem_one_shot":
        return time_in_graph(_one_shot(numel, device), device, iters, replays=10) / 1000
    raise ValueError(f"unknown all-reduce method {method!r}; one of {ALL_REDUCE_METHODS}")


def replay_ms(runner: object, key: tuple[int, ...], n: int) -> float:
    """GPU time of one replay of the runner's captured step `key` (no host work in between)."""
    graph = runner.graphs.graphs[tuple(key)][0]  # type: ignore[attr-defined]
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(runner.device)  # type: ignore[attr-defined]
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize(runner.device)  # type: ignore[attr-defined]
    return start.elapsed_time(end) / n
