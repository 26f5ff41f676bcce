"""Tensor parallelism: N processes, one per device, each holding a shard of the model.

Rank 0 lives in the caller's process (the target service, or `LLM`) and is the only one
that schedules. Every cache operation and forward pass it runs is first broadcast to the
other ranks as a small Python object over a gloo group (the batch description: token ids,
lengths), then every rank runs the same step on its shard: column/row-parallel layers with
one all-reduce per attention and per MLP block (NCCL on CUDA, gloo on CPU), logits
gathered over the vocabulary. `TensorParallelRunner` has the ModelRunner interface, so the
verifier and the engine do not know whether the model is sharded.

A worker that dies takes rank 0 down with it (exit code 3) rather than letting the next
collective hang: a watchdog thread watches the worker processes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from specsplit.runtime.kv_cache import OutOfKVMemory
from specsplit.runtime.parallel import ParallelContext
from specsplit.runtime.runner import ModelRunner, StepInput

log = logging.getLogger(__name__)
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("SPECSPLIT_TP_TIMEOUT_S", "120")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_for(rank: int, device_type: str) -> torch.device:
    return torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")


def _init(rank: int, world: int, port: int, device_type: str) -> tuple[ParallelContext, Any]:
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)  # ops travel on CPU
    return ParallelContext(rank, world, None), control


def _load(folder: str | None, random_shape: dict | None, device: torch.device, ctx: ParallelContext,
          kwargs: dict[str, Any]) -> ModelRunner:
    if random_shape is None:
        return ModelRunner.from_folder(folder, device=device, ctx=ctx, **kwargs)  # type: ignore[arg-type]
    # benchmarks: real shapes, random weights, no checkpoint on disk
    from specsplit.testing import random_model

    kw = dict(kwargs)
    dtype = kw.pop("dtype", torch.bfloat16)
    cfg, model = random_model(random_shape, device, dtype if isinstance(dtype, torch.dtype) else torch.bfloat16,
                              seed=ctx.rank, ctx=ctx)
    return ModelRunner.from_model(cfg, model, device=device, **kw)


def _worker(rank: int, world: int, port: int, device_type: str, folder: str | None, random_shape: dict | None,
            kwargs: dict[str, Any]) -> None:
    """Ranks 1..N-1: load the shard, then mirror rank 0's operations until told to stop."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ctx, control = _init(rank, world, port, device_type)
    runner = _load(folder, random_shape, _device_for(rank, device_type), ctx, kwargs)
    dist.barrier(group=control)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        op, args = box[0]
        if op == "stop":
            break
        try:
            getattr(runner, op)(*args)
        except (ValueError, OutOfKVMemory) as e:  # rank 0 hit the same error and changed nothing either
            log.debug("rank %d: %s", rank, e)
    dist.destroy_process_group()


class TensorParallelRunner:
    """Rank 0 of a tensor-parallel group, with the ModelRunner interface."""

    def __init__(self, folder: str | Path | None, world_size: int, *, device_type: str | None = None,
                 on_worker_death: Callable[[int, int], None] | None = None, random_shape: dict | None = None,
                 **kwargs: Any) -> None:
        if world_size < 2:
            raise ValueError("TensorParallelRunner needs world_size >= 2 (use ModelRunner for one device)")
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size={world_size} but only {torch.cuda.device_count()} GPUs are visible")
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, device_type, None if folder is None else str(folder),
                                                          random_shape, kwargs),
                                  daemon=True, name=f"specsplit-tp{r}") for r in range(1, world_size)]
        for p in self.procs:
            p.start()
        self._on_death = on_worker_death or _exit_on_worker_death
        self._stopped = False
        self._watch = threading.Thread(target=self._watchdog, daemon=True, name="specsplit-tp-watchdog")
        self._watch.start()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        pctx, self._control = _init(0, world_size, port, device_type)
        t0 = time.perf_counter()
        self.local = _load(None if folder is None else str(folder), random_shape, _device_for(0, device_type), pctx,
                           kwargs)
        dist.barrier(group=self._control)
        log.info("tensor parallel: %d ranks (%s) ready in %.1fs", world_size, device_type, time.perf_counter() - t0)
        self.world_size = world_size
        self.cfg = self.local.cfg
        self.device = self.local.device
        self.max_model_len = self.local.max_model_len
        self.cache = self.local.cache

    def _watchdog(self) -> None:
        while not self._stopped:
            for p in self.procs:
                if p.exitcode is not None and not self._stopped:
                    self._on_death(int(p.name.removeprefix("specsplit-tp")), p.exitcode)
                    return
            time.sleep(0.5)

    def _send(self, op: str, *args: Any) -> None:
        dist.broadcast_object_list([(op, args)], src=0, group=self._control)

    def add(self, seq_id: int) -> None:
        self._send("add", seq_id)
        self.local.add(seq_id)

    def free(self, seq_id: int) -> None:
        self._send("free", seq_id)
        self.local.free(seq_id)

    def truncate(self, seq_id: int, length: int) -> None:
        self._send("truncate", seq_id, length)
        self.local.truncate(seq_id, length)

    def length(self, seq_id: int) -> int:
        return self.local.length(seq_id)

    def forward(self, inputs: list[StepInput]) -> torch.Tensor:
        # validate on rank 0 first so a bad batch never reaches the workers
        self.local.check(inputs)
        self._send("forward", inputs)
        return self.local.forward(inputs)

    def forward_hidden(self, inputs: list[StepInput], layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` plus hidden states; every rank runs the same (eager) path, rank 0 returns them."""
        self.local.check(inputs)
        self._send("forward_hidden", inputs, layers)
        return self.local.forward_hidden(inputs, layers)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self._send("stop")
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - workers may already be gone
            pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def _exit_on_worker_death(rank: int, code: int) -> None:
    log.critical("tensor-parallel worker %d exited with code %d; exiting so the pod restarts", rank, code)
    os._exit(3)
