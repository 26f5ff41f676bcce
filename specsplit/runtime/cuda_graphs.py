"""CUDA graphs for decode, verify and draft steps.

The runner pads every short step to uniform shapes (each sequence to the step's longest
query, the batch to a bucket; see `ModelRunner._uniform_batch`), so a step has static
shapes once the context length is rounded up to a bucket. Such steps are captured once per
(batch bucket B, query length Q, context bucket) and replayed: one launch instead of
hundreds, which is what keeps a 5 ms step near the memory-bandwidth bound. Prefill chunks
run eagerly.

The paged backends (our Triton kernels, flash-attn) read the block table themselves, so
the context bucket only sizes that table: buckets double from 2048 tokens and a handful of
graphs covers every context. SDPA's gathered view grows with the context, so its buckets are
256 tokens apart. `ModelRunner.capture_graphs` captures the common shapes at start-up; any
other shape is captured on first use, with that step's real inputs.

Tensor parallel: the all-reduces of the row-parallel layers and the logits' all-gather are
NCCL collectives, captured into the same graphs, so a TP step is one launch per rank too.
That needs every rank to capture the same shapes in the same order, which holds because
each rank runs the same sequence of steps (rank 0 sends it every operation) and
`capture_graphs` walks the same list on each. An NCCL communicator is created lazily by its
first collective, which must not happen inside a capture: the eager warm-up steps run first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from specsplit.runtime.attention import StepBatch, packed_to_device
from specsplit.runtime.model import Transformer, top_candidates

log = logging.getLogger(__name__)

def capture(fn: Callable[[], Any], device: torch.device, pool: Any = None,
            warmups: int = 1) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run `fn` `warmups` times on a side stream (lazy allocations, kernel selection, NCCL
    set-up must not happen inside a capture), then capture one call; returns (graph, outputs)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool):  # its capture stream on `device`
        out = fn()
    return graph, out


def time_in_graph(fn: Callable[[], Any], device: torch.device, calls: int = 1, replays: int = 5) -> float:
    """GPU microseconds per call of `fn`: `calls` calls captured in one graph (after a warm-up
    call), the graph replayed `replays` times with nothing from the host in between."""
    graph, _ = capture(lambda: [fn() for _ in range(calls)], device)
    with torch.cuda.device(device):  # the events and replays on `device`'s stream, whatever is current
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
    us = start.elapsed_time(end) * 1000 / (replays * calls)
    graph.reset()
    return us


class CudaGraphs:
    """Captured forward passes keyed by the step's shapes (B, Q, context bucket)."""

    def __init__(self, model: Transformer, kv_layers: list[tuple[Tensor, Tensor]], backend: str,
                 device: torch.device, *, context_bucket: int = 256, geometric: bool = False,
                 max_graphs: int = 256, compile: bool = False) -> None:
        self.model = model
        # torch.compile fuses the many small ops (norms, rotary, activations) that dominate a
        # 1-token step once launches are gone; dynamic shapes so one compilation serves all keys
        self.forward = torch.compile(model.forward, dynamic=True) if compile else model.forward
        self.kv_layers = kv_layers
        self.backend = backend
        self.device = device
        self.context_bucket = context_bucket
        self.geometric = geometric  # buckets double from context_bucket instead of adding to it
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        # greedy one-token steps chained in one graph (a draft block): (n, B, context) -> graph, inputs, ids
        self.chains: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor, Tensor]] = {}
        # steps that also return hidden states (an EAGLE head's target): (key, layers) -> graph, inputs, outputs
        self.hidden: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, tuple[Tensor, Tensor]]] = {}
        self.replays = 0

    def bucket(self, max_seq_len: int) -> int:
        if self.geometric:
            return max(self.context_bucket, 1 << (max_seq_len - 1).bit_length())
        return -(-max_seq_len // self.context_bucket) * self.context_bucket

    def run(self, batch: StepBatch, device_ids: Tensor | None = None) -> Tensor | None:
        """Replay (capturing first if needed); None if the graph budget is used up.

        `device_ids` # [n] replaces the first n input ids on the device (see ModelRunner.forward).
        """
        entry = self.graphs.get(batch.key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return None
            entry = self._capture(batch)
            self.graphs[batch.key] = entry
        graph, static, out = entry
        batch.to_device(self.device, out=static)
        if device_ids is not None:
            static[: device_ids.shape[0]].copy_(device_ids)
        graph.replay()
        self.replays += 1
        return out

    def run_hidden(self, batch: StepBatch, layers: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
        """A step that also returns the hidden states entering `layers` (ModelRunner.forward_hidden's
        numbering) at every token row: (logits, states # [T, len(layers) * H]), buffers reused by
        the next replay of the same key; None if the graph budget is used up."""
        key = (batch.key, layers)
        entry = self.hidden.get(key)
        if entry is None:
            if len(self.graphs) + len(self.chains) + len(self.hidden) >= self.max_graphs:
                return None
            entry = self._capture(batch, layers)
            self.hidden[key] = entry
        graph, static, out = entry
        batch.to_device(self.device, out=static)
        graph.replay()
        self.replays += 1
        return out

    def run_chain(self, batches: list[StepBatch], first_ids: Tensor, plan: Tensor | None = None,
                  top: int = 0) -> Tensor | tuple[Tensor, Tensor, Tensor] | None:
        """`len(batches)` greedy one-token steps in one replay; None if the graph budget is used up.

        Step j feeds the argmax of step j - 1 (step 0: `first_ids` # [m], the rest of the batch
        bucket is padding), or where `plan` # [m, n] is >= 0, that token instead (a benchmark's
        oracle: the model still runs every step); every step's inputs were built on the host beforehand, so the block
        costs one copy and one launch instead of one host round of work per token.
        Returns the argmax ids # [n, B] (a buffer reused by the next replay of the same key); with
        `top` > 0 also each step's `top` likeliest tokens and their probabilities # [n, B, top]
        (what the tree of guesses branches on).
        """
        key = (len(batches), top, *batches[0].key)
        entry = self.chains.get(key)
        if entry is None:
            if len(self.graphs) + len(self.chains) >= self.max_graphs:
                return None
            entry = self._capture_chain(batches, top)
            self.chains[key] = entry
        graph, static, first, forced, out = entry
        packed_to_device(np.concatenate([b.packed for b in batches]), self.device, out=static)
        first.zero_()
        first[: first_ids.shape[0]].copy_(first_ids)
        forced.fill_(-1)
        if plan is not None:
            forced[: plan.shape[0]].copy_(plan)
        graph.replay()
        self.replays += 1
        return out

    def _capture_chain(self, batches: list[StepBatch], top: int) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor, Any]:
        sizes = [b.packed.shape[0] for b in batches]
        static = torch.from_numpy(np.concatenate([b.packed for b in batches])).to(self.device)
        views = torch.split(static, sizes)
        first = torch.zeros(batches[0].num_seqs, dtype=torch.int64, device=self.device)  # [B]
        forced = torch.full((batches[0].num_seqs, len(batches)), -1, dtype=torch.int64, device=self.device)  # [B, n]

        def chain() -> Any:
            prev, outs, cand_ids, cand_p = first, [], [], []
            for j, (b, buf) in enumerate(zip(batches, views, strict=True)):
                ids, pos, meta = b.unpack(buf)
                ids.copy_(prev)  # one token per sequence: the previous step's choice
                logits = self.model.compute_logits(self.forward(ids, pos, self.kv_layers, meta, self.backend))
                prev = torch.where(forced[:, j] >= 0, forced[:, j], logits.argmax(-1))
                outs.append(prev)
                if top:
                    top_ids, top_p = top_candidates(logits, top)  # [B, top]
                    cand_ids.append(top_ids)
                    cand_p.append(top_p)
            if not top:
                return torch.stack(outs)  # [n, B]
            return torch.stack(outs), torch.stack(cand_ids), torch.stack(cand_p)  # [n, B], [n, B, top] x 2

        graph, out = capture(chain, self.device, self.pool)  # the warm-up's cache writes land where the replay's will
        log.info("captured CUDA graph chain of %d steps for batch %d, context %d", len(batches), *batches[0].key[:1],
                 batches[0].key[2])
        return graph, static, first, forced, out

    def release(self) -> None:
        """Free every captured graph (after the last replay, before the process group goes).

        A captured NCCL collective keeps its communicator busy: destroying the communicator
        while a graph that holds one is alive blocks forever. Every rank calls this first.
        """
        torch.cuda.synchronize(self.device)
        for graph, *_ in [*self.graphs.values(), *self.chains.values(), *self.hidden.values()]:
            graph.reset()
        self.graphs.clear()
        self.chains.clear()
        self.hidden.clear()
        torch.cuda.synchronize(self.device)

    def _capture(self, batch: StepBatch, layers: tuple[int, ...] = ()) -> tuple[torch.cuda.CUDAGraph, Tensor, Any]:
        static = batch.to_device(self.device).clone()

        def step() -> Any:
            ids, pos, meta = batch.unpack(static)  # index derivation is captured too
            if not layers:
                return self.model.compute_logits(self.forward(ids, pos, self.kv_layers, meta, self.backend))
            aux: list[Tensor] = []
            hidden = self.model(ids, pos, self.kv_layers, meta, self.backend, layers, aux)
            by_layer = dict(zip(sorted(set(layers)), aux, strict=True))
            return self.model.compute_logits(hidden), torch.cat([by_layer[i] for i in layers], dim=-1)

        graph, out = capture(step, self.device, self.pool, warmups=2)
        log.info("captured CUDA graph for batch %d x %d tokens, context %d", *batch.key[:3])
        return graph, static, out
