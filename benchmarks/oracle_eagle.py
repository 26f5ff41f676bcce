"""Benchmark-only: an EAGLE-3 head of the real size whose acceptance rate is set on purpose.

No trained head for the random-weight 8B-shaped target exists (a random head's drafts are
never accepted), so, as `OracleDrafter` does for a draft model (benchmarks/oracle.py), the head
runs for real (one head step and its LM head over the draft vocabulary per drafted token,
from the target states that crossed the wire), but each token it chose is replaced by the
target's own greedy continuation with probability alpha and by a wrong token otherwise, drawn
once per (reference, position). The replaced token is the one fed to the next head step.

`random_eagle3_drafter` builds it: EAGLE-3 for Llama-3.1-8B (fc 3 x 4096 -> 4096, one decoder
layer with 2 x 4096 attention input, a 32,000-token draft vocabulary), random bf16 weights,
the target's embedding shape. `head_config` is the config.json the gateway reads to know
which target layers the head reads.

Never serve with these: the oracle knows the answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from oracle import OracleDrafter, OracleStats, follow_reference, refuse_sampled

from specsplit.speculation.drafters import DraftRequest
from specsplit.speculation.eagle.drafter import EagleDrafter, HeadRunner

DRAFT_VOCAB = 32000  # EAGLE-3's published Llama-3.1-8B heads


def aux_layers(num_layers: int) -> tuple[int, int, int]:
    """vLLM's default (2, N/2, N-3); a target too shallow for it (the tiny CPU shape) reads 0, 1, 2."""
    return (2, num_layers // 2, num_layers - 3) if num_layers >= 6 else (0, 1, 2)


def head_config(target_shape: dict) -> dict[str, Any]:
    """config.json of the head: a one-layer Llama of the target's width, plus the EAGLE-3 keys."""
    from specsplit.speculation.eagle.checkpoint import head_config_dict

    shape = {k: v for k, v in target_shape.items() if k != "num_hidden_layers"}
    return head_config_dict(shape, "eagle3", min(DRAFT_VOCAB, shape["vocab_size"]),
                            aux_layers(target_shape["num_hidden_layers"]))


def write_head_config(folder: Path, target_shape: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(head_config(target_shape)))
    return folder


class OracleEagleDrafter(EagleDrafter):
    """The real head's steps; the oracle's tokens (OracleDrafter's plan) proposed and fed."""

    method = "oracle-eagle3"
    # the reference bookkeeping is OracleDrafter's own (its functions use only these attributes)
    set_alpha = OracleDrafter.set_alpha
    set_references = OracleDrafter.set_references
    oracle_block = OracleDrafter.oracle_block
    oracle_top2 = OracleDrafter.oracle_top2
    set_beta = OracleDrafter.set_beta
    _plan = OracleDrafter._plan

    def __init__(self, runner: HeadRunner, alpha: float = 1.0, seed: int = 0) -> None:
        super().__init__(runner)
        self.seed = seed
        self.alpha = 1.0
        self.beta = 0.0  # an EAGLE head drafts ahead only the all-accepted outcome: runner-ups are not used
        self.set_alpha(alpha)
        self.refs: list[list[int]] = []
        self._by_prompt: dict[tuple[int, ...], int] = {}
        self._u: list[np.ndarray] = []
        self._wrong: list[list[int]] = []
        self._ref_of: dict[int, int] = {}
        self._checked: dict[int, int] = {}
        self._plans: dict[int, list[int | None]] = {}  # seq_id -> this request's block plan
        self.stats = OracleStats()

    def _on_open(self, seq_id: int) -> None:
        refuse_sampled(self, seq_id)
        super()._on_open(seq_id)
        follow_reference(self, seq_id)

    def _on_close(self, seq_id: int) -> None:
        super()._on_close(seq_id)
        for d in (self._ref_of, self._checked, self._plans):
            d.pop(seq_id, None)

    def _rollback(self, seq_id: int, valid: int) -> None:
        if seq_id in self._checked:
            self._checked[seq_id] = min(self._checked[seq_id], valid)

    def _run(self, reqs: list[DraftRequest], feed: list[Any]) -> dict[int, Any]:
        for r in reqs:
            self._plans[r.seq_id] = self._plan(r.seq_id, self.sessions[r.seq_id].tokens, r.k)[0]  # no runner-ups
        return super()._run(reqs, feed)

    def _planned(self, reqs: list[DraftRequest], k: int) -> torch.Tensor:
        plans = [self._plans[r.seq_id] for r in reqs]
        return torch.tensor([[-1 if t is None else t for t in p] + [-1] * (k - len(p)) for p in plans],
                            dtype=torch.int64, device=self.device)

    def _pick(self, reqs: list[DraftRequest], step: list[int], toks: list[int]) -> list[int]:
        out = []
        for r, j, t in zip(reqs, step, toks, strict=True):
            planned = self._plans[r.seq_id][j]
            out.append(t if planned is None else planned)  # None: off the reference, the head's own
        return out


def random_eagle3_drafter(target_shape: dict, device: torch.device, dtype: torch.dtype, *, max_model_len: int,
                          kv_cache_bytes: int, seed: int = 0) -> OracleEagleDrafter:
    """The real-size EAGLE-3 head with random weights, behind the oracle."""
    from transformers import LlamaConfig

    from specsplit.runtime.config import ModelConfig
    from specsplit.speculation.eagle.head import EagleHead, HeadConfig

    hcfg_dict = head_config(target_shape)
    mcfg = ModelConfig.from_hf(LlamaConfig(**{k: v for k, v in hcfg_dict.items()
                                              if k not in ("architectures", "model_type", "draft_vocab_size",
                                                           "eagle_aux_hidden_state_layer_ids")}))
    hc = HeadConfig("eagle3", mcfg, target_shape["hidden_size"], hcfg_dict["draft_vocab_size"], False,
                    tuple(hcfg_dict["eagle_aux_hidden_state_layer_ids"]))
    torch.manual_seed(seed)
    head = EagleHead(hc).to(device, dtype)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
        head.d2t.zero_()  # draft id i is target id i
    gen = torch.Generator(device=device).manual_seed(seed + 5)
    embed = torch.randn(target_shape["vocab_size"], target_shape["hidden_size"], generator=gen, device=device,
                        dtype=dtype) * 0.02
    runner = HeadRunner(head.eval(), embed, None, target_shape["vocab_size"], device=device,
                        max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes)
    return OracleEagleDrafter(runner, alpha=1.0, seed=seed)


def time_head(drafter: EagleDrafter, ctx: int, k: int, reps: int) -> dict[str, float]:
    """Server-side ms of proposing k tokens at batch 1 (k head steps), context ~ctx, as a round
    brings them: the states of the one new position, then the head on its own output."""
    from specsplit.sampling.params import SamplingParams

    v, width = drafter.vocab_size, drafter.runner.head.hc.state_size
    dev = drafter.device
    drafter.open(-101, [(7 * i + 3) % v for i in range(ctx)], SamplingParams(temperature=0.0, max_tokens=1))
    dt = drafter.runner.head.fc.weight.dtype
    drafter.propose([DraftRequest(-101, ctx, [], k, torch.randn(ctx - 1, width, dtype=dt))])  # the prefill's states
    one = torch.randn(1, width, dtype=dt)
    req = [DraftRequest(-101, ctx, [], k, one)]
    for _ in range(3):
        drafter.propose(req)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    import time

    t = time.perf_counter()
    for _ in range(reps):
        drafter.propose(req)
    ms = (time.perf_counter() - t) / reps * 1000
    from bench_tiers import after_idle_ms

    idle = after_idle_ms(lambda: drafter.propose(req), dev, reps)
    drafter.close(-101)
    return {f"draft{k}_ms": ms, "draft_token_ms": ms / k, f"draft{k}_after_idle_ms": idle}

