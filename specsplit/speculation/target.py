"""The target side of speculation: prefill and verify many sessions in one forward.

A session's cache holds every committed token except the last one the target emitted
(`pending`), which is fed at the start of the next step together with the draft block.
One step per session therefore feeds `[pending] + drafts` (or `prompt + drafts` on the
first step), reads logits at the last `len(drafts) + 1` positions, and keeps
`accepted` drafts: the rollback is a cache truncation.

Chunked prefill: a step feeds at most `prefill_chunk` prompt tokens in all (beyond the short
rounds of sessions that are decoding). A session with more left to prefill gets a chunk of its
prompt and a result with no token (`prefill` says how far it is) and is asked again, so no step
is unbounded and other sessions' rounds go on between the chunks of a long prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from specsplit import trace
from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.sampling.history import (
    extend_counts_with_drafts,
    extend_seen_with_drafts,
    output_counts,
    seen_mask,
)
from specsplit.sampling.logits import (
    SamplingBatch,
    argmax_is_enough,
    logprobs_of,
    make_generator,
    pick_logprobs,
    process_logits,
    processed_logprobs,
)
from specsplit.sampling.params import SamplingParams
from specsplit.sampling.rejection import rejection_sample
from specsplit.speculation.session import SessionError, UnknownSession, check_token_ids


@dataclass
class TargetSession:
    seq_id: int
    params: SamplingParams
    generator: torch.Generator | None
    history: list[int]  # prompt + committed tokens (drives the repetition penalty)
    unfed: list[int]  # tokens emitted/committed but not yet in the cache
    num_logprobs: int | None = None
    prompt_len: int = 0  # history[prompt_len:] was generated (frequency / presence penalties)
    prompt_logprobs_due: bool = False  # the next step returns the prompt's logprobs (echo)
    # what the chunks of a long prompt produced, handed over with the session's first token
    prompt_lps: list[dict[int, float]] = field(default_factory=list)
    prompt_lp_ids: list[int] = field(default_factory=list)
    hidden: list[Tensor] = field(default_factory=list)  # EAGLE: states of the chunks fed so far
    hidden_layers: tuple[int, ...] = ()  # EAGLE: layers whose states each step returns (empty: none)


@dataclass
class VerifyItem:
    """One session's request for this step."""

    seq_id: int
    draft_ids: list[int] = field(default_factory=list)  # the block to verify, may be empty
    q_ids: Tensor | None = None  # [k, K] int64 sparse draft support (sampled requests)
    q_probs: Tensor | None = None  # [k, K] float32 the probabilities the draft sampled from
    # EAGLE: the draft that read this session's hidden states is gone: compute none from this step on
    stop_states: bool = False


@dataclass
class VerifyResult:
    seq_id: int
    num_accepted: int  # drafts kept, 0..len(draft_ids)
    emitted: list[int]  # draft_ids[:num_accepted] + [next token]; empty while prefilling
    logprobs: list[dict[int, float]] | None  # per emitted token: {id: logprob} incl. top-N
    verify_ns: int  # wall time of the batched step this result came from
    # on a session's first step when asked: tokens 1.. of its opening ids, {id: logprob} each
    prompt_logprobs: list[dict[int, float]] | None = None
    prompt_ids: list[int] | None = None  # the prompt tokens those logprobs are of (tokens 1..)
    # [len(emitted) - 1 + tokens fed before the block, D] when hidden states are exposed (EAGLE):
    # the target's state at every fed position up to the last accepted one, i.e. the state that
    # predicted each token after it; D = len(hidden_layers) * hidden_size
    hidden_states: Tensor | None = None
    packed_states: bytes = b""  # served: hidden_states as wire bytes (eagle/wire.py), packed in the step's thread
    prefill: tuple[int, int] | None = None  # (tokens prefilled, of) when this step fed only a chunk

    @property
    def pending(self) -> bool:
        """Only a chunk of the prompt was fed: step the same item again for its token."""
        return self.prefill is not None


MIN_CHUNK = 32  # the first prefilling session of a step gets at least this many tokens
ROUND_TOKENS = 64  # a feed this short (pending token + a block) is a round, never cut


def default_prefill_chunk(device: torch.device) -> int:
    """Prompt tokens per step: a few seconds of work for a small model on a CPU; on a GPU a
    chunk large enough to keep the device busy."""
    return 2048 if device.type == "cuda" else 512


