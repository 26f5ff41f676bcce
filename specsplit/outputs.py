"""vLLM-shaped results of `LLM.generate` (and of the gRPC client)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecMetrics:
    """Speculation statistics of one completion (or one request, summed)."""

    num_drafted_tokens: int = 0  # tokens proposed by the drafter
    num_accepted_tokens: int = 0  # of those, accepted by the target
    num_rounds: int = 0  # verify steps (each emits accepted + 1 tokens)
    num_emitted_tokens: int = 0  # tokens produced by those rounds

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_drafted_tokens if self.num_drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per round (accepted + the target's own): 1.0 means no speed-up."""
        return self.num_emitted_tokens / self.num_rounds if self.num_rounds else 0.0

    def add(self, other: SpecMetrics) -> None:
        self.num_drafted_tokens += other.num_drafted_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_rounds += other.num_rounds
        self.num_emitted_tokens += other.num_emitted_tokens


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
