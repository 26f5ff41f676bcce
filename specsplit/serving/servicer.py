"""The session servicer every tier shares: one bidirectional stream is one session.

A stream opens with an `open` message (prompt + sampling parameters), then each step
message (a draft's `propose`, a target's `verify`) is answered by one reply computed in a
batched step with every other session's request. What the skeleton does once for both
tiers: refuse a stream that does not start with `open`, number the sessions, admit a new
session only when the KV cache has room for it (rolling the open back otherwise), close it
when the stream ends or is cancelled, time and count the steps, preempt the newest sessions
when a step runs out of KV memory, warm up before reporting SERVING, and report NOT_SERVING
when the device breaks. A tier says only how its messages become domain requests and back.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import grpc

from specsplit import trace
from specsplit.runtime.kv_cache import PagedKVCache
from specsplit.sampling.params import SamplingParams
from specsplit.serving.batcher import StepBatcher
from specsplit.serving.config import TierConfig
from specsplit.serving.convert import token_choice_from_pb
from specsplit.serving.errors import grpc_errors, status_for
from specsplit.serving.kv import admit, preempting
from specsplit.serving.metrics import TierMetrics
from specsplit.serving.tier import TierHandle, start_tier
from specsplit.speculation.session import SessionError

Req = TypeVar("Req")
Res = TypeVar("Res")


class SessionEngine(Protocol):
    """What a tier serves: a drafter or a target verifier (both keep sessions by id)."""

    sessions: dict[int, Any]

    def open(self, seq_id: int, token_ids: list[int], params: SamplingParams,
             prompt_len: int | None = None, **options: Any) -> None: ...

    def close(self, seq_id: int) -> None: ...


class SessionServicer(ABC, Generic[Req, Res]):
    """Serves `Session` streams over `engine`, stepping all sessions' requests in batches."""

    tier: ClassVar[str]  # "draft" | "target": metric label, thread and log name
    step_kind: ClassVar[str]  # the oneof name of the messages that follow `open`
    add_to_server: ClassVar[Callable[[Any, grpc.aio.Server], None]]  # the generated add_*_to_server (a staticmethod)
    service_name: ClassVar[str]  # full name, for health and reflection
    # a lone session steps on the loop's thread, without the worker's two hand-offs (batcher.py)
    inline_alone: ClassVar[bool] = False

    def __init__(self, engine: SessionEngine, step: Callable[[list[Req]], list[Res]], *, max_batch: int,
                 cache: PagedKVCache | None, max_model_len: int, step_gather: float = 0.25) -> None:
        self.engine = engine
        self.step = step  # the engine's batched step, unwrapped
        self.cache = cache  # None: the engine keeps no KV cache (n-gram lookup)
        self.max_model_len = max_model_len
        self.metrics = TierMetrics(self.tier)
        self.batcher: StepBatcher[Req, Res] = StepBatcher(
            preempting(self._timed(step), lambda r: r.seq_id),  # KV full: the newest sessions give way
            max_batch=max_batch, name=self.tier, gather=step_gather, inline_alone=self.inline_alone)
        self.metrics.bind(lambda: self.batcher.queue_depth, lambda: cache.usage if cache is not None else 0.0,
                          lambda: len(engine.sessions))
        self._ids = itertools.count(1)
        self.handle: TierHandle | None = None

    # ---- what each tier says -----------------------------------------------------------------
    @abstractmethod
    def request(self, seq_id: int, msg: Any) -> Req:
        """A step message as the engine's request; SessionError / ValueError on bad input."""

    @abstractmethod
    def reply(self, msg: Any, result: Res, queue_ns: int, received_ns: int) -> Any:
        """The engine's result as the stream's server message (`received_ns`: perf_counter_ns
        when the request was read, for a tier that reports its whole handling time)."""

    def progress(self, msg: Any, result: Res) -> Any | None:
        """A progress message when `result` is unfinished work (a chunk of a long prompt), else None."""
        return None

    @abstractmethod
    def warmup_request(self, seq_id: int, prompt_len: int) -> Req:
        """A small request for a session of `prompt_len` tokens, run once before SERVING."""

    def check_open(self, token_ids: list[int], params: SamplingParams) -> None:  # noqa: B027 - optional hook
        """Refuse an open the engine itself would not catch (SessionError)."""

    def open_options(self, msg: Any) -> dict[str, Any]:
        """Extra keyword arguments of `engine.open` taken from the `open` message."""
        return {}

    # ---- the skeleton ------------------------------------------------------------------------
    def on_internal_error(self, exc: BaseException) -> None:
        if self.handle is not None and self.batcher.failed is not None:
            asyncio.ensure_future(self.handle.grpc.set_serving(False))

    @grpc_errors
    async def Session(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[Any]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        seq_id = next(self._ids)
        try:
            if first.WhichOneof("kind") != "open":
                raise SessionError(f"the first message of a {self.tier} session must be 'open'")
            params = token_choice_from_pb(first.open.params)
            ids = list(first.open.token_ids)
            self.check_open(ids, params)
            prompt_len = first.open.prompt_len if first.open.HasField("prompt_len") else None
            # inside the try: a client that cancels while the open (prefill) runs must still free it
            await self.batcher.call(functools.partial(self._open, **self.open_options(first.open)), seq_id, ids, params,
                                    prompt_len)
            async for msg in request_iterator:
                if msg.WhichOneof("kind") != self.step_kind:
                    raise SessionError(f"after 'open', a {self.tier} session only takes '{self.step_kind}' messages")
                received = time.perf_counter_ns()
                trace.mark(f"{self.tier}.received", seq_id)
                step = getattr(msg, self.step_kind)
                req = self.request(seq_id, step)
                trace.mark(f"{self.tier}.submit", seq_id)
                result, queue_ns = await self.batcher.submit(req, seq_id)
                trace.mark(f"{self.tier}.resumed", seq_id)
                while (note := self.progress(step, result)) is not None:  # slow, not hung: step again
                    yield note
                    result, queue_ns = await self.batcher.submit(req, seq_id)
                out = self.reply(step, result, queue_ns, received)
                trace.mark(f"{self.tier}.reply", seq_id)
                yield out
        except Exception as exc:
            self.metrics.errors.labels(status_for(exc)[0].name).inc()
            raise
        finally:
            # runs on close and on client cancel; scheduled so cancellation cannot skip it
            self.batcher.release(seq_id)
            asyncio.ensure_future(self.batcher.call(self._close, seq_id))

    def _open(self, seq_id: int, token_ids: list[int], params: SamplingParams, prompt_len: int | None = None,
              **options: Any) -> None:
        # validates first: bad input stays INVALID_ARGUMENT; prompt_len: penalties count only what follows
        self.engine.open(seq_id, token_ids, params, prompt_len, **options)
        try:
            admit(self.cache, len(token_ids))  # full: RESOURCE_EXHAUSTED, the gateway retries later
        except Exception:
            self.engine.close(seq_id)
            raise
        self.metrics.sessions_opened.inc()

    def _close(self, seq_id: int) -> None:
        if seq_id in self.engine.sessions:  # not when the open failed or never ran
            self.engine.close(seq_id)
            self.metrics.sessions_closed.inc()

    def _timed(self, step: Callable[[list[Req]], list[Res]]) -> Callable[[list[Req]], list[Res]]:
        def run(items: list[Req]) -> list[Res]:
            with self.metrics.step_seconds.time():
                out = step(items)
            self.metrics.steps.inc()
            self.metrics.batch_size.observe(len(items))
            return out
        return run

    async def warmup(self) -> None:
        """One open + step + close through the batcher: first-call costs are paid before SERVING."""
        def run() -> None:
            self.engine.open(-1, [1] * 8, SamplingParams(temperature=0.0, max_tokens=1))
            try:
                self.step([self.warmup_request(-1, 8)])
            finally:
                self.engine.close(-1)
        await self.batcher.call(run)

    async def start(self, cfg: TierConfig, on_stop: Callable[[], None] | None = None) -> TierHandle:
        """Serve, warm up, report SERVING; `on_stop` runs after the drain (e.g. stop TP workers),
        or at once when the start fails (a TP runner's workers would otherwise keep the process
        from exiting)."""
        try:
            handle = await start_tier(
                name=self.tier, add_servicer=lambda s: self.add_to_server(self, s),
                service_name=self.service_name, batcher=self.batcher, metrics=self.metrics, host=cfg.host,
                port=cfg.grpc_port, metrics_port=cfg.metrics_port, warmup=self.warmup, tls=cfg.tls,
                health_port=cfg.health_port,
            )
        except BaseException:
            if on_stop is not None:
                on_stop()
            raise
        self.handle = handle
        if on_stop is not None:
            handle.on_stop.append(on_stop)
        return handle
