"""In-process speculative decoding with continuous batching.

Each `step()` is one round for every running sequence: the drafter proposes a block per
sequence (one batched call), the target verifies all blocks and prefills all newly admitted
prompts in one batched forward, and every sequence commits its accepted tokens plus one.
A finished sequence frees its slot at once for the next waiting one. Without a drafter the
same loop is plain decoding (k = 0), which is the baseline every benchmark compares to.
What a round does to each sequence (k, commit, statistics) is `RoundBook`'s (round.py), the
same bookkeeping the served loop uses; this engine adds the batching.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from specsplit.outputs import CompletionOutput, Logprob, RequestOutput, SpecMetrics
from specsplit.runtime.kv_cache import OutOfKVMemory
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.adaptive import CostModel
from specsplit.speculation.drafters import Drafter, DraftRequest
from specsplit.speculation.round import RoundBook, completion_params
from specsplit.speculation.sequence import IncrementalDetokenizer, Sequence, end_token_ids
from specsplit.speculation.target import TargetVerifier, VerifyItem

log = logging.getLogger(__name__)


@dataclass
class _Running:
    seq: Sequence
    request_id: str
    book: RoundBook  # k, commit and statistics of its rounds (shared with the served loop)
    opened: bool = False
    hidden: list[Any] = field(default_factory=list)  # target states not yet handed to the drafter (EAGLE)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)


class SpecEngine:
    """Drives a TargetVerifier and an optional Drafter over many requests."""

    def __init__(
        self, target: TargetVerifier, drafter: Drafter | None, tokenizer: Any, *,
        num_speculative_tokens: int = 5, adaptive: bool = True, max_num_seqs: int = 64,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.k_max = num_speculative_tokens if drafter is not None else 0
        self.adaptive = adaptive
        self.max_num_seqs = max_num_seqs
        self.costs = CostModel()
        self.eos_ids = end_token_ids(target.runner.cfg.eos_token_ids, tokenizer)
        self.max_model_len = target.runner.max_model_len
        if drafter is not None and hasattr(drafter, "runner"):
            self.max_model_len = min(self.max_model_len, drafter.runner.max_model_len)
        self.waiting: deque[_Running] = deque()
        self.running: list[_Running] = []
        self.requests: dict[str, _Request] = {}
        self._next_seq = 0

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.target.check_ids(prompt_ids, "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}")
        req = _Request(request_id, prompt, list(prompt_ids))
        for i in range(params.n):
            seq = Sequence(
                self._next_seq, list(prompt_ids), completion_params(params, i), self.eos_ids, self.max_model_len,
                IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer is not None else None,
                index=i,
            )
            self._next_seq += 1
            req.seqs.append(seq)
            self.waiting.append(_Running(seq, request_id, RoundBook(seq, self.k_max, self.adaptive)))
        self.requests[request_id] = req

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for r in [*self.running, *self.waiting]:
            if r.request_id == request_id:
                r.seq.finish_reason = r.seq.finish_reason or "abort"
        self._reap()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one round -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one round; return the requests that finished in it."""
        self._admit()
        if not self.running:
            return self._reap()
        ks = {r.seq.seq_id: r.book.choose_k(self.costs, self.drafter is not None) for r in self.running}
        drafts: dict[int, Any] = {}
        if self.drafter is not None:
            reqs = []
            for r in self.running:
                if not r.opened:
                    self.drafter.open(r.seq.seq_id, r.seq.all_ids, r.seq.params, len(r.seq.prompt_ids))
                    r.book.draft_valid = len(r.seq.all_ids)
                    r.hidden.clear()  # the target's re-prefill sends every position's state again
                ids = r.seq.all_ids
                if ks[r.seq.seq_id] > 0 or not r.opened:
                    hidden = torch.cat(r.hidden) if len(r.hidden) > 1 else (r.hidden[0] if r.hidden else None)
                    valid = r.book.draft_valid
                    reqs.append(DraftRequest(r.seq.seq_id, valid, ids[valid:], ks[r.seq.seq_id], hidden))
            if reqs:
                t0 = time.perf_counter()
                try:
                    props = self.drafter.propose(reqs)
                except OutOfKVMemory:  # the draft's own pool is full: as for the target's below
                    for r in self.running:
                        if not r.opened:  # opened in the drafter just now, never in the target
                            self.drafter.close(r.seq.seq_id)
                    self._preempt_one()
                    return self._reap()
                self.costs.observe_draft_call(time.perf_counter() - t0, max(q.k for q in reqs),
                                              max(len(q.new_tokens) for q in reqs), self.k_max,
                                              prompt_chunk=any(p.prefilling for p in props))
                for q, p in zip(reqs, props, strict=True):
                    drafts[q.seq_id] = p
                    run = next(r for r in self.running if r.seq.seq_id == q.seq_id)
                    run.book.draft_valid = len(run.seq.all_ids)
                    run.hidden.clear()
        items = []
        for r in self.running:
            if not r.opened:
                self.target.open(r.seq.seq_id, r.seq.all_ids, r.seq.params, len(r.seq.prompt_ids))
                r.opened = True
            p = drafts.get(r.seq.seq_id)
            items.append(VerifyItem(r.seq.seq_id, p.token_ids if p else [], p.q_ids if p else None,
                                    p.q_probs if p else None))
        t0 = time.perf_counter()
        try:
            results = self.target.step(items)
        except OutOfKVMemory:
            self._preempt_one()
            return self._reap()
        self.costs.observe_verify(max(len(i.draft_ids) for i in items), time.perf_counter() - t0,
                                  prompt_chunk=any(r.pending for r in results))
        for r, it, res in zip(self.running, items, results, strict=True):
            if res.pending:  # a chunk of a long prompt went in; its first token comes in a later step
                continue
            if res.hidden_states is not None:
                r.hidden.append(res.hidden_states)
            prompt_lps = _to_logprobs(res.prompt_logprobs) \
                if res.prompt_logprobs is not None and r.seq.prompt_logprobs is None else None
            r.book.commit(len(it.draft_ids), res.num_accepted, res.emitted,
                          _to_logprobs(res.logprobs) if res.logprobs is not None else None, prompt_lps)
        return self._reap()

    def _admit(self) -> None:
        caches = [self.target.runner.cache]
        if self.drafter is not None and hasattr(self.drafter, "runner"):
            caches.append(self.drafter.runner.cache)  # the draft's pool must hold it too
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if self.running and not all(self._fits(cache, r) for cache in caches):
                break
            self.waiting.popleft()
            self.running.append(r)

    def _fits(self, cache: Any, r: _Running) -> bool:
        """Room in `cache` for r's next round once every running sequence has had its own."""
        def blocks(x: _Running) -> int:
            return -(-(len(x.seq.all_ids) + self.k_max + 1) // cache.block_size)

        def held(x: _Running) -> int:  # admitted but not yet prefilled: holds nothing yet
            return len(cache.seqs[x.seq.seq_id].blocks) if x.seq.seq_id in cache.seqs else 0

        growth = sum(blocks(x) - held(x) for x in self.running)
        return blocks(r) + max(growth, 0) <= cache.num_free_blocks

    def _preempt_one(self) -> None:
        """Out of KV memory: free the newest sequence; it is re-prefilled from its tokens later."""
        if len(self.running) <= 1:
            raise OutOfKVMemory("one sequence alone does not fit the KV cache; raise the KV budget")
        victim = self.running.pop()
        self._close(victim)
        victim.opened = False
        self.waiting.appendleft(victim)
        log.info("preempted sequence %d (KV cache full)", victim.seq.seq_id)

    def _close(self, r: _Running) -> None:
        self.target.close(r.seq.seq_id)
        if self.drafter is not None:
            self.drafter.close(r.seq.seq_id)

    def _reap(self) -> list[RequestOutput]:
        for r in [x for x in self.running if x.seq.finished]:
            self._close(r)
            self.running.remove(r)
        self.waiting = deque(r for r in self.waiting if not r.seq.finished)
        done = []
        for rid, req in list(self.requests.items()):
            if all(s.finished for s in req.seqs):
                done.append(self._output(req))
                del self.requests[rid]
        return done

    def _output(self, req: _Request) -> RequestOutput:
        outs, total = [], SpecMetrics()
        for s in req.seqs:
            total.add(s.metrics)
            outs.append(CompletionOutput(
                s.index, s.text, list(s.output_ids),
                s.cumulative_logprob if s.logprobs is not None else None, s.logprobs,
                s.finish_reason, s.stop_reason, s.metrics,
            ))
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, True, total,
                             req.seqs[0].prompt_logprobs if req.seqs else None)


def _to_logprobs(raw: list[dict[int, float]]) -> list[dict[int, Any]]:
    out = []
    for d in raw:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])
        out.append({t: Logprob(lp, rank + 1) for rank, (t, lp) in enumerate(ranked)})
    return out
