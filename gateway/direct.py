"""The gateway's side of the direct round: one `Generate` stream per completion.

The target tier runs the rounds (target_service/generate.py) and talks to the draft replica
itself; the gateway picks both replicas, relays the committed tokens into its `Sequence` (the
ground truth: stop strings, text, logprobs) and, when the target replica fails, starts the
completion again on another one with every token it has received. What it has received is
exactly what the client has seen, so no token is lost or sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from specsplit.outputs import SpecMetrics
from specsplit.proto.v1 import target_pb2
from specsplit.serving.completion_loop import Delta, LoopOptions, RoundTimes, RoundTiming
from specsplit.serving.convert import logprobs_from_pb, token_choice_to_pb
from specsplit.serving.replicas import NoReplica, ReplicaPool, TierFailure
from specsplit.serving.target_link import Failover
from specsplit.speculation.round import adapts_k, commit_verdict
from specsplit.speculation.sequence import Sequence

log = logging.getLogger(__name__)


class DirectLoop:
    """Relays one completion from a target replica that drives its own rounds."""

    def __init__(self, seq: Sequence, targets: ReplicaPool, drafts: ReplicaPool | None, opts: LoopOptions) -> None:
        self.seq = seq
        self.targets = targets
        self.drafts = drafts
        self.opts = opts
        self.stats = SpecMetrics()
        self.times = RoundTimes()
        self.failover = Failover(targets, opts, self.stats)
        self.failures = self.failover.failures  # (tier, status) -> tier sessions that broke
        self._params_pb = token_choice_to_pb(seq.params)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._bad_drafts: set[str] = set()

    def _end_ids(self) -> list[int]:
        p = self.seq.params
        ends = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            ends.update(self.seq.eos_token_ids)
        return sorted(ends)

    def _draft_address(self) -> str:
        if self.drafts is None or self.opts.num_speculative_tokens == 0:
            return ""
        try:
            return self.drafts.acquire(self._bad_drafts)
        except NoReplica:
            if not self.stats.draft_fallback:
                log.warning("no draft replica left: completing with plain target decoding")
            self.stats.draft_fallback = True
            return ""

    async def run(self) -> AsyncIterator[Delta]:
        seq = self.seq
        while not seq.finished:
            target = self.failover.acquire()
            self.failover.reopened(target)
            draft = self._draft_address()
            start = target_pb2.GenerateStart(
                token_ids=seq.all_ids, params=self._params_pb,
                stopping=target_pb2.Stopping(max_new_tokens=seq.max_new_tokens(), end_token_ids=self._end_ids()),
                draft_address=draft, num_speculative_tokens=self.opts.num_speculative_tokens if draft else 0,
                adaptive=adapts_k(self.opts.adaptive, seq.params), pipeline=self.opts.pipeline,
                max_branches=self.opts.max_branches,
                prompt_len=len(seq.prompt_ids), hidden_layers=self.opts.hidden_layers if draft else (),
            )
            try:
                async for delta in self._stream(target, draft, start):
                    yield delta
                    if seq.finished:
                        break
            except TierFailure as f:
                await self.failover.failed(f)
            finally:
                self.targets.release(target)
                if draft:
                    self.drafts.release(draft)  # type: ignore[union-attr]
                await self.close()

    async def _stream(self, target: str, draft: str, start: target_pb2.GenerateStart) -> AsyncIterator[Delta]:
        seq, stats = self.seq, self.stats
        call = self._call = self.targets.stub(target).Generate(timeout=self.opts.session_timeout_s,
                                                                wait_for_ready=False)
        try:
            await call.write(target_pb2.GenerateClientMessage(start=start))
            progress: tuple[int, int] | None = None
            while not seq.finished:
                try:
                    msg = await asyncio.wait_for(call.read(), self.opts.round_timeout_s)
                except asyncio.TimeoutError:
                    done = f" after prefilling {progress[0]} of {progress[1]} tokens" if progress else ""
                    raise TierFailure("target", target, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      f"no round and no progress for {self.opts.round_timeout_s:.1f}s{done} "
                                      "(round timeout)") from None
                if msg is grpc.aio.EOF:
                    code = await call.code()
                    details = await call.details()
                    if code == grpc.StatusCode.OK:
                        code, details = grpc.StatusCode.UNAVAILABLE, "the completion ended early"
                    raise TierFailure("target", target, code, details or "")
                if msg.WhichOneof("kind") == "progress":  # a long prefill: slow, not hung
                    progress = (msg.progress.prefilled, msg.progress.total)
                    log.debug("target replica %s: prefilled %d of %d tokens", target, *progress)
                    continue
                t_relay = time.perf_counter_ns()
                d = msg.delta
                self.failover.succeeded()
                ids = list(d.token_ids)
                lps = logprobs_from_pb(list(d.logprobs), ids)
                prompt = logprobs_from_pb(list(d.prompt_logprobs), seq.all_ids[1 : len(d.prompt_logprobs) + 1]) \
                    if d.prompt_logprobs else None  # echo: the first delta carries them
                kept, text = commit_verdict(seq, stats, d.drafted, d.accepted, ids, lps, prompt)
                stats.num_pipelined_rounds += int(d.pipelined)
                stats.num_drafted_ahead_rounds += int(d.drafted_ahead)
                t = d.timing
                timing = RoundTiming(t.round_ns, t.verify_ns, t.verify_wait_ns, t.verify_queue_ns, t.draft_wait_ns,
                                     t.draft_ns, t.draft_queue_ns, t.draft_handled_ns, t.ahead_wait_ns)
                self.times.add(timing)
                stats.verify_ns += t.verify_ns + t.verify_queue_ns
                stats.draft_ns += t.draft_wait_ns
                move = False
                if d.draft_failure and self.drafts is not None:
                    self.drafts.mark_failed(draft)
                    self._bad_drafts.add(draft)
                    # another draft replica: start again there (the target re-prefills what we hold);
                    # none: the target tier goes on with plain decoding, as it already does
                    move = bool(self.drafts.healthy(self._bad_drafts))
                    log.warning("draft replica %s failed (%s): %s", draft, d.draft_failure,
                                "moving the completion to another draft replica" if move else "plain decoding")
                    self.failures[("draft", "UNAVAILABLE")] = self.failures.get(("draft", "UNAVAILABLE"), 0) + 1
                    if move:
                        stats.num_failovers += 1
                    else:
                        stats.draft_fallback = True
                out = Delta(seq.index, kept, text, lps[: len(kept)] if lps else None, seq.finish_reason,
                            seq.stop_reason, drafted=d.drafted, accepted=min(d.accepted, len(kept)),
                            pipelined=d.pipelined, timing=timing, draft_failure=d.draft_failure,
                            drafted_ahead=d.drafted_ahead)
                self.times.relay_ns += time.perf_counter_ns() - t_relay
                yield out
                if move and not seq.finished:
                    return  # run() starts again with every token received and another draft replica
        except grpc.aio.AioRpcError as e:
            raise TierFailure("target", target, e.code(), e.details() or "") from None

    async def close(self) -> None:
        """Cancel the stream: the target tier closes both sessions and frees their KV."""
        call, self._call = self._call, None
        if call is not None and not call.done():
            call.cancel()
