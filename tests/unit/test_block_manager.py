from engine.block_manager import BlockManager, KVEvent
from pdserve.hashing import hash_blocks


def test_allocate_takes_blocks_from_the_front_in_order():
    manager = BlockManager(num_blocks=6, block_size=4)
    assert manager.allocate("a", 5) == [0, 1]
    assert manager.allocate("b", 4) == [2]
    assert manager.allocate("a", 9) == [0, 1, 3]
    assert manager.free_block_ids == [4, 5]


def test_allocate_returns_none_and_changes_nothing_when_short():
    manager = BlockManager(num_blocks=3, block_size=4)
    manager.allocate("a", 8)
    assert manager.allocate("b", 8) is None
    assert manager.free_block_ids == [2]
    assert manager.block_table("b") == []


def test_free_returns_tail_first_and_cached_blocks_stay_matchable():
    manager = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    manager.allocate("a", 5)
    manager.cache_full_blocks("a", tokens, 5)
    manager.free("a")
    # Tail first: the suffix is evicted before the shared prefix.
    assert manager.free_block_ids == [3, 2, 1, 0]
    match = manager.match_prefix(tokens)
    assert match.block_ids == [0, 1] and match.num_tokens == 4


def test_prefix_hit_shares_blocks_and_counts_references():
    manager = BlockManager(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    manager.allocate("a", 5)
    manager.cache_full_blocks("a", prompt, 5)
    match = manager.match_prefix(prompt + [6])
    assert match.block_ids == [0, 1]
    table = manager.allocate("b", 6, match)
    assert table == [0, 1, 3]
    assert [manager.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    manager.free("a")
    assert manager.free_block_ids == [4, 5, 6, 7, 2]
    manager.free("b")
    assert manager.free_block_ids == [4, 5, 6, 7, 2, 3, 1, 0]
    assert manager.num_free_blocks == 8


def test_last_token_is_never_matched():
    manager = BlockManager(num_blocks=4, block_size=2)
    manager.allocate("a", 4)
    manager.cache_full_blocks("a", [1, 2, 3, 4], 4)
    # The whole prompt is cached, but the last block must be recomputed for logits.
    assert manager.match_prefix([1, 2, 3, 4]).block_ids == [0]


def test_hit_on_a_free_cached_block_takes_it_out_of_the_free_queue():
    manager = BlockManager(num_blocks=3, block_size=2)
    manager.allocate("a", 2)
    manager.cache_full_blocks("a", [7, 8], 2)
    manager.free("a")
    match = manager.match_prefix([7, 8, 9])
    # Block 0 is free but cached: it counts as free, so 2 new + 1 revived fits in 3.
    assert manager.allocate("b", 5, match) == [0, 1, 2]
    assert manager.num_free_blocks == 0


def test_eviction_emits_removed_and_reuse_forgets_the_hash():
    manager = BlockManager(num_blocks=2, block_size=2)
    manager.allocate("a", 2)
    manager.cache_full_blocks("a", [1, 2], 2)
    (stored,) = hash_blocks([1, 2], 2)
    assert manager.drain_events() == [KVEvent("stored", stored)]
    manager.free("a")
    manager.allocate("b", 4)  # takes block 1 then block 0, evicting the cached one
    assert manager.drain_events() == [KVEvent("removed", stored)]
    assert manager.match_prefix([1, 2, 3]).block_ids == []
    assert manager.cached_hashes() == []


def test_token_mismatch_on_a_hash_hit_is_a_miss():
    manager = BlockManager(num_blocks=4, block_size=2)
    manager.allocate("a", 2)
    manager.cache_full_blocks("a", [1, 2], 2)
    (block_hash,) = hash_blocks([1, 2], 2)
    manager.blocks[0].token_ids = (9, 9)  # what a hash collision would look like
    assert manager.match_prefix([1, 2, 3]).block_ids == []
    assert manager._cached[block_hash] == 0


def test_duplicate_content_is_cached_once():
    manager = BlockManager(num_blocks=4, block_size=2)
    manager.allocate("a", 2)
    manager.allocate("b", 2)
    manager.cache_full_blocks("a", [1, 2], 2)
    manager.cache_full_blocks("b", [1, 2], 2)
    assert len(manager.drain_events()) == 1
    assert manager.blocks[1].block_hash is None


def test_prefix_caching_off():
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    manager.allocate("a", 4)
    manager.cache_full_blocks("a", [1, 2, 3, 4], 4)
    assert manager.match_prefix([1, 2, 3, 4, 5]).block_ids == []
    assert manager.drain_events() == []
