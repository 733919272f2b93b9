"""The router's KV index (router.kv_index): mirroring worker caches and choosing a worker."""

from __future__ import annotations

import pytest

from pdserve.hashing import hash_blocks
from pdserve.protocol import KVEvent, KVEventKind, KVEvents, KVSnapshot, Load
from router.kv_index import KVIndex, WorkerScore

STORED, REMOVED = KVEventKind.STORED, KVEventKind.REMOVED

BLOCK_SIZE = 4


def tokens(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


class FakeWorker:
    """Numbers its prefix-cache events the way decode/events.py does: one per event."""

    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self.seq = 0
        self.held: list[int] = []

    def snapshot(self) -> KVSnapshot:
        return KVSnapshot(self.worker_id, self.seq, list(self.held))

    def store_prompt(self, token_ids: list[int]) -> KVEvents:
        """Cache a prompt's full blocks, as the block manager does after prefill."""
        new = [h for h in hash_blocks(token_ids, BLOCK_SIZE) if h not in self.held]
        self.held.extend(new)
        return self._batch([KVEvent(STORED, h) for h in new])

    def remove(self, block_hash: int) -> KVEvents:
        self.held.remove(block_hash)
        return self._batch([KVEvent(REMOVED, block_hash)])

    def _batch(self, events: list[KVEvent]) -> KVEvents:
        batch = KVEvents(self.worker_id, self.seq, events)
        self.seq += len(events)
        return batch


def make_index(*worker_ids: str, weight: float = 1.0, max_blocks: int = 1000) -> KVIndex:
    index = KVIndex(BLOCK_SIZE, weight, max_blocks)
    for worker_id in worker_ids:
        index.add_worker(worker_id)
    return index


def test_snapshot_then_events_mirror_the_workers_cache():
    index = make_index("w0")
    a, b, c = hash_blocks(tokens(0, 12), BLOCK_SIZE)
    assert not index.is_synced("w0") and index.num_cached_blocks("w0") == 0

    index.apply_snapshot(KVSnapshot("w0", 3, [a, b]))
    assert index.is_synced("w0") and index.cached_hashes("w0") == [a, b]
    assert index.apply_events(KVEvents("w0", 3, [KVEvent(STORED, c)])) is True
    assert index.cached_hashes("w0") == [a, b, c]
    assert index.blocks_to_prefill("w0", [a, b, c]) == 0

    assert index.apply_events(KVEvents("w0", 4, [KVEvent(REMOVED, a)])) is True
    assert index.cached_hashes("w0") == [b, c]
    # A prefix match stops at the first missing block, though b and c are still held.
    assert index.blocks_to_prefill("w0", [a, b, c]) == 3
    assert index.apply_events(KVEvents("w0", 5, [KVEvent(REMOVED, 12345)])) is True
    assert index.cached_hashes("w0") == [b, c]


def test_gap_unsyncs_the_worker_and_its_events_wait_for_a_snapshot():
    index = make_index("w0")
    a, b, c, d = hash_blocks(tokens(0, 16), BLOCK_SIZE)
    index.apply_snapshot(KVSnapshot("w0", 0, []))
    assert index.apply_events(KVEvents("w0", 0, [KVEvent(STORED, a)])) is True

    assert index.apply_events(KVEvents("w0", 5, [KVEvent(STORED, b)])) is False  # 1..4 lost
    assert not index.is_synced("w0")
    # Ignored until the snapshot, without asking for yet another one.
    assert index.apply_events(KVEvents("w0", 6, [KVEvent(STORED, c)])) is True
    assert index.cached_hashes("w0") == [a]
    # The last known hashes still score meanwhile.
    assert index.blocks_to_prefill("w0", [a, b]) == 1

    index.apply_snapshot(KVSnapshot("w0", 9, [c, d]))
    assert index.is_synced("w0") and index.cached_hashes("w0") == [c, d]
    assert index.apply_events(KVEvents("w0", 9, [KVEvent(REMOVED, c)])) is True
    assert index.cached_hashes("w0") == [d]


def test_batches_already_in_the_snapshot_are_skipped():
    index = make_index("w0")
    a, b = hash_blocks(tokens(0, 8), BLOCK_SIZE)
    index.apply_snapshot(KVSnapshot("w0", 4, [a, b]))
    assert index.apply_events(KVEvents("w0", 2, [KVEvent(REMOVED, a), KVEvent(REMOVED, b)])) is True
    assert index.apply_events(KVEvents("w0", 0, [KVEvent(REMOVED, a)])) is True
    assert index.cached_hashes("w0") == [a, b]
    assert index.apply_events(KVEvents("w0", 4, [KVEvent(REMOVED, b)])) is True
    assert index.cached_hashes("w0") == [a]


def test_overlapping_batch_applies_only_its_new_part():
    index = make_index("w0")
    a, b, c = hash_blocks(tokens(0, 12), BLOCK_SIZE)
    index.apply_snapshot(KVSnapshot("w0", 2, [a]))
    # Events 0 and 1 count as already reflected in the snapshot: removing a there must not
    # be applied again.
    batch = KVEvents("w0", 0, [KVEvent(STORED, b), KVEvent(REMOVED, a), KVEvent(STORED, b),
                               KVEvent(STORED, c)])
    assert index.apply_events(batch) is True
    assert index.cached_hashes("w0") == [a, b, c]
    # Expected next: 4, so a batch at 4 applies and one at 6 is a gap.
    assert index.apply_events(KVEvents("w0", 4, [KVEvent(REMOVED, b)])) is True
    assert index.cached_hashes("w0") == [a, c]
    assert index.apply_events(KVEvents("w0", 6, [KVEvent(REMOVED, c)])) is False


def test_removal_of_a_groups_first_block_frees_it_to_move():
    index = make_index("w0", "w1")
    workers = {worker_id: FakeWorker(worker_id) for worker_id in ("w0", "w1")}
    for worker in workers.values():
        index.apply_snapshot(worker.snapshot())
    prompt = tokens(100, 14)  # 3 full blocks
    hashes = hash_blocks(prompt, BLOCK_SIZE)
    assert index.choose(hashes, ["w0", "w1"]) == "w0"  # a tie: first registered
    assert index.apply_events(workers["w0"].store_prompt(prompt))

    assert index.scores(hashes, ["w0", "w1"]) == {"w0": WorkerScore(0, 0, 0),
                                                   "w1": WorkerScore(3, 3, 0)}
    assert index.choose(hashes, ["w1", "w0"]) == "w0"
    assert index.apply_events(workers["w0"].remove(hashes[0]))
    assert index.scores(hashes, ["w0", "w1"]) == {"w0": WorkerScore(3, 3, 0),
                                                   "w1": WorkerScore(3, 3, 0)}
    assert index.choose(hashes, ["w0", "w1"]) == "w1"  # a tie again: w1 waited longest


def test_interleaved_prefix_groups_stick_to_the_worker_holding_them():
    worker_ids = ["w0", "w1", "w2"]
    index = make_index(*worker_ids)
    workers = {worker_id: FakeWorker(worker_id) for worker_id in worker_ids}
    for worker in workers.values():
        index.apply_snapshot(worker.snapshot())
    # Three system prompts of 4 blocks each; every request adds its own 6-token question,
    # so a prompt has 5 full blocks and the group's 4 are shared.
    prefixes = {"A": tokens(1000, 16), "B": tokens(2000, 16), "C": tokens(3000, 16)}
    chosen: dict[str, list[str]] = {group: [] for group in prefixes}
    for round_number in range(5):
        # A round's requests stay in flight until its end, so load competes with the cache.
        for group, prefix in prefixes.items():
            prompt = prefix + tokens(10_000 + 100 * round_number, 6)
            worker_id = index.choose(index.hash_prompt(prompt), worker_ids)
            index.start_request(worker_id, f"{group}{round_number}", len(prompt))
            assert index.apply_events(workers[worker_id].store_prompt(prompt))
            chosen[group].append(worker_id)
        for group in prefixes:
            index.finish_request(f"{group}{round_number}")
    assert chosen == {"A": ["w0"] * 5, "B": ["w1"] * 5, "C": ["w2"] * 5}
    assert [index.num_active_blocks(worker_id) for worker_id in worker_ids] == [0, 0, 0]
    # Each worker holds its group's 4 blocks plus one question block per round.
    assert [index.num_cached_blocks(worker_id) for worker_id in worker_ids] == [9, 9, 9]


def test_enough_load_outweighs_a_cache_hit():
    index = make_index("w0", "w1", weight=2.0)
    worker = FakeWorker("w0")
    index.apply_snapshot(worker.snapshot())
    index.apply_snapshot(FakeWorker("w1").snapshot())
    prompt = tokens(0, 12)
    hashes = hash_blocks(prompt, BLOCK_SIZE)
    index.apply_events(worker.store_prompt(prompt))

    index.start_request("w0", "r1", 24)  # 6 blocks: 0 + 6 = 2 * 3 + 0, a tie on cost
    assert index.scores(hashes, ["w0", "w1"]) == {"w0": WorkerScore(6.0, 0, 6),
                                                   "w1": WorkerScore(6.0, 3, 0)}
    assert index.choose(hashes, ["w0", "w1"]) == "w1"  # fewer in flight
    index.update_request("r1", 25)  # 7 blocks
    assert index.choose(hashes, ["w0", "w1"]) == "w1"
    index.update_request("r1", 20)  # 5 blocks
    assert index.choose(hashes, ["w0", "w1"]) == "w0"


def test_weight_zero_routes_by_load_only_and_unsynced_workers_count():
    index = make_index("w0", "w1", "w2", weight=0.0)
    worker = FakeWorker("w0")
    index.apply_snapshot(worker.snapshot())
    prompt = tokens(0, 16)
    hashes = hash_blocks(prompt, BLOCK_SIZE)
    index.apply_events(worker.store_prompt(prompt))
    index.start_request("w0", "r1", 1)
    index.start_request("w1", "r2", 5)

    assert not index.is_synced("w2")  # no snapshot yet: counts as holding nothing
    assert index.scores(hashes, ["w0", "w1", "w2"]) == {"w0": WorkerScore(1.0, 0, 1),
                                                         "w1": WorkerScore(2.0, 4, 2),
                                                         "w2": WorkerScore(0.0, 4, 0)}
    assert index.choose(hashes, ["w0", "w1", "w2"]) == "w2"
    assert index.choose(hashes, ["w0", "w1"]) == "w0"


def test_ties_rotate_so_equal_workers_share_the_load():
    index = make_index("w0", "w1", "w2")
    hashes = hash_blocks(tokens(0, 8), BLOCK_SIZE)
    picks = [index.choose(hashes, order) for order in
             (["w0", "w1", "w2"], ["w2", "w1", "w0"], ["w1", "w2", "w0"]) * 2]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]
    # Equal cost (an empty request holds no blocks): fewer in-flight requests first.
    index.start_request("w0", "empty", 0)
    assert index.scores(hashes, ["w0"]) == {"w0": WorkerScore(2, 2, 0)}
    assert [index.choose(hashes, ["w0", "w1"]) for _ in range(3)] == ["w1"] * 3


