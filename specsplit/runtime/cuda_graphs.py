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

import torch
from torch import Tensor

from specsplit.runtime.attention import StepBatch
from specsplit.runtime.model import Transformer

log = logging.getLogger(__name__)

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

    def release(self) -> None:
        """Free every captured graph (after the last replay, before the process group goes).

        A captured NCCL collective keeps its communicator busy: destroying the communicator
        while a graph that holds one is alive blocks forever. Every rank calls this first.
        """
        torch.cuda.synchronize(self.device)
        for graph, _, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        torch.cuda.synchronize(self.device)

    def _capture(self, batch: StepBatch) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static = batch.to_device(self.device).clone()

        def step() -> Tensor:
            ids, pos, meta = batch.unpack(static)  # index derivation is captured too
            hidden = self.forward(ids, pos, self.kv_layers, meta, self.backend)
            return self.model.compute_logits(hidden)

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        log.info("captured CUDA graph for batch %d x %d tokens, context %d", *batch.key[:3])
        return graph, static, out