class TargetVerifier:
    """Owns the target runner and every open session's sampling state."""

    def __init__(self, runner: ModelRunner, prefill_chunk: int | None = None) -> None:
        self.runner = runner
        self.sessions: dict[int, TargetSession] = {}
        self.vocab_size = runner.cfg.vocab_size
        self.hidden_layers: tuple[int, ...] = ()  # layers whose states new sessions get (in-process EAGLE)
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(runner.device)
        if self.prefill_chunk < MIN_CHUNK:
            raise ValueError(f"prefill_chunk must be >= {MIN_CHUNK}, got {self.prefill_chunk}")

    def check_hidden_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Layers in the numbering of `ModelRunner.forward_hidden`: 0..num_layers, at most 4."""
        n = self.runner.cfg.num_layers
        if len(layers) > 4 or not all(0 <= i <= n for i in layers):
            raise SessionError(f"hidden layers {tuple(layers)}: want at most 4 layers within 0..{n}")
        return tuple(int(i) for i in layers)

    def expose_hidden(self, layers: tuple[int, ...]) -> None:
        """Sessions opened from now on return hidden states from every step (in-process EAGLE)."""
        try:
            self.hidden_layers = self.check_hidden_layers(layers)
        except SessionError as e:
            raise ValueError(str(e)) from None

    def open(self, seq_id: int, token_ids: list[int], params: SamplingParams, prompt_len: int | None = None,
             hidden_layers: tuple[int, ...] | None = None) -> None:
        """Register a session; its tokens are prefilled by the next `step` that names it.

        `prompt_len`: how many of `token_ids` are the prompt (a session re-opened after a
        failover also carries the tokens generated so far); None: all of them.
        `hidden_layers`: the target states each step returns for this session (an EAGLE draft
        reads them); None: as `expose_hidden` set.
        """
        layers = self.hidden_layers if hidden_layers is None else self.check_hidden_layers(hidden_layers)
        if seq_id in self.sessions:
            raise SessionError(f"session {seq_id} is already open")
        self.check_ids(token_ids, "prompt")
        if not token_ids:
            raise SessionError("prompt is empty")
        if prompt_len is not None and not 0 < prompt_len <= len(token_ids):
            raise SessionError(f"prompt_len {prompt_len} outside 1..{len(token_ids)}")
        self.check_ids(list(params.logit_bias or ()), "logit_bias")
        if len(token_ids) >= self.runner.max_model_len:
            raise SessionError(f"prompt of {len(token_ids)} tokens does not fit max_model_len "
                               f"{self.runner.max_model_len}")
        self.runner.add(seq_id)
        self.sessions[seq_id] = TargetSession(
            seq_id, params, make_generator(params, self.runner.device), list(token_ids), list(token_ids),
            params.logprobs, len(token_ids) if prompt_len is None else prompt_len,
            params.prompt_logprobs is not None, hidden_layers=layers,
        )

    def close(self, seq_id: int) -> None:
        if self.sessions.pop(seq_id, None) is not None:
            self.runner.free(seq_id)

    def check_ids(self, ids: list[int], what: str) -> None:
        check_token_ids(ids, self.vocab_size, what)

    def step(self, items: list[VerifyItem]) -> list[VerifyResult]:
        """Verify every item's block in one batched forward; sessions advance by accepted + 1."""
        t0 = time.perf_counter_ns()
        sessions = []
        for it in items:
            s = self.sessions.get(it.seq_id)
            if s is None:
                raise UnknownSession(f"no open target session {it.seq_id}")
            self.check_ids(it.draft_ids, "draft block")
            if not s.params.greedy and it.draft_ids and it.q_ids is None:
                raise SessionError(f"session {it.seq_id}: a sampled request needs the draft distribution q")
            if it.stop_states:  # no more state copies (nor the hidden-state graphs) for this session
                s.hidden_layers, s.hidden = (), []
            sessions.append(s)
        chunks = plan_chunks([len(s.unfed) + len(it.draft_ids) for it, s in zip(items, sessions, strict=True)],
                             [len(s.unfed) for s in sessions], self.prefill_chunk)
        # per item: what it feeds, and its rows of logits and of hidden states in the step's output
        inputs: list[StepInput] = []
        spans: list[tuple[int, int, int, int, int]] = []  # (logit row, prompt rows, rows, hidden row, hidden rows)
        row = hrow = 0
        for it, s, n in zip(items, sessions, chunks, strict=True):
            feed = s.unfed + it.draft_ids if n is None else s.unfed[:n]
            # a session due its prompt logprobs reads logits at every fed prompt position
            e = (len(s.unfed) - 1 if n is None else n) if s.prompt_logprobs_due else 0
            rows = e + len(it.draft_ids) + 1 if n is None else max(e, 1)  # a chunk's one row is unused
            nh = len(feed) if s.hidden_layers else 0  # EAGLE: the state at every fed position
            spans.append((row, e, rows if feed else 0, hrow, nh))
            if feed:
                inputs.append(StepInput(it.seq_id, feed, rows, nh))
                row, hrow = row + rows, hrow + nh
        logits = hidden = None
        layers = tuple(dict.fromkeys(i for s in sessions for i in s.hidden_layers))  # every layer asked for
        trace.mark("verify.forward", len(inputs))
        if inputs and layers:
            logits, hidden = self.runner.forward_hidden(inputs, layers)  # [rows, V], [hidden rows, len(layers) * H]
        elif inputs:
            logits = self.runner.forward(inputs)  # [rows, V]
        trace.mark("verify.launched", len(inputs))  # the host's part is done; the device's may not be
        whole = [i for i, n in enumerate(chunks) if n is None]
        results: list[VerifyResult | None] = [None] * len(items)
        if whole:
            assert logits is not None
            sel = [r for i in whole for r in range(spans[i][0] + spans[i][1], spans[i][0] + spans[i][2])]
            lg = logits if len(sel) == logits.shape[0] else logits[torch.tensor(sel, device=logits.device)]
            for i, r in zip(whole, self._accept([items[i] for i in whole], [sessions[i] for i in whole], lg),
                            strict=True):
                results[i] = r
        dt = time.perf_counter_ns() - t0
        trace.mark("verify.accepted", len(items))
        out: list[VerifyResult] = []
        for it, s, r, n, (r0, e, _, h0, nh) in zip(items, sessions, results, chunks, spans, strict=True):
            fed = (s.unfed if n is None else s.unfed[: n + 1])[: e + 1]  # the prompt rows predict fed[1:]
            if e:
                assert logits is not None
                ids = torch.tensor(fed[1:], device=logits.device)
                s.prompt_lps.extend(self._to_dicts(*logprobs_of(logits[r0 : r0 + e], ids, s.params.prompt_logprobs or 0),
                                                   fed[1:]))
                s.prompt_lp_ids.extend(fed[1:])
            if r is None:  # prefilling: n tokens of the prompt went in (possibly none this step)
                if hidden is not None and nh:
                    s.hidden.append(_columns(hidden[h0 : h0 + nh], layers, s.hidden_layers))
                del s.unfed[: n or 0]
                done = self.runner.length(it.seq_id)
                out.append(VerifyResult(it.seq_id, 0, [], None, dt, prefill=(done, done + len(s.unfed))))
                continue
            if s.hidden_layers:  # states up to the last accepted position; the rest were rejected
                assert hidden is not None
                s.hidden.append(_columns(hidden[h0 : h0 + len(s.unfed) + r.num_accepted], layers, s.hidden_layers))
                r.hidden_states = torch.cat(s.hidden) if len(s.hidden) > 1 else s.hidden[0]
                s.hidden = []
            if s.prompt_logprobs_due:
                r.prompt_logprobs, r.prompt_ids = s.prompt_lps, s.prompt_lp_ids or None
                s.prompt_logprobs_due, s.prompt_lps, s.prompt_lp_ids = False, [], []
            done = self.runner.length(it.seq_id)
            self.runner.truncate(it.seq_id, done - len(it.draft_ids) + r.num_accepted)
            s.history.extend(r.emitted)
            s.unfed = [r.emitted[-1]]
            r.verify_ns = dt
            out.append(r)
        return out

    def _accept(self, items: list[VerifyItem], sessions: list[TargetSession], logits: Tensor) -> list[VerifyResult]:
        if all(argmax_is_enough(s.params) and s.num_logprobs is None for s in sessions):
            return self._accept_greedy(items, logits)
        device = logits.device
        b = len(items)
        ks = [len(it.draft_ids) for it in items]
        kmax = max(ks)
        # scatter the ragged rows into a padded [B, kmax+1, V] view
        row_of = torch.tensor([i for i, k in enumerate(ks) for _ in range(k + 1)], device=device)
        col_of = torch.tensor([j for k in ks for j in range(k + 1)], device=device)
        params = [s.params for s in sessions]
        batch = SamplingBatch.from_params(params, device, [s.generator for s in sessions])
        rows = batch.repeat_interleave(kmax + 1)
        padded = logits.new_zeros(b, kmax + 1, logits.shape[-1])
        padded[row_of, col_of] = logits
        drafts = torch.full((b, max(kmax, 1)), -1, dtype=torch.int64)
        for i, it in enumerate(items):
            drafts[i, : ks[i]] = torch.tensor(it.draft_ids, dtype=torch.int64)
        drafts = drafts[:, :kmax].to(device)
        seen = counts = None
        if rows.any_penalty:
            base = seen_mask([torch.tensor(s.history) for s in sessions], self.vocab_size, device)
            seen = extend_seen_with_drafts(base, drafts).reshape(b * (kmax + 1), -1)
        if rows.any_output_penalty:
            out = output_counts([torch.tensor(s.history[s.prompt_len :], dtype=torch.int64) for s in sessions],
                                self.vocab_size, device)
            counts = extend_counts_with_drafts(out, drafts).reshape(b * (kmax + 1), -1)
        flat = padded.reshape(b * (kmax + 1), -1)  # [B*(k+1), V]
        probs = process_logits(flat, rows, seen, counts)  # [B*(k+1), V]
        probs = probs.view(b, kmax + 1, -1)
        argmax = probs.argmax(-1)  # [B, kmax+1]
        q_ids = q_probs = None
        if not batch.all_greedy:  # sampled rows need q even when no row drafted (k = 0: [B, 0, 1])
            kq = max((it.q_ids.shape[-1] for it in items if it.q_ids is not None), default=1)
            q_ids = torch.zeros(b, kmax, kq, dtype=torch.int64, device=device)
            q_probs = torch.zeros(b, kmax, kq, dtype=torch.float32, device=device)
            for i, it in enumerate(items):
                if it.q_ids is not None and ks[i]:
                    q_ids[i, : ks[i], : it.q_ids.shape[-1]] = it.q_ids.to(device)
                    q_probs[i, : ks[i], : it.q_probs.shape[-1]] = it.q_probs.to(device)
        num_acc, next_tok = rejection_sample(
            probs, argmax, drafts, torch.tensor(ks, device=device), q_ids, q_probs,
            batch.is_greedy, batch.generators,
        )
        num_acc_l, next_l = num_acc.tolist(), next_tok.tolist()
        want_lp = [s.num_logprobs is not None for s in sessions]
        lp_all = None
        if any(want_lp):  # the distribution each token was chosen from, as vLLM's processed logprobs
            lp_all = processed_logprobs(flat, rows, seen, counts).view(b, kmax + 1, -1)  # [B, k+1, V]
        results = []
        for i, it in enumerate(items):
            emitted = it.draft_ids[: num_acc_l[i]] + [next_l[i]]
            lps = None
            if lp_all is not None and want_lp[i]:
                ids = torch.tensor(emitted, device=device)
                lps = self._to_dicts(*pick_logprobs(lp_all[i, : len(emitted)], ids, sessions[i].num_logprobs or 0),
                                     emitted)
            results.append(VerifyResult(it.seq_id, num_acc_l[i], emitted, lps, 0))
        return results

    @staticmethod
    def _accept_greedy(items: list[VerifyItem], logits: Tensor) -> list[VerifyResult]:
        """Greedy rows that no processor changes: the argmax of the raw logits decides.

        One small device-to-host copy (N ids) instead of the full-vocabulary probability
        tensors of the general path; the result is the same (tested against it).
        """
        best = logits.argmax(-1).tolist()  # [sum(k_i + 1)]
        results, row = [], 0
        for it in items:
            k = len(it.draft_ids)
            a = 0
            while a < k and it.draft_ids[a] == best[row + a]:
                a += 1
            emitted = it.draft_ids[:a] + [best[row + a]]
            results.append(VerifyResult(it.seq_id, a, emitted, None, 0))
            row += k + 1
        return results

    @staticmethod
    def _to_dicts(chosen: Tensor, top_ids: Tensor, top_lp: Tensor, emitted: list[int]) -> list[dict[int, float]]:
        """Per token {id: logprob}: its top alternatives and itself."""
        out = []
        for j, tok in enumerate(emitted):
            d = {int(t): float(v) for t, v in zip(top_ids[j].tolist(), top_lp[j].tolist(), strict=True)}
            d[tok] = float(chosen[j])
            out.append(d)
        return out


