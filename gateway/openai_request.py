"""OpenAI request bodies -> prompts + SamplingParams, with every field type-checked.

Each field the API defines is either honoured or refused with a 400 that names it; nothing a
client asks for is dropped. Fields that change nothing about the output (`user`,
`metadata`, `store`, `service_tier`) are accepted. Unknown fields are refused too, so a
typo does not pass silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.core import GatewayCore, Prompt
from specsplit.sampling.params import MAX_LOGPROBS, SamplingParams


class RequestError(ValueError):
    """A 400 about one field of the body: `param` names it in the OpenAI error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class OpenAIRequest:
    """What a completions or chat request asks for, validated."""

    chat: bool
    prompts: list[Prompt]  # one per prompt (chat: one)
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage and no choices
    continuous_usage: bool  # stream_options.continuous_usage_stats (vLLM's): usage on every chunk
    echo: bool  # completions: the prompt is repeated before the output (with logprobs if asked)
    top_logprobs: int | None  # None: no logprobs; else alternatives per token (0..20)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


# field -> (check, what it must be); null always means "the default"
Check = tuple[Callable[[Any], bool], str]
_BOOL: Check = (lambda v: isinstance(v, bool), "a boolean")
_INT: Check = (_is_int, "an integer")
_NUM: Check = (_is_num, "a number")
_STR: Check = (lambda v: isinstance(v, str), "a string")
_OBJ: Check = (lambda v: isinstance(v, dict), "an object")
_STOP: Check = (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings")

COMMON: dict[str, Check] = {
    "model": _STR, "stream": _BOOL, "stream_options": _OBJ, "max_tokens": _INT, "temperature": _NUM,
    "top_p": _NUM, "n": _INT, "stop": _STOP, "seed": _INT, "presence_penalty": _NUM, "frequency_penalty": _NUM,
    "logit_bias": _OBJ, "user": _STR, "metadata": _OBJ, "store": _BOOL, "service_tier": _STR,
    # vLLM's extensions
    "top_k": _INT, "min_p": _NUM, "repetition_penalty": _NUM, "ignore_eos": _BOOL,
    "stop_token_ids": (_is_int_list, "a list of integers"),
}
COMPLETIONS: dict[str, Check] = {
    **COMMON, "prompt": (lambda v: True, ""), "logprobs": _INT, "echo": _BOOL, "best_of": _INT, "suffix": _STR,
}
CHAT: dict[str, Check] = {
    **COMMON, "messages": (lambda v: isinstance(v, list), "a list of messages"), "logprobs": _BOOL,
    "top_logprobs": _INT, "max_completion_tokens": _INT, "response_format": _OBJ,
    "tools": (lambda v: isinstance(v, list), "a list"), "tool_choice": (lambda v: True, ""),
    "parallel_tool_calls": _BOOL, "modalities": (_is_str_list, "a list of strings"),
}
# OpenAI fields this server does not implement: a clear refusal instead of "unknown field"
UNSUPPORTED = {"functions", "function_call", "audio", "prediction", "reasoning_effort", "web_search_options",
               "verbosity"}
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "n", "seed", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "logit_bias", "ignore_eos", "stop_token_ids", "stop")


def check_fields(body: dict[str, Any], spec: dict[str, Check]) -> None:
    """Every field known and of the right type (a JSON null stands for the default)."""
    for name in sorted(body, key=str):
        if name in UNSUPPORTED:
            raise RequestError(f"'{name}' is not supported by this server", name)
        if name not in spec:
            raise RequestError(f"unknown field '{name}'", name)
        check, what = spec[name]
        v = body[name]
        if v is not None and not check(v):
            raise RequestError(f"'{name}' must be {what}, got {_short(v)}", name)


def _sampling(body: dict[str, Any], max_tokens: Any, default_max: int | None) -> dict[str, Any]:
    kw = {f: body[f] for f in _SAMPLING if body.get(f) is not None}
    kw["max_tokens"] = max_tokens if max_tokens is not None else default_max
    return kw


def _stream(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats)."""
    stream = bool(body.get("stream"))
    opts = body.get("stream_options")
    if opts is None:
        return stream, False, False
    if not stream:
        raise RequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    unknown = sorted(set(opts) - {"include_usage", "continuous_usage_stats"}, key=str)
    if unknown:
        raise RequestError(f"unknown field 'stream_options.{unknown[0]}'", "stream_options")
    flags = []
    for name in ("include_usage", "continuous_usage_stats"):
        v = opts.get(name)
        if v is not None and not isinstance(v, bool):
            raise RequestError(f"'stream_options.{name}' must be a boolean, got {_short(v)}", "stream_options")
        flags.append(bool(v))
    return stream, flags[0], flags[0] and flags[1]  # vLLM: continuous stats only with include_usage


def _no_output_fields(body: dict[str, Any]) -> None:
    """`metadata` is stored by OpenAI, never used for generation: only its shape is checked."""
    md = body.get("metadata")
    if md is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise RequestError("'metadata' must map strings to strings", "metadata")


def _params(kw: dict[str, Any]) -> SamplingParams:
    """SamplingParams validates ranges; its messages start with the field's name."""
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        name = str(e).split(" ", 1)[0].split("[", 1)[0]
        raise RequestError(str(e), name if name in kw else None) from None


