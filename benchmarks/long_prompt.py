"""Time prompts up to the context limit through a running gateway, with a short round going on.

    specsplit up smollm2-135m &                       # or any gateway
    python benchmarks/long_prompt.py --address 127.0.0.1:50051 --lengths 4001 8001

Each long prompt (token ids, so its length is exact) asks for a few tokens; meanwhile a short
request streams, to show other sessions' rounds go on during a long prefill (its longest gap
between tokens is printed). A long prompt must succeed whatever its length up to the limit.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import grpc

from specsplit.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def _params(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _short_stream(stub: gateway_pb2_grpc.GatewayStub, stop: threading.Event, gaps: list[float]) -> None:
    """Stream short requests until `stop`, recording the gaps between received messages."""
    while not stop.is_set():
        last = time.perf_counter()
        for _ in stub.Generate(gateway_pb2.GenerateRequest(text="def add(a, b):", params=_params(32)), timeout=600):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--address", default="127.0.0.1:50051")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4001, 8001])
    ap.add_argument("--max-tokens", type=int, default=8)
    a = ap.parse_args()
    with grpc.insecure_channel(a.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        vocab_hi = 1000  # ordinary ids of any of our models' vocabularies
        for n in a.lengths:
            ids = [(7 * i + 13) % (vocab_hi - 100) + 100 for i in range(n)]
            stop, gaps = threading.Event(), []
            side = threading.Thread(target=_short_stream, args=(stub, stop, gaps), daemon=True)
            side.start()
            t0 = time.perf_counter()
            try:
                r = stub.GenerateUnary(gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=ids),
                                                                   params=_params(a.max_tokens)), timeout=3600)
                outcome = {"completion_tokens": r.usage.completion_tokens, "ok": True}
            except grpc.RpcError as e:
                outcome = {"ok": False, "error": f"{e.code().name}: {e.details()}"}
            dt = time.perf_counter() - t0
            stop.set()
            side.join(600)
            print(json.dumps({"prompt_tokens": n, "seconds": round(dt, 1), **outcome,
                              "short_request_messages": len(gaps),
                              "short_request_max_gap_s": round(max(gaps), 2) if gaps else None}), flush=True)


if __name__ == "__main__":
    main()
