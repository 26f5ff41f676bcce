"""What a round does to one completion, written once for every driver of the round.

Two drivers run rounds: the in-process engine (`SpecEngine`: many sequences drafted and
verified in one batched step) and the served loop (`CompletionLoop`: one completion, with
RPCs to the tiers, pipelining and failover). They differ in how a block gets drafted and
verified; what the round does to the completion is the same, and lives here:

- how long the next block may be: the room left before max_tokens and the context, and the
  k that adaptive k picks within it (`RoundBook.choose_k`);
- whether k may adapt at all: not for a seeded request (`adapts_k`);
- what a verdict commits: the tokens up to the first stop, their logprobs, the prompt's
  logprobs from the first verdict, the speculation statistics, the acceptance estimate and
  how much of the committed sequence the drafter holds (`RoundBook.commit`);
- the sampling parameters of each of a request's n completions (`completion_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from specsplit.outputs import SpecMetrics
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.adaptive import AdaptiveK, CostModel
from specsplit.speculation.sequence import Sequence


def completion_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of completion `index` of a request's n.

    A seeded request gives completion i the seed + i: its n samples differ from each other, each
    is reproducible, and completion 0 is the same request asked with n = 1.
    """
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def adapts_k(adaptive: bool, params: SamplingParams) -> bool:
    """Whether k may follow the measured costs for a completion with these parameters.

    Not for a seeded request: how many random numbers a round draws depends on k, so a k chosen
    from timings would make the same seeded request sample other tokens on a busier machine.
    """
    return adaptive and params.seed is None


def commit_verdict(seq: Sequence, metrics: SpecMetrics, drafted: int, accepted: int, emitted: list[int],
                   logprobs: list[dict[int, Any]] | None,
                   prompt_logprobs: list[dict[int, Any]] | None = None) -> tuple[list[int], str]:
    """Commit a verdict's tokens into `seq` and count the round; return (tokens kept, text delta).

    `drafted` tokens were verified, `accepted` of them kept by the target, `emitted` is the
    accepted prefix plus the target's own token. A stop inside the block keeps fewer tokens:
    only accepted tokens that were kept count as accepted. `prompt_logprobs` (tokens 1.. of the
    prompt, from the first verdict that carries them) are stored once, behind a None for token 0.
    Also used by the gateway's side of the direct round, which relays verdicts the target tier
    counted the same way.
    """
    if prompt_logprobs is not None and seq.prompt_logprobs is None:
        seq.prompt_logprobs = [None, *prompt_logprobs][: len(seq.prompt_ids)]
    kept, text = seq.commit(emitted, logprobs)
    metrics.num_drafted_tokens += drafted
    metrics.num_accepted_tokens += min(accepted, len(kept))
    metrics.num_rounds += 1
    metrics.num_emitted_tokens += len(kept)
    return kept, text


class RoundBook:
    """The bookkeeping of one completion's rounds: block length, commit, statistics.

    The driver drafts and verifies; before each round it asks `choose_k`, after each verdict it
    calls `commit`. `draft_valid` is how many leading committed tokens the drafter's session
    holds: the driver sets it when the drafter catches up (or is re-opened); a verdict on a block
    of the drafter's moves it past the accepted prefix, which the drafter already holds.
    """

    def __init__(self, seq: Sequence, k_max: int, adaptive: bool, metrics: SpecMetrics | None = None) -> None:
        self.seq = seq
        self.adaptive = AdaptiveK(k_max, adapts_k(adaptive, seq.params))
        self.metrics = seq.metrics if metrics is None else metrics  # the served loop keeps its own
        self.draft_valid = 0

    def room(self) -> int:
        """The longest block worth verifying: the round's own token must still fit after it."""
        seq = self.seq
        return max(0, min(seq.max_new_tokens() - 1, seq.max_model_len - len(seq.all_ids) - 1))

    def choose_k(self, costs: CostModel, drafting: bool) -> int:
        """The next block's length: 0 without a drafter, else adaptive k within the room left;
        0 also while the server's load governor finds that drafting does not pay at this load
        (only for adaptive k: a fixed k stays fixed)."""
        if drafting and self.adaptive.enabled and not costs.governor.allows_drafting():
            return 0
        return self.adaptive.choose(costs, self.room()) if drafting else 0

    def choose_ahead_k(self, costs: CostModel, block_len: int) -> int:
        """The length of a block drafted ahead while `block_len` tokens are verified: adaptive k,
        cut to what ends within that verify (`CostModel.ahead_k`), since a guess that outlasts
        the verify holds up the round whenever it misses. A fixed k (asked for, or a seeded
        request's) stays fixed: what it drafts must not depend on timing."""
        k = self.choose_k(costs, True)
        return costs.ahead_k(k, block_len) if self.adaptive.enabled else k

    def commit(self, drafted: int, accepted: int, emitted: list[int], logprobs: list[dict[int, Any]] | None,
               prompt_logprobs: list[dict[int, Any]] | None = None) -> tuple[list[int], str]:
        """Commit one verdict (see `commit_verdict`) and learn from it; return (kept, text delta).

        A block of `drafted` > 0 tokens updates the acceptance estimate, and the drafter, which
        made the block from the tokens committed before it, now holds its accepted prefix too.
        """
        before = len(self.seq.all_ids)
        kept, text = commit_verdict(self.seq, self.metrics, drafted, accepted, emitted, logprobs, prompt_logprobs)
        if drafted:
            self.adaptive.observe(drafted, accepted)
            self.draft_valid = before + accepted
        return kept, text
