"""StepBatch: the plain-Python build of small steps equals the numpy one; a chained block's later
steps, patched from the first, equal built ones."""

from __future__ import annotations

import numpy as np
import pytest

from specsplit.runtime import attention
from specsplit.runtime.attention import StepBatch


@pytest.mark.parametrize("dense", [True, False])
def test_advanced_step_equals_a_step_built_from_scratch(dense: bool) -> None:
    bs, pad = 4, 32
    tables = [[3, 7, 1, 9, 2], [5, 6, 8], [], []]  # two real sequences, two padding rows of the batch bucket
    lens = [13, 6]

    def built(d: int) -> StepBatch:
        batch = StepBatch.build([0] * 4, [1] * 4, [n + 1 + d for n in lens] + [1, 1], tables, bs, pad, dense=dense,
                                write_lens=[1, 1, 0, 0], scratch_slot=99)
        batch.packed[4:6] += np.array([100, 200])  # positions offset (an EAGLE head's cache base)
        return batch

    first = built(0)
    for d in range(1, 5):
        want, got = built(d), first.advanced(d, 2)
        assert got.shapes == want.shapes and got.key == want.key
        np.testing.assert_array_equal(got.packed, want.packed)
    np.testing.assert_array_equal(first.packed, built(0).packed)  # the first step is left as it was


def test_advancing_a_multi_token_step_is_refused() -> None:
    batch = StepBatch.build([1, 2, 3], [3], [3], [[0]], 4)
    with pytest.raises(ValueError, match="one token per sequence"):
        batch.advanced(1, 1)


@pytest.mark.parametrize("seed", range(20))
def test_small_steps_are_built_as_the_array_builder_builds_them(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ragged queries (0 tokens included), padding tokens, contexts past the block tables, padded contexts."""
    rng = np.random.default_rng(seed)
    bs = int(rng.choice([1, 4, 16]))
    b = int(rng.integers(1, 6))
    q = [int(x) for x in rng.integers(0 if b > 1 else 1, 8, size=b)]
    q[0] = max(q[0], 1)
    s = [n + int(rng.integers(0, 40)) for n in q]
    tables = [[int(x) for x in rng.integers(0, 100, size=int(rng.integers(0, -(-n // bs) + 1)))] for n in s]
    write = [int(rng.integers(0, n + 1)) for n in q] if seed % 2 else None
    pad = int(rng.choice([0, 64]))
    args = ([int(x) for x in rng.integers(0, 500, size=sum(q))], q, s, tables, bs, pad or None)
    small = StepBatch.build(*args, write_lens=write, scratch_slot=7)
    monkeypatch.setattr(attention, "SMALL_STEP_SEQS", 0)  # every step through numpy
    arrays = StepBatch.build(*args, write_lens=write, scratch_slot=7)
    assert small.shapes == arrays.shapes and small.key == arrays.key
    np.testing.assert_array_equal(small.packed, arrays.packed)
    for name, shape in small.shapes:
        assert small.field(name).shape == shape
