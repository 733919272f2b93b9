"""The decode worker's remote-prefill path through the scheduler and block manager.

A pool of 8 blocks of 4 tokens. ``warm_prefix`` leaves blocks 0 and 1 free but cached for the
tokens 1..8, with the free queue ``[2, 3, 4, 5, 6, 7, 1, 0]``.
"""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, KVEvent
from engine.request import Request, RequestId, RequestStatus
from engine.scheduler import Scheduler, SchedulerOutput
from pdserve.hashing import hash_blocks
from pdserve.sampling import SamplingParams

PREFIX = list(range(1, 9))  # two full blocks
PROMPT = list(range(1, 14))  # PREFIX and 5 more tokens: 13 tokens, 4 blocks
TOKEN = 99  # what every step samples


def make() -> tuple[Scheduler, BlockManager]:
    block_manager = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(block_manager, max_num_batched_tokens=64, max_num_seqs=8,
                          max_model_len=64)
    return scheduler, block_manager


def make_request(name: str, prompt: list[int], arrival_index: int,
                 max_tokens: int = 4) -> Request:
    return Request(RequestId(name), list(prompt),
                   SamplingParams(max_tokens=max_tokens, temperature=0), arrival_index)


def step(scheduler: Scheduler) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.update(output, {s.request.request_id: TOKEN
                              for s in output.scheduled if s.needs_sample})
    return output


def plan(output: SchedulerOutput) -> list[tuple[str, int, int, list[int]]]:
    return [(s.request.request_id, s.start, s.num_new_tokens, list(s.block_ids))
            for s in output.scheduled]


def warm_prefix(scheduler: Scheduler, block_manager: BlockManager) -> None:
    """Run a request whose prompt is PREFIX to completion, leaving its blocks cached."""
    scheduler.add_request(make_request("p", PREFIX, 0, max_tokens=1))
    while scheduler.has_unfinished:
        step(scheduler)
    assert block_manager.cached_hashes() == hash_blocks(PREFIX, 4)
    assert block_manager.free_block_ids == [2, 3, 4, 5, 6, 7, 1, 0]
    block_manager.drain_events()


def park_remote(scheduler: Scheduler, request: Request) -> list[int] | None:
    scheduler.add_request(request)
    return scheduler.allocate_for_remote_kv(request)


# -- allocate_for_remote_kv -------------------------------------------------------------------

def test_allocates_all_but_the_last_prompt_token_sharing_the_cached_prefix():
    scheduler, block_manager = make()
    warm_prefix(scheduler, block_manager)
    request = make_request("a", PROMPT, 1)
    # 12 tokens: the cached blocks 0 and 1, and one fresh block for tokens 9..12.
    assert park_remote(scheduler, request) == [0, 1, 2]
    assert block_manager.block_table("a") == [0, 1, 2]
    assert block_manager.free_block_ids == [3, 4, 5, 6, 7]
    assert [block_manager.blocks[b].ref_count for b in (0, 1, 2)] == [1, 1, 1]
    assert request.status is RequestStatus.WAITING_FOR_REMOTE_KV
    assert (request.num_computed_tokens, request.num_cached_tokens) == (8, 8)
    assert list(scheduler.waiting) == []
    assert scheduler.waiting_for_remote_kv == {"a": request}
    assert scheduler.running == []


def test_allocates_with_no_cached_prefix():
    scheduler, block_manager = make()
    request = make_request("a", PROMPT, 0)
    assert park_remote(scheduler, request) == [0, 1, 2]
    assert (request.num_computed_tokens, request.num_cached_tokens) == (0, 0)
    assert block_manager.free_block_ids == [3, 4, 5, 6, 7]


def test_a_short_pool_changes_nothing():
    scheduler, block_manager = make()
    scheduler.add_request(make_request("big", list(range(100, 124)), 0))  # 24 tokens
    step(scheduler)
    assert block_manager.free_block_ids == [6, 7]
    request = make_request("a", PROMPT, 1)
    assert park_remote(scheduler, request) is None
    assert block_manager.free_block_ids == [6, 7]
    assert block_manager.block_table("a") == []
    assert request.status is RequestStatus.WAITING
    assert list(scheduler.waiting) == [request]
    assert scheduler.waiting_for_remote_kv == {}


def test_a_request_waiting_for_remote_kv_is_not_scheduled():
    scheduler, _ = make()
    park_remote(scheduler, make_request("a", PROMPT, 0))
    assert plan(step(scheduler)) == []
    scheduler.add_request(make_request("b", [50, 51, 52], 1))
    assert plan(step(scheduler)) == [("b", 0, 3, [3])]
    assert plan(step(scheduler)) == [("b", 3, 1, [3])]


