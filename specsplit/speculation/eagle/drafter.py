"""EagleDrafter: an EAGLE / EAGLE-3 head behind the Drafter interface.

The head keeps its own paged KV cache, one entry per position: entry p pairs the target's
state at p with token p+1. Each request brings the target states of the tokens committed
since the last one (`DraftRequest.hidden_states`), so the drafter never calls the target:
in process the engine hands them over, over the split they arrive with the round's commit.
The entries the head made from its own states while drafting are dropped at the next
request and rebuilt from the target's states, as EAGLE does. If states for some positions
never arrive (a draft session re-opened elsewhere), the head restarts its cache at the first
position it has states for: fewer drafts accepted for a while, never a wrong token.

Drafting ahead (a branch request, sent while the target verifies the session's last block):
the head guesses the outcome where the whole block is accepted, so it goes on from its own
output state after the block's last token (the session's `tail`): the bonus guess, then the
next block. Such a request brings the states of the round verified before, which rewrite
those positions' entries in place; the entries the head made from its own states after them
stay until the next sequential request truncates them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from specsplit import trace
from specsplit.runtime.attention import StepBatch, select_backend
from specsplit.runtime.cpu_kernels import packing_enabled
from specsplit.runtime.kv_cache import PagedKVCache
from specsplit.sampling.logits import (
    SamplingBatch,
    process_logits,
    sample_sparse,
    topk_truncate,
)
from specsplit.speculation.drafters import Drafter, DraftRequest, Proposal, penalty_inputs
from specsplit.speculation.eagle.head import EagleHead
from specsplit.speculation.eagle.head_graphs import MAX_FEED, HeadChain, context_bucket
from specsplit.speculation.target import SessionError

log = logging.getLogger(__name__)


@dataclass
class _HeadState:
    base: int = 0  # position of the head cache's first entry
    valid: int = 0  # entries from `base` on that were built from target states
    # the head's output state after the last token it drafted (the state that token's entry
    # pairs with), and the session's token count when it held: drafting ahead goes on from it
    tail: Tensor | None = None
    tail_len: int = -1


class HeadRunner:
    """The head, the target embeddings (and LM head for EAGLE-1) and the head's paged cache."""

    def __init__(self, head: EagleHead, embed: Tensor, target_head: nn.Module | None, vocab_size: int, *,
                 device: torch.device, max_model_len: int, kv_cache_bytes: int | None = None,
                 block_size: int = 16, enforce_eager: bool = False) -> None:
        self.head = head
        self.embed = embed  # [V, H]
        self.target_head = target_head  # EAGLE-1: the target's LM head ([N, H] -> [N, V])
        self.vocab_size = vocab_size
        self.device = device
        self.max_model_len = max_model_len
        self.cfg = head.hc.model
        backend = select_backend(device)
        self.backend = backend if backend in ("flash", "sdpa") else "sdpa"  # the head runs unfused layers
        if self.backend == "flash":
            block_size = max(block_size, 256)
        dtype = head.post_attention_layernorm.weight.dtype
        if packing_enabled(device, dtype):  # oneDNN packed weights, as the target's on CPU
            for m in head.modules():
                if m is not head and hasattr(m, "prepack"):
                    m.prepack()
        per_block = PagedKVCache.bytes_per_block(1, block_size, self.cfg.num_kv_heads, self.cfg.head_dim, dtype)
        budget = kv_cache_bytes if kv_cache_bytes is not None else 256 * 2**20
        blocks = max(budget // per_block, -(-max_model_len // block_size))
        self.cache = PagedKVCache(1, int(blocks), block_size, self.cfg.num_kv_heads, self.cfg.head_dim, dtype, device)
        # greedy blocks: the steps after the first in one CUDA graph replay (None: step eagerly)
        self.chain: HeadChain | None = HeadChain(self) if device.type == "cuda" and not enforce_eager else None

    def shutdown(self) -> None:
        """Nothing to stop: the head lives in the caller's process."""

    @torch.inference_mode()
    def step(self, seq_ids: list[int], tokens: list[list[int]], states: Tensor, bases: list[int]) -> Tensor:
        """Append one entry per token (token i with state row i) to each sequence's cache and
        return the output state at each sequence's last entry [B, H]. states: [sum(len), H]."""
        cache = self.cache
        needs = {s: cache.seqs[s].length + len(t) for s, t in zip(seq_ids, tokens, strict=True)}
        for s, n in needs.items():
            if n + bases[seq_ids.index(s)] > self.max_model_len:
                raise SessionError(f"draft session {s} would pass max_model_len {self.max_model_len}")
            cache.reserve(s, n)
        qlens = [len(t) for t in tokens]
        dense = self.backend == "sdpa"
        # on a GPU, a dense context padded as the graphs pad it: the eager steps meet few shapes, not
        # one per length (kernels that prepare per shape prepare a few times only)
        pad = context_bucket(max(needs.values())) if dense and self.device.type == "cuda" else None
        batch = StepBatch.build([x for t in tokens for x in t], qlens, list(needs.values()),
                                [cache.seqs[s].blocks for s in seq_ids], cache.block_size, pad, dense=dense)
        ids, positions, meta = batch.unpack(batch.to_device(self.device))
        positions = positions + torch.tensor(bases).to(self.device, non_blocking=True)[meta.token_seq]
        embeds = nn.functional.embedding(ids, self.embed).to(states.dtype)
        out = self.head(embeds, states, positions, cache.layers[0], meta, self.backend)  # [T, H]
        for s, n in needs.items():
            cache.seqs[s].length = n
        last = torch.tensor(qlens).to(self.device, non_blocking=True).cumsum(0) - 1
        return out[last]

    def logits(self, out: Tensor) -> Tensor:
        """[B, H] -> [B, V] float32 over the target vocabulary."""
        return self.head.draft_logits(out, self.target_head, self.vocab_size)


class EagleDrafter(Drafter):
    """Drafts k tokens per request: one head step over the new target states, then k - 1
    steps on the head's own output."""

    def __init__(self, runner: HeadRunner, top_k: int = 32) -> None:
        super().__init__(runner.vocab_size, runner.device)
        self.runner = runner
        self.method = runner.head.hc.method
        self.top_k = top_k
        self.state: dict[int, _HeadState] = {}

    def target_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """The target states this head reads (see HeadConfig.target_layers)."""
        return self.runner.head.hc.target_layers(num_target_layers)

    def _on_open(self, seq_id: int) -> None:
        self.runner.cache.add(seq_id)
        self.state[seq_id] = _HeadState()

    def _on_close(self, seq_id: int) -> None:
        self.runner.cache.free(seq_id)
        self.state.pop(seq_id, None)

    def _draft(self, reqs: list[DraftRequest]) -> list[Proposal]:
        head = self.runner.head
        width = head.hc.state_size
        feed: list[tuple[int, list[int], Tensor, int]] = []  # seq_id, tokens, states, start position
        rewrites: list[tuple[int, list[int], Tensor, int]] = []
        for r in reqs:
            s, st = self.sessions[r.seq_id], self.state[r.seq_id]
            length = len(s.tokens)
            # a branch request's last block_len tokens are under verify: the states end before them
            known = length - (r.branch.block_len if r.branch is not None else 0)
            h = r.hidden_states
            if h is not None and h.shape[0] > 0:
                n = h.shape[0]
                if h.dim() != 2 or h.shape[1] != width or n > known - 1:
                    raise SessionError(f"draft session {r.seq_id}: hidden states of shape {tuple(h.shape)}, want "
                                       f"[n <= {known - 1}, {width}]")
                start = known - 1 - n  # position of the first new entry
                states = head.project(h.to(self.device, head.fc.weight.dtype))
                follows = st.base <= start <= st.base + st.valid  # no gap after the entries from target states
                if r.branch is not None and follows:  # in place: the entries drafted after them stay
                    st.valid = max(st.valid, start - st.base + n)
                else:
                    self.runner.cache.truncate(r.seq_id, start - st.base if follows else 0)
                    if not follows:  # states for positions before `start` are missing: restart the cache there
                        st.base = start
                    st.valid = start - st.base + n
                    st.tail = None  # a guess ahead would go on from entries just dropped: none this time
                    if r.branch is None:
                        feed.append((r.seq_id, s.tokens[length - n :], states, start))
                        continue
                rewrites.append((r.seq_id, s.tokens[known - n : known], states, start))
            if r.branch is not None and st.tail is not None and st.tail_len == length:
                feed.append((r.seq_id, s.tokens[-1:], st.tail[None], length - 2))  # go on after the block
        if rewrites:
            trace.mark("head.rewrite", sum(len(w[1]) for w in rewrites))  # entries rebuilt
            self._rewrite(rewrites)
        if not feed:
            return [Proposal([]) for _ in reqs]
        by_id = {r.seq_id: r for r in reqs}
        for f in feed:
            self.state[f[0]].tail = None  # set again by the block drafted now
        made = self._run([by_id[f[0]] for f in feed], feed)
        for seq_id, p in made.items():
            st = self.state[seq_id]
            st.tail_len = len(self.sessions[seq_id].tokens) + len(p.token_ids) if st.tail is not None else -1
        return [made.get(r.seq_id, Proposal([])) for r in reqs]

    def _rewrite(self, rewrites: list[tuple[int, list[int], Tensor, int]]) -> None:
        """Rebuild each session's entries at `start`.. from the target's states, in place: the
        entries after them (drafted from the head's own states, maybe under verify) stay."""
        cache = self.runner.cache
        seq_ids = [w[0] for w in rewrites]
        ends = [cache.seqs[s].length for s in seq_ids]
        for seq_id, _, _, start in rewrites:
            cache.seqs[seq_id].length = start - self.state[seq_id].base
        try:
            self.runner.step(seq_ids, [w[1] for w in rewrites], torch.cat([w[2] for w in rewrites]),
                             [self.state[s].base for s in seq_ids])
        finally:
            for seq_id, end in zip(seq_ids, ends, strict=True):
                cache.seqs[seq_id].length = max(end, cache.seqs[seq_id].length)

    def _chained(self, reqs: list[DraftRequest], feed: list[tuple[int, list[int], Tensor, int]]
                 ) -> dict[int, Proposal] | None:
        """A greedy batch's blocks in one CUDA graph replay (`HeadChain`); None where that cannot
        run (sampling, penalties, logit bias, blocks of different lengths, no CUDA): step eagerly.
        Decided from the requests' parameters on the host: no sampling tensors are built."""
        chain = self.runner.chain
        k = reqs[0].k
        params = [self.sessions[r.seq_id].params for r in reqs]
        if chain is None or any(r.k != k for r in reqs) or not all(
                p.greedy and not p.logit_bias and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty for p in params):
            return None
        plan = self._planned(reqs, k)
        if plan is None and type(self)._pick is not EagleDrafter._pick:
            return None  # picks made on the host, step by step
        seq_ids = [r.seq_id for r in reqs]
        if any(len(f[1]) > MAX_FEED for f in feed):
            trace.mark("head.feed_eager", max(len(f[1]) for f in feed))
            self._feed_all_but_last(feed)  # a prompt's states: eagerly into the cache, then the block in a graph
        trace.mark("head.chain", len(seq_ids))
        got = chain.run(seq_ids, [f[1] for f in feed], torch.cat([f[2] for f in feed]),
                        [self.state[s].base for s in seq_ids], k, plan)
        if got is None:
            return None
        trace.mark("head.launched", len(seq_ids))
        ids, tails = got
        for i, s in enumerate(seq_ids):
            self.state[s].tail = tails[i]
        blocks = ids.tolist()
        trace.mark("head.synced", len(seq_ids))
        return {s: Proposal(block) for s, block in zip(seq_ids, blocks, strict=True)}

    def _feed_all_but_last(self, feed: list[tuple[int, list[int], Tensor, int]]) -> None:
        """Append every new entry but the last of each sequence to the head's cache in one eager
        step, and leave only the last in `feed` (in place: an eager fallback must not feed them
        again). The block's graph then starts from one new token, whatever the prompt's length."""
        long = [i for i, f in enumerate(feed) if len(f[1]) > 1]
        seq_ids = [feed[i][0] for i in long]
        self.runner.step(seq_ids, [feed[i][1][:-1] for i in long], torch.cat([feed[i][2][:-1] for i in long]),
                         [self.state[s].base for s in seq_ids])
        for i in long:
            seq_id, tokens, states, start = feed[i]
            feed[i] = (seq_id, tokens[-1:], states[-1:], start + len(tokens) - 1)

    def _pick(self, reqs: list[DraftRequest], step: list[int], toks: list[int]) -> list[int]:
        """The tokens drafted at position `step[j]` of each live request's block: the head's choice.
        (Benchmarks override it to set the acceptance rate while the head still runs for real.)"""
        return toks

    def _planned(self, reqs: list[DraftRequest], k: int) -> Tensor | None:
        """`_pick` decided up front, for a block drafted in one graph replay: tokens # [n, k]
        (-1: the head's own choice); None: none planned."""
        return None

    def _run(self, reqs: list[DraftRequest], feed: list[tuple[int, list[int], Tensor, int]]) -> dict[int, Proposal]:
        chained = self._chained(reqs, feed)
        if chained is not None:  # every block in one graph replay
            return chained
        trace.mark("head.eager", len(reqs))
        sessions = [self.sessions[r.seq_id] for r in reqs]
        batch = SamplingBatch.from_params([s.params for s in sessions], self.device, [s.generator for s in sessions])
        blocks: list[list[int]] = [[] for _ in reqs]
        q_ids: list[list[Tensor]] = [[] for _ in reqs]
        q_probs: list[list[Tensor]] = [[] for _ in reqs]
        live = list(range(len(reqs)))
        ids = {i: f[1] for i, f in enumerate(feed)}  # tokens of the next entries, per live request
        states = torch.cat([f[2] for f in feed])  # [sum(len(ids)), H] their states
        for _ in range(max(r.k for r in reqs)):
            seq_ids = [reqs[i].seq_id for i in live]
            bases = [self.state[s].base for s in seq_ids]
            out = self.runner.step(seq_ids, [ids[i] for i in live], states, bases)  # [n, H]
            logits = self.runner.logits(out)  # [n, V]
            sub = batch.select(torch.tensor(live, device=self.device)) if len(live) < len(reqs) else batch
            seen, counts = penalty_inputs(sub, [sessions[i] for i in live], [blocks[i] for i in live], self.vocab_size,
                                          self.device)
            probs = process_logits(logits, sub, seen, counts)  # [n, V]
            if sub.all_greedy:
                toks = probs.argmax(-1).tolist()
            else:
                top_ids, top_p = topk_truncate(probs, self.top_k)  # [n, K]
                toks = sample_sparse(top_ids, top_p, sub).tolist()
            toks = self._pick([reqs[i] for i in live], [len(blocks[i]) for i in live], toks)
            for j, i in enumerate(live):
                blocks[i].append(toks[j])
                if not sub.all_greedy and not sessions[i].params.greedy:
                    q_ids[i].append(top_ids[j])
                    q_probs[i].append(top_p[j])
                if len(blocks[i]) == reqs[i].k:  # where drafting ahead goes on from
                    self.state[reqs[i].seq_id].tail = out[j]
            keep = [j for j, i in enumerate(live) if len(blocks[i]) < reqs[i].k]
            live = [live[j] for j in keep]
            if not live:
                break
            ids = {i: [blocks[i][-1]] for i in live}
            states = out[keep]  # the head continues from its own output state
        made = {}
        for i, (r, s) in enumerate(zip(reqs, sessions, strict=True)):
            if s.params.greedy:
                made[r.seq_id] = Proposal(blocks[i])
            else:
                made[r.seq_id] = Proposal(blocks[i], torch.stack(q_ids[i]), torch.stack(q_probs[i]))
        return made
