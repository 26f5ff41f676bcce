"""The shared-memory ring that carries tensor-parallel step messages: order, size, bounds."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from specsplit.runtime.runner import StepInput
from specsplit.runtime.shm_broadcast import ShmBroadcast, Timeout
from specsplit.runtime.tensor_parallel import decode_forward, encode_forward


def _read_all(spec: dict, reader: int, n: int, out: mp.Queue) -> None:
    ring = ShmBroadcast(**spec)
    got = [ring.recv(reader, deadline=time.monotonic() + 60) for _ in range(n)]
    out.put((reader, got))
    ring.close()


def test_every_reader_process_gets_every_message_in_order_across_wraparound_and_chunking() -> None:
    ring = ShmBroadcast(3, num_slots=4, slot_bytes=64)  # 8 words a slot: most messages span slots
    msgs = [list(range(i, i + (i * 7) % 40 + 1)) for i in range(30)]  # 1..40 words
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_read_all, args=(ring.spec(), r, len(msgs), out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for m in msgs:
            ring.send(m, deadline=time.monotonic() + 60)
        results = dict(out.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
        ring.close()
    want = msgs
    assert results[0] == want and results[1] == want


def test_writer_waits_for_a_slow_reader_instead_of_overwriting() -> None:
    ring = ShmBroadcast(2, num_slots=2, slot_bytes=64)
    reader = ShmBroadcast(**ring.spec())
    ring.send([1])
    ring.send([2])
    with pytest.raises(Timeout):  # both slots hold unread messages
        ring.send([3], deadline=time.monotonic() + 0.2)
    assert reader.recv(0) == [1]
    ring.send([3], deadline=time.monotonic() + 5)  # the freed slot is reused
    assert [reader.recv(0) for _ in range(2)] == [[2], [3]]
    reader.close()
    ring.close()


def test_reader_gives_up_when_its_writer_is_gone_or_the_deadline_passes() -> None:
    ring = ShmBroadcast(2)
    reader = ShmBroadcast(**ring.spec())
    t = time.monotonic()
    with pytest.raises(Timeout, match="gone"):
        reader.recv(0, alive=lambda: time.monotonic() - t < 0.2)
    with pytest.raises(Timeout, match="timed out"):
        reader.recv(0, deadline=time.monotonic() + 0.1)
    assert time.monotonic() - t < 5
    reader.close()
    ring.close()


def test_a_message_sent_while_the_reader_waits_wakes_it() -> None:
    ring = ShmBroadcast(2, spin_s=0.0)  # straight to the sleeping poll
    reader = ShmBroadcast(**ring.spec())
    got: list[list[int]] = []
    th = threading.Thread(target=lambda: got.append(reader.recv(0, deadline=time.monotonic() + 10)))
    th.start()
    time.sleep(0.2)
    ring.send([7, 8, 9])
    th.join(10)
    assert got == [[7, 8, 9]]
    reader.close()
    ring.close()


def test_forward_message_round_trips_ragged_inputs() -> None:
    inputs = [StepInput(3, [5, 6, 7], 2), StepInput(-1, [1], 1), StepInput(2**40, list(range(100)), 100)]
    back = decode_forward(encode_forward(inputs))
    assert back == inputs
