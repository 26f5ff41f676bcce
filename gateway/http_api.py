"""OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) + /metrics.

Errors follow OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a 4xx
status for bad input, 401 without a valid API key (when the gateway has keys; /health and
/metrics stay open), 404 for an unknown model, 429 when the gateway or the key's limits are
full (with Retry-After), 503 when a tier is unavailable.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ApiKey, ApiKeys
from gateway.core import GatewayCore
from gateway.openai_request import OpenAIRequest, RequestError, parse_chat, parse_completion
from gateway.openai_stream import respond_once, respond_streamed
from specsplit.serving.errors import Overloaded, Unauthenticated, Unavailable, retry_after

log = logging.getLogger(__name__)

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


def _http_error(request: web.Request, e: web.HTTPException) -> web.Response:
    """aiohttp's own 4xx (no such route, wrong method, body too large) in OpenAI's shape."""
    if e.status == 404:
        message = f"no route {request.method} {request.path}"
    elif e.status == 405:
        allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
        message = f"method {request.method} is not allowed on {request.path}" + (f"; use {allowed}" if allowed else "")
    else:
        message = e.text or e.reason
    headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
    type_ = "not_found_error" if e.status == 404 else "invalid_request_error"
    return _error_response(ApiError(e.status, message, type_, headers=headers or None))


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return _error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _http_error(request, e)
    except Unauthenticated as e:
        return _error_response(ApiError(401, str(e), "authentication_error", headers={"WWW-Authenticate": "Bearer"}))
    except Overloaded as e:
        return _error_response(ApiError(429, str(e), "rate_limit_exceeded",
                                        headers={"Retry-After": str(retry_after(e) or 1)}))
    except Unavailable as e:
        return _error_response(ApiError(503, str(e), "service_unavailable"))
    except LookupError as e:
        return _error_response(ApiError(404, str(e.args[0] if e.args else e), "model_not_found", "model"))
    except RequestError as e:
        return _error_response(ApiError(400, str(e), param=e.param))
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
            "id": name, "object": "model", "created": 0, "owned_by": "specsplit",
            "max_model_len": self.core.max_model_len, "speculative": self.core.speculative_label}
            for name in self.core.model_names]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._respond(request, parse_completion(await _json(request), self.core))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._respond(request, parse_chat(await _json(request), self.core))

    async def _respond(self, request: web.Request, req: OpenAIRequest) -> web.StreamResponse:
        events = self.core.generate(req.prompts, req.params)
        key = request.get(API_KEY)
        if key is not None:
            events = self.keys.metered(key, sum(len(p.token_ids) for p in req.prompts), events)  # type: ignore[union-attr]
        if req.stream:
            return await respond_streamed(request, self.core, req, events)
        return web.json_response(await respond_once(self.core, req, events))
