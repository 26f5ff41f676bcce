"""OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) + /metrics.

Errors follow OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a 4xx
status for bad input, 401 without a valid API key (when the gateway has keys; /health and
/metrics stay open), 404 for an unknown model, 429 when the gateway or the key's limits are
full (with Retry-After), 503 when a tier is unavailable.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ApiKey, ApiKeys
from gateway.core import Finished, GatewayCore, Prompt
from specsplit.outputs import SpecMetrics
from specsplit.sampling.params import SamplingParams
from specsplit.serving.completion_loop import Delta
from specsplit.serving.errors import Overloaded, Unauthenticated, Unavailable, retry_after

log = logging.getLogger(__name__)

# OpenAI request fields we map onto SamplingParams (others that clients send are ignored
# only if harmless; unknown sampling fields are rejected so nothing is silently dropped)
_IGNORED = {"user", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "suffix",
            "echo", "best_of", "response_format", "tools", "tool_choice", "parallel_tool_calls",
            "service_tier", "store", "metadata", "top_logprobs", "modalities"}


OPEN_PATHS = frozenset({"/health", "/metrics"})  # reachable without an API key
# where the auth middleware leaves the caller's key (typed keys from aiohttp 3.12; a string before)
API_KEY: Any = web.RequestKey("api_key", ApiKey) if hasattr(web, "RequestKey") else "api_key"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _error_response(e: ApiError) -> web.Response:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}
    return web.json_response(body, status=e.status, headers=e.headers)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return _error_response(e)
    except web.HTTPException:
        raise
    except Unauthenticated as e:
        return _error_response(ApiError(401, str(e), "authentication_error", headers={"WWW-Authenticate": "Bearer"}))
    except Overloaded as e:
        return _error_response(ApiError(429, str(e), "rate_limit_exceeded",
                                        headers={"Retry-After": str(retry_after(e) or 1)}))
    except Unavailable as e:
        return _error_response(ApiError(503, str(e), "service_unavailable"))
    except LookupError as e:
        return _error_response(ApiError(404, str(e.args[0] if e.args else e), "model_not_found", "model"))
    except (ValueError, TypeError) as e:
        return _error_response(ApiError(400, str(e)))
    except Exception as e:  # noqa: BLE001 - never a crash, always a JSON error
        log.exception("internal error")
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}", "internal_error"))


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:  # e.g. 100k nested brackets (found by tests/fuzz)
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def sampling_from_openai(body: dict[str, Any], chat: bool) -> SamplingParams:
    """Map OpenAI fields to SamplingParams; OpenAI's defaults (temperature 1, max_tokens 16 for completions)."""
    known = {"model", "prompt", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p",
             "top_k", "min_p", "n", "stop", "seed", "logprobs", "repetition_penalty", "ignore_eos",
             "stop_token_ids"} | _IGNORED
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unknown field(s): {unknown}", param=unknown[0])
    kw: dict[str, Any] = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"),
                     ("n", "n"), ("seed", "seed"), ("repetition_penalty", "repetition_penalty"),
                     ("ignore_eos", "ignore_eos"), ("stop_token_ids", "stop_token_ids")):
        if body.get(src) is not None:
            kw[dst] = body[src]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    elif chat:
        kw["max_tokens"] = None  # chat: up to the context
    if body.get("stop") is not None:
        kw["stop"] = body["stop"]
    lp = body.get("logprobs")
    if chat:
        if lp:
            kw["logprobs"] = int(body.get("top_logprobs") or 0)
    elif lp is not None:
        kw["logprobs"] = lp
    for f in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if isinstance(kw.get(f), int) and not isinstance(kw.get(f), bool):
            kw[f] = float(kw[f])
    return SamplingParams(**kw)


