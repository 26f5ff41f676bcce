"""Choose the block length k per sequence from its acceptance and the measured costs.

With per-token acceptance α, a block of k yields E(k) = (1 - α^(k+1)) / (1 - α) tokens and
costs k draft steps plus one verify step of k+1 tokens. We pick the k in 0..k_max with the
most tokens per second, using running averages of the measured step times, so k shrinks
where the draft is expensive or often wrong (k = 0 is plain decoding) and grows where it
is cheap and right.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def expected_tokens(alpha: float, k: int) -> float:
    """E(k): tokens emitted by a round with block length k (accepted prefix + 1)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class Ema:
    value: float
    weight: float = 0.2

    def update(self, x: float) -> None:
        self.value += self.weight * (x - self.value)


@dataclass
class CostModel:
    """Running step times shared by all sequences of one engine (seconds)."""

    draft_step: Ema = field(default_factory=lambda: Ema(0.0))  # one draft forward
    verify: dict[int, Ema] = field(default_factory=dict)  # verify time by tokens per sequence (k+1)
    seen_draft: bool = False

    def observe_draft(self, seconds_per_step: float) -> None:
        if not self.seen_draft:
            self.draft_step.value, self.seen_draft = seconds_per_step, True
        else:
            self.draft_step.update(seconds_per_step)

    def observe_verify(self, k: int, seconds: float) -> None:
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
        # nearest measured k: verify cost grows slowly with k while memory bound
        return self.verify[min(known, key=lambda j: abs(j - k))].value

    def round_time(self, k: int) -> float | None:
        v = self.verify_time(k)
        if v is None or (k > 0 and not self.seen_draft):
            return None
        return v + k * self.draft_step.value


@dataclass
class AdaptiveK:
    """Per-sequence acceptance estimate and the k it implies."""

    k_max: int
    enabled: bool = True
    alpha: Ema = field(default_factory=lambda: Ema(0.7, 0.3))  # optimistic prior: start speculating
    zero_rounds: int = 0  # rounds without drafting since the last probe
    # a probe (k = 1 after probe_every rounds without drafting) checks whether acceptance has
    # changed; each probe that changes nothing doubles the wait, up to 256 rounds, since every
    # probe costs a draft catch-up over the skipped tokens
    probe_every: int = 16

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        # per-token acceptance from a truncated-geometric observation: accepted of drafted
        rate = accepted / drafted if accepted < drafted else (accepted + 1) / (drafted + 1)
        self.alpha.update(rate)

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
                self.probe_every = min(2 * self.probe_every, 256)
                return 1  # probe: acceptance may have changed since drafting stopped
        else:
            self.zero_rounds, self.probe_every = 0, 16
        return best_k
