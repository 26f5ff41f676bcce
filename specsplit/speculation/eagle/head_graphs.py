"""An EAGLE head's greedy draft steps chained in one CUDA graph replay.

After its first step (which takes the target's new states, a variable number of them) the head
drafts the rest of a block one token at a time from its own output state. Run eagerly, each of
those steps is dozens of small kernels plus host work: at batch 1 on an H100 a step of an
EAGLE-3 head for an 8B target cost 1.85 ms, a quarter of the target's whole decode step. Here
every step's inputs are built on the host beforehand, the chosen token and the output state
are fed to the next step on the device, and the k - 1 steps are one graph replay.

Graphs are captured per (steps, batch bucket, new tokens bucket, context bucket) on first use,
with the real inputs of that block (the warm-up's cache writes land where the replay then
writes again). The buckets are powers of two (contexts from 256) so that a served session meets
few shapes: each capture costs tens of milliseconds, paid by the round that meets it. When the
budget of graphs is used up the least recently used one is dropped. Adaptive k and drafting
ahead meet about a hundred shapes per batch bucket (k + 1 of 1..7, feeds of 1..16, a few
contexts), so the budget holds 256: the graphs share one memory pool, and a budget below the
shapes in use would capture again and again.
Greedy sessions only; anything else (sampling, penalties, no CUDA) steps eagerly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from specsplit.runtime.attention import StepBatch, packed_to_device
from specsplit.runtime.cuda_graphs import capture
from specsplit.runtime.runner import BATCH_BUCKETS

if TYPE_CHECKING:
    from specsplit.speculation.eagle.drafter import HeadRunner

log = logging.getLogger(__name__)

CONTEXT_BUCKET = 256  # the head's attention (SDPA or flash) reads a context padded to this times a power of two
MAX_FEED = 16  # the most new tokens per sequence a block's first step takes in a graph (more: eager)


class HeadChain:
    """Captured chains of greedy head steps, keyed by their shapes."""

    def __init__(self, runner: HeadRunner, max_graphs: int = 256) -> None:
        self.runner = runner
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor, Tensor,
                                                 tuple[Tensor, Tensor]]] = {}
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
    def run(self, seq_ids: list[int], feeds: list[list[int]], states: Tensor, bases: list[int], k: int,
            plan: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """A greedy block of `k` tokens per sequence in one replay.

        Step 0 appends each sequence's `feeds[i]` (the tokens committed since its last block)
        with their projected target states (`states` # [sum(len(feeds[i])), H]); each later step
        the previous step's choice and the head's own output state. Where `plan` # [m, k] is
        >= 0 that token is fed and proposed instead (a benchmark's oracle). Returns the ids
        # [m, k] and the head's output state after the last step # [m, H] (what drafting on
        would start from), or None (nothing changed) when the block cannot run here.
        """
        r, cache = self.runner, self.runner.cache
        m = len(seq_ids)
        b = next((x for x in BATCH_BUCKETS if x >= m), None)
        qs = [len(f) for f in feeds]
        q = 1 << (max(qs) - 1).bit_length() if qs and max(qs) > 0 else 0  # few shapes: pad to a power of two
        if self.disabled or k < 1 or b is None or min(qs) < 1 or q > MAX_FEED:
            return None
        needs = {s: cache.seqs[s].length + n + k - 1 for s, n in zip(seq_ids, qs, strict=True)}
        if any(needs[s] + base > r.max_model_len for s, base in zip(seq_ids, bases, strict=True)):
            return None  # the eager path says why
        if self.scratch is None:
            if cache.num_free_blocks < 1:
                return None
            self.scratch = cache.reserve_scratch() * cache.block_size
        if not cache.can_fit(needs):
            return None
        seqs = [cache.seqs[s] for s in seq_ids]
        starts = [s.length for s in seqs]
        for seq_id, new_len in needs.items():
            cache.reserve(seq_id, new_len)
        pad = max(CONTEXT_BUCKET, 1 << (max(max(needs.values()), max(starts) + q) - 1).bit_length())
        tables = [s.blocks for s in seqs] + [[] for _ in range(b - m)]
        dense, write = r.backend == "sdpa", [1] * m + [0] * (b - m)
        ids = [t for f in feeds for t in [*f, *[0] * (q - len(f))]] + [0] * ((b - m) * q)
        first = StepBatch.build(ids, [q] * b, [x + q for x in starts] + [q] * (b - m), tables, cache.block_size, pad,
                                dense=dense, write_lens=qs + [0] * (b - m), scratch_slot=self.scratch)
        # rotary positions are absolute, and the head's cache starts at each session's `base`
        first.packed[b * q : b * q + m * q] += np.repeat(np.asarray(bases, dtype=np.int64), q)  # "positions"
        batches = [first]
        if k > 1:  # the later steps: one token each, fed on the device
            step = StepBatch.build([0] * b, [1] * b, [x + n + 1 for x, n in zip(starts, qs, strict=True)] + [1] * (b - m),
                                   tables, cache.block_size, pad, dense=dense, write_lens=write, scratch_slot=self.scratch)
            step.packed[b : b + m] += np.asarray(bases, dtype=np.int64)  # "positions"
            batches += [step, *(step.advanced(j, m) for j in range(1, k - 1))]
        key = (k, *first.key)
        entry = self.graphs.pop(key, None)  # re-inserted below: the dict's order is least recently used first
        if entry is None:
            if len(self.graphs) >= self.max_graphs:  # make room: drop the least recently used graph
                torch.cuda.synchronize(r.device)
                self.graphs.pop(next(iter(self.graphs)))[0].reset()
            try:
                entry = self._capture(batches, q)
            except Exception:  # noqa: BLE001 - an uncapturable head keeps drafting eagerly
                log.warning("could not capture the EAGLE head's steps in a CUDA graph; drafting eagerly", exc_info=True)
                self.disabled = True
                for seq_id in seq_ids:  # give back the blocks reserved for the block
                    cache.truncate(seq_id, cache.seqs[seq_id].length)
                return None
        self.graphs[key] = entry
        graph, static, st_in, last, forced, out = entry
        packed_to_device(np.concatenate([x.packed for x in batches]), r.device, out=static)
        rows = torch.tensor([i * q + j for i, n in enumerate(qs) for j in range(n)], device=r.device)
        st_in.zero_()
        st_in[rows] = states.to(st_in.dtype)
        last.copy_(torch.tensor([i * q + n - 1 for i, n in enumerate(qs)] + [i * q for i in range(m, b)]))
        forced.fill_(-1)
        if plan is not None:
            forced[:m].copy_(plan)
        graph.replay()
        self.replays += 1
        for s, x, n in zip(seqs, starts, qs, strict=True):
            s.length = x + n + k - 1
        ids, tail = out
        return ids[:, :m].T.clone(), tail[:m].clone()  # [m, k], [m, H]

    def _capture(self, batches: list[StepBatch], q: int
                 ) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        r = self.runner
        dev, b, k = r.device, batches[0].num_seqs, len(batches)
        static = torch.from_numpy(np.concatenate([x.packed for x in batches])).to(dev)
        views = torch.split(static, [x.packed.shape[0] for x in batches])
        dtype = r.head.post_attention_layernorm.weight.dtype
        st_in = torch.zeros(b * q, r.cfg.hidden_size, dtype=dtype, device=dev)  # [B*Q, H] step 0's states
        last = torch.zeros(b, dtype=torch.int64, device=dev)  # [B] step 0's row of each sequence's last token
        forced = torch.full((b, k), -1, dtype=torch.int64, device=dev)  # [B, k]
        kv = r.cache.layers[0]

        def pick(j: int, st: Tensor) -> Tensor:
            return torch.where(forced[:, j] >= 0, forced[:, j], self.greedy_ids(st))

        def chain() -> tuple[Tensor, Tensor]:
            ids, pos, meta = batches[0].unpack(views[0])
            st = r.head(nn.functional.embedding(ids, r.embed).to(dtype), st_in, pos, kv, meta, r.backend)[last]
            tok = pick(0, st)
            outs = [tok]
            for j in range(1, k):
                _, pos, meta = batches[j].unpack(views[j])
                st = r.head(nn.functional.embedding(tok, r.embed).to(dtype), st, pos, kv, meta, r.backend)  # [B, H]
                tok = pick(j, st)
                outs.append(tok)
            return torch.stack(outs), st  # [k, B], [B, H]

        graph, out = capture(chain, dev, self.pool)
        log.info("captured a CUDA graph of a %d-token EAGLE head block for batch %d x %d, context %d",
                 k, b, q, batches[0].key[2])
        return graph, static, st_in, last, forced, out
