"""Where the draft tier's time goes when it serves one EAGLE-3 round (batch 1, real head size).

The served EAGLE round spends longer in the draft tier than the head's CUDA graph takes. This
runs the draft tier's own propose path in one process, round after round as a served session
sees it (states of the accepted positions arrive as wire bytes, the session rolls back to the
accepted prefix and appends the target's token), and reports:
  - the graph replay alone (the head block, as `gpu_eagle_head.py` times it);
  - the whole propose: bytes -> tensor, session bookkeeping, projection, graph, ids to the host;
  - a cProfile of the propose loop (host functions by own time), to name what is left.

    python3 benchmarks/gpu_eagle_propose.py [--rounds 300] [-k 5] [--accepted 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--accepted", type=int, default=3, help="draft tokens accepted per round (states = accepted + 1)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="a tiny target shape (CPU smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from oracle_eagle import random_eagle3_drafter

    from specsplit.runtime.random_weights import LLAMA_31_8B
    from specsplit.sampling.params import SamplingParams
    from specsplit.speculation.drafters import DraftRequest
    from specsplit.speculation.eagle.drafter import EagleDrafter
    from specsplit.speculation.eagle.wire import pack_states, unpack_states

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    tiny = dict(LLAMA_31_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2)
    shape = tiny if args.tiny or not cuda else LLAMA_31_8B
    oracle = random_eagle3_drafter(shape, dev, dt, max_model_len=4096, kv_cache_bytes=512 << 20)
    drafter = EagleDrafter(oracle.runner)  # the head's own choices: no oracle bookkeeping in the profile
    width, v, k, a = drafter.runner.head.hc.state_size, drafter.vocab_size, args.k, args.accepted
    prompt = [(7 * i + 3) % v for i in range(args.context)]
    wire = pack_states(torch.randn(a + 1, width))  # one round's states as they cross the wire

    def cycle() -> float:
        """One session from its prompt through `rounds` rounds, each a served round's propose;
        returns the rounds' seconds (the prompt's own propose is not a round)."""
        drafter.open(1, prompt, SamplingParams(temperature=0.0, max_tokens=1))
        drafter.propose([DraftRequest(1, args.context, [], k, torch.randn(args.context - 1, width).to(torch.bfloat16))])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            s = drafter.sessions[1]
            prefix = len(s.tokens) - k + a  # a of the last k drafts accepted, then the target's own token
            drafter.propose([DraftRequest(1, prefix, [(prefix * 13) % v], k, unpack_states(wire, width))])
        dt = time.perf_counter() - t0
        drafter.close(1)
        return dt

    cycle()  # captures the graphs of every shape the timed cycles meet
    propose_ms = cycle() / args.rounds * 1e3
    prof = cProfile.Profile()
    prof.enable()
    cycle()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    rec = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "k": k, "accepted": a,
           "propose_ms": propose_ms, "propose_per_token_ms": propose_ms / k}
    chain = drafter.runner.chain
    if chain is not None and chain.graphs:  # the replay alone, for the same block shape
        graph = next(iter(chain.graphs.values())).graph  # the first step's graph
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        rec["graph_replay_ms"] = start.elapsed_time(end) / 100
        rec["host_ms"] = propose_ms - rec["graph_replay_ms"]
        rec["graphs"] = len(chain.graphs)
    print(json.dumps(rec, indent=2))
    print(text.getvalue())
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%MZ", time.gmtime())
        (args.out / f"gpu_eagle_propose_{stamp}.json").write_text(json.dumps({**rec, "profile": text.getvalue()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
