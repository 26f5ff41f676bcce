"""StepBatch.advanced: a chained block's later steps, patched from the first, equal built ones."""

from __future__ import annotations

import numpy as np
import pytest

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
