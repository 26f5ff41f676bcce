"""CUDA graphs for decode and verify steps.

A step where every sequence feeds the same number of new tokens Q and wants logits for all
of them (decode: Q = 1; verify: Q = k + 1) has static shapes once the context length is
rounded up to a bucket. Such steps are captured once per (batch size B, Q, context bucket)
and replayed: one launch instead of hundreds, which is what keeps a 5 ms step near the
memory-bandwidth bound. Prefill chunks and ragged batches run eagerly.

Capture happens lazily on the first step of a shape, using that step's real inputs (the
warm-up passes write the same keys/values the replay writes, so capture is harmless).
"""

from __future__ import annotations

import logging
from dataclasses import fields

import torch
from torch import Tensor

from specsplit.runtime.attention import AttentionMetadata
from specsplit.runtime.model import Transformer

log = logging.getLogger(__name__)

_TENSOR_FIELDS = [f.name for f in fields(AttentionMetadata) if f.name != "max_query_len"]


class CudaGraphs:
    """Captured forward passes keyed by (B, Q, context bucket)."""

    def __init__(self, model: Transformer, kv_layers: list[tuple[Tensor, Tensor]], backend: str,
                 device: torch.device, *, context_bucket: int = 256, max_batch: int = 128, max_query: int = 17,
                 max_graphs: int = 96) -> None:
        self.model = model
        self.kv_layers = kv_layers
        self.backend = backend
        self.device = device
        self.context_bucket = context_bucket
        self.max_batch = max_batch
        self.max_query = max_query
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, dict[str, Tensor], Tensor]] = {}
        self.replays = 0

    def bucket(self, max_seq_len: int) -> int:
        return -(-max_seq_len // self.context_bucket) * self.context_bucket

    def eligible(self, query_lens: list[int], num_logits: list[int]) -> bool:
        q = query_lens[0]
        return (len(query_lens) <= self.max_batch and q <= self.max_query
                and all(x == q for x in query_lens) and all(n == q for n in num_logits))

    def run(self, ids: Tensor, pos: Tensor, meta: AttentionMetadata) -> Tensor | None:
        """Replay (capturing first if needed); None if the graph budget is used up."""
        b, q = meta.query_index.shape
        key = (b, q, meta.kv_slots.shape[1])
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return None
            entry = self._capture(key, ids, pos, meta)
            self.graphs[key] = entry
        graph, bufs, out = entry
        bufs["input_ids"].copy_(ids, non_blocking=True)
        bufs["positions"].copy_(pos, non_blocking=True)
        for name in _TENSOR_FIELDS:
            bufs[name].copy_(getattr(meta, name), non_blocking=True)
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, key: tuple[int, int, int], ids: Tensor, pos: Tensor,
                 meta: AttentionMetadata) -> tuple[torch.cuda.CUDAGraph, dict[str, Tensor], Tensor]:
        bufs = {"input_ids": ids.clone(), "positions": pos.clone()}
        for name in _TENSOR_FIELDS:
            bufs[name] = getattr(meta, name).clone()
        static_meta = AttentionMetadata(max_query_len=meta.max_query_len,
                                        **{n: bufs[n] for n in _TENSOR_FIELDS})

        def step() -> Tensor:
            hidden = self.model(bufs["input_ids"], bufs["positions"], self.kv_layers, static_meta, self.backend)
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
        log.info("captured CUDA graph for batch %d x %d tokens, context bucket %d", *key)
        return graph, bufs, out
