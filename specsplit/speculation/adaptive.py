"""Choose the block length k per sequence from its acceptance and the measured costs.

With per-token acceptance α, a block of k yields E(k) = (1 - α^(k+1)) / (1 - α) tokens and
costs k draft steps plus one verify step of k+1 tokens; served, a draft call also costs a
fixed overhead whatever its k (the RPC both ways, the draft tier's code around its step). We
pick the k in 0..k_max with the most tokens per second, using running averages of the
measured times, so k shrinks where the draft is expensive or often wrong (k = 0 is plain
decoding) and grows where it is cheap and right. Served with drafting ahead, a round also waits
for the block drafted beside its verify when the draft tier is slower than the verify (at load):
that wait counts as a cost of drafting too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def expected_tokens(alpha: float, k: int) -> float:
    """E(k): tokens emitted by a round with block length k (accepted prefix + 1)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class Ema:
    """A running average that ignores a lone spike: a step that also captured a CUDA graph for a
    new shape costs tens of times a step, once; counted, it would make drafting look dear for
    many rounds (and with k = 0 rarely measured again). `spike` times the average or more counts
    only when it repeats `patience` times in a row: then it is the new cost, not a one-off."""

    value: float
    weight: float = 0.2
    spike: float = 4.0
    patience: int = 3
    _spikes: int = 0

    def update(self, x: float) -> None:
        if self.value > 0 and x > self.spike * self.value:
            self._spikes += 1
            if self._spikes < self.patience:
                return
        self._spikes = 0
        self.value += self.weight * (x - self.value)


def load_bucket(mean_active: float) -> int:
    """The load level a governor epoch counts for: log2 of the mean running completions,
    rounded, so a power of two sits in the middle of its level (6-11 -> 3, 12-22 -> 4, ...).
    Edges at the powers of two would split a steady 8 or 32 (it dips to 7.x between requests)
    into two levels, each measured and re-checked on its own."""
    return round(math.log2(max(mean_active, 1.0)))


@dataclass
class LoadGovernor:
    """Whether drafting pays at the current load, decided for all completions of one server.

    Adaptive k weighs one completion's acceptance against measured step costs. Served at load,
    that misses what drafting does to the others: a completion waiting for its draft misses the
    step they share, and verify steps grow with the blocks. So the governor measures what users
    get, tokens committed per second per running completion, in epochs with drafting allowed and
    epochs without, per load (running completions, `load_bucket`), keeps the better mode and
    tries the other one again after `explore_every` epochs; each re-check that confirms the choice
    doubles that wait, up to `explore_max` (a re-check of the worse mode costs throughput), and a
    re-check that reverses it brings it back. Below `min_sessions`, it stays out of the way.
    `fixed` (True, False) overrides it: drafting always allowed, or never.
    """

    epoch_s: float = 0.5
    explore_every: int = 4
    explore_max: int = 32
    min_sessions: int = 2
    fixed: bool | None = None
    clock: Callable[[], float] = time.monotonic
    drafting: bool = True  # this epoch's mode
    active: int = 0  # completions running now
    rates: dict[tuple[int, bool], float] = field(default_factory=dict)  # (load, drafting) -> tokens/s each
    epochs: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})  # measured epochs per mode
    _start: float = -1.0
    _last: float = 0.0
    _tokens: int = 0
    _session_s: float = 0.0  # completions x seconds in this epoch
    _since_explore: int = 0
    _wait: int = 0  # epochs between re-checks now (explore_every .. explore_max)
    _best: bool | None = None  # the mode kept, as of the last comparison

    def enter(self) -> None:
        self._advance()
        self.active += 1

    def leave(self) -> None:
        self._advance()
        self.active = max(0, self.active - 1)

    def record(self, tokens: int) -> None:
        """A round committed `tokens` tokens."""
        self._advance()
        self._tokens += tokens

    def allows_drafting(self) -> bool:
        self._advance()
        return self.allowed

    @property
    def allowed(self) -> bool:
        """The current decision, as it stands (metrics read it without moving the epoch on)."""
        if self.fixed is not None:
            return self.fixed
        return self.drafting or self.active < self.min_sessions

    def _advance(self) -> None:
        now = self.clock()
        if self._start < 0:
            self._start = self._last = now
            return
        self._session_s += self.active * (now - self._last)
        self._last = now
        if now - self._start >= self.epoch_s:
            self._close_epoch(now)

    def _close_epoch(self, now: float) -> None:
        mean_active = self._session_s / max(now - self._start, 1e-9)
        if self.fixed is None and mean_active >= self.min_sessions and self._session_s > 0:
            load = load_bucket(mean_active)
            key = (load, self.drafting)
            rate = self._tokens / self._session_s
            self.rates[key] = rate if key not in self.rates else 0.5 * (self.rates[key] + rate)
            self.epochs[self.drafting] += 1
            self.drafting = self._next_mode(load)
        self._start, self._tokens, self._session_s = now, 0, 0.0

    def _next_mode(self, load: int) -> bool:
        on, off = self.rates.get((load, True)), self.rates.get((load, False))
        if on is None or off is None:  # measure both first
            return on is None
        best = on >= off
        if best != self._best:  # the choice changed (or is new): re-check it soon
            self._best, self._wait, self._since_explore = best, self.explore_every, 0
        self._since_explore += 1
        if self._since_explore >= self._wait:
            self._since_explore = 0
            self._wait = min(2 * self._wait, self.explore_max)
            return not best
        return best


