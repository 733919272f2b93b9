import pytest

from engine.block_manager import BlockManager
from engine.request import Request, RequestId, RequestStatus
from engine.scheduler import Scheduler
from pdserve.sampling import SamplingParams


def make_scheduler(num_blocks=8, block_size=4, budget=16, max_num_seqs=8, max_model_len=64):
    manager = BlockManager(num_blocks, block_size)
    return Scheduler(manager, budget, max_num_seqs, max_model_len), manager


def make_request(name, num_prompt_tokens, arrival, max_tokens=4, first_token=1):
    tokens = list(range(first_token, first_token + num_prompt_tokens))
    return Request(RequestId(name), tokens, SamplingParams(max_tokens=max_tokens), arrival)


def run_step(scheduler, token=99):
    output = scheduler.schedule()
    sampled = {s.request.request_id: token for s in output.scheduled if s.needs_sample}
    scheduler.update(output, sampled)
    return output


def plan(output):
    return [(s.request.request_id, s.start, s.num_new_tokens, list(s.block_ids))
            for s in output.scheduled]


def test_chunked_prefill_then_decode_within_the_token_budget():
    scheduler, _ = make_scheduler(budget=8)
    scheduler.add_request(make_request("a", 10, 0))
    scheduler.add_request(make_request("b", 3, 1))
    assert plan(run_step(scheduler)) == [("a", 0, 8, [0, 1])]
    # a's second chunk, then b is admitted with what budget is left.
    assert plan(run_step(scheduler)) == [("a", 8, 2, [0, 1, 2]), ("b", 0, 3, [3])]
    # Decodes only now: one token each, a first (arrival order among decodes).
    assert plan(run_step(scheduler)) == [("a", 10, 1, [0, 1, 2]), ("b", 3, 1, [3])]


def test_decodes_are_scheduled_before_a_prefill_chunk():
    scheduler, _ = make_scheduler(budget=4, num_blocks=16)
    scheduler.add_request(make_request("a", 2, 0))
    run_step(scheduler)
    scheduler.add_request(make_request("b", 12, 1))
    run_step(scheduler)  # a decodes, b takes the remaining 3 tokens
    output = run_step(scheduler)
    assert [(s.request.request_id, s.num_new_tokens) for s in output.scheduled] == [
        ("a", 1), ("b", 3)]


def test_finish_frees_blocks_and_reports_length():
    scheduler, manager = make_scheduler()
    request = make_request("a", 3, 0, max_tokens=2)
    scheduler.add_request(request)
    run_step(scheduler)
    run_step(scheduler)
    assert request.status is RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == [99, 99]
    assert manager.num_free_blocks == 8 and not scheduler.has_unfinished


def test_stop_token_and_eos():
    scheduler, _ = make_scheduler()
    request = Request(RequestId("a"), [1, 2], SamplingParams(max_tokens=9), 0, (7,))
    scheduler.add_request(request)
    run_step(scheduler, token=7)
    assert request.status is RequestStatus.FINISHED_STOPPED and request.finish_reason == "stop"
    ignoring = Request(RequestId("b"), [1, 2], SamplingParams(max_tokens=2, ignore_eos=True), 1)
    scheduler.add_request(ignoring)
    run_step(scheduler, token=7)
    assert ignoring.status is RequestStatus.RUNNING
    stopping = Request(RequestId("c"), [1], SamplingParams(stop_token_ids=(5,)), 2)
    scheduler.add_request(stopping)
    run_step(scheduler, token=5)
    assert stopping.status is RequestStatus.FINISHED_STOPPED


def test_max_model_len_finishes_with_length():
    scheduler, _ = make_scheduler(max_model_len=4)
    request = make_request("a", 3, 0, max_tokens=10)
    scheduler.add_request(request)
    run_step(scheduler)
    assert request.status is RequestStatus.FINISHED_LENGTH and request.num_tokens == 4


def two_requests_filling_four_blocks(max_tokens):
    """4 blocks of 2 tokens: a and b each hold 2 blocks after prefill, so the next decode of
    a needs a third block and b (the later arrival) is preempted."""
    scheduler, manager = make_scheduler(num_blocks=4, block_size=2, budget=16)
    a = make_request("a", 4, 0, max_tokens=max_tokens)
    b = make_request("b", 4, 1, max_tokens=max_tokens, first_token=50)
    scheduler.add_request(a)
    scheduler.add_request(b)
    return scheduler, manager, a, b


