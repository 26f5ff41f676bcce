"""The paged KV cache's block accounting, and the runner's all-or-nothing forward."""

import pytest
import torch

from specsplit.runtime.kv_cache import OutOfKVMemory, PagedKVCache
from specsplit.runtime.runner import ModelRunner, StepInput


def _cache(num_blocks: int = 8, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(2, num_blocks, block_size, 2, 8, torch.float32, torch.device("cpu"))


def _state(cache: PagedKVCache) -> tuple:
    return (sorted(cache._free), {s: (list(b.blocks), b.length) for s, b in cache.seqs.items()})


def test_layer_tensors_have_paged_shape():
    cache = _cache(num_blocks=5, block_size=3)
    assert len(cache.layers) == 2
    for k, v in cache.layers:
        assert k.shape == v.shape == (5, 3, 2, 8)
    assert PagedKVCache.bytes_per_block(2, 3, 2, 8, torch.float32) == 2 * 2 * 3 * 2 * 8 * 4


def test_reserve_allocates_ceil_of_length_over_block_size():
    cache = _cache(block_size=4)
    cache.add(0)
    cache.reserve(0, 1)
    assert len(cache.seqs[0].blocks) == 1
    cache.reserve(0, 4)  # still fits the first block
    assert len(cache.seqs[0].blocks) == 1
    cache.reserve(0, 9)
    assert len(cache.seqs[0].blocks) == 3
    assert cache.num_free_blocks == 5
    assert cache.usage == pytest.approx(3 / 8)


def test_sequences_get_distinct_blocks():
    cache = _cache()
    for s in range(3):
        cache.add(s)
        cache.reserve(s, 8)
    blocks = [b for s in range(3) for b in cache.seqs[s].blocks]
    assert len(blocks) == len(set(blocks)) == 6


def test_truncate_frees_blocks_past_new_end():
    cache = _cache(block_size=4)
    cache.add(0)
    cache.reserve(0, 12)
    cache.seqs[0].length = 12
    first = list(cache.seqs[0].blocks)
    cache.truncate(0, 5)  # positions 0..4 live in blocks 0 and 1
    assert cache.seqs[0].blocks == first[:2]
    assert cache.seqs[0].length == 5
    assert cache.num_free_blocks == 6
    cache.truncate(0, 4)  # exactly one full block
    assert cache.seqs[0].blocks == first[:1]
    cache.truncate(0, 0)
    assert cache.seqs[0].blocks == [] and cache.num_free_blocks == 8


def test_truncate_past_length_rejected():
    cache = _cache()
    cache.add(0)
    cache.reserve(0, 3)
    cache.seqs[0].length = 3
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(0, 4)


def test_freed_blocks_are_reused():
    cache = _cache(num_blocks=2, block_size=4)
    cache.add(0)
    cache.reserve(0, 8)
    cache.free(0)
    assert cache.num_free_blocks == 2 and 0 not in cache.seqs
    cache.add(1)
    cache.reserve(1, 8)
    assert sorted(cache.seqs[1].blocks) == [0, 1]
    cache.free(99)  # unknown: no-op


def test_out_of_memory_leaves_no_side_effects():
    cache = _cache(num_blocks=4, block_size=4)
    cache.add(0)
    cache.reserve(0, 8)
    before = _state(cache)
    with pytest.raises(OutOfKVMemory, match="need 3 blocks, 2 of 4 free"):
        cache.reserve(0, 20)
    assert _state(cache) == before
    assert cache.can_fit({0: 16}) and not cache.can_fit({0: 17})


def test_add_twice_and_empty_pool_rejected():
    cache = _cache()
    cache.add(0)
    with pytest.raises(ValueError, match="already has a cache"):
        cache.add(0)
    with pytest.raises(ValueError, match="at least one block"):
        _cache(num_blocks=0)


def test_runner_forward_out_of_memory_changes_nothing(tiny_target):
    runner = ModelRunner.from_folder(tiny_target, block_size=4, max_model_len=16, kv_cache_bytes=0)
    assert runner.cache.num_blocks == 4  # the floor: one sequence of max_model_len
    runner.add(0)
    runner.add(1)
    runner.forward([StepInput(0, [1, 2, 3, 4, 5, 6])])  # 2 blocks
    before = _state(runner.cache)
    # sequence 1 alone would fit, but not together with sequence 0's growth
    with pytest.raises(OutOfKVMemory):
        runner.forward([StepInput(0, [7, 8, 9]), StepInput(1, [1, 2, 3, 4, 5])])
    assert _state(runner.cache) == before
    logits = runner.forward([StepInput(1, [1, 2, 3, 4, 5])])  # and the runner still works
    assert logits.shape == (1, runner.cfg.vocab_size)


def test_runner_rejects_bad_step_inputs(tiny_target):
    runner = ModelRunner.from_folder(tiny_target, block_size=4, max_model_len=16, kv_cache_bytes=1 << 20)
    runner.add(0)
    with pytest.raises(ValueError, match="bad step input"):
        runner.forward([StepInput(0, [])])
    with pytest.raises(ValueError, match="bad step input"):
        runner.forward([StepInput(0, [1, 2], num_logits=3)])
    with pytest.raises(ValueError, match="max_model_len"):
        runner.forward([StepInput(0, list(range(17)))])
    assert runner.length(0) == 0


# --- forks (the draft's tree of guesses) -------------------------------------------------------


def _filled(cache: PagedKVCache, seq_id: int, length: int) -> None:
    """A sequence of `length` tokens whose K rows hold their position (to see what is shared)."""
    cache.add(seq_id)
    cache.reserve(seq_id, length)
    cache.seqs[seq_id].length = length
    bs = cache.block_size
    for pos in range(length):
        for k, _ in cache.layers:
            k[cache.seqs[seq_id].blocks[pos // bs], pos % bs] = float(pos)


def _row(cache: PagedKVCache, seq_id: int, pos: int) -> float:
    bs = cache.block_size
    return float(cache.layers[0][0][cache.seqs[seq_id].blocks[pos // bs], pos % bs, 0, 0])


def test_fork_borrows_full_blocks_and_copies_the_partial_one():
    cache = _cache(num_blocks=8, block_size=4)
    _filled(cache, 0, 10)  # blocks: [0..3] [4..7] [8, 9]
    free = cache.num_free_blocks
    assert cache.fork([(0, 1, 6)]) == [1]
    parent, child = cache.seqs[0].blocks, cache.seqs[1].blocks
    assert child[0] == parent[0]  # borrowed
    assert child[1] != parent[1]  # positions 4, 5 live in a copy
    assert cache.num_free_blocks == free - 1
    assert [_row(cache, 1, p) for p in range(6)] == [0, 1, 2, 3, 4, 5]


def test_freeing_a_fork_never_frees_borrowed_blocks():
    cache = _cache(num_blocks=8, block_size=4)
    _filled(cache, 0, 8)
    before = _state(cache)
    cache.fork([(0, 1, 8), (0, 2, 5)])
    cache.free(1)
    cache.truncate(2, 0)
    cache.free(2)
    assert _state(cache) == before
    cache.free(0)
    assert cache.num_free_blocks == 8


def test_parent_freed_first_leaves_the_fork_its_blocks():
    cache = _cache(num_blocks=8, block_size=4)
    _filled(cache, 0, 8)
    cache.fork([(0, 1, 8)])
    cache.free(0)
    assert cache.num_free_blocks == 6  # the fork still holds both
    assert [_row(cache, 1, p) for p in range(8)] == list(range(8))
    cache.free(1)
    assert cache.num_free_blocks == 8


def test_write_into_a_shared_block_is_copied_first():
    cache = _cache(num_blocks=8, block_size=4)
    _filled(cache, 0, 8)
    cache.fork([(0, 1, 8)])
    cache.truncate(0, 6)  # the parent rolls back into a block its fork still reads
    shared = cache.seqs[0].blocks[1]
    assert cache.blocks_needed(0, 7) == 1  # the copy
    cache.reserve(0, 7)
    assert cache.seqs[0].blocks[1] != shared and cache.seqs[1].blocks[1] == shared
    assert _row(cache, 0, 5) == 5.0  # the copy holds what was there


def test_fork_without_a_free_block_is_skipped():
    cache = _cache(num_blocks=3, block_size=4)
    _filled(cache, 0, 10)  # all three blocks
    assert cache.fork([(0, 1, 6), (0, 2, 8)]) == [2]  # 6 needs a copy; 8 only borrows
    assert 1 not in cache.seqs


def test_rename_hands_a_fork_the_parents_id():
    cache = _cache(num_blocks=8, block_size=4)
    _filled(cache, 0, 6)
    cache.fork([(0, 1, 5)])
    cache.free(0)
    cache.rename(1, 0)
    assert cache.seqs[0].length == 5 and 1 not in cache.seqs
    cache.free(0)
    assert cache.num_free_blocks == 8
    with pytest.raises(ValueError):
        _filled(cache, 2, 4)
        cache.fork([(2, 2, 4)])
