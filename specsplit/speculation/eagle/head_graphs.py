"""An EAGLE head's greedy draft steps replayed as CUDA graphs.

After its first step (which takes the target's new states, a variable number of them) the head
drafts the rest of a block one token at a time from its own output state. Run eagerly, each of
those steps is dozens of small kernels plus host work: at batch 1 on an H100 a step of an
EAGLE-3 head for an 8B target cost 1.85 ms, a quarter of the target's whole decode step. Here
every step's inputs are built on the host beforehand and copied to the device at once; the
first step is one captured graph, and each later step one replay of a captured one-token step,
fed the previous step's token and output state on the device (a few device copies between
replays, no host sync).

Graphs are captured on first use, with the real inputs of that block (the warm-up's cache
writes land where the replay then writes again): first steps per (batch bucket, new tokens
bucket, context bucket), later steps per (batch bucket, context bucket). The buckets are powers
of two (contexts from 256), and the block length is not part of any key, so however adaptive k
and drafting ahead vary the block, a served session meets a few dozen shapes per batch bucket;
one graph per whole block, keyed by its length too, met so many that their captures (tens of
milliseconds each) kept landing on served rounds. When the budget of graphs is used up the
least recently used one is dropped.
Greedy sessions only; anything else (sampling, penalties, no CUDA) steps eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


def context_bucket(length: int) -> int:
    """The padded context of a head step reading `length` entries: CONTEXT_BUCKET times a power of two."""
    return max(CONTEXT_BUCKET, 1 << (length - 1).bit_length())


@dataclass
class _Graph:
    """One captured step and its static tensors: inputs written before each replay, outputs read after."""

    static: Tensor  # the step's packed inputs (positions, slots, context lengths, ...)
    st_in: Tensor  # the states it steps from
    forced: Tensor  # [B] a token to choose instead of the head's (-1: the head's own)
    last: Tensor | None = None  # first step: each sequence's last row
    tok_in: Tensor | None = None  # later steps: the token fed
    graph: torch.cuda.CUDAGraph | None = None
    tok: Tensor | None = None  # [B] the chosen token
    st: Tensor | None = None  # [B, H] the output state


class HeadChain:
    """Captured chains of greedy head steps, keyed by their shapes."""

    def __init__(self, runner: HeadRunner, max_graphs: int = 256) -> None:
        self.runner = runner
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
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
        """A greedy block of `k` tokens per sequence, in k graph replays.

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
        pad = context_bucket(max(max(needs.values()), max(starts) + q))
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
        try:
            g0 = self._graph(("first", *first.key), lambda: self._capture_first(first, q))
            g1 = self._graph(("step", *batches[1].key), lambda: self._capture_step(batches[1])) if k > 1 else None
        except Exception:  # noqa: BLE001 - an uncapturable head keeps drafting eagerly
            log.warning("could not capture the EAGLE head's steps in a CUDA graph; drafting eagerly", exc_info=True)
            self.disabled = True
            for seq_id, x in zip(seq_ids, starts, strict=True):  # give back the blocks reserved for the block
                cache.truncate(seq_id, x)
            return None
        # every step's inputs in one copy; step 0: the new tokens with their projected target states
        packed = packed_to_device(np.concatenate([x.packed for x in batches]), r.device)
        inputs = torch.split(packed, [x.packed.shape[0] for x in batches])
        g0.static.copy_(inputs[0])
        # small index lists from pageable memory without blocking (staged at once, no device sync)
        rows = torch.tensor([i * q + j for i, n in enumerate(qs) for j in range(n)]).to(r.device, non_blocking=True)
        g0.st_in.zero_()
        g0.st_in[rows] = states.to(g0.st_in.dtype)
        g0.last.copy_(torch.tensor([i * q + n - 1 for i, n in enumerate(qs)] + [i * q for i in range(m, b)]),
                      non_blocking=True)
        g0.forced.fill_(-1)
        if plan is not None:
            g0.forced[:m].copy_(plan[:, 0])
        g0.graph.replay()
        ids = torch.empty(k, b, dtype=torch.int64, device=r.device)
        ids[0].copy_(g0.tok)
        tail = g0.st
        if g1 is not None:  # steps 1..k-1: one replay each, fed its predecessor's token and state on the device
            g1.tok_in.copy_(g0.tok)
            g1.st_in.copy_(g0.st)
            g1.forced.fill_(-1)
            for j in range(1, k):
                g1.static.copy_(inputs[j])
                if plan is not None:
                    g1.forced[:m].copy_(plan[:, j])
                g1.graph.replay()
                ids[j].copy_(g1.tok)
                g1.tok_in.copy_(g1.tok)
                g1.st_in.copy_(g1.st)
            tail = g1.st
        self.replays += 1
        for s, x, n in zip(seqs, starts, qs, strict=True):
            s.length = x + n + k - 1
        return ids[:, :m].T.clone(), tail[:m].clone()  # [m, k], [m, H]

    def _graph(self, key: tuple[Any, ...], make: Callable[[], _Graph]) -> _Graph:
        """The captured graph of `key`, captured now if new; the least recently used one is
        dropped when the budget is full."""
        g = self.graphs.pop(key, None)  # re-inserted below: the dict's order is least recently used first
        if g is None:
            if len(self.graphs) >= self.max_graphs:
                torch.cuda.synchronize(self.runner.device)
                self.graphs.pop(next(iter(self.graphs))).graph.reset()
            g = make()
        self.graphs[key] = g
        return g

    def _capture_first(self, batch: StepBatch, q: int) -> _Graph:
        """A block's first step: each sequence's q new tokens (padded) with their states; its
        output at each sequence's last token, and the token chosen from it."""
        r = self.runner
        dev, b = r.device, batch.num_seqs
        dtype = r.head.post_attention_layernorm.weight.dtype
        g = _Graph(static=torch.from_numpy(batch.packed).to(dev),
                   st_in=torch.zeros(b * q, r.cfg.hidden_size, dtype=dtype, device=dev),  # [B*Q, H]
                   last=torch.zeros(b, dtype=torch.int64, device=dev),  # [B] row of each sequence's last token
                   forced=torch.full((b,), -1, dtype=torch.int64, device=dev))

        def step() -> tuple[Tensor, Tensor]:
            ids, pos, meta = batch.unpack(g.static)
            st = r.head(nn.functional.embedding(ids, r.embed).to(dtype), g.st_in, pos, r.cache.layers[0], meta,
                        r.backend)[g.last]
            return self._pick(g.forced, st), st

        g.graph, (g.tok, g.st) = capture(step, dev, self.pool)
        log.info("captured a CUDA graph of an EAGLE head's first step for batch %d x %d, context %d", b, q,
                 batch.key[2])
        return g

    def _capture_step(self, batch: StepBatch) -> _Graph:
        """A later step: one token per sequence, the previous step's choice with its output state."""
        r = self.runner
        dev, b = r.device, batch.num_seqs
        dtype = r.head.post_attention_layernorm.weight.dtype
        g = _Graph(static=torch.from_numpy(batch.packed).to(dev),
                   st_in=torch.zeros(b, r.cfg.hidden_size, dtype=dtype, device=dev),  # [B, H]
                   tok_in=torch.zeros(b, dtype=torch.int64, device=dev),
                   forced=torch.full((b,), -1, dtype=torch.int64, device=dev))

        def step() -> tuple[Tensor, Tensor]:
            _, pos, meta = batch.unpack(g.static)
            st = r.head(nn.functional.embedding(g.tok_in, r.embed).to(dtype), g.st_in, pos, r.cache.layers[0], meta,
                        r.backend)  # [B, H]
            return self._pick(g.forced, st), st

        g.graph, (g.tok, g.st) = capture(step, dev, self.pool)
        log.info("captured a CUDA graph of an EAGLE head's later step for batch %d, context %d", b, batch.key[2])
        return g

    def _pick(self, forced: Tensor, st: Tensor) -> Tensor:
        return torch.where(forced >= 0, forced, self.greedy_ids(st))
