"""OpenAI response pieces: logprobs in the completions and chat shapes, usage, speculation.

Logprobs are the target's (processed, as vLLM's `processed_logprobs`); token strings are
each id decoded alone, as vLLM writes them. JSON has no infinity, so a token that the
sampling parameters cut off (logprob -inf) is written as -9999.0, as vLLM does.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.core import Finished
from specsplit.outputs import SpecMetrics

NEG_INF_LOGPROB = -9999.0


def _lp(v: float) -> float:
    return v if math.isfinite(v) else NEG_INF_LOGPROB


class TokenText:
    """Decodes single token ids (cached: the same ids recur in every response)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, tok: int) -> str:
        s = self._cache.get(tok)
        if s is None:
            s = self._cache[tok] = self.tokenizer.decode([tok])
        return s


def _ranked(d: dict[int, float], top: int) -> list[tuple[int, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])[:top]


class CompletionLogprobs:
    """The legacy completions shape: parallel lists, extended delta by delta.

    `text_offset` counts characters from the start of the choice's text (the echoed prompt
    included), each token's offset being the sum of the decoded lengths before it.
    """

    def __init__(self, text: TokenText, top: int, offset: int = 0) -> None:
        self.text, self.top, self.offset = text, top, offset

    def part(self, token_ids: list[int], lps: list[dict[int, float] | None] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for j, tok in enumerate(token_ids):
            d = lps[j] if lps is not None and j < len(lps) else None
            s = self.text(tok)
            out["tokens"].append(s)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
            if d is None:  # the first prompt token has no logprob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_lp(d[tok]))
            alts = {self.text(t): _lp(v) for t, v in _ranked(d, self.top)}
            alts.setdefault(s, _lp(d[tok]))  # vLLM: the sampled token is always listed
            out["top_logprobs"].append(alts)
        return out


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in out:
            out[k].extend(p[k])
    return out


def chat_logprobs(text: TokenText, token_ids: list[int], lps: list[dict[int, float]] | None,
                  top: int) -> dict[str, Any]:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for j, tok in enumerate(token_ids):
        d = lps[j] if lps is not None and j < len(lps) else {}
        s = text(tok)
        content.append({
            "token": s, "logprob": _lp(d.get(tok, -math.inf)), "bytes": list(s.encode()),
            "top_logprobs": [{"token": text(t), "logprob": _lp(v), "bytes": list(text(t).encode())}
                             for t, v in _ranked(d, top)],
        })
    return {"content": content}


def usage(finals: dict[int, Finished]) -> dict[str, int]:
    """Token counts of a request: every prompt once (however many completions it has)."""
    prompts: dict[int, int] = {}
    for f in finals.values():
        prompts[f.prompt_index] = f.prompt_tokens
    prompt = sum(prompts.values())
    completion = sum(f.completion_tokens for f in finals.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def speculation(finals: list[Finished]) -> dict[str, Any]:
    """Speculation statistics summed over the given completions (a specsplit extension)."""
    total = SpecMetrics()
    for f in finals:
        total.add(f.stats)
    return total.to_dict()
