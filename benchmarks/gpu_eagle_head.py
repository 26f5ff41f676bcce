"""GPU: an EAGLE-3 head of the real size against its Llama-3.1-8B-shaped target (random weights, bf16).

Measures, on one GPU, in one run:
  - the target's 1-token decode step (CUDA graphs, as served) and a 6-token verify step;
  - the same verify step returning the three hidden layers EAGLE-3 reads (eager today);
  - the head's cost per drafted token: one head step (1 entry) + its LM head over the
    32,000-token draft vocabulary, batch 1, eagerly; and a greedy block of k as the draft tier
    drafts it (all k steps in one CUDA graph replay), per token.
Goal (issue 11): head per drafted token / target 1-token step <= 0.10.

    python3 benchmarks/gpu_eagle_head.py [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("-k", type=int, default=5, help="block length of the chained head steps")
    args = ap.parse_args()
    from transformers import LlamaConfig

    from specsplit.runtime.config import ModelConfig
    from specsplit.runtime.random_weights import LLAMA_31_8B, random_model
    from specsplit.runtime.runner import ModelRunner, StepInput
    from specsplit.speculation.eagle.drafter import HeadRunner
    from specsplit.speculation.eagle.head import EagleHead, HeadConfig

    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg, model = random_model(LLAMA_31_8B, dev, dt)
    target = ModelRunner.from_model(cfg, model, device=dev, max_model_len=4096, kv_cache_bytes=2 << 30)
    target.add(0)
    target.forward([StepInput(0, list(range(1, 513)))])
    n = cfg.num_layers
    layers = (2, n // 2, n - 3)

    def step1() -> None:
        target.forward([StepInput(0, [7])])
        target.truncate(0, 512)

    def verify6() -> None:
        target.forward([StepInput(0, [7] * 6, 6)])
        target.truncate(0, 512)

    def verify6_hidden() -> None:
        target.forward_hidden([StepInput(0, [7] * 6, 6, 6)], layers)
        target.truncate(0, 512)

    t_step, t_verify, t_verify_h = timed(step1, args.iters), timed(verify6, args.iters), timed(verify6_hidden, args.iters)
    hcfg = ModelConfig.from_hf(LlamaConfig(**{**LLAMA_31_8B, "num_hidden_layers": 1}))
    head = EagleHead(HeadConfig("eagle3", hcfg, 4096, 32000, False)).to(dev, dt)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, device=dev, dtype=dt) * 0.02
    runner = HeadRunner(head, embed, None, cfg.vocab_size, device=dev, max_model_len=4096)
    runner.cache.add(0)
    runner.step([0], [list(range(1, 513))], torch.randn(512, 4096, device=dev, dtype=dt), [0])
    state = torch.randn(1, 4096, device=dev, dtype=dt)

    def head_token() -> None:
        out = runner.step([0], [[7]], state, [0])
        runner.logits(out).argmax(-1)
        runner.cache.truncate(0, 512)

    t_head = timed(head_token, args.iters)
    k = args.k  # a greedy block as the draft tier drafts it: every step in one CUDA graph replay
    assert runner.chain is not None
    proj = torch.randn(1, 4096, device=dev, dtype=dt)  # one new token's projected target state

    def head_block() -> None:
        got = runner.chain.run([0], [[7]], proj, [0], k)  # type: ignore[union-attr]
        assert got is not None
        got[0].tolist()  # the block reaches the host, as a proposal does
        runner.cache.truncate(0, 512)

    t_block = timed(head_block, args.iters)
    rec_block = {"head_block_ms": t_block, "head_block_k": k, "head_block_per_token_ms": t_block / k,
                 "head_block_per_token_over_target_step": t_block / k / t_step}
    rec = {**rec_block, "target_step_ms": t_step, "target_verify6_ms": t_verify, "target_verify6_with_3_hidden_layers_ms": t_verify_h,
           "head_per_drafted_token_ms": t_head, "head_over_target_step": t_head / t_step,
           "goal": "head_over_target_step <= 0.10", "device": torch.cuda.get_device_name(dev)}
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
