"""`specsplit.Client`: the gateway's gRPC API with the same `generate()` shape as `LLM`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from specsplit.outputs import CompletionOutput, RequestOutput, SpecMetrics
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from specsplit.sampling.params import SamplingParams
from specsplit.serving.convert import params_to_pb, spec_stats_from_pb
from specsplit.serving.grpc_server import channel_options
from specsplit.serving.tls import ClientTLS, channel

_FINISH = {gateway_pb2.FINISH_REASON_STOP: "stop", gateway_pb2.FINISH_REASON_LENGTH: "length",
           gateway_pb2.FINISH_REASON_ABORT: "abort"}


@dataclass
class StreamEvent:
    """One message of a streamed generation."""

    index: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metrics: SpecMetrics = field(default_factory=SpecMetrics)  # on the last message: counts and timings

    def summary(self) -> str:
        m = self.metrics
        return (f"[{self.completion_tokens} tokens, finish={self.finish_reason}, acceptance "
                f"{m.acceptance_rate:.0%}, {m.mean_accepted_length:.2f} tokens/round over {m.num_rounds} rounds, "
                f"{m.num_pipelined_rounds} pipelined]")


def _event(msg: gateway_pb2.GenerateResponse) -> StreamEvent:
    ev = StreamEvent(msg.index, list(msg.token_ids), msg.text)
    if msg.HasField("usage"):
        ev.finished = True
        ev.finish_reason = _FINISH.get(msg.finish_reason)
        ev.stop_reason = msg.stop_reason or None
        ev.prompt_tokens, ev.completion_tokens = msg.usage.prompt_tokens, msg.usage.completion_tokens
        ev.metrics = spec_stats_from_pb(msg.stats)
    return ev


class Client:
    """Blocking client of a running gateway (`specsplit up` or a deployment)."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float = 600.0, *, api_key: str | None = None,
                 tls: ClientTLS | None = None) -> None:
        """`api_key` goes out as `authorization: Bearer <key>` metadata; `tls` secures the channel."""
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._channel = channel(address, tls, channel_options())
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def list_models(self) -> list[str]:
        return [m.id for m in self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=self.timeout,
                                                       metadata=self._metadata).models]

    def _request(self, prompt: str | dict[str, Any] | list[dict[str, str]], params: SamplingParams | None
                 ) -> gateway_pb2.GenerateRequest:
        req = gateway_pb2.GenerateRequest(params=params_to_pb(params or SamplingParams()))
        if isinstance(prompt, str):
            req.text = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            req.token_ids.ids.extend(prompt["prompt_token_ids"])
        elif isinstance(prompt, dict) and "prompt" in prompt:
            req.text = prompt["prompt"]
        elif isinstance(prompt, list):
            req.chat.messages.extend(gateway_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
        else:
            raise ValueError("a prompt must be a string, {'prompt_token_ids': [...]} or a list of chat messages")
        return req

    def stream(self, prompt: str | dict[str, Any], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield events as tokens are verified; the last one per completion has `finished`."""
        call = self._stub.Generate(self._request(prompt, params), timeout=self.timeout, metadata=self._metadata)
        try:
            for msg in call:
                yield _event(msg)
        finally:
            call.cancel()  # a client that stops reading frees the sessions at once

    def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        yield from self.stream(messages, params)  # type: ignore[arg-type]

    def generate(self, prompts: str | dict[str, Any] | Sequence[str | dict[str, Any]],
                 sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Same shape as `LLM.generate`; prompts run one after another over the same channel."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return [self._collect(p, sampling_params) for p in prompts]

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        return [self._collect(messages, sampling_params)]

    def _collect(self, prompt: Any, params: SamplingParams | None) -> RequestOutput:
        outs: dict[int, CompletionOutput] = {}
        total = SpecMetrics()
        for ev in self.stream(prompt, params):
            o = outs.setdefault(ev.index, CompletionOutput(ev.index, "", []))
            o.text += ev.text
            o.token_ids.extend(ev.token_ids)
            if ev.finished:
                o.finish_reason, o.stop_reason, o.metrics = ev.finish_reason, ev.stop_reason, ev.metrics
                total.add(ev.metrics)
        text = prompt if isinstance(prompt, str) else None
        return RequestOutput("", text, [], [outs[i] for i in sorted(outs)], True, total)
