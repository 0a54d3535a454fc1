"""BlockManager: the driver-side bookkeeping of which KV-cache block belongs to which sequence."""

from __future__ import annotations

import pytest

from plait.engine.kv_cache import BlockManager, blocks_needed


def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 4) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]
    assert blocks_needed(16, 16) == 1 and blocks_needed(17, 16) == 2


def test_fresh_manager_is_all_free():
    bm = BlockManager(8, 4)
    assert bm.num_free == 8 and bm.usage() == 0.0
    assert bm.table(123) == []
    bm.check_invariants()


def test_grow_hands_out_low_ids_first_and_only_what_is_needed():
    bm = BlockManager(10, 4)
    assert bm.grow(1, 5) == [0, 1]  # 5 tokens -> 2 blocks
    assert bm.grow(2, 4) == [2]
    assert bm.grow(1, 8) == [0, 1]  # still 2 blocks: nothing new
    assert bm.grow(1, 9) == [0, 1, 3]  # the table only ever grows at its end, prefix kept
    assert bm.table(1) == [0, 1, 3] and bm.table(2) == [2]
    assert bm.num_free == 6
    assert bm.usage() == pytest.approx(0.4)
    bm.check_invariants()


def test_grow_to_fewer_tokens_never_shrinks():
    bm = BlockManager(4, 4)
    bm.grow(7, 12)
    assert bm.grow(7, 1) == [0, 1, 2]
    assert bm.num_free == 1
    bm.check_invariants()


def test_grow_takes_only_the_missing_blocks_or_none():
    bm = BlockManager(4, 4)
    assert bm.grow(1, 17) is None and bm.num_free == 4  # needs 5
    assert bm.grow(1, 6) == [0, 1]  # 2 blocks, 2 free
    assert bm.grow(1, 17) is None and bm.table(1) == [0, 1] and bm.num_free == 2  # needs 3 more: nothing taken
    assert bm.grow(2, 9) is None and bm.grow(2, 8) == [2, 3]
    assert bm.num_free == 0
    assert bm.grow(1, 8) == [0, 1]  # already covered: needs nothing
    assert bm.grow(1, 9) is None and bm.grow(3, 1) is None and bm.grow(3, 0) == []
    bm.check_invariants()


def test_release_frees_everything_and_reuses_low_ids():
    bm = BlockManager(6, 2)
    bm.grow(1, 4)  # [0, 1]
    bm.grow(2, 4)  # [2, 3]
    bm.grow(3, 2)  # [4]
    bm.release(2)
    assert bm.num_free == 3 and bm.table(2) == [] and 2 not in bm.tables
    bm.check_invariants()
    assert bm.grow(4, 6) == [2, 3, 5]  # freed blocks come back lowest first
    bm.release(1)
    bm.release(3)
    bm.release(4)
    assert bm.num_free == 6 and bm.tables == {}
    bm.check_invariants()
    assert sorted(bm.grow(5, 12)) == [0, 1, 2, 3, 4, 5]


def test_release_of_unknown_sequence_is_a_no_op():
    bm = BlockManager(3, 4)
    bm.grow(1, 4)
    bm.release(99)
    bm.release(1)
    bm.release(1)  # twice: no double free
    assert bm.num_free == 3 and sorted(bm.free) == [0, 1, 2]
    bm.check_invariants()


def test_many_sequences_random_churn_keeps_invariants():
    import random

    rng = random.Random(0)
    bm = BlockManager(32, 4)
    sizes: dict[int, int] = {}
    for step in range(2000):
        seq = rng.randrange(12)
        if seq in sizes and rng.random() < 0.3:
            bm.release(seq)
            del sizes[seq]
        else:
            want = sizes.get(seq, 0) + rng.randint(1, 9)
            before = list(bm.table(seq))
            table = bm.grow(seq, want)
            if table is not None:
                assert table[: len(before)] == before and len(table) == blocks_needed(want, 4)
                sizes[seq] = want
            else:
                assert blocks_needed(want, 4) - len(before) > bm.num_free and bm.table(seq) == before
        bm.check_invariants()
        assert sum(len(t) for t in bm.tables.values()) + bm.num_free == 32
    for seq in list(sizes):
        bm.release(seq)
    assert bm.num_free == 32
    bm.check_invariants()


