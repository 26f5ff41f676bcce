"""Per-request sampling parameters, field-compatible with vLLM's `SamplingParams`.

The gateway builds these from JSON and ships them to the services with `to_dict()`, so
validation happens once, here, and every error names the field and its allowed range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# Below this temperature a request is treated as greedy (vLLM's `_SAMPLING_EPS`).
GREEDY_EPS = 1e-5

MAX_N = 16
MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 256  # each is checked on every generated token
MAX_PENALTY = 2.0  # presence / frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100] (OpenAI's range)
MAX_LOGIT_BIAS_ENTRIES = 1024  # one dense row per request would cost V floats on every step


@dataclass
class SamplingParams:
    """How to pick each output token of one request; defaults are vLLM's."""

    n: int = 1  # completions per prompt; each is an independent sequence
    temperature: float = 1.0  # logits are divided by this; < 1e-5 means greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability sums to >= top_p
    top_k: int = -1  # keep the k most likely tokens; -1 or 0 turns it off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    seed: int | None = None  # per-request RNG so a sampled request can be replayed
    max_tokens: int | None = 16  # output budget; None runs up to the model's context
    stop: str | list[str] | None = None  # strings that end the output; becomes list[str]
    stop_token_ids: list[int] | None = None  # token ids that end the output; becomes list
    ignore_eos: bool = False  # keep going past EOS (benchmarks want fixed lengths)
    logprobs: int | None = None  # how many top logprobs to return per token, 0..20
    repetition_penalty: float = 1.0  # HF rule on tokens already seen; 1 turns it off
    presence_penalty: float = 0.0  # subtracted once from every token already generated; 0 off
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens; 0 off
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's rule)
    prompt_logprobs: int | None = None  # top logprobs per prompt token (echo), 0..20; None: none

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, MAX_N)
        self.temperature = _check_float("temperature", self.temperature)
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}"
            )
        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, None, None)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**63 - 1)  # int64 on the wire
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None)
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_stop_token_ids(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
            setattr(self, name, value)
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax at every step (vLLM's threshold)."""
        return self.temperature < GREEDY_EPS

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field, for the wire; inverse of `from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build from a JSON object; unknown keys are an error so typos do not pass silently."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling params must be an object, got {type(d).__name__}")
        unknown = unknown_fields(cls, d)
        if unknown:
            raise ValueError(f"unknown sampling params: {', '.join(unknown)}")
        return cls(**d)


def unknown_fields(cls: type, d: dict[str, Any]) -> list[str]:
    """The keys of `d` that name no field of the dataclass `cls`, sorted: refused, never dropped."""
    known = {f.name for f in fields(cls)}
    return sorted(str(k) for k in set(d) - known)


def _check_int(name: str, value: Any, lo: int | None, hi: int | None) -> None:
    # bool is an int subclass, but `"n": true` in JSON is a client bug, not n=1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be in [{lo_s}, {hi_s}], got {value}")


def _check_float(name: str, value: Any) -> float:
    # JSON has one number type, so integers are accepted and converted.
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _normalise_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop must contain only strings, got {s!r}")
        if not 1 <= len(s) <= MAX_STOP_LENGTH:
            raise ValueError(
                f"each stop string must have 1 to {MAX_STOP_LENGTH} characters, got {len(s)}"
            )
    return list(stop)


def _normalise_logit_bias(bias: Any) -> dict[int, float] | None:
    """{id: bias} with int ids; JSON object keys are strings, so digit strings are accepted."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be an object mapping token ids to numbers, got {bias!r}")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias must have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        tok = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        v = _check_float(f"logit_bias[{key}]", value)
        if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias[{key}] must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {v}")
        out[tok] = v
    return out or None


def _normalise_stop_token_ids(ids: Any) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of integers, got {ids!r}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"stop_token_ids must contain integers >= 0, got {i!r}")
    return list(ids)
