"""Tensor parallelism: N processes, one per device, each holding a shard of the model.

Rank 0 lives in the caller's process (the target service, or `LLM`) and is the only one
that schedules. Every cache operation and forward pass it runs is first sent to the other
ranks as a flat list of int64 words through a shared-memory ring (`ShmBroadcast`: no pickling, no
socket on the step's path), then every rank runs the same step on its shard: column/row-
parallel layers with one all-reduce per attention and per MLP block (NCCL on CUDA, inside
the CUDA graphs; gloo on CPU), logits gathered over the vocabulary. `TensorParallelRunner`
has the ModelRunner interface, so the verifier and the engine do not know whether the model
is sharded.

Exit: `shutdown(timeout_s)` returns within its bound whatever the workers do. Every rank
leaves the collectives together: rank 0 sends STOP through the ring; each rank frees its
CUDA graphs (a live graph holding an NCCL collective makes the communicator's destruction
block forever) and marks itself LEFT; once all are LEFT (a barrier on shared-memory words,
with a deadline) each destroys its process group in a thread with a timeout, workers exit
with `os._exit(0)`, and rank 0 kills whatever is still alive at the bound.

A worker that dies takes rank 0 down with it (exit code 3) rather than letting the next
collective hang: a watchdog thread watches the worker processes. A worker whose rank 0 is
gone exits on its own, and workers ignore SIGINT/SIGTERM: rank 0 owns their lifetime.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
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

from specsplit.runtime.collective_bench import ALL_REDUCE_METHODS, all_reduce_ms, replay_ms
from specsplit.runtime.kv_cache import OutOfKVMemory
from specsplit.runtime.parallel import ParallelContext
from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.runtime.shm_broadcast import ShmBroadcast, Timeout, wait_until

log = logging.getLogger(__name__)
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("SPECSPLIT_TP_TIMEOUT_S", "120")))

# message opcodes (word 0 of every message)
ADD, FREE, TRUNCATE, FORWARD, STOP, ALL_REDUCE_BENCH, REPLAY_BENCH, FORWARD_HIDDEN, FORK, RENAME = range(1, 11)
# per-rank teardown states (ShmBroadcast.states)
LOADING, READY, LEFT, DONE = 0, 1, 2, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_for(rank: int, device_type: str) -> torch.device:
    return torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")


def _init(rank: int, world: int, port: int, device_type: str) -> ParallelContext:
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    return ParallelContext(rank, world, None)


def _load(folder: str | None, random_weights: Any, device: torch.device, ctx: ParallelContext,
          kwargs: dict[str, Any]) -> ModelRunner:
    if random_weights is None:
        return ModelRunner.from_folder(folder, device=device, ctx=ctx, **kwargs)  # type: ignore[arg-type]
    # benchmarks: real shapes, random weights, no checkpoint on disk; every rank its shard
    from specsplit.runtime.random_weights import random_model

    kw = dict(kwargs)
    dtype = kw.pop("dtype", torch.bfloat16)
    rw = random_weights
    cfg, model = random_model(rw.shape, device, dtype if isinstance(dtype, torch.dtype) else torch.bfloat16,
                              seed=rw.seed, std=rw.std, confident=rw.confident, ctx=ctx)
    return ModelRunner.from_model(cfg, model, device=device, **kw)


# ---- messages ----------------------------------------------------------------------------
def encode_forward(inputs: list[StepInput], layers: tuple[int, ...] = ()) -> list[int]:
    """[FORWARD | FORWARD_HIDDEN, n, len(layers), layers..., seq_ids[n], lengths[n], num_logits[n],
    num_hidden[n], token ids...] (int64 words)."""
    msg = [FORWARD_HIDDEN if layers else FORWARD, len(inputs), len(layers), *layers]
    msg += [i.seq_id for i in inputs]
    msg += [len(i.token_ids) for i in inputs]
    msg += [i.num_logits for i in inputs]
    msg += [i.num_hidden for i in inputs]
    for i in inputs:
        msg += i.token_ids
    return msg


def decode_forward(msg: list[int]) -> list[StepInput]:
    return decode_forward_layers(msg)[0]


def decode_forward_layers(msg: list[int]) -> tuple[list[StepInput], tuple[int, ...]]:
    n, nl = msg[1], msg[2]
    layers = tuple(msg[3 : 3 + nl])
    at = 3 + nl
    seq_ids, lens = msg[at : at + n], msg[at + n : at + 2 * n]
    logits, hidden = msg[at + 2 * n : at + 3 * n], msg[at + 3 * n : at + 4 * n]
    out, at = [], at + 4 * n
    for s, ln, nlog, nh in zip(seq_ids, lens, logits, hidden, strict=True):
        out.append(StepInput(s, msg[at : at + ln], nlog, nh))
        at += ln
    return out, layers


# ---- teardown, shared by every rank -------------------------------------------------------
def _release_graphs(runner: ModelRunner | None) -> None:
    graphs = getattr(runner, "graphs", None)
    if graphs is not None:
        graphs.release()


def _in_thread(fn: Callable[[], None], timeout_s: float, name: str) -> bool:
    """Run fn in a daemon thread; True if it finished within timeout_s (it is abandoned otherwise)."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported, the caller moves on either way
            log.warning("%s failed: %s", name, e)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name=f"specsplit-{name}").start()
    return done.wait(max(0.0, timeout_s))


