"""GatewayCore: what both public APIs (gRPC and OpenAI HTTP) call.

Tokenizes (and applies chat templates), admits requests through a bounded queue, runs one
`CompletionLoop` per completion against the replica pools, and turns the loops' deltas
into one stream per request. Protocol-specific code lives in grpc_api.py and http_api.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.config import GatewayConfig
from gateway.direct import DirectLoop
from gateway.metrics import GatewayMetrics
from specsplit.outputs import SpecMetrics
from specsplit.proto.v1 import draft_pb2_grpc, target_pb2_grpc
from specsplit.sampling.params import SamplingParams
from specsplit.serving.completion_loop import CompletionLoop, Delta, LoopOptions, RoundTimes
from specsplit.serving.errors import Overloaded, Unavailable
from specsplit.serving.metrics import governor_gauge
from specsplit.serving.replicas import ReplicaPool
from specsplit.speculation.adaptive import CostModel
from specsplit.speculation.round import completion_params
from specsplit.speculation.sequence import IncrementalDetokenizer, Sequence
from specsplit.speculation.session import check_token_ids

log = logging.getLogger(__name__)
MAX_COMPLETIONS = 64  # prompts x n in one request: each is a session on both tiers
DRAINING = "the gateway is shutting down and takes no new requests; retry on another replica"


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class Finished:
    """Last event of one completion: its stats and token counts."""

    index: int
    stats: SpecMetrics
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_index: int = 0  # which of the request's prompts (several on /v1/completions)


class GatewayCore:
    def __init__(self, cfg: GatewayConfig, tokenizer: Any, max_model_len: int, eos_ids: tuple[int, ...],
                 model_vocab_size: int | None = None, hidden_layers: tuple[int, ...] = (),
                 hidden_size: int = 0) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_ids = eos_ids
        self.model_names = cfg.served_model_names  # what ListModels and /v1/models show
        self.model_name = self.model_names[0]  # reported in responses
        self.vocab_size = len(tokenizer)
        sc = cfg.speculative
        self.targets = ReplicaPool("target", target_pb2_grpc.TargetServiceStub, tls=cfg.tier_tls("target"))
        self.drafts = ReplicaPool("draft", draft_pb2_grpc.DraftServiceStub, tls=cfg.tier_tls("draft")) \
            if sc is not None else None
        self.opts = LoopOptions(
            num_speculative_tokens=sc.num_speculative_tokens if sc else 0, adaptive=sc.adaptive if sc else False,
            pipeline=cfg.pipeline, max_branches=cfg.max_branches, round_timeout_s=cfg.round_timeout_s, session_timeout_s=cfg.request_timeout_s,
            kv_wait_s=cfg.kv_wait_s, vocab_size=max(self.vocab_size, model_vocab_size or 0),
            hidden_layers=hidden_layers,  # EAGLE: the target states the draft's head reads
            hidden_row_bytes=2 * hidden_size * len(hidden_layers),
        )
        self.costs = CostModel()
        self.metrics = GatewayMetrics()
        self._timeline = self._new_timeline()
        self._slots = asyncio.Semaphore(cfg.max_concurrent_requests)
        self._waiting = 0
        self._running = 0
        self._ids = itertools.count()
        self.draining = False  # set on SIGTERM: new requests are refused, running ones finish
        self.metrics.queue_depth.set_function(lambda: self._waiting)
        self.metrics.sessions.set_function(lambda: self._running)
        governor_gauge(self.metrics.registry, lambda: self.costs.governor.allowed)  # gateway-driven rounds

    @property
    def speculative_label(self) -> str:
        sc = self.cfg.speculative
        if sc is None:
            return "none"
        return "ngram" if sc.method == "ngram" else f"{sc.method}:{sc.model}"

    # ---- input -----------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        """A request names one of the served names (or none); anything else is NOT_FOUND / 404."""
        if name and name not in self.model_names:
            raise LookupError(f"model {name!r} is not served here; available: "
                              f"{', '.join(repr(n) for n in self.model_names)}")

    def encode_text(self, text: str) -> Prompt:
        if not isinstance(text, str) or not text:
            raise ValueError("the prompt is empty")
        return self._check(Prompt(text, self.tokenizer.encode(text)))

    def encode_ids(self, ids: list[int]) -> Prompt:
        if not ids:
            raise ValueError("the prompt is empty")
        if any((not isinstance(t, int)) or isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
        check_token_ids(ids, self.vocab_size, "prompt")
        return self._check(Prompt(None, list(ids)))

    def encode_chat(self, messages: list[dict[str, str]]) -> Prompt:
        if not messages:
            raise ValueError("messages is empty")
        # OpenAI's `developer` role is its new name for `system`
        messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                    for m in messages]
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") \
                    or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a role (system, developer, user, assistant, tool) and a "
                                 "string content")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use completions with a plain prompt")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._check(Prompt(text, self.tokenizer.encode(text, add_special_tokens=False)))

    def _check(self, p: Prompt) -> Prompt:
        limit = self.cfg.max_prompt_tokens or self.max_model_len - 1
        if len(p.token_ids) > limit or len(p.token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(p.token_ids)} tokens; the limit is {min(limit, self.max_model_len - 1)}")
        return p

    def check_params(self, params: SamplingParams) -> SamplingParams:
        if params.max_tokens is not None and params.max_tokens > self.cfg.max_tokens_limit:
            raise ValueError(f"max_tokens={params.max_tokens} exceeds this gateway's limit of {self.cfg.max_tokens_limit}")
        bad = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias has token id(s) outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return params

    # ---- generation --------------------------------------------------------------------------
    async def generate(self, prompt: Prompt | list[Prompt], params: SamplingParams) -> AsyncIterator[Delta | Finished]:
        """Admit, run n completions per prompt concurrently, and stream their deltas as they come.

        One admission slot per request, however many prompts it has; completion j of prompt
        i has index i * n + j (OpenAI's numbering of choices).
        """
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not prompts or len(prompts) * params.n > MAX_COMPLETIONS:
            raise ValueError(f"a request may ask for 1 to {MAX_COMPLETIONS} completions (prompts x n), "
                             f"got {len(prompts)} x {params.n}")
        params = self.check_params(params)
        if self.draining:
            raise Unavailable(DRAINING)
        if self._slots.locked() and self._waiting >= self.cfg.max_queued_requests:
            self.metrics.requests.labels("rejected").inc()
            raise Overloaded(f"gateway is at capacity ({self.cfg.max_concurrent_requests} running, "
                             f"{self._waiting} queued); retry later")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        self.metrics.tokens.labels("prompt").inc(sum(len(p.token_ids) for p in prompts))
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._one(p, params, i * params.n + j, queue, i))
                 for i, p in enumerate(prompts) for j in range(params.n)]
        outcome = "error"
        try:
            done = 0
            while done < len(tasks):
                ev = await queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, Finished):
                    done += 1
                yield ev
            outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._running -= 1
            self._slots.release()
            self.metrics.requests.labels(outcome).inc()

    async def _one(self, prompt: Prompt, params: SamplingParams, index: int, out: asyncio.Queue,
                   prompt_index: int = 0) -> None:
        j = index - prompt_index * params.n  # which of this prompt's n: a prompt's seeds do not depend on its place
        seq = Sequence(next(self._ids), list(prompt.token_ids), completion_params(params, j), self.eos_ids,
                       self.max_model_len, IncrementalDetokenizer(self.tokenizer, prompt.token_ids), index=index)
        loop: CompletionLoop | DirectLoop = DirectLoop(seq, self.targets, self.drafts, self.opts) \
            if self.cfg.round_mode == "direct" else CompletionLoop(seq, self.targets, self.drafts, self.costs, self.opts)
        recorded = False
        try:
            first = True
            async for delta in loop.run():
                self.metrics.tokens.labels("completion").inc(len(delta.token_ids))
                self.metrics.observe_round(delta)
                if first and params.prompt_logprobs is not None:  # echo: [None] for a one-token prompt
                    delta.prompt_logprobs = seq.prompt_logprobs or [None]
                first = False
                out.put_nowait(delta)
            self.metrics.record(loop.stats, loop.failures)
            recorded = True
            self._add_timeline(loop.stats, loop.times, len(seq.output_ids))
            out.put_nowait(Finished(index, loop.stats, len(prompt.token_ids), len(seq.output_ids),
                                    seq.finish_reason, seq.stop_reason, prompt_index))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded to the request's stream
            out.put_nowait(exc)
        finally:
            if not recorded:  # a failed or cancelled completion: its failovers and failures count too
                self.metrics.record(loop.stats, loop.failures)
            # shielded: `generate` cancels this task as soon as it has read `Finished`, which
            # would otherwise interrupt the close and leave a tier session (and its KV) open
            await asyncio.shield(loop.close())

    def _add_timeline(self, stats: SpecMetrics, times: RoundTimes, tokens: int) -> None:
        t = self._timeline
        t["completions"] += 1
        t["rounds"] += stats.num_rounds
        t["tokens"] += tokens
        t["relay_ns"] += times.relay_ns
        for f in times.sum.__dataclass_fields__:
            t[f] = t.get(f, 0) + getattr(times.sum, f)

    def take_timeline(self) -> dict[str, int]:
        """Round timing sums of the completions finished since the last call (benchmarks)."""
        t, self._timeline = self._timeline, self._new_timeline()
        return t

    @staticmethod
    def _new_timeline() -> dict[str, int]:
        return {"completions": 0, "rounds": 0, "tokens": 0, "relay_ns": 0}

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request runs or waits, at most `timeout_s`; True if none is left."""
        deadline = time.monotonic() + timeout_s
        while self._running + self._waiting > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._running + self._waiting == 0

    async def close(self) -> None:
        await self.targets.close()
        if self.drafts is not None:
            await self.drafts.close()


def now_s() -> int:
    return int(time.time())