@dataclass
class CostModel:
    """Running step times shared by all sequences of one engine (seconds)."""

    draft_step: Ema = field(default_factory=lambda: Ema(0.0))  # one draft forward
    verify: dict[int, Ema] = field(default_factory=dict)  # verify time by tokens per sequence (k+1)
    seen_draft: bool = False
    draft_call: Ema = field(default_factory=lambda: Ema(0.0))  # a draft call's cost beyond its steps (served)
    # served, drafting ahead: how long a round waits, after its verify, for the block drafted beside
    # it. Small on an idle draft tier; at load (its passes batch every session's branches) it can
    # outlast the target's step, and the round then misses the step the other sessions share
    ahead_wait: Ema = field(default_factory=lambda: Ema(0.0))
    governor: LoadGovernor = field(default_factory=LoadGovernor)  # served: does drafting pay at this load

    def observe_draft(self, seconds_per_step: float) -> None:
        if not self.seen_draft:
            self.draft_step.value, self.seen_draft = seconds_per_step, True
        else:
            self.draft_step.update(seconds_per_step)

    def observe_draft_call(self, seconds: float, steps: int, new_tokens: int, k_max: int, *,
                           prompt_chunk: bool = False, step_seconds: float | None = None) -> None:
        """A draft call of `steps` forwards whose first one fed `new_tokens` tokens, `seconds` as
        the caller waited for it; `step_seconds`: the part the drafter itself spent drafting (a
        draft tier reports it), the rest being the call's fixed overhead. Without it the whole
        call counts as steps (in process there is no overhead to speak of).

        A call that first catches up on tokens the draft skipped (rounds with k = 0, a fresh
        prefill: more than k_max + 1 new tokens) is not a draft step's cost; counting it would
        make drafting look dear, keep k at 0 and never measure it again. Nor is a call that
        prefilled a chunk of a long prompt (`prompt_chunk`).
        """
        if steps <= 0 or new_tokens > k_max + 1 or prompt_chunk:
            return
        if step_seconds is None:
            self.observe_draft(seconds / steps)
            return
        overhead = max(0.0, seconds - step_seconds)
        if not self.seen_draft:
            self.draft_call.value = overhead
        else:
            self.draft_call.update(overhead)
        self.observe_draft(step_seconds / steps)

    def observe_ahead_wait(self, seconds: float) -> None:
        self.ahead_wait.update(seconds)

    def observe_verify(self, k: int, seconds: float, *, prompt_chunk: bool = False) -> None:
        """A verify step of k draft tokens per sequence; a step that prefilled a chunk of a long
        prompt (`prompt_chunk`) is a prefill's cost, not a verify's, and is not counted."""
        if prompt_chunk:
            return
        if k not in self.verify:
            self.verify[k] = Ema(seconds)
        else:
            self.verify[k].update(seconds)

    def verify_time(self, k: int) -> float | None:
        if k in self.verify:
            return self.verify[k].value
        known = sorted(self.verify)
        if not known:
            return None
        lo = [j for j in known if j < k]
        hi = [j for j in known if j > k]
        if lo and hi:  # between two measured block lengths: verify cost is close to linear in k
            a, b = lo[-1], hi[0]
            ta, tb = self.verify[a].value, self.verify[b].value
            return ta + (tb - ta) * (k - a) / (b - a)
        # beyond them: the nearest one (cost grows slowly with k while memory bound)
        return self.verify[(lo or hi)[-1 if lo else 0]].value

    def ahead_k(self, k: int, block_len: int) -> int:
        """The block to draft ahead while a block of `block_len` is verified: at most `k`, and
        short enough that its k + 1 steps (the bonus guess first) end within that verify, so a
        guess that misses does not hold up the round's fresh proposal behind it; 0 (no guess)
        when not even one token fits. `k` while the costs are unmeasured."""
        v = self.verify_time(block_len)
        if v is None or not self.seen_draft or self.draft_step.value <= 0:
            return k
        return max(0, min(k, int(v / self.draft_step.value) - 1))

    def round_time(self, k: int) -> float | None:
        v = self.verify_time(k)
        if v is None or (k > 0 and not self.seen_draft):
            return None
        return v + (self.draft_call.value + k * self.draft_step.value + self.ahead_wait.value if k > 0 else 0.0)


