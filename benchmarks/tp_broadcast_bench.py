"""What the shared-memory ring saves per tensor-parallel step against `broadcast_object_list`.

Rank 0 sends the same step messages both ways, in alternating blocks, in one run: pickled
(op, [StepInput]) tuples through `broadcast_object_list` over gloo (how steps travelled
before), and int64 messages through `ShmBroadcast`. Each message carries its send time, so
the readers measure the one-way latency up to the decoded StepInputs (what delays a worker's
launch, and so every all-reduce of the step), and rank 0 measures what the send costs it.
Rank 0 sends a message only once every reader has decoded the previous one (no queueing in
the figures), then busy-waits `--gap-us`, standing in for the step's own work.

    python benchmarks/tp_broadcast_bench.py --world 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from specsplit.runtime.runner import StepInput
from specsplit.runtime.shm_broadcast import ShmBroadcast
from specsplit.runtime.tensor_parallel import FORWARD, decode_forward, encode_forward

CASES = {  # name -> step inputs
    "decode_b1": [StepInput(0, [1234])],
    "verify6_b32": [StepInput(s, list(range(1000 + s, 1006 + s)), 6) for s in range(32)],
    "prefill_2048": [StepInput(0, list(range(2048)))],
}


def _spin(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


def _run(rank: int, world: int, port: int, spec: dict, iters: int, blocks: int, gap_us: float, q: mp.Queue,
         writer: ShmBroadcast | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ring = ShmBroadcast(**spec) if rank else writer
    assert ring is not None
    lat: dict[str, list[float]] = {}
    send: dict[str, list[float]] = {}
    done = 0  # messages this rank has decoded (readers publish it in ring.states[rank])
    for _ in range(blocks):
        for case, inputs in CASES.items():
            for how in ("object_list", "shm"):
                key = f"{case}/{how}"
                dist.barrier()
                for _ in range(iters):
                    done += 1
                    if rank == 0:
                        # no queueing: every reader has decoded the previous message (not timed)
                        while min(ring.states[1:]) < done - 1:
                            pass
                        _spin(gap_us)
                        t = time.perf_counter()
                        if how == "object_list":
                            dist.broadcast_object_list([("forward", (inputs,), t)], src=0)
                        else:
                            ring.send([*encode_forward(inputs), int(t * 1e9)])
                        send.setdefault(key, []).append(time.perf_counter() - t)
                        continue
                    if how == "object_list":
                        box: list = [None]
                        dist.broadcast_object_list(box, src=0)
                        _op, (got,), t = box[0]
                    else:
                        m = ring.recv(rank - 1)
                        got, t = decode_forward(m[:-1]), m[-1] / 1e9
                        assert m[0] == FORWARD
                    lat.setdefault(key, []).append(time.perf_counter() - t)
                    assert len(got) == len(inputs)
                    ring.states[rank] = done
    dist.barrier()
    q.put((rank, lat, send))
    dist.destroy_process_group()
    if rank:
        ring.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200, help="messages per case and method, per block")
    ap.add_argument("--blocks", type=int, default=3, help="alternating blocks of both methods")
    ap.add_argument("--gap-us", type=float, default=500.0, help="rank 0's busy work between messages")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args()
    spec_ring = ShmBroadcast(a.world, slot_bytes=1 << 16)
    from specsplit.runtime.tensor_parallel import _free_port

    port = _free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(r, a.world, port, spec_ring.spec(), a.iters, a.blocks, a.gap_us, q))
             for r in range(1, a.world)]
    for p in procs:
        p.start()
    _run(0, a.world, port, spec_ring.spec(), a.iters, a.blocks, a.gap_us, q, writer=spec_ring)
    results = {r: (lat, send) for r, lat, send in (q.get(timeout=120) for _ in range(a.world))}
    for p in procs:
        p.join(30)
    spec_ring.close()
    res: dict = {"benchmark": "tp_broadcast_bench", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": f"{os.cpu_count()} CPUs", "torch": torch.__version__, "command": " ".join(sys.argv),
                 "world": a.world, "gap_us": a.gap_us, "cases": {}}
    for case in CASES:
        row = {}
        for how in ("object_list", "shm"):
            key = f"{case}/{how}"
            lat = [x for r in range(1, a.world) for x in results[r][0][key]]
            row[how] = {"latency_us_p50": float(np.median(lat)) * 1e6, "latency_us_p90": float(np.quantile(lat, 0.9)) * 1e6,
                        "rank0_send_us_p50": float(np.median(results[0][1][key])) * 1e6}
        row["latency_ratio_object_list_over_shm"] = row["object_list"]["latency_us_p50"] / row["shm"]["latency_us_p50"]
        row["saved_us_per_step"] = row["object_list"]["latency_us_p50"] - row["shm"]["latency_us_p50"]
        res["cases"][case] = row
        print(f"{case:14s} object_list p50 {row['object_list']['latency_us_p50']:8.1f} us "
              f"(rank 0 send {row['object_list']['rank0_send_us_p50']:7.1f})   shm p50 {row['shm']['latency_us_p50']:7.1f} us "
              f"(rank 0 send {row['shm']['rank0_send_us_p50']:6.1f})   ratio {row['latency_ratio_object_list_over_shm']:5.1f}x")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = out / f"tp_broadcast_{res['date'].replace(':', '').replace('+0000', 'Z')}.json"
    name.write_text(json.dumps(res, indent=2))
    print(f"wrote {name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
