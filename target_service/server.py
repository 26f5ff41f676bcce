"""Target service: verifies draft blocks for many sessions in one batched forward.

Thin: protobuf in -> `TargetVerifier.step` (through the StepBatcher) -> protobuf out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator

import grpc

from specsplit.proto.v1 import target_pb2, target_pb2_grpc
from specsplit.sampling.params import SamplingParams
from specsplit.serving.batcher import StepBatcher
from specsplit.serving.convert import logprobs_to_pb, params_from_pb, sparse_from_pb
from specsplit.serving.errors import grpc_errors, status_for
from specsplit.serving.kv import admit, preempting
from specsplit.serving.metrics import TierMetrics
from specsplit.serving.tier import TierHandle, start_tier
from specsplit.speculation.target import SessionError, TargetVerifier, VerifyItem, VerifyResult
from target_service.config import TargetServiceConfig

log = logging.getLogger(__name__)
SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name
MAX_BLOCK = 32  # longest draft block accepted in one verify


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, verifier: TargetVerifier, batcher: StepBatcher[VerifyItem, VerifyResult],
                 metrics: TierMetrics) -> None:
        self.verifier = verifier
        self.batcher = batcher
        self.metrics = metrics
        self._ids = itertools.count(1)
        self.handle: TierHandle | None = None

    def on_internal_error(self, exc: BaseException) -> None:
        if self.handle is not None and self.batcher.failed is not None:
            asyncio.ensure_future(self.handle.grpc.set_serving(False))

    @grpc_errors
    async def Session(
        self, request_iterator: AsyncIterator[target_pb2.TargetClientMessage], context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[target_pb2.TargetServerMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        seq_id = next(self._ids)
        try:
            if first.WhichOneof("kind") != "open":
                raise SessionError("the first message of a target session must be 'open'")
            params = params_from_pb(first.open.params)
            # inside the try: a client that cancels while the open runs must still free it
            prompt_len = first.open.prompt_len if first.open.HasField("prompt_len") else None
            await self.batcher.call(self._open, seq_id, list(first.open.token_ids), params, prompt_len)
            async for msg in request_iterator:
                if msg.WhichOneof("kind") != "verify":
                    raise SessionError("after 'open', a target session only takes 'verify' messages")
                v = msg.verify
                k = len(v.draft_ids)
                if k > MAX_BLOCK:
                    raise SessionError(f"draft block of {k} tokens exceeds the limit of {MAX_BLOCK}")
                q_ids, q_probs = sparse_from_pb(list(v.q), k, self.verifier.vocab_size)
                item = VerifyItem(seq_id, list(v.draft_ids), q_ids, q_probs)
                res, queue_ns = await self.batcher.submit(item)
                yield target_pb2.TargetServerMessage(result=target_pb2.VerifyResult(
                    round_id=v.round_id, num_accepted=res.num_accepted, next_token=res.emitted[-1],
                    logprobs=logprobs_to_pb(res.logprobs, res.emitted), verify_ns=res.verify_ns, queue_ns=queue_ns,
                    prompt_logprobs=logprobs_to_pb(res.prompt_logprobs, list(first.open.token_ids[1:])),
                ))
        except Exception as exc:
            self.metrics.errors.labels(status_for(exc)[0].name).inc()
            raise
        finally:
            # runs on close and on client cancel; scheduled so cancellation cannot skip it
            asyncio.ensure_future(self._close(seq_id))

    def _open(self, seq_id: int, token_ids: list[int], params: SamplingParams, prompt_len: int | None) -> None:
        self.verifier.open(seq_id, token_ids, params, prompt_len)  # validates first: bad input stays INVALID_ARGUMENT
        try:
            admit(self.verifier.runner.cache, len(token_ids))  # full: RESOURCE_EXHAUSTED, the gateway retries
        except Exception:
            self.verifier.close(seq_id)
            raise
        self.metrics.sessions_opened.inc()

    async def _close(self, seq_id: int) -> None:
        await self.batcher.call(self._close_now, seq_id)

    def _close_now(self, seq_id: int) -> None:
        if seq_id in self.verifier.sessions:  # not when the open failed or never ran
            self.verifier.close(seq_id)
            self.metrics.sessions_closed.inc()


def _step(verifier: TargetVerifier, metrics: TierMetrics):  # noqa: ANN202 - closure factory
    def run(items: list[VerifyItem]) -> list[VerifyResult]:
        with metrics.step_seconds.time():
            out = verifier.step(items)
        metrics.steps.inc()
        metrics.batch_size.observe(len(items))
        return out
    return preempting(run, lambda it: it.seq_id)  # KV full: the newest sessions give way


async def start_target(cfg: TargetServiceConfig, verifier: TargetVerifier | None = None) -> TierHandle:
    """Load the model (unless given), start serving, warm up, report SERVING."""
    holder: dict[str, TierHandle] = {}
    loop = asyncio.get_running_loop()

    def on_worker_death(rank: int, code: int) -> None:
        """A TP worker died: report NOT_SERVING, then exit non-zero so Kubernetes restarts the pod."""
        log.critical("tensor-parallel worker %d exited with code %d: NOT_SERVING, exiting", rank, code)
        if "h" in holder:
            asyncio.run_coroutine_threadsafe(holder["h"].grpc.set_serving(False), loop)
        time.sleep(1.0)
        os._exit(3)

    if verifier is None:
        from specsplit.factory import load_target

        verifier, _ = await asyncio.to_thread(
            load_target, cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
            kv_cache_bytes=cfg.kv_cache_memory_bytes, gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size, on_worker_death=on_worker_death,
            enforce_eager=cfg.enforce_eager,
        )
    metrics = TierMetrics("target")
    batcher: StepBatcher[VerifyItem, VerifyResult] = StepBatcher(_step(verifier, metrics), max_batch=cfg.max_batch, name="target")
    servicer = TargetServicer(verifier, batcher, metrics)
    metrics.bind(lambda: batcher.queue_depth, lambda: verifier.runner.cache.usage, lambda: len(verifier.sessions))

    async def warmup() -> None:
        def run() -> None:
            verifier.open(-1, [0] * 8, _greedy())
            try:
                verifier.step([VerifyItem(-1, [1, 2, 3])])
            finally:
                verifier.close(-1)
        await batcher.call(run)

    handle = await start_tier(
        name="target", add_servicer=lambda s: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, s),
        service_name=SERVICE_NAME, batcher=batcher, metrics=metrics, host=cfg.host, port=cfg.grpc_port,
        metrics_port=cfg.metrics_port, warmup=warmup, tls=cfg.tls, health_port=cfg.health_port,
    )
    servicer.handle = handle
    holder["h"] = handle
    handle.on_stop.append(verifier.runner.shutdown)
    return handle


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=1)
