"""Per-sequence ground truth: committed tokens, stop rules, incremental text.

Shared by the in-process engine and the gateway, so that "which tokens does the user get
and why did it stop" has one answer. A verify round emits `accepted + 1` tokens at once;
`Sequence.commit` walks them one by one so a stop string, stop token, EOS or max_tokens
that falls inside a drafted block ends the sequence exactly where the target alone would.

End tokens as vLLM handles them: the token that ended the sequence (an EOS or one of
`stop_token_ids`) stays in the token ids, its text stays out of `.text`, the finish reason is
"stop", and the stop reason is None for the model's EOS and the token id for any other
(a generation config's further EOS ids, stop_token_ids), so which token ended it is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specsplit.outputs import SpecMetrics
from specsplit.sampling.params import SamplingParams


class IncrementalDetokenizer:
    """Text deltas from token ids without re-decoding everything (TGI's offsets scheme).

    Decodes a short window and only emits text once it no longer ends in an incomplete
    UTF-8 sequence, so multi-token characters are never split.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:])  # a little left context for word boundaries
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""


def end_token_ids(model_eos: tuple[int, ...], tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends generation: the model config's EOS first (the one reported as stop
    reason None; for the catalogue models it is also the tokenizer's), then its generation
    config's, then the tokenizer's EOS if it differs."""
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return tuple(dict.fromkeys([*model_eos, *([int(tok_eos)] if tok_eos is not None else [])]))


@dataclass
class Sequence:
    """One completion being generated."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]  # every end token, the primary EOS first (end_token_ids)
    max_model_len: int
    detokenizer: IncrementalDetokenizer | None = None
    index: int = 0  # which of the request's n completions
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Any]] | None = None
    prompt_logprobs: list[dict[int, Any] | None] | None = None  # [None, then per prompt token], when asked
    cumulative_logprob: float = 0.0
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    _held: str = ""  # text withheld because it may be the start of a stop string

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def max_new_tokens(self) -> int:
        """Tokens this sequence may still emit (max_tokens and the context both bound it)."""
        cap = self.max_model_len - len(self.prompt_ids)
        if self.params.max_tokens is not None:
            cap = min(cap, self.params.max_tokens)
        return max(0, cap - len(self.output_ids))

    def commit(self, tokens: list[int], logprobs: list[dict[int, Any]] | None = None) -> tuple[list[int], str]:
        """Append a round's emitted tokens up to the first stop; return (tokens kept, text delta)."""
        kept: list[int] = []
        delta = ""
        stops = self.params.stop or []
        for i, tok in enumerate(tokens):
            if self.finished:
                break
            self.output_ids.append(tok)
            kept.append(tok)
            if logprobs is not None:
                self.logprobs = self.logprobs if self.logprobs is not None else []
                self.logprobs.append(logprobs[i])
                entry = logprobs[i].get(tok)
                if entry is not None:
                    self.cumulative_logprob += float(getattr(entry, "logprob", entry))
            is_eos = tok in self.eos_token_ids and not self.params.ignore_eos
            is_stop_id = tok in (self.params.stop_token_ids or ())
            piece = ""
            if self.detokenizer is not None and not is_eos and not is_stop_id:
                piece = self.detokenizer.push(tok)
            if piece and stops:
                piece = self._held + piece
                self._held = ""
                hit = _first_stop(self.text + piece, stops, len(self.text))
                if hit is not None:
                    pos, s = hit
                    delta += (self.text + piece)[len(self.text) : pos]
                    self.text = (self.text + piece)[:pos]
                    self.finish_reason, self.stop_reason = "stop", s
                    break
                keep_back = _partial_stop_len(self.text + piece, stops)
                if keep_back:
                    self._held = piece[len(piece) - keep_back :] if keep_back <= len(piece) else piece
                    piece = piece[: len(piece) - len(self._held)]
            self.text += piece
            delta += piece
            if is_eos:
                self.finish_reason = "stop"
                self.stop_reason = None if tok == self.eos_token_ids[0] else tok
            elif is_stop_id:
                self.finish_reason, self.stop_reason = "stop", tok
            elif self.max_new_tokens() == 0:
                self.finish_reason = "length"
        if self.finished and self._held and not isinstance(self.stop_reason, str):
            self.text += self._held
            delta += self._held
            self._held = ""
        return kept, delta


def _first_stop(text: str, stops: list[str], searched_upto: int) -> tuple[int, str] | None:
    """Earliest stop string in `text` that ends past `searched_upto`."""
    best: tuple[int, str] | None = None
    for s in stops:
        pos = text.find(s, max(0, searched_upto - len(s) + 1))
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