def test_a_request_waiting_for_remote_kv_is_never_preempted():
    scheduler, block_manager = make()
    # "a" arrives last, so it would be the victim if it were considered at all.
    waiting = make_request("a", list(range(1, 10)), 2)  # 9 tokens: blocks for 8
    assert park_remote(scheduler, waiting) == [0, 1]
    b = make_request("b", list(range(100, 112)), 0)
    c = make_request("c", list(range(200, 212)), 1)
    scheduler.add_request(b)
    scheduler.add_request(c)
    assert plan(step(scheduler)) == [("b", 0, 12, [2, 3, 4]), ("c", 0, 12, [5, 6, 7])]
    assert block_manager.free_block_ids == []
    # b's 13th token needs a fourth block: c (latest-arrived running) is preempted, not a.
    output = step(scheduler)
    assert output.preempted == [c]
    assert plan(output) == [("b", 12, 1, [2, 3, 4, 7])]
    assert block_manager.free_block_ids == [6, 5]
    assert block_manager.block_table("a") == [0, 1]
    assert waiting.status is RequestStatus.WAITING_FOR_REMOTE_KV
    assert scheduler.waiting_for_remote_kv == {"a": waiting}


def test_a_growing_request_preempts_itself_rather_than_the_waiting_one():
    scheduler, block_manager = make()
    waiting = make_request("a", PROMPT, 1)
    assert park_remote(scheduler, waiting) == [0, 1, 2]
    b = make_request("b", list(range(100, 120)), 0)  # 20 tokens, 5 blocks: the pool is full
    scheduler.add_request(b)
    assert plan(step(scheduler)) == [("b", 0, 20, [3, 4, 5, 6, 7])]
    output = step(scheduler)
    assert output.preempted == [b]
    assert plan(output) == []
    assert list(scheduler.waiting) == [b]
    assert block_manager.free_block_ids == [7, 6, 5, 4, 3]
    assert block_manager.block_table("a") == [0, 1, 2]
    assert waiting.status is RequestStatus.WAITING_FOR_REMOTE_KV


# -- remote_kv_landed -------------------------------------------------------------------------

def test_landed_runs_only_the_last_prompt_token_and_samples():
    scheduler, block_manager = make()
    warm_prefix(scheduler, block_manager)
    request = make_request("a", PROMPT, 1)
    park_remote(scheduler, request)
    scheduler.remote_kv_landed("a")
    assert request.status is RequestStatus.RUNNING
    assert request.num_computed_tokens == 12
    assert scheduler.running == [request]
    assert scheduler.waiting_for_remote_kv == {}
    output = scheduler.schedule()
    assert plan(output) == [("a", 12, 1, [0, 1, 2, 3])]
    assert output.scheduled[0].needs_sample
    scheduler.update(output, {"a": TOKEN})
    assert request.num_prompt_tokens_computed == 1
    assert (request.num_computed_tokens, request.output_token_ids) == (13, [TOKEN])
    # The block the prefill worker wrote (tokens 9..12) now enters the prefix cache.
    assert block_manager.drain_events() == [KVEvent("stored", hash_blocks(PROMPT, 4)[2])]
    assert plan(step(scheduler)) == [("a", 13, 1, [0, 1, 2, 3])]


def test_landed_without_a_cached_prefix_counts_one_computed_prompt_token():
    scheduler, _ = make()
    request = make_request("a", list(range(1, 6)), 0)  # 5 tokens: one block for 4
    assert park_remote(scheduler, request) == [0]
    scheduler.remote_kv_landed("a")
    assert plan(step(scheduler)) == [("a", 4, 1, [0, 1])]
    assert request.num_prompt_tokens_computed == 1


# -- take_back_remote -------------------------------------------------------------------------

def test_take_back_requeues_at_the_front_and_parks_the_blocks():
    scheduler, block_manager = make()
    warm_prefix(scheduler, block_manager)
    request = make_request("a", PROMPT, 1)
    assert park_remote(scheduler, request) == [0, 1, 2]
    other = make_request("w", [50, 51, 52], 2)
    scheduler.add_request(other)
    assert scheduler.take_back_remote("a", "a#attempt1") is request
    assert list(scheduler.waiting) == [request, other]
    assert request.status is RequestStatus.WAITING
    assert request.num_computed_tokens == 0
    assert scheduler.waiting_for_remote_kv == {}
    assert block_manager.block_table("a") == []
    assert block_manager.block_table("a#attempt1") == [0, 1, 2]
    assert block_manager.free_block_ids == [3, 4, 5, 6, 7]

    # Prefilled here into fresh blocks; only the cached prefix is shared with the parked ones.
    output = step(scheduler)
    assert plan(output) == [("a", 8, 5, [0, 1, 3, 4]), ("w", 0, 3, [5])]
    assert request.num_prompt_tokens_computed == 5
    assert [block_manager.blocks[b].ref_count for b in (0, 1, 2)] == [2, 2, 1]
    assert block_manager.free_block_ids == [6, 7]

    block_manager.free("a#attempt1")
    assert block_manager.free_block_ids == [6, 7, 2]
    assert [block_manager.blocks[b].ref_count for b in (0, 1)] == [1, 1]
    assert block_manager.block_table("a") == [0, 1, 3, 4]


