"""One writer, many readers: step messages through a ring of slots in shared memory.

Rank 0 of a tensor-parallel group sends every cache operation and forward pass to the other
ranks of its host. A collective (`broadcast_object_list`) pickles the message and costs two
broadcasts through a socket per step; here the message is a flat list of int64 words written into a
slot of a shared-memory ring, and the readers poll the slot's sequence number. Nothing is
pickled and no system call sits on the path while a reader is spinning.

Layout (all int64): a control block, then `num_slots` slots of `slot_bytes` payload each.
- control: `acks[r]`, the last sequence number reader r has consumed, and `states[rank]`,
  a word per rank that the teardown uses as a barrier (see `TensorParallelRunner.shutdown`).
- slot: `seq` (published last), `nbytes` (negative: more chunks of the same message follow),
  then the payload. Sequence numbers start at 1; slot i holds messages i, i + n, i + 2n...
The writer reuses a slot only once every reader has acknowledged its previous message, so a
reader that stalls holds the writer back after `num_slots` messages, never loses one.

Waits spin (yielding the core) for `spin_s`, then sleep in growing steps, and give up at a
deadline or when a liveness check fails: a reader whose writer died never hangs, and
neither does a writer whose reader stopped answering.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory

_FENCE = threading.Lock()  # acquiring a lock is a full memory barrier on every platform we run on


def _fence() -> None:
    _FENCE.acquire()
    _FENCE.release()


class Timeout(Exception):
    """A bounded wait ran out (or its liveness check failed) before the condition held."""


def wait_until(cond: Callable[[], bool], deadline: float | None = None, alive: Callable[[], bool] | None = None,
               spin_s: float = 0.02, what: str = "condition") -> None:
    """Spin on `cond` for `spin_s`, then sleep-poll; raise Timeout at `deadline` or if not `alive()`."""
    if cond():
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < spin_s:
        if cond():
            return
        os.sched_yield()
    nap = 5e-5
    while not cond():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise Timeout(f"timed out waiting for {what}")
        if alive is not None and not alive():
            raise Timeout(f"gave up waiting for {what}: the other side is gone")
        time.sleep(nap if deadline is None else max(0.0, min(nap, deadline - now)))
        nap = min(nap * 2, 2e-3)


class ShmBroadcast:
    """A shared-memory ring: `send` on rank 0, `recv(reader)` on ranks 1..N-1.

    Words are read and written through a memoryview cast to int64 (a Python int per access,
    no numpy scalar boxing): a small message costs a few microseconds each way.
    """

    def __init__(self, world_size: int, *, num_slots: int = 16, slot_bytes: int = 1 << 16, name: str | None = None,
                 spin_s: float = 0.02) -> None:
        if world_size < 2:
            raise ValueError("a broadcast needs at least one reader")
        self.world_size = world_size
        self.readers = world_size - 1
        self.num_slots = num_slots
        self.slot_words = 2 + slot_bytes // 8  # [seq, nbytes, payload...]
        self.spin_s = spin_s
        self.ctl_words = self.readers + world_size
        size = 8 * (self.ctl_words + num_slots * self.slot_words)
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self.owner, size=0 if name else size)
        self.words = self.shm.buf[:size].cast("q")  # int64 view of the whole segment
        if self.owner:
            self.words[:] = array("q", bytes(size))
        self.acks = self.words[: self.readers]  # [readers] last sequence number each reader consumed
        self.states = self.words[self.readers : self.ctl_words]  # [world_size] one word per rank (teardown barrier)
        self.sent = 0  # writer: last sequence number published
        self.free_upto = num_slots  # writer: sequence numbers up to this one have a free slot
        self.received = 0  # reader: last sequence number consumed

    @property
    def name(self) -> str:
        return self.shm.name

    def spec(self) -> dict:
        """What a reader process needs to attach (picklable)."""
        return {"world_size": self.world_size, "num_slots": self.num_slots,
                "slot_bytes": 8 * (self.slot_words - 2), "name": self.name, "spin_s": self.spin_s}

    def _slot(self, seq: int) -> int:
        """Word offset of the slot that carries message `seq`."""
        return self.ctl_words + ((seq - 1) % self.num_slots) * self.slot_words

    # ---- writer (rank 0) -------------------------------------------------------------------
    def send(self, msg: Sequence[int] | array, deadline: float | None = None,
             alive: Callable[[], bool] | None = None) -> None:
        """Publish an int64 message to every reader; waits (bounded by `deadline`) for free slots."""
        payload = msg if isinstance(msg, array) else array("q", msg)  # [words]
        cap, w = self.slot_words - 2, self.words
        chunks = max(1, -(-len(payload) // cap))
        for c in range(chunks):
            part = payload[c * cap : (c + 1) * cap]
            seq = self.sent + 1
            if seq > self.free_upto:  # every reader must have consumed this slot's previous message
                wait_until(lambda seq=seq: min(self.acks) + self.num_slots >= seq, deadline, alive, self.spin_s,
                           "the readers to free a slot")
                self.free_upto = min(self.acks) + self.num_slots
            at = self._slot(seq)
            w[at + 2 : at + 2 + len(part)] = part
            w[at + 1] = -len(part) if c < chunks - 1 else len(part)
            _fence()
            w[at] = seq  # published: readers poll this word
            self.sent = seq

    # ---- readers (ranks 1..N-1) ------------------------------------------------------------
    def recv(self, reader: int, deadline: float | None = None, alive: Callable[[], bool] | None = None) -> list[int]:
        """The next message for reader `reader` (0-based: rank - 1)."""
        out: list[int] = []
        w = self.words
        while True:
            seq = self.received + 1
            at = self._slot(seq)
            if w[at] != seq:
                wait_until(lambda at=at, seq=seq: w[at] == seq, deadline, alive, self.spin_s, "the next message")
            _fence()
            n = w[at + 1]
            out += w[at + 2 : at + 2 + abs(n)].tolist()
            _fence()
            self.received = seq
            self.acks[reader] = seq
            if n >= 0:
                return out

    def close(self) -> None:
        """Detach; the owner (rank 0) also removes the segment."""
        for view in (self.acks, self.states, self.words):
            view.release()
        try:
            self.shm.close()
        except BufferError:  # a view still exported somewhere: the mapping goes with the process
            return
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