@dataclass
class Acceptance:
    """Per-token acceptance rate α from recent rounds, as the geometric model's estimate.

    A round that drafted d tokens and accepted a is a run of a accepted tokens, ended by one
    rejection if a < d. The maximum-likelihood α over many rounds is accepted tokens divided
    by (accepted tokens + rejections); both counts decay each round so the estimate follows
    changes. A per-round ratio a/d would be biased low and noisy: one early rejection in a
    block of 5 would read as α = 0 even when α is 0.9.
    """

    accepted: float
    rejected: float
    decay: float = 0.85  # per round: about the last 6-7 rounds count

    @classmethod
    def prior(cls, alpha: float, weight: float = 2.0) -> Acceptance:
        """Start at `alpha`, worth `weight` token trials of evidence."""
        return cls(alpha * weight, (1.0 - alpha) * weight)

    @property
    def value(self) -> float:
        total = self.accepted + self.rejected
        return self.accepted / total if total > 0 else 0.0

    def update(self, drafted: int, accepted: int) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if accepted < drafted else 0.0)


@dataclass
class AdaptiveK:
    """Per-sequence acceptance estimate and the k it implies."""

    k_max: int
    enabled: bool = True
    alpha: Acceptance = field(default_factory=lambda: Acceptance.prior(0.7))  # optimistic: start speculating
    zero_rounds: int = 0  # rounds without drafting since the last probe
    # a probe (k = 1 after probe_every rounds without drafting) checks whether acceptance has
    # changed; each rejected probe doubles the wait, up to 256 rounds, since every probe costs
    # a draft catch-up over the skipped tokens; an accepted one brings it back to 16
    probe_every: int = 16

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.alpha.update(drafted, accepted)
        if accepted > 0:
            self.probe_every = 16

    def choose(self, costs: CostModel, limit: int) -> int:
        k_cap = max(0, min(self.k_max, limit))
        if not self.enabled or k_cap == 0:
            return k_cap
        best_k, best_rate = k_cap, -1.0
        for k in range(0, k_cap + 1):
            t = costs.round_time(k)
            if t is None:
                return k_cap  # not measured yet: explore with the full block
            rate = expected_tokens(self.alpha.value, k) / max(t, 1e-9)
            if rate > best_rate * 1.02:  # prefer shorter blocks unless clearly better
                best_k, best_rate = k, rate
        if best_k == 0:
            self.zero_rounds += 1
            if self.zero_rounds >= self.probe_every:
                self.zero_rounds = 0
                self.probe_every = min(2 * self.probe_every, 256)  # observe() resets it if accepted
                return 1  # probe: acceptance may have changed since drafting stopped
        else:
            self.zero_rounds, self.probe_every = 0, 16
        return best_k