def test_take_back_without_a_cached_prefix_uses_only_fresh_blocks():
    scheduler, block_manager = make()
    request = make_request("a", PROMPT, 0)
    assert park_remote(scheduler, request) == [0, 1, 2]
    scheduler.take_back_remote("a", "a#attempt1")
    assert plan(step(scheduler)) == [("a", 0, 13, [3, 4, 5, 6])]
    assert block_manager.free_block_ids == [7]
    block_manager.free("a#attempt1")
    assert block_manager.free_block_ids == [7, 2, 1, 0]


def test_take_back_onto_a_used_owner_leaves_the_request_waiting_for_remote_kv():
    scheduler, block_manager = make()
    request = make_request("a", PROMPT, 0)
    park_remote(scheduler, request)
    block_manager.allocate("taken", 1)
    with pytest.raises(ValueError, match="^'taken' already owns blocks$"):
        scheduler.take_back_remote("a", "taken")
    assert scheduler.waiting_for_remote_kv == {"a": request}


# -- rename -----------------------------------------------------------------------------------

def test_rename_moves_the_table():
    _, block_manager = make()
    block_manager.allocate("a", 5)
    block_manager.rename("a", "a#attempt1")
    assert (block_manager.block_table("a"), block_manager.block_table("a#attempt1")) == (
        [], [0, 1])


def test_rename_onto_an_existing_owner_raises_and_changes_nothing():
    _, block_manager = make()
    block_manager.allocate("a", 5)
    block_manager.allocate("b", 1)
    with pytest.raises(ValueError, match="^'b' already owns blocks$"):
        block_manager.rename("a", "b")
    assert (block_manager.block_table("a"), block_manager.block_table("b")) == ([0, 1], [2])


# -- is_cacheable -----------------------------------------------------------------------------

def run_to_completion(scheduler: Scheduler, request: Request) -> None:
    scheduler.add_request(request)
    while scheduler.has_unfinished:
        step(scheduler)
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_a_cacheable_request_enters_its_full_blocks_into_the_cache():
    scheduler, block_manager = make()
    run_to_completion(scheduler, make_request("a", list(range(1, 10)), 0))
    # 9 prompt tokens + 4 sampled, of which 12 were computed: three full blocks.
    hashes = hash_blocks(list(range(1, 10)) + [TOKEN] * 3, 4)
    assert block_manager.cached_hashes() == hashes
    assert block_manager.drain_events() == [KVEvent("stored", h) for h in hashes]


def test_a_request_that_is_not_cacheable_enters_nothing():
    scheduler, block_manager = make()
    request = make_request("a", list(range(1, 10)), 0)
    request.is_cacheable = False
    run_to_completion(scheduler, request)
    assert block_manager.cached_hashes() == []
    assert block_manager.drain_events() == []


def test_a_lossy_remote_request_shares_the_cached_prefix_but_adds_nothing():
    scheduler, block_manager = make()
    warm_prefix(scheduler, block_manager)
    cached = block_manager.cached_hashes()
    request = make_request("a", PROMPT, 1)
    assert park_remote(scheduler, request) == [0, 1, 2]
    request.is_cacheable = False  # what the decode worker does when an fp8 wire lands
    scheduler.remote_kv_landed("a")
    while scheduler.has_unfinished:
        step(scheduler)
    assert request.output_token_ids == [TOKEN] * 4
    assert block_manager.cached_hashes() == cached
    assert block_manager.drain_events() == []


# -- num_prompt_tokens_computed ---------------------------------------------------------------

def test_prompt_tokens_computed_locally_exclude_the_cached_prefix():
    scheduler, block_manager = make()
    warm_prefix(scheduler, block_manager)
    request = make_request("a", PROMPT, 1)
    run_to_completion(scheduler, request)
    assert request.num_cached_tokens == 8
    assert request.num_prompt_tokens_computed == len(PROMPT) - 8


def test_prompt_tokens_computed_add_up_over_chunks():
    block_manager = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(block_manager, max_num_batched_tokens=4, max_num_seqs=8,
                          max_model_len=64)
    warm_prefix(scheduler, block_manager)
    request = make_request("a", PROMPT, 1)
    scheduler.add_request(request)
    assert plan(step(scheduler)) == [("a", 8, 4, [0, 1, 2])]
    assert request.num_prompt_tokens_computed == 4
    assert plan(step(scheduler)) == [("a", 12, 1, [0, 1, 2, 3])]
    assert request.num_prompt_tokens_computed == 5
    step(scheduler)  # a decode step computes no prompt token
    assert request.num_prompt_tokens_computed == 5


def test_prompt_tokens_computed_without_a_cache_hit_is_the_prompt_length():
    scheduler, _ = make()
    request = make_request("a", PROMPT, 0)
    run_to_completion(scheduler, request)
    assert (request.num_cached_tokens, request.num_prompt_tokens_computed) == (0, 13)