def test_preemption_recomputes_the_latest_arrival():
    scheduler, manager, a, b = two_requests_filling_four_blocks(max_tokens=8)
    assert plan(run_step(scheduler)) == [("a", 0, 4, [0, 1]), ("b", 0, 4, [2, 3])]
    output = run_step(scheduler)
    assert [r.request_id for r in output.preempted] == ["b"]
    assert plan(output) == [("a", 4, 1, [0, 1, 3])]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert scheduler.waiting[0] is b and scheduler.num_preemptions == 1
    assert b.output_token_ids == [99]  # kept: recomputed as prompt, never resampled
    assert manager.free_block_ids == [2]  # b's blocks went back tail first; a took 3


def test_preempted_request_resumes_from_its_cached_prefix():
    scheduler, _, a, b = two_requests_filling_four_blocks(max_tokens=3)
    run_step(scheduler)
    run_step(scheduler)  # b preempted, its full blocks stay cached while free
    while a.status is RequestStatus.RUNNING:
        run_step(scheduler)
    output = run_step(scheduler)
    # b's tail block [52, 53] was evicted first (a took it); its head [50, 51] still hits.
    assert [(s.request.request_id, s.start, s.num_new_tokens) for s in output.scheduled] == [
        ("b", 2, 3)]
    assert b.num_cached_tokens == 2


def test_a_lone_request_that_cannot_grow_preempts_itself_without_losing_tokens():
    scheduler, _ = make_scheduler(num_blocks=2, block_size=2, budget=16, max_model_len=16)
    a = make_request("a", 4, 0, max_tokens=3)
    scheduler.add_request(a)
    run_step(scheduler)
    output = run_step(scheduler)
    assert [r.request_id for r in output.preempted] == ["a"] and output.scheduled == []


def test_max_num_seqs_limits_admission():
    scheduler, _ = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("a", 2, 0))
    scheduler.add_request(make_request("b", 2, 1))
    assert [s.request.request_id for s in run_step(scheduler).scheduled] == ["a"]


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_abort_in_any_state_frees_everything(steps):
    scheduler, manager = make_scheduler(budget=4)
    a = make_request("a", 10, 0, max_tokens=5)
    b = make_request("b", 3, 1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    for _ in range(steps):
        run_step(scheduler)
    assert scheduler.abort("a") is a and scheduler.abort("b") is b
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert manager.num_free_blocks == 8
    assert not scheduler.has_unfinished and not scheduler.running and not scheduler.waiting
    assert scheduler.abort("a") is None


def test_remote_kv_request_holds_blocks_and_is_never_preempted():
    scheduler, manager = make_scheduler(num_blocks=4, block_size=2, budget=16)
    remote = make_request("r", 5, 0, max_tokens=2, first_token=50)
    scheduler.add_request(remote)
    assert scheduler.allocate_for_remote_kv(remote) == [0, 1]  # 4 of 5 tokens arrive remotely
    assert remote.status is RequestStatus.WAITING_FOR_REMOTE_KV
    local = make_request("a", 4, 1, max_tokens=4)
    scheduler.add_request(local)
    run_step(scheduler)
    output = run_step(scheduler)  # a needs a 3rd block: it preempts itself, not the remote one
    assert [r.request_id for r in output.preempted] == ["a"]
    assert remote.status is RequestStatus.WAITING_FOR_REMOTE_KV
    scheduler.remote_kv_landed("r")
    output = run_step(scheduler)
    assert plan(output)[0] == ("r", 4, 1, [0, 1, 3])
    scheduler.abort("r")
    scheduler.abort("a")
    assert manager.num_free_blocks == 4


def test_abort_while_waiting_for_remote_kv_frees_blocks():
    scheduler, manager = make_scheduler()
    request = make_request("r", 9, 0)
    scheduler.add_request(request)
    scheduler.allocate_for_remote_kv(request)
    scheduler.abort("r")
    assert manager.num_free_blocks == 8 and not scheduler.waiting_for_remote_kv


def test_duplicate_request_id_is_refused():
    scheduler, _ = make_scheduler()
    scheduler.add_request(make_request("a", 2, 0))
    with pytest.raises(ValueError, match="request_id"):
        scheduler.add_request(make_request("a", 2, 1))