def plan_chunks(feeds: list[int], prompts: list[int], budget: int) -> list[int | None]:
    """How much of each item a step feeds: None = all of it (a round, or a prompt that fits the
    budget left), else a chunk of n < prompts[i] prompt tokens (0: none this step).

    `feeds[i]` is what item i would feed whole, `prompts[i]` its part still to prefill. Rounds
    always go whole; prompts share `budget` in item order, and the first prompt that has to be
    cut gets at least MIN_CHUNK tokens, so every step moves some prefill forward.
    """
    left = budget
    cut_one = False
    out: list[int | None] = []
    for feed, prompt in zip(feeds, prompts, strict=True):
        if feed <= ROUND_TOKENS or feed <= left or prompt <= 1:
            out.append(None)
            left -= feed
            continue
        n = max(left, 0 if cut_one else MIN_CHUNK)
        n = min(n, prompt - 1)  # the last prompt token goes with the block, whose logits it gives
        out.append(max(n, 0))
        left -= max(n, 0)
        cut_one = True
    return out


def _columns(states: Tensor, have: tuple[int, ...], want: tuple[int, ...]) -> Tensor:
    """The `want` layers' blocks of states computed for `have` (sessions of one step asked for
    different layers): [n, len(have) * H] -> [n, len(want) * H]."""
    if have == want:
        return states
    h = states.shape[1] // len(have)
    return torch.cat([states[:, have.index(i) * h : (have.index(i) + 1) * h] for i in want], dim=1)
