"""Answers to completions and chat requests: one JSON object, or a stream of chunks (SSE).

Streams follow OpenAI's rules: every chunk carries exactly one choice, and the chunk with
`"choices": []` and the usage comes only when the request set
`stream_options.include_usage` (then every other chunk has `"usage": null`, or with vLLM's
`continuous_usage_stats` the choice's counts so far). Speculation
statistics ride along where no client looks for anything else: on the chunk that ends a
choice (that completion's) and on the usage chunk (the request's).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from aiohttp import web

from gateway.core import Finished, GatewayCore, Prompt
from gateway.openai_request import OpenAIRequest
from gateway.openai_response import (
    CompletionLogprobs,
    TokenText,
    chat_logprobs,
    merge_completion_logprobs,
    speculation,
    usage,
)
from specsplit.serving.completion_loop import Delta
from specsplit.serving.errors import Overloaded, Unavailable


def _head(core: GatewayCore, req: OpenAIRequest, chunk: bool) -> dict[str, Any]:
    kind = "chat.completion" if req.chat else "text_completion"
    return {"id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex,
            "object": kind + (".chunk" if chunk and req.chat else ""), "created": int(time.time()),
            "model": core.model_name}


def _prompt_text(core: GatewayCore, p: Prompt) -> str:
    return p.text if p.text is not None else core.tokenizer.decode(p.token_ids)


class _Choice:
    """What one completion has produced so far."""

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[dict[int, float] | None] | None = None

    def add(self, ev: Delta) -> None:
        self.text += ev.text
        self.token_ids += ev.token_ids
        self.logprobs += ev.logprobs or []
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs


async def respond_once(core: GatewayCore, req: OpenAIRequest, events: AsyncIterator[Delta | Finished]
                       ) -> dict[str, Any]:
    """The whole answer as one object, choices ordered by index."""
    choices: dict[int, _Choice] = {}
    finals: dict[int, Finished] = {}
    async for ev in events:
        if isinstance(ev, Delta):
            choices.setdefault(ev.index, _Choice()).add(ev)
        else:
            finals[ev.index] = ev
    text = TokenText(core.tokenizer)
    out = []
    for i in sorted(finals):
        f, c = finals[i], choices.get(i, _Choice())
        lps: dict[str, Any] | None = None
        if req.chat:
            if req.top_logprobs is not None:
                lps = chat_logprobs(text, c.token_ids, c.logprobs, req.top_logprobs)
            out.append({"index": i, "message": {"role": "assistant", "content": c.text},
                        "finish_reason": f.finish_reason, "logprobs": lps})
            continue
        prompt = req.prompts[f.prompt_index]
        body = (_prompt_text(core, prompt) if req.echo else "") + c.text
        if req.top_logprobs is not None:
            acc = CompletionLogprobs(text, req.top_logprobs)
            parts = [acc.part(prompt.token_ids, c.prompt_logprobs)] if req.echo else []
            lps = merge_completion_logprobs([*parts, acc.part(c.token_ids, c.logprobs)])
        out.append({"index": i, "text": body, "finish_reason": f.finish_reason, "logprobs": lps,
                    "stop_reason": f.stop_reason})
    return {**_head(core, req, chunk=False), "choices": out, "usage": usage(finals),
            "speculation": speculation(list(finals.values()))}


async def respond_streamed(request: web.Request, core: GatewayCore, req: OpenAIRequest,
                           events: AsyncIterator[Delta | Finished]) -> web.StreamResponse:
    # pull the first event before committing to 200, so admission errors stay proper 4xx
    it = cast(AsyncGenerator[Delta | Finished, None], events.__aiter__())
    try:
        first: Delta | Finished | None = await it.__anext__()
    except StopAsyncIteration:
        first = None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    head = _head(core, req, chunk=True)
    text = TokenText(core.tokenizer)
    finals: dict[int, Finished] = {}
    started: set[int] = set()
    accs: dict[int, CompletionLogprobs] = {}
    generated: dict[int, int] = {}  # completion tokens per choice so far (continuous usage)

    def chunk(index: int, piece: str, finish: str | None, lps: dict[str, Any] | None = None) -> dict[str, Any]:
        if req.chat:
            delta: dict[str, Any] = {"content": piece} if piece or finish is None else {}
            if index not in started:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lps}
        else:
            choice = {"index": index, "text": piece, "finish_reason": finish, "logprobs": lps}
        started.add(index)
        out = {**head, "choices": [choice]}
        if req.continuous_usage:  # vLLM's: this choice's counts so far
            prompt = len(req.prompts[index // req.params.n].token_ids)
            done = generated.get(index, 0)
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
        elif req.include_usage:
            out["usage"] = None
        return out

    def logprobs(ev: Delta) -> dict[str, Any] | None:
        if req.top_logprobs is None:
            return None
        if req.chat:
            return chat_logprobs(text, ev.token_ids, ev.logprobs, req.top_logprobs)
        acc = accs.setdefault(ev.index, CompletionLogprobs(text, req.top_logprobs))
        return acc.part(ev.token_ids, ev.logprobs)

    async def send(payload: dict[str, Any]) -> None:
        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    async def on_delta(ev: Delta) -> None:
        generated[ev.index] = generated.get(ev.index, 0) + len(ev.token_ids)
        if req.echo and ev.index not in started:  # the prompt first, as its own chunk
            prompt = req.prompts[ev.index // req.params.n]
            lps = None
            if req.top_logprobs is not None:
                acc = accs.setdefault(ev.index, CompletionLogprobs(text, req.top_logprobs))
                lps = acc.part(prompt.token_ids, ev.prompt_logprobs)
            await send(chunk(ev.index, _prompt_text(core, prompt), None, lps))
        if ev.text or ev.index not in started or (req.top_logprobs is not None and ev.token_ids):
            await send(chunk(ev.index, ev.text, None, logprobs(ev)))

    try:
        ev = first
        while ev is not None:
            if isinstance(ev, Delta):
                await on_delta(ev)
            else:
                finals[ev.index] = ev
                await send({**chunk(ev.index, "", ev.finish_reason), "speculation": speculation([ev])})
            try:
                ev = await it.__anext__()
            except StopAsyncIteration:
                ev = None
        if req.include_usage:
            await send({**head, "choices": [], "usage": usage(finals), "speculation": speculation(list(finals.values()))})
    except ConnectionResetError:  # the client hung up: stop generating (finally) and free its slot
        return resp
    except (ValueError, Overloaded, Unavailable) as e:
        await send({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
    finally:
        await it.aclose()  # cancels the completions and closes their tier sessions at once
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