def parse_completion(body: dict[str, Any], core: GatewayCore) -> OpenAIRequest:
    check_fields(body, COMPLETIONS)
    _no_output_fields(body)
    core.check_model(body.get("model"))
    stream, include_usage, continuous = _stream(body)
    if body.get("suffix"):
        raise RequestError("'suffix' (insertion) is not supported by this server", "suffix")
    n = body.get("n") or 1
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise RequestError(f"'best_of' must equal n ({n}): choosing the best of several completions is not "
                           "supported by this server", "best_of")
    echo = bool(body.get("echo"))
    kw = _sampling(body, body.get("max_tokens"), 16)
    top = body.get("logprobs")
    if top is not None:
        kw["logprobs"] = top
        if echo:
            kw["prompt_logprobs"] = top
    params = _params(kw)
    return OpenAIRequest(False, _prompts(body.get("prompt"), core), params, stream, include_usage, continuous, echo, top)


def _prompts(prompt: Any, core: GatewayCore) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [core.encode_text(prompt)]
    if isinstance(prompt, list) and prompt:
        if _is_int_list(prompt):
            return [core.encode_ids(prompt)]
        if _is_str_list(prompt):
            return [core.encode_text(p) for p in prompt]
        if all(isinstance(p, list) and p and _is_int_list(p) for p in prompt):
            return [core.encode_ids(p) for p in prompt]
    raise RequestError("'prompt' must be a non-empty string, a list of strings, a list of token ids, or a list "
                       "of lists of token ids", "prompt")


def parse_chat(body: dict[str, Any], core: GatewayCore) -> OpenAIRequest:
    check_fields(body, CHAT)
    _no_output_fields(body)
    core.check_model(body.get("model"))
    stream, include_usage, continuous = _stream(body)
    if body.get("tools"):
        raise RequestError("'tools' (function calling) is not supported by this server", "tools")
    if body.get("tool_choice") not in (None, "none"):
        raise RequestError("'tool_choice' other than \"none\" is not supported by this server", "tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(f"'response_format' {_short(fmt)} is not supported by this server (only "
                           '{"type": "text"})', "response_format")
    if body.get("modalities") not in (None, ["text"]):
        raise RequestError("'modalities' other than [\"text\"] is not supported by this server", "modalities")
    top = body.get("top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise RequestError(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kw = _sampling(body, max_tokens, None)  # chat: up to the context by default
    want = bool(body.get("logprobs"))
    if want:
        kw["logprobs"] = top or 0
    params = _params(kw)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a list of {role, content}", "messages")
    prompt = core.encode_chat([chat_message(m, i) for i, m in enumerate(messages)])
    return OpenAIRequest(True, [prompt], params, stream, include_usage, continuous, False, (top or 0) if want else None)


_ROLES = ("system", "user", "assistant", "tool", "developer")


def chat_message(m: Any, i: int) -> dict[str, str]:
    """One message as the chat template wants it: content parts joined into a string (as vLLM
    joins text parts, with newlines), `developer` as `system` (as OpenAI treats it)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise RequestError(f"{where} must be an object with a role and a content", "messages")
    extra = sorted(set(m) - {"role", "content", "name", "tool_call_id"}, key=str)
    if extra:
        raise RequestError(f"{where}: '{extra[0]}' is not supported by this server", "messages")
    role = m.get("role")
    if role not in _ROLES:
        raise RequestError(f"{where}: role must be one of {', '.join(_ROLES)}, got {_short(role)}", "messages")
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise RequestError(f"{where}.content[{j}]: only text parts are supported, got type "
                                   f"{_short(kind)}", "messages")
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise RequestError(f"{where}.content[{j}]: a text part is {{\"type\": \"text\", \"text\": "
                                   "<string>}", "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise RequestError(f"{where}: content must be a string or a list of text parts", "messages")
    out = {"role": "system" if role == "developer" else role, "content": content}
    for key in ("name", "tool_call_id"):
        if key in m:
            if not isinstance(m[key], str):
                raise RequestError(f"{where}: '{key}' must be a string", "messages")
            out[key] = m[key]
    return out
