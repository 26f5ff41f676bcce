"""An EAGLE head's greedy draft steps chained in one CUDA graph replay.

After its first step (which takes the target's new states, a variable number of them) the head
drafts the rest of a block one token at a time from its own output state. Run eagerly, each of
those steps is dozens of small kernels plus host work: at batch 1 on an H100 a step of an
EAGLE-3 head for an 8B target cost 1.85 ms, a quarter of the target's whole decode step. Here
every step's inputs are built on the host beforehand, the chosen token and the output state
are fed to the next step on the device, and the k - 1 steps are one graph replay.

Graphs are captured per (steps, batch bucket, context bucket) on first use, with the real
inputs of that block (the warm-up's cache writes land where the replay then writes again).
Greedy sessions only; anything else (sampling, penalties, no CUDA) steps eagerly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from specsplit.runtime.attention import StepBatch, packed_to_device
from specsplit.runtime.runner import BATCH_BUCKETS

if TYPE_CHECKING:
    from specsplit.speculation.eagle.drafter import HeadRunner

log = logging.getLogger(__name__)

CONTEXT_BUCKET = 256  # the head's attention (SDPA or flash) reads a context padded to a multiple of this


class HeadChain:
    """Captured chains of greedy head steps, keyed by their shapes."""

    def __init__(self, runner: HeadRunner, max_graphs: int = 64) -> None:
        self.runner = runner
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor, Tensor, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.scratch: int | None = None  # a cache slot the padding rows write to, read by no one
        self.disabled = False
        self.replays = 0

    def greedy_ids(self, out: Tensor) -> Tensor:
        """Output states [B, H] -> the head's greedy token ids [B] in the target vocabulary
        (EAGLE-3: the argmax over its own vocabulary, mapped; the same token as the argmax
        of `HeadRunner.logits`, without building the full-vocabulary row)."""
        head = self.runner.head
        if head.hc.method == "eagle":
            return self.runner.target_head(out).argmax(-1)  # type: ignore[misc]
        return head.draft_to_target()[head.lm_head(head.norm(out)).argmax(-1)]

    @torch.inference_mode()
    def run(self, seq_ids: list[int], first_ids: Tensor, first_states: Tensor, bases: list[int], n: int,
            plan: Tensor | None = None) -> Tensor | None:
        """`n` greedy one-token head steps per sequence in one replay.

        Step 0 feeds `first_ids` # [m] with `first_states` # [m, H] (the first step's choice
        and output); each later step the previous step's choice and output. Where `plan`
        # [m, n] is >= 0 that token is fed and proposed instead (a benchmark's oracle).
        Returns the ids # [m, n], or None (nothing changed) when it cannot run here.
        """
        r, cache = self.runner, self.runner.cache
        m = len(seq_ids)
        b = next((x for x in BATCH_BUCKETS if x >= m), None)
        if self.disabled or n < 1 or b is None:
            return None
        needs = {s: cache.seqs[s].length + n for s in seq_ids}
        if any(needs[s] + base > r.max_model_len for s, base in zip(seq_ids, bases, strict=True)):
            return None  # the eager path says why
        if self.scratch is None:
            if cache.num_free_blocks < 1:
                return None
            self.scratch = cache.reserve_scratch() * cache.block_size
        if not cache.can_fit(needs):
            return None
        for s, new_len in needs.items():
            cache.reserve(s, new_len)
        seqs = [cache.seqs[s] for s in seq_ids]
        pad = -(-max(needs.values()) // CONTEXT_BUCKET) * CONTEXT_BUCKET
        tables = [s.blocks for s in seqs] + [[] for _ in range(b - m)]
        batches = []
        for j in range(n):
            batch = StepBatch.build([0] * b, [1] * b, [s.length + j + 1 for s in seqs] + [1] * (b - m), tables,
                                    cache.block_size, pad, dense=r.backend == "sdpa", write_lens=[1] * m + [0] * (b - m),
                                    scratch_slot=self.scratch)
            # rotary positions are absolute, and the head's cache starts at each session's `base`
            batch.packed[b : b + m] += np.asarray(bases, dtype=np.int64)  # the "positions" field
            batches.append(batch)
        key = (n, *batches[0].key)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return None
            try:
                entry = self._capture(batches)
            except Exception:  # noqa: BLE001 - an uncapturable head keeps drafting eagerly
                log.warning("could not capture the EAGLE head's steps in a CUDA graph; drafting eagerly", exc_info=True)
                self.disabled = True
                return None
            self.graphs[key] = entry
        graph, static, first, first_st, forced, out = entry
        packed_to_device(np.concatenate([x.packed for x in batches]), r.device, out=static)
        first.zero_()
        first[:m].copy_(first_ids)
        first_st.zero_()
        first_st[:m].copy_(first_states)
        forced.fill_(-1)
        if plan is not None:
            forced[:m].copy_(plan)
        graph.replay()
        self.replays += 1
        for s in seqs:
            s.length += n
        return out[:, :m].T.clone()  # [m, n]

    def _capture(self, batches: list[StepBatch]) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor, Tensor, Tensor]:
        r = self.runner
        dev, b, n = r.device, batches[0].num_seqs, len(batches)
        static = torch.from_numpy(np.concatenate([x.packed for x in batches])).to(dev)
        views = torch.split(static, [x.packed.shape[0] for x in batches])
        dtype = r.head.post_attention_layernorm.weight.dtype
        first = torch.zeros(b, dtype=torch.int64, device=dev)  # [B]
        first_st = torch.zeros(b, r.cfg.hidden_size, dtype=dtype, device=dev)  # [B, H]
        forced = torch.full((b, n), -1, dtype=torch.int64, device=dev)  # [B, n]
        kv = r.cache.layers[0]

        def chain() -> Tensor:
            tok, st, outs = first, first_st, []
            for j, (batch, buf) in enumerate(zip(batches, views, strict=True)):
                _, pos, meta = batch.unpack(buf)
                embeds = nn.functional.embedding(tok, r.embed).to(dtype)
                st = r.head(embeds, st, pos, kv, meta, r.backend)  # [B, H]
                tok = torch.where(forced[:, j] >= 0, forced[:, j], self.greedy_ids(st))
                outs.append(tok)
            return torch.stack(outs)  # [n, B]

        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            chain()
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = chain()
        log.info("captured a CUDA graph of %d EAGLE head steps for batch %d, context %d", n, b, batches[0].key[2])
        return graph, static, first, first_st, forced, out
