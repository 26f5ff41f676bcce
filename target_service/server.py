"""Target service: verifies draft blocks for many sessions in one batched forward.

Thin: protobuf in -> `TargetVerifier.step` (through the shared session servicer) -> protobuf out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from specsplit.proto.v1 import target_pb2, target_pb2_grpc
from specsplit.serving.convert import logprobs_to_pb, sparse_from_pb, token_choice_from_pb
from specsplit.serving.errors import grpc_errors, status_for
from specsplit.serving.metrics import governor_gauge
from specsplit.serving.servicer import SessionServicer
from specsplit.serving.tier import TierHandle
from specsplit.speculation.adaptive import CostModel
from specsplit.speculation.eagle.wire import max_rows, pack_states
from specsplit.speculation.session import MAX_BLOCK, SessionError
from specsplit.speculation.target import TargetVerifier, VerifyItem, VerifyResult
from target_service.config import TargetServiceConfig
from target_service.generate import DraftPools, LocalTarget, run_generate, start_to_sequence

log = logging.getLogger(__name__)


class TargetServicer(SessionServicer[VerifyItem, VerifyResult], target_pb2_grpc.TargetServiceServicer):
    tier = "target"
    step_kind = "verify"
    add_to_server = staticmethod(target_pb2_grpc.add_TargetServiceServicer_to_server)
    service_name = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name

    def __init__(self, *args: Any, drafts: DraftPools, round_timeout_s: float, costs: CostModel | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.drafts = drafts  # direct rounds: the draft replicas this tier dials
        # step costs measured here steer adaptive k of direct rounds (and its load governor)
        self.costs = costs if costs is not None else CostModel()
        self.round_timeout_s = round_timeout_s  # a slower draft round counts as a failed draft replica

    def open_options(self, msg: target_pb2.TargetOpen) -> dict[str, Any]:
        # an EAGLE draft reads these layers' states: every result of the session carries them
        return {"hidden_layers": tuple(msg.hidden_layers)} if msg.hidden_layers else {}

    def request(self, seq_id: int, msg: target_pb2.TargetVerify) -> VerifyItem:
        k = len(msg.draft_ids)
        if k > MAX_BLOCK:
            raise SessionError(f"draft block of {k} tokens exceeds the limit of {MAX_BLOCK}")
        q_ids, q_probs = sparse_from_pb(list(msg.q), k, self.engine.vocab_size)  # type: ignore[attr-defined]
        return VerifyItem(seq_id, list(msg.draft_ids), q_ids, q_probs, stop_states=msg.stop_hidden_states)

    def reply(self, msg: target_pb2.TargetVerify, result: VerifyResult, queue_ns: int, received_ns: int
              ) -> target_pb2.TargetServerMessage:
        return target_pb2.TargetServerMessage(result=target_pb2.VerifyResult(
            round_id=msg.round_id, num_accepted=result.num_accepted, next_token=result.emitted[-1],
            logprobs=logprobs_to_pb(result.logprobs, result.emitted), verify_ns=result.verify_ns,
            queue_ns=queue_ns, prompt_logprobs=logprobs_to_pb(result.prompt_logprobs, result.prompt_ids or []),
            hidden_states=result.packed_states,
        ))

    def progress(self, msg: target_pb2.TargetVerify, result: VerifyResult) -> target_pb2.TargetServerMessage | None:
        if result.prefill is None:
            return None
        return target_pb2.TargetServerMessage(progress=target_pb2.PrefillProgress(
            round_id=msg.round_id, prefilled=result.prefill[0], total=result.prefill[1]))

    def warmup_request(self, seq_id: int, prompt_len: int) -> VerifyItem:
        return VerifyItem(seq_id, [1, 2, 3])

    @grpc_errors
    async def Generate(
        self, request_iterator: AsyncIterator[target_pb2.GenerateClientMessage], context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[target_pb2.GenerateServerMessage]:
        """The direct round (target_service/generate.py): this tier drives the completion."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        try:
            if first.WhichOneof("kind") != "start":
                raise SessionError("the first message of a Generate stream must be 'start'")
            verifier: TargetVerifier = self.engine  # type: ignore[assignment]
            seq = start_to_sequence(first.start, token_choice_from_pb(first.start.params), self.max_model_len)
            link = LocalTarget(verifier, self.batcher, next(self._ids), seq, self._open, self._close)
            async for msg in run_generate(first.start, link, seq, self.drafts, self.costs, self.round_timeout_s):
                yield msg
        except Exception as exc:
            self.metrics.errors.labels(status_for(exc)[0].name).inc()
            raise


def packing_states(step: Callable[[list[VerifyItem]], list[VerifyResult]]
                   ) -> Callable[[list[VerifyItem]], list[VerifyResult]]:
    """The verifier's step, with each result's hidden states packed as wire bytes in the step's
    own thread (the device-to-host copy stays off the event loop)."""
    def run(items: list[VerifyItem]) -> list[VerifyResult]:
        results = step(items)
        for r in results:
            if r.hidden_states is not None:  # the newest rows that fit one message (wire.py)
                keep = max_rows(2 * r.hidden_states.shape[1])
                r.packed_states, r.hidden_states = pack_states(r.hidden_states[-keep:]), None
        return results
    return run


async def start_target(cfg: TargetServiceConfig, verifier: TargetVerifier | None = None,
                       costs: CostModel | None = None) -> TierHandle:
    """Load the model (unless given), start serving, warm up, report SERVING. `costs`: the cost
    model (and load governor) of the direct rounds this tier runs, to watch or steer it."""
    servicer: TargetServicer | None = None
    loop = asyncio.get_running_loop()

    def on_worker_death(rank: int, code: int) -> None:
        """A TP worker died: report NOT_SERVING, then exit non-zero so Kubernetes restarts the pod."""
        log.critical("tensor-parallel worker %d exited with code %d: NOT_SERVING, exiting", rank, code)
        if servicer is not None and servicer.handle is not None:
            asyncio.run_coroutine_threadsafe(servicer.handle.grpc.set_serving(False), loop)
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
    runner = verifier.runner
    servicer = TargetServicer(verifier, packing_states(verifier.step), max_batch=cfg.max_batch,
                              step_gather=cfg.step_gather, cache=runner.cache,
                              max_model_len=runner.max_model_len, drafts=DraftPools(cfg.draft_tls),
                              round_timeout_s=cfg.round_timeout_s, costs=costs)
    governor_gauge(servicer.metrics.registry, lambda: servicer.costs.governor.allowed)
    handle = await servicer.start(cfg, runner.shutdown)
    handle.on_close.append(servicer.drafts.close)
    return handle
