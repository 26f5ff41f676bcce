"""Draft service: proposes blocks for many sessions at once (draft model or n-gram).

Thin: protobuf in -> `Drafter.propose` (through the StepBatcher) -> protobuf out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

import grpc

from draft_service.config import DraftServiceConfig
from specsplit.proto.v1 import draft_pb2, draft_pb2_grpc
from specsplit.sampling.params import SamplingParams
from specsplit.serving.batcher import StepBatcher
from specsplit.serving.convert import params_from_pb, sparse_to_pb
from specsplit.serving.errors import grpc_errors, status_for
from specsplit.serving.kv import admit, preempting
from specsplit.serving.metrics import TierMetrics
from specsplit.serving.tier import TierHandle, start_tier
from specsplit.speculation.drafters import Drafter, DraftRequest, Proposal
from specsplit.speculation.target import SessionError

log = logging.getLogger(__name__)
SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name
MAX_K = 33  # a block of 32 plus the pipelined guess of the bonus token


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, drafter: Drafter, batcher: StepBatcher[DraftRequest, Proposal], metrics: TierMetrics,
                 max_model_len: int) -> None:
        self.drafter = drafter
        self.batcher = batcher
        self.metrics = metrics
        self.max_model_len = max_model_len
        self._ids = itertools.count(1)
        self.handle: TierHandle | None = None

    def on_internal_error(self, exc: BaseException) -> None:
        if self.handle is not None and self.batcher.failed is not None:
            asyncio.ensure_future(self.handle.grpc.set_serving(False))

    @grpc_errors
    async def Session(
        self, request_iterator: AsyncIterator[draft_pb2.DraftClientMessage], context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[draft_pb2.DraftServerMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        seq_id = next(self._ids)
        try:
            if first.WhichOneof("kind") != "open":
                raise SessionError("the first message of a draft session must be 'open'")
            params = params_from_pb(first.open.params)
            ids = list(first.open.token_ids)
            if len(ids) >= self.max_model_len:
                raise SessionError(f"prompt of {len(ids)} tokens does not fit the draft's max_model_len {self.max_model_len}")
            # inside the try: a client that cancels while the open (prefill) runs must still free it
            prompt_len = first.open.prompt_len if first.open.HasField("prompt_len") else None
            await self.batcher.call(self._open, seq_id, ids, params, prompt_len)
            async for msg in request_iterator:
                if msg.WhichOneof("kind") != "propose":
                    raise SessionError("after 'open', a draft session only takes 'propose' messages")
                p = msg.propose
                if p.k > MAX_K:
                    raise SessionError(f"k={p.k} exceeds the limit of {MAX_K}")
                new_len = p.prefix_len + len(p.new_tokens)
                k = min(p.k, max(0, self.max_model_len - new_len - 1))  # never past the draft's context
                req = DraftRequest(seq_id, p.prefix_len, list(p.new_tokens), k)
                prop, queue_ns = await self.batcher.submit(req)
                yield draft_pb2.DraftServerMessage(proposal=draft_pb2.DraftProposal(
                    round_id=p.round_id, token_ids=prop.token_ids, q=sparse_to_pb(prop.q_ids, prop.q_probs),
                    draft_ns=prop.draft_ns, queue_ns=queue_ns,
                ))
        except Exception as exc:
            self.metrics.errors.labels(status_for(exc)[0].name).inc()
            raise
        finally:
            asyncio.ensure_future(self._close(seq_id))

    def _open(self, seq_id: int, token_ids: list[int], params: SamplingParams, prompt_len: int | None) -> None:
        self.drafter.open(seq_id, token_ids, params, prompt_len)  # validates first: bad input stays INVALID_ARGUMENT
        runner = getattr(self.drafter, "runner", None)  # n-gram lookup keeps no KV cache
        try:
            admit(runner.cache if runner is not None else None, len(token_ids))
        except Exception:
            self.drafter.close(seq_id)
            raise
        self.metrics.sessions_opened.inc()

    async def _close(self, seq_id: int) -> None:
        await self.batcher.call(self._close_now, seq_id)

    def _close_now(self, seq_id: int) -> None:
        if seq_id in self.drafter.sessions:  # not when the open failed or never ran
            self.drafter.close(seq_id)
            self.metrics.sessions_closed.inc()


def _step(drafter: Drafter, metrics: TierMetrics):  # noqa: ANN202 - closure factory
    def run(items: list[DraftRequest]) -> list[Proposal]:
        with metrics.step_seconds.time():
            out = drafter.propose(items)
        metrics.steps.inc()
        metrics.batch_size.observe(len(items))
        return out
    return preempting(run, lambda r: r.seq_id)  # KV full: the newest sessions give way


async def start_draft(cfg: DraftServiceConfig, drafter: Drafter | None = None) -> TierHandle:
    """Load the drafter (unless given), start serving, warm up, report SERVING."""
    if drafter is None:
        drafter = await asyncio.to_thread(_load, cfg)
    runner = getattr(drafter, "runner", None)
    max_len = runner.max_model_len if runner is not None else (cfg.max_model_len or 1 << 20)
    metrics = TierMetrics("draft")
    batcher: StepBatcher[DraftRequest, Proposal] = StepBatcher(_step(drafter, metrics), max_batch=cfg.max_batch, name="draft")
    servicer = DraftServicer(drafter, batcher, metrics, max_len)
    metrics.bind(lambda: batcher.queue_depth, lambda: runner.cache.usage if runner is not None else 0.0,
                 lambda: len(drafter.sessions))

    async def warmup() -> None:
        def run() -> None:
            drafter.open(-1, [1] * 8, SamplingParams(temperature=0.0))
            try:
                drafter.propose([DraftRequest(-1, 8, [], 3)])
            finally:
                drafter.close(-1)
        await batcher.call(run)

    handle = await start_tier(
        name="draft", add_servicer=lambda s: draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, s),
        service_name=SERVICE_NAME, batcher=batcher, metrics=metrics, host=cfg.host, port=cfg.grpc_port,
        metrics_port=cfg.metrics_port, warmup=warmup, tls=cfg.tls, health_port=cfg.health_port,
    )
    servicer.handle = handle
    if runner is not None:
        handle.on_stop.append(runner.shutdown)
    return handle


def _load(cfg: DraftServiceConfig) -> Drafter:
    from transformers import AutoConfig

    from specsplit.factory import load_drafter, load_tokenizer, model_folder

    folder = model_folder(cfg.model)
    tok = load_tokenizer(folder)
    vocab = int(AutoConfig.from_pretrained(folder).vocab_size)
    return load_drafter(cfg.speculative, tok, vocab, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                        kv_cache_bytes=cfg.kv_cache_memory_bytes, gpu_memory_utilization=cfg.gpu_memory_utilization)