def destroy_group(deadline: float, abort_s: float = 0.5) -> bool:
    """destroy_process_group by `deadline`; else abort the communicators (at most `abort_s` more)."""
    if not dist.is_initialized():
        return True
    if _in_thread(dist.destroy_process_group, deadline - time.monotonic(), "destroy-process-group"):
        return True
    log.warning("destroy_process_group did not return in time; aborting the communicators")
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None:
        _in_thread(abort, abort_s, "abort-process-group")
    return False


def _leave_together(ring: ShmBroadcast, rank: int, deadline: float) -> bool:
    """Mark this rank LEFT (no collective will follow) and wait, bounded, for all the others."""
    ring.states[rank] = LEFT
    try:
        wait_until(lambda: min(ring.states) >= LEFT, deadline, what="every rank to leave the collectives")
        return True
    except Timeout:
        return False


def _bench(fn: Callable[..., float], *args: Any) -> float | None:
    """A measurement that may fail the same way on every rank (an API missing): keep the rank alive."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - rank 0 raises the same error to its caller
        log.warning("measurement %s failed: %r", fn.__name__, e)
        return None


# ---- ranks 1..N-1 --------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, device_type: str, folder: str | None, random_weights: Any,
            kwargs: dict[str, Any], ring_spec: dict, parent_pid: int) -> None:
    """Load the shard, then mirror rank 0's operations until STOP; then leave with the others."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 handles it and stops us in order

    def parent_alive() -> bool:
        return os.getppid() == parent_pid

    def watch_parent() -> None:  # rank 0 killed outright: do not outlive it, even inside a collective
        while parent_alive():
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True, name="specsplit-tp-parent").start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ring = ShmBroadcast(**ring_spec)
    ctx = _init(rank, world, port, device_type)
    device = _device_for(rank, device_type)
    runner = _load(folder, random_weights, device, ctx, kwargs)
    ring.states[rank] = READY
    ops: dict[int, Callable[[list[int]], Any]] = {
        ADD: lambda m: runner.add(m[1]),
        FREE: lambda m: runner.free(m[1]),
        TRUNCATE: lambda m: runner.truncate(m[1], m[2]),
        # every rank's cache is in the same state, so the same forks take the same blocks
        FORK: lambda m: runner.fork([(m[i], m[i + 1], m[i + 2]) for i in range(1, len(m), 3)]),
        RENAME: lambda m: runner.rename(m[1], m[2]),
        FORWARD: lambda m: runner.forward(decode_forward(m)),
        FORWARD_HIDDEN: lambda m: runner.forward_hidden(*decode_forward_layers(m)),
        ALL_REDUCE_BENCH: lambda m: _bench(all_reduce_ms, ctx, device, m[1], m[2], ALL_REDUCE_METHODS[m[3]]),
        REPLAY_BENCH: lambda m: replay_ms(runner, tuple(m[2:]), m[1]),
    }
    while True:
        try:
            msg = ring.recv(rank - 1, alive=parent_alive)
        except Timeout:
            os._exit(0)  # rank 0 is gone
        if msg[0] == STOP:
            break
        try:
            ops[msg[0]](msg)
        except (ValueError, OutOfKVMemory) as e:  # rank 0 hit the same error and changed nothing either
            log.debug("rank %d: %s", rank, e)
        except Exception:  # anything else leaves this rank out of step: die, rank 0's watchdog sees it
            log.exception("tensor-parallel rank %d failed", rank)
            os._exit(1)
    # rank 0's monotonic deadlines (one clock for the whole host)
    barrier_by, destroy_by = msg[1] / 1e9, msg[2] / 1e9
    _release_graphs(runner)
    ok = _leave_together(ring, rank, barrier_by) and destroy_group(destroy_by, abort_s=0.1)
    ring.states[rank] = DONE
    ring.close()
    os._exit(0 if ok else 4)  # no interpreter teardown: nothing left to wait on a communicator