def test_bound_keeps_the_newest_stored_hashes():
    index = make_index("w0", "w1", max_blocks=3)
    a, b, c, d, e, f = hash_blocks(tokens(0, 24), BLOCK_SIZE)
    index.apply_snapshot(KVSnapshot("w0", 0, [a, b, c, d]))
    assert index.cached_hashes("w0") == [b, c, d]
    index.apply_events(KVEvents("w0", 0, [KVEvent(STORED, e)]))
    assert index.cached_hashes("w0") == [c, d, e]
    index.apply_events(KVEvents("w0", 1, [KVEvent(STORED, c)]))  # stored again: newest
    assert index.cached_hashes("w0") == [d, e, c]
    index.apply_events(KVEvents("w0", 2, [KVEvent(STORED, f), KVEvent(REMOVED, e)]))
    assert index.cached_hashes("w0") == [c, f]
    index.apply_snapshot(KVSnapshot("w1", 0, [a]))
    assert index.num_cached_entries == 3


def test_request_accounting_counts_whole_blocks_until_finish():
    index = make_index("w0")
    index.start_request("w0", "r1", 9)
    assert index.num_active_blocks("w0") == 3 and index.num_in_flight("w0") == 1
    index.update_request("r1", 12)
    assert index.num_active_blocks("w0") == 3
    index.update_request("r1", 13)
    assert index.num_active_blocks("w0") == 4
    index.start_request("w0", "r2", 4)
    assert index.num_active_blocks("w0") == 5 and index.num_in_flight("w0") == 2
    with pytest.raises(ValueError, match="'r2' is already in flight on worker 'w0'"):
        index.start_request("w0", "r2", 4)

    index.finish_request("r1")
    assert index.num_active_blocks("w0") == 1 and index.num_in_flight("w0") == 1
    index.finish_request("r1")  # already finished: nothing happens
    index.update_request("r1", 100)
    assert index.num_active_blocks("w0") == 1
    with pytest.raises(ValueError, match="num_tokens=-1"):
        index.start_request("w0", "r3", -1)