class OpenAIApi:
    def __init__(self, core: GatewayCore, keys: ApiKeys | None = None) -> None:
        self.core = core
        self.keys = keys  # None: no API key needed

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every route needs a key when keys are configured, except /health and /metrics (probes,
        Prometheus): deny by default, so a route added later is not open by mistake."""
        if self.keys is not None and request.path not in OPEN_PATHS:
            request[API_KEY] = self.keys.authenticate(request.headers.get("Authorization"))
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors, self.authenticate], client_max_size=8 * 2**20)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        for tier, pool in (("target", self.core.targets), ("draft", self.core.drafts)):
            if pool is not None:
                for addr in pool.addresses:
                    self.core.metrics.replica_sessions.labels(tier, addr).set(pool.load.get(addr, 0))
        return web.Response(body=generate_latest(self.core.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.core.model_name, "object": "model", "created": 0, "owned_by": "specsplit",
            "max_model_len": self.core.max_model_len, "speculative": self.core.speculative_label}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        self.core.check_model(body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            p = self.core.encode_text(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            p = self.core.encode_ids(prompt)
        else:
            raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                           param="prompt")
        params = sampling_from_openai(body, chat=False)
        return await self._respond(request, body, p, params, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        self.core.check_model(body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ApiError(400, "messages must be a list of {role, content}", param="messages")
        p = self.core.encode_chat(messages)
        params = sampling_from_openai(body, chat=True)
        return await self._respond(request, body, p, params, chat=True)

    async def _respond(self, request: web.Request, body: dict[str, Any], prompt: Prompt, params: SamplingParams,
                       chat: bool) -> web.StreamResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        events = self.core.generate(prompt, params)
        key = request.get(API_KEY)
        if key is not None:
            events = self.keys.metered(key, len(prompt.token_ids), events)  # type: ignore[union-attr]
        if body.get("stream"):
            return await self._stream(request, events, rid, created, obj + (".chunk" if chat else ""), chat)
        texts: dict[int, str] = {}
        finals: dict[int, Finished] = {}
        async for ev in events:
            if isinstance(ev, Delta):
                texts[ev.index] = texts.get(ev.index, "") + ev.text
            else:
                finals[ev.index] = ev
        choices = []
        for i in sorted(finals):
            f = finals[i]
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts.get(i, "")},
                                "finish_reason": f.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": texts.get(i, ""), "finish_reason": f.finish_reason,
                                "logprobs": None, "stop_reason": f.stop_reason})
        return web.json_response({
            "id": rid, "object": obj, "created": created, "model": self.core.model_name, "choices": choices,
            "usage": _usage(finals), "speculation": _spec(finals)})

    async def _stream(self, request: web.Request, events: AsyncIterator[Delta | Finished], rid: str, created: int,
                      obj: str, chat: bool) -> web.StreamResponse:
        # pull the first event before committing to 200, so admission errors stay proper 4xx
        it = cast(AsyncGenerator[Delta | Finished, None], events.__aiter__())
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        finals: dict[int, Finished] = {}
        started: set[int] = set()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"content": text} if text or finish is None else {}
                if index not in started:
                    delta["role"] = "assistant"
                    started.add(index)
                choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": self.core.model_name, "choices": [choice]}

        async def send(payload: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        try:
            ev = first
            while ev is not None:
                if isinstance(ev, Delta):
                    if ev.text or ev.index not in started:
                        await send(chunk(ev.index, ev.text, None))
                else:
                    finals[ev.index] = ev
                    await send(chunk(ev.index, "", ev.finish_reason))
                try:
                    ev = await it.__anext__()
                except StopAsyncIteration:
                    ev = None
            final = {"id": rid, "object": obj, "created": created, "model": self.core.model_name, "choices": [],
                     "usage": _usage(finals), "speculation": _spec(finals)}
            await send(final)
        except ConnectionResetError:  # the client hung up: stop generating (finally) and free its slot
            return resp
        except (ValueError, Overloaded, Unavailable) as e:
            await send({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
        finally:
            await it.aclose()  # cancels the completions and closes their tier sessions at once
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _usage(finals: dict[int, Finished]) -> dict[str, int]:
    prompt = next(iter(finals.values())).prompt_tokens if finals else 0
    completion = sum(f.completion_tokens for f in finals.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _spec(finals: dict[int, Finished]) -> dict[str, Any]:
    total = SpecMetrics()
    for f in finals.values():
        total.add(f.stats)
    return total.to_dict()
