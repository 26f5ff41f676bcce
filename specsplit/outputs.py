"""vLLM-shaped results of `LLM.generate` (and of the gRPC client)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class SpecMetrics:
    """Speculation statistics of one completion (or one request, summed).

    The one shape of these numbers: the in-process engine fills the counts, the gateway's
    loop also the timings and faults; the gateway's responses (gRPC `SpecStats`, the HTTP
    `speculation` object) and its Prometheus counters are made from it.
    """

    num_drafted_tokens: int = 0  # tokens proposed by the drafter
    num_accepted_tokens: int = 0  # of those, accepted by the target
    num_rounds: int = 0  # verify steps (each emits accepted + 1 tokens)
    num_emitted_tokens: int = 0  # tokens produced by those rounds
    num_pipelined_rounds: int = 0  # rounds whose block was drafted while the previous one was verified
    # rounds for which a block was drafted ahead (the draft answered a speculative propose); the
    # pipelined ones are those whose guess (a branch of the tree) matched the verdict: hits
    num_drafted_ahead_rounds: int = 0
    draft_ns: int = 0  # wall time waiting for the draft tier
    verify_ns: int = 0  # wall time waiting for the target tier
    overhead_ns: int = 0  # the rest of the loop's time
    num_failovers: int = 0  # sessions moved to another replica after a failure
    num_preemptions: int = 0  # sessions a tier refused or dropped for lack of KV memory
    draft_fallback: bool = False  # the draft tier was lost: finished with plain decoding

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_drafted_tokens if self.num_drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per round (accepted + the target's own): 1.0 means no speed-up."""
        return self.num_emitted_tokens / self.num_rounds if self.num_rounds else 0.0

    def add(self, other: SpecMetrics) -> None:
        for f in fields(self):
            if f.name == "draft_fallback":
                self.draft_fallback = self.draft_fallback or other.draft_fallback
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, Any]:
        """The `speculation` object of the gateway's OpenAI HTTP responses."""
        return {"drafted_tokens": self.num_drafted_tokens, "accepted_tokens": self.num_accepted_tokens,
                "rounds": self.num_rounds, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length, "pipelined_rounds": self.num_pipelined_rounds,
                "drafted_ahead_rounds": self.num_drafted_ahead_rounds,
                "draft_fallback": self.draft_fallback}


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per generated token
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    metrics: SpecMetrics = field(default_factory=SpecMetrics)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: SpecMetrics = field(default_factory=SpecMetrics)  # summed over outputs
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # [None, then one per prompt token], when asked