def test_worker_messages_after_removal_are_ignored_and_its_requests_dropped():
    index = make_index("w0")
    a = hash_blocks(tokens(0, 4), BLOCK_SIZE)[0]
    index.start_request("w0", "r1", 8)
    index.remove_worker("w0")
    index.remove_worker("w0")  # a no-op
    index.apply_snapshot(KVSnapshot("w0", 0, [a]))
    assert index.apply_events(KVEvents("w0", 7, [KVEvent(STORED, a)])) is True
    index.apply_load(Load("w0", 1, 0, 10, 16))
    index.finish_request("r1")
    index.update_request("r1", 9)
    assert index.worker_ids == [] and index.num_cached_entries == 0

    index.add_worker("w0")  # back, with a clean slate
    assert index.num_active_blocks("w0") == 0 and index.load("w0") is None
    index.start_request("w0", "r1", 4)  # the id is free again
    assert index.num_active_blocks("w0") == 1


def test_router_calls_naming_an_unknown_worker_raise():
    index = make_index("w0")
    with pytest.raises(ValueError, match=r"worker 'w9' is not in the KV index \(known: \['w0'\]"):
        index.choose([], ["w0", "w9"])
    with pytest.raises(ValueError, match="'w9' is not in the KV index"):
        index.start_request("w9", "r1", 4)
    with pytest.raises(ValueError, match="'w9' is not in the KV index"):
        index.num_cached_blocks("w9")
    with pytest.raises(ValueError, match="'w0' is already in the KV index"):
        index.add_worker("w0")
    with pytest.raises(ValueError, match="at least one candidate"):
        index.choose([], [])


def test_load_keeps_the_latest_report():
    index = make_index("w0")
    assert index.load("w0") is None
    index.apply_load(Load("w0", 1, 0, 10, 16))
    index.apply_load(Load("w0", 2, 3, 4, 16))
    assert index.load("w0") == Load("w0", 2, 3, 4, 16)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("block_size=0", {"block_size": 0, "weight": 1.0, "max_blocks_per_worker": 8}),
    ("weight=-1", {"block_size": 4, "weight": -1.0, "max_blocks_per_worker": 8}),
    ("weight=nan", {"block_size": 4, "weight": float("nan"), "max_blocks_per_worker": 8}),
    ("max_blocks_per_worker=0", {"block_size": 4, "weight": 1.0, "max_blocks_per_worker": 0}),
])
def test_bad_config_is_refused_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        KVIndex(**kwargs)
