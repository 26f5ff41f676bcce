"""The public gRPC API (specsplit.v1.Gateway): thin over GatewayCore."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from gateway.auth import ApiKey, ApiKeys, authorization_from_metadata
from gateway.core import Finished, GatewayCore, Prompt
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from specsplit.serving.completion_loop import Delta
from specsplit.serving.convert import logprobs_to_pb, params_from_pb, spec_stats_to_pb
from specsplit.serving.errors import grpc_errors

FINISH = {"stop": gateway_pb2.FINISH_REASON_STOP, "length": gateway_pb2.FINISH_REASON_LENGTH,
          "abort": gateway_pb2.FINISH_REASON_ABORT, None: gateway_pb2.FINISH_REASON_UNSPECIFIED}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore, keys: ApiKeys | None = None) -> None:
        self.core = core
        self.keys = keys  # None: no API key needed

    def _authenticate(self, context: grpc.aio.ServicerContext) -> ApiKey | None:
        """The caller's key from the `authorization` metadata (Unauthenticated when needed and absent)."""
        if self.keys is None:
            return None
        return self.keys.authenticate(authorization_from_metadata(context.invocation_metadata()))

    def _prompt(self, req: gateway_pb2.GenerateRequest) -> Prompt:
        try:
            self.core.check_model(req.model)
        except LookupError as e:
            raise _NotFound(str(e)) from None
        kind = req.WhichOneof("prompt")
        if kind == "text":
            return self.core.encode_text(req.text)
        if kind == "token_ids":
            return self.core.encode_ids(list(req.token_ids.ids))
        if kind == "chat":
            return self.core.encode_chat([{"role": m.role, "content": m.content} for m in req.chat.messages])
        raise ValueError("the request has no prompt (text, token_ids or chat)")

    async def _events(self, req: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        key = self._authenticate(context)  # before anything else: no validation hints without a key
        prompt = self._prompt(req)
        params = params_from_pb(req.params)
        _ = req.request_id or uuid.uuid4().hex
        events = self.core.generate(prompt, params)
        if key is not None:
            events = self.keys.metered(key, len(prompt.token_ids), events)  # type: ignore[union-attr]
        async for ev in events:
            if isinstance(ev, Delta):
                if ev.token_ids or ev.text or ev.prompt_logprobs:
                    yield gateway_pb2.GenerateResponse(
                        index=ev.index, token_ids=ev.token_ids, text=ev.text,
                        logprobs=logprobs_to_pb(ev.logprobs, ev.token_ids),
                        prompt_logprobs=logprobs_to_pb(ev.prompt_logprobs[1:], prompt.token_ids[1:])
                        if ev.prompt_logprobs else [])
            elif isinstance(ev, Finished):
                yield gateway_pb2.GenerateResponse(
                    index=ev.index, finish_reason=FINISH.get(ev.finish_reason, 0),
                    stop_reason="" if ev.stop_reason is None else str(ev.stop_reason),
                    usage=gateway_pb2.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens),
                    stats=spec_stats_to_pb(ev.stats))

    @grpc_errors
    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            async for msg in self._events(request, context):
                yield msg
        except _NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    @grpc_errors
    async def GenerateUnary(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                            ) -> gateway_pb2.GenerateResponse:
        """Everything of completion 0 in one message (use Generate for n > 1)."""
        out = gateway_pb2.GenerateResponse(index=0)
        try:
            async for msg in self._events(request, context):
                if msg.index != 0:
                    continue
                out.token_ids.extend(msg.token_ids)
                out.text += msg.text
                out.logprobs.extend(msg.logprobs)
                out.prompt_logprobs.extend(msg.prompt_logprobs)
                if msg.HasField("usage"):
                    out.finish_reason = msg.finish_reason
                    out.stop_reason = msg.stop_reason
                    out.usage.CopyFrom(msg.usage)
                    out.stats.CopyFrom(msg.stats)
        except _NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return out

    @grpc_errors
    async def ListModels(self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> gateway_pb2.ListModelsResponse:
        self._authenticate(context)
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelInfo(
            id=name, speculative=self.core.speculative_label, max_model_len=self.core.max_model_len)
            for name in self.core.model_names])


class _NotFound(Exception):
    pass
