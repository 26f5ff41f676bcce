"""Target service: verifies draft blocks for many sessions in one batched forward.

Thin: protobuf in -> `TargetVerifier.step` (through the shared session servicer) -> protobuf out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from specsplit.proto.v1 import target_pb2, target_pb2_grpc
from specsplit.serving.convert import logprobs_to_pb, sparse_from_pb
from specsplit.serving.servicer import SessionServicer
from specsplit.serving.tier import TierHandle
from specsplit.speculation.session import MAX_BLOCK, SessionError
from specsplit.speculation.target import TargetVerifier, VerifyItem, VerifyResult
from target_service.config import TargetServiceConfig

log = logging.getLogger(__name__)


class TargetServicer(SessionServicer[VerifyItem, VerifyResult], target_pb2_grpc.TargetServiceServicer):
    tier = "target"
    step_kind = "verify"
    add_to_server = staticmethod(target_pb2_grpc.add_TargetServiceServicer_to_server)
    service_name = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name

    def request(self, seq_id: int, msg: target_pb2.TargetVerify) -> VerifyItem:
        k = len(msg.draft_ids)
        if k > MAX_BLOCK:
            raise SessionError(f"draft block of {k} tokens exceeds the limit of {MAX_BLOCK}")
        q_ids, q_probs = sparse_from_pb(list(msg.q), k, self.engine.vocab_size)  # type: ignore[attr-defined]
        return VerifyItem(seq_id, list(msg.draft_ids), q_ids, q_probs)

    def reply(self, msg: target_pb2.TargetVerify, result: VerifyResult, queue_ns: int
              ) -> target_pb2.TargetServerMessage:
        return target_pb2.TargetServerMessage(result=target_pb2.VerifyResult(
            round_id=msg.round_id, num_accepted=result.num_accepted, next_token=result.emitted[-1],
            logprobs=logprobs_to_pb(result.logprobs, result.emitted), verify_ns=result.verify_ns,
            queue_ns=queue_ns,
        ))

    def warmup_request(self, seq_id: int, prompt_len: int) -> VerifyItem:
        return VerifyItem(seq_id, [1, 2, 3])


async def start_target(cfg: TargetServiceConfig, verifier: TargetVerifier | None = None) -> TierHandle:
    """Load the model (unless given), start serving, warm up, report SERVING."""
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
    servicer = TargetServicer(verifier, verifier.step, max_batch=cfg.max_batch, cache=runner.cache,
                              max_model_len=runner.max_model_len)
    return await servicer.start(cfg, runner.shutdown)
