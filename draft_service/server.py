"""Draft service: proposes blocks for many sessions at once (draft model, n-gram or EAGLE head).

Thin: protobuf in -> `Drafter.propose` (through the shared session servicer) -> protobuf out.
An EAGLE head also takes the target's hidden states, packed bf16 bytes on each propose.
"""

from __future__ import annotations

import asyncio
import time

import torch

from draft_service.config import DraftServiceConfig
from specsplit.proto.v1 import draft_pb2, draft_pb2_grpc
from specsplit.sampling.params import SamplingParams
from specsplit.serving.convert import sparse_to_pb
from specsplit.serving.servicer import SessionServicer
from specsplit.serving.tier import TierHandle
from specsplit.speculation.branches import BranchSpec
from specsplit.speculation.drafters import Drafter, DraftRequest, Proposal
from specsplit.speculation.eagle.wire import unpack_states
from specsplit.speculation.session import MAX_PROPOSE, SessionError


class DraftServicer(SessionServicer[DraftRequest, Proposal], draft_pb2_grpc.DraftServiceServicer):
    tier = "draft"
    step_kind = "propose"
    add_to_server = staticmethod(draft_pb2_grpc.add_DraftServiceServicer_to_server)
    service_name = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name
    # its steps are short and its stream carries nothing else while one runs; the target tier
    # keeps the worker thread (its loop streams the last round's tokens while a verify runs)
    inline_alone = True

    def check_open(self, token_ids: list[int], params: SamplingParams) -> None:
        if len(token_ids) >= self.max_model_len:
            raise SessionError(f"prompt of {len(token_ids)} tokens does not fit the draft's max_model_len "
                               f"{self.max_model_len}")

    @property
    def state_width(self) -> int:
        """Values per position of the target states the drafter reads (0: it reads none)."""
        runner = getattr(self.engine, "runner", None)
        head = getattr(runner, "head", None)
        return head.hc.state_size if head is not None else 0

    def request(self, seq_id: int, msg: draft_pb2.DraftPropose) -> DraftRequest:
        # a branch request's session drafts one token more than k: its guess of the bonus token
        extra = 1 if msg.HasField("branches") else 0
        if msg.k + extra > MAX_PROPOSE:
            raise SessionError(f"k={msg.k} exceeds the limit of {MAX_PROPOSE - extra}"
                               f"{' with branches' if extra else ''}")
        new_len = msg.prefix_len + len(msg.new_tokens)
        k = min(msg.k, max(0, self.max_model_len - new_len - 1 - extra))  # never past the draft's context
        states = None
        if msg.hidden_states:
            width = self.state_width
            if not width:
                raise SessionError(f"this draft tier ({getattr(self.engine, 'method', '')}) reads no hidden states")
            try:
                states = unpack_states(msg.hidden_states, width)  # [n, width] bfloat16
            except ValueError as e:
                raise SessionError(f"hidden_states: {e}; is the target tier returning the layers this head reads?"
                                   ) from None
        branch = BranchSpec(msg.branches.block_len, msg.branches.max_branches) if extra else None
        adopt = msg.adopt_branch if msg.HasField("adopt_branch") else None
        return DraftRequest(seq_id, msg.prefix_len, list(msg.new_tokens), k, states, branch=branch, adopt=adopt)

    def reply(self, msg: draft_pb2.DraftPropose, result: Proposal, queue_ns: int, received_ns: int
              ) -> draft_pb2.DraftServerMessage:
        branches = [draft_pb2.DraftBranch(id=b.id, accepted=b.accepted, token=b.token, token_ids=b.block.token_ids,
                                          q=sparse_to_pb(b.block.q_ids, b.block.q_probs))
                    for b in result.branches or ()]
        return draft_pb2.DraftServerMessage(proposal=draft_pb2.DraftProposal(
            round_id=msg.round_id, token_ids=result.token_ids, q=sparse_to_pb(result.q_ids, result.q_probs),
            draft_ns=result.draft_ns, queue_ns=queue_ns, prefilling=result.prefilling, branches=branches,
            handled_ns=time.perf_counter_ns() - received_ns,
        ))

    def warmup_request(self, seq_id: int, prompt_len: int) -> DraftRequest:
        width = self.state_width  # an EAGLE head drafts only from states: give it some
        states = torch.zeros(prompt_len - 1, width, dtype=torch.bfloat16) if width else None
        return DraftRequest(seq_id, prompt_len, [], 3, states)


async def start_draft(cfg: DraftServiceConfig, drafter: Drafter | None = None) -> TierHandle:
    """Load the drafter (unless given), start serving, warm up, report SERVING."""
    if drafter is None:
        drafter = await asyncio.to_thread(_load, cfg)
    # what branches below full acceptance guess from (DraftServiceConfig.branch_alternatives)
    drafter.alternatives = cfg.branch_alternatives if cfg.branch_alternatives is not None else \
        (1 if drafter.device.type == "cuda" else 0)
    drafter.max_rows = cfg.max_batch  # a pass's branches never grow it past the tier's batch
    runner = getattr(drafter, "runner", None)  # n-gram lookup keeps no model and no KV cache
    max_len = runner.max_model_len if runner is not None else (cfg.max_model_len or 1 << 20)
    servicer = DraftServicer(drafter, drafter.propose, max_batch=cfg.max_batch, step_gather=cfg.step_gather,
                             cache=runner.cache if runner is not None else None, max_model_len=max_len)
    return await servicer.start(cfg, runner.shutdown if runner is not None else None)


def _load(cfg: DraftServiceConfig) -> Drafter:
    from transformers import AutoConfig

    from specsplit.factory import load_drafter, load_tokenizer, model_folder

    folder = model_folder(cfg.model)
    tok = load_tokenizer(folder)
    vocab = int(AutoConfig.from_pretrained(folder).vocab_size)
    # EAGLE: the head reads the target's embeddings (and LM head) from the target's own checkpoint
    return load_drafter(cfg.speculative, tok, vocab, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                        kv_cache_bytes=cfg.kv_cache_memory_bytes, gpu_memory_utilization=cfg.gpu_memory_utilization,
                        enforce_eager=cfg.enforce_eager, target_model=folder)