# ---- rank 0 ---------------------------------------------------------------------------------
class TensorParallelRunner:
    """Rank 0 of a tensor-parallel group, with the ModelRunner interface."""

    def __init__(self, folder: str | Path | None, world_size: int, *, device_type: str | None = None,
                 on_worker_death: Callable[[int, int], None] | None = None, random_weights: Any = None,
                 random_shape: dict | None = None, **kwargs: Any) -> None:
        if world_size < 2:
            raise ValueError("TensorParallelRunner needs world_size >= 2 (use ModelRunner for one device)")
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size={world_size} but only {torch.cuda.device_count()} GPUs are visible")
        if random_weights is None and random_shape is not None:
            from specsplit.runtime.random_weights import RandomWeights

            random_weights = RandomWeights(random_shape)
        # NVLink multicast (NVLS) is off on our machines and must stay off; spawned ranks inherit this
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
        self.world_size = world_size
        self.ring = ShmBroadcast(world_size)
        self.teardown: list[tuple[str, float]] = []  # (stage, seconds since shutdown began), for tests and logs
        self._stopped = False
        self._on_death = on_worker_death or _exit_on_worker_death
        port = _free_port()
        ctx = mp.get_context("spawn")
        src = None if folder is None else str(folder)
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, device_type, src, random_weights, kwargs,
                                                          self.ring.spec(), os.getpid()),
                                  daemon=True, name=f"specsplit-tp{r}") for r in range(1, world_size)]
        for p in self.procs:
            p.start()
        self._watch = threading.Thread(target=self._watchdog, daemon=True, name="specsplit-tp-watchdog")
        self._watch.start()
        try:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
            pctx = _init(0, world_size, port, device_type)
            t0 = time.perf_counter()
            self.local = _load(src, random_weights, _device_for(0, device_type), pctx, kwargs)
            self.ring.states[0] = READY
            wait_until(lambda: min(self.ring.states) >= READY, alive=self._workers_alive,
                       what="every rank to load its shard")
        except BaseException:
            self._stopped = True
            self._kill(time.monotonic() + 2.0)
            destroy_group(time.monotonic() + 2.0)
            self.ring.close()
            raise
        log.info("tensor parallel: %d ranks (%s) ready in %.1fs", world_size, device_type, time.perf_counter() - t0)
        self.cfg = self.local.cfg
        self.device = self.local.device
        self.max_model_len = self.local.max_model_len
        self.cache = self.local.cache  # for questions only (block size, free blocks): changes go through
        # the methods here, which every rank mirrors

    def _workers_alive(self) -> bool:
        return all(p.exitcode is None for p in self.procs)

    def _watchdog(self) -> None:
        while not self._stopped:
            for p in self.procs:
                if p.exitcode is not None and not self._stopped:
                    self._on_death(int(p.name.removeprefix("specsplit-tp")), p.exitcode)
                    return
            time.sleep(0.5)

    def _send(self, *words: int) -> None:
        self.ring.send(words, alive=self._workers_alive)

    @property
    def graphs(self) -> Any:
        return self.local.graphs

    def add(self, seq_id: int) -> None:
        self._send(ADD, seq_id)
        self.local.add(seq_id)

    def free(self, seq_id: int) -> None:
        self._send(FREE, seq_id)
        self.local.free(seq_id)

    def truncate(self, seq_id: int, length: int) -> None:
        self._send(TRUNCATE, seq_id, length)
        self.local.truncate(seq_id, length)

    def length(self, seq_id: int) -> int:
        return self.local.length(seq_id)

    def fork(self, forks: list[tuple[int, int, int]]) -> list[int]:
        self._send(FORK, *(x for f in forks for x in f))
        return self.local.fork(forks)

    def rename(self, old: int, new: int) -> None:
        self._send(RENAME, old, new)
        self.local.rename(old, new)

    def forward(self, inputs: list[StepInput], device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ModelRunner.forward on every rank. `device_ids` (a drafter feeding its own picks back)
        come to the host here: the other ranks cannot read rank 0's device."""
        if device_ids is not None:
            if device_ids.shape != (len(inputs),) or any(len(i.token_ids) != 1 for i in inputs):
                raise ValueError("device_ids needs exactly one token per input")
            inputs = [dataclasses.replace(i, token_ids=[t]) for i, t in zip(inputs, device_ids.tolist(), strict=True)]
        # validate on rank 0 first so a bad batch never reaches the workers
        self.local.check(inputs)
        self.ring.send(encode_forward(inputs), alive=self._workers_alive)
        return self.local.forward(inputs)

    def all_reduce_ms(self, numel: int, iters: int = 64, method: str = "nccl") -> float:
        """Measured time of one all-reduce of `numel` elements over the group (benchmarks);
        `method`: one of ALL_REDUCE_METHODS."""
        self._send(ALL_REDUCE_BENCH, numel, iters, ALL_REDUCE_METHODS.index(method))
        return all_reduce_ms(self.local.model.ctx, self.device, numel, iters, method)

    def replay_ms(self, key: tuple[int, ...], n: int = 20) -> float:
        """GPU time of one replay of the CUDA graph `key`, all ranks together (benchmarks)."""
        if self.local.graphs is None or tuple(key) not in self.local.graphs.graphs:
            raise ValueError(f"no captured graph {key}")
        self._send(REPLAY_BENCH, n, *key)
        return replay_ms(self.local, key, n)

    def forward_hidden(self, inputs: list[StepInput], layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` plus hidden states (EAGLE); every rank runs the same step (a CUDA graph where its
        shape allows), rank 0 returns them."""
        self.local.check(inputs)
        self.ring.send(encode_forward(inputs, layers), alive=self._workers_alive)
        return self.local.forward_hidden(inputs, layers)

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Stop every rank within `timeout_s` (never more); True if all left cleanly.

        STOP through the ring -> graphs freed -> barrier (bounded) -> process groups destroyed
        (bounded, in threads) -> workers exit; then kill what is still alive.
        """
        if self._stopped:
            return True
        self._stopped = True
        t0 = time.monotonic()
        deadline = t0 + timeout_s

        def mark(stage: str) -> None:
            self.teardown.append((stage, time.monotonic() - t0))
            log.debug("tensor parallel shutdown: %s at %.2fs", stage, time.monotonic() - t0)

        # the bound, split: barrier by half of it, destroy by 0.8 (with a short abort after it),
        # joins and kills in the rest
        barrier_by, destroy_by = t0 + 0.5 * timeout_s, t0 + 0.8 * timeout_s
        clean = True
        try:
            stop = [STOP, int(barrier_by * 1e9), int(destroy_by * 1e9)]
            self.ring.send(stop, deadline=barrier_by, alive=self._workers_alive)
            mark("stop sent")
        except Timeout:
            clean = False
            mark("stop not delivered")
        _release_graphs(self.local)
        if clean and _leave_together(self.ring, 0, barrier_by):
            mark("all ranks left the collectives")
        else:
            clean = False
            mark("barrier timed out")
            self._kill(barrier_by)  # a stuck rank would hold the others' destroy; it goes first
            mark("stragglers killed")
        destroyed = destroy_group(destroy_by, abort_s=0.1 * timeout_s)
        clean = clean and destroyed
        mark("process group destroyed" if destroyed else "process group abandoned")
        for p in self.procs:
            p.join(max(0.0, deadline - 0.1 * timeout_s - time.monotonic()))
        clean = self._kill(deadline) and clean
        codes = [p.exitcode for p in self.procs]
        clean = clean and codes == [0] * len(codes)
        mark(f"workers exited {codes}")
        self.ring.states[0] = DONE
        self.ring.close()
        log.info("tensor parallel: %s shutdown in %.2fs (worker exit codes %s)", "clean" if clean else "forced",
                 time.monotonic() - t0, codes)
        return clean

    def _kill(self, deadline: float) -> bool:
        """SIGKILL every worker still alive (they ignore SIGTERM); True if none needed it.

        Nothing is lost: the shared memory is rank 0's, and the driver frees a dead process's
        device memory.
        """
        alive = [p for p in self.procs if p.is_alive()]
        for p in alive:
            p.kill()
        for p in alive:
            p.join(max(0.1, deadline - time.monotonic()))
        return not alive


def _exit_on_worker_death(rank: int, code: int) -> None:
    log.critical("tensor-parallel worker %d exited with code %d; exiting so the pod restarts", rank, code)
    os._exit(3)