# --- check_invariants must catch corrupted state ---------------------------------------------------------------


def _busy() -> BlockManager:
    bm = BlockManager(8, 4)
    bm.grow(1, 8)  # [0, 1]
    bm.grow(2, 12)  # [2, 3, 4]
    bm.check_invariants()
    return bm


def test_invariants_catch_a_block_owned_twice():
    bm = _busy()
    bm.tables[2][0] = 0  # seq 2 now claims seq 1's block without counting it; block 2 is lost
    with pytest.raises(AssertionError, match="reference count"):
        bm.check_invariants()


def test_invariants_catch_a_block_free_and_owned():
    bm = _busy()
    bm.free.append(bm.tables[1][0])
    with pytest.raises(AssertionError, match="free and owned"):
        bm.check_invariants()


def test_invariants_catch_a_leaked_block():
    bm = _busy()
    bm.tables[2].pop()  # dropped from the table without going back to the free list
    with pytest.raises(AssertionError, match="leaked"):
        bm.check_invariants()


def test_invariants_catch_a_leak_hidden_by_a_duplicate_free_block():
    bm = _busy()
    lost = bm.free.pop()
    bm.free.append(bm.free[0])  # the count still adds up, but `lost` is gone and another block is free twice
    assert lost not in bm.free
    with pytest.raises(AssertionError, match="neither free nor owned"):
        bm.check_invariants()


def test_invariants_catch_a_block_id_out_of_range():
    bm = _busy()
    bm.tables[1][1] = 99  # the count still adds up, but block 1 is lost and 99 does not exist
    with pytest.raises(AssertionError, match=r"blocks \[1\] are neither free nor owned"):
        bm.check_invariants()


# --- prefix caching ------------------------------------------------------------------------------------------------


def test_full_blocks_are_shared_by_content_and_idle_ones_evicted_oldest_first():
    bm = BlockManager(6, 4, prefix_caching=True)
    a = list(range(10))  # two full blocks and two tokens
    bm.grow(1, 10)
    bm.register(1, a, 10)
    assert bm.cached_prefix(a, 9) == (bm.table(1)[:2], bm.keys[1][:2])
    assert bm.cached_prefix(a[:4] + [99] * 6, 9)[0] == bm.table(1)[:1]  # the second block's tokens differ
    assert bm.cached_prefix([99] * 4 + a[4:], 9)[0] == []  # same tokens, other prefix: another key
    blocks, keys = bm.cached_prefix(a, 9)
    assert bm.can_share(blocks, 12)
    bm.share(2, blocks, keys, queried_tokens=10)
    bm.grow(2, 12)
    assert bm.table(2)[:2] == bm.table(1)[:2] and bm.refs[bm.table(1)[0]] == 2
    assert (bm.queried_tokens, bm.hit_tokens) == (10, 8)
    bm.check_invariants()
    shared = bm.table(1)[:2]
    bm.release(1)
    bm.release(2)
    bm.check_invariants()
    assert bm.num_free == 6 and set(shared) <= set(bm.evictable)  # idle but still cached
    assert bm.cached_prefix(a, 9)[0] == shared
    bm.grow(3, 24)  # every block: the empty ones first, then the idle cached ones, oldest release first
    assert bm.cached_prefix(a, 9)[0] == [] and not bm.evictable and not bm.block_of
    bm.check_invariants()


def test_sharing_idle_cached_blocks_takes_them_out_of_the_free_count():
    bm = BlockManager(4, 4, prefix_caching=True)
    a = list(range(8))
    bm.grow(1, 8)
    bm.register(1, a, 8)
    bm.release(1)
    blocks, keys = bm.cached_prefix(a, 7)
    assert len(blocks) == 1  # at most 7 tokens: the last token is always computed
    assert bm.num_free == 4 and bm.can_share(blocks, 16) and not bm.can_share(blocks, 17)
