"""Continuous batching: which requests run this step, and how many tokens each computes.

Every step has a token budget (``max_num_batched_tokens``). Running requests come first —
decodes (one token each) before chunks of prefills already under way — then waiting requests
are admitted, a long prompt taking only what budget is left (chunked prefill). When the pool
runs out of blocks the latest-arrived running request is preempted: its blocks are freed and
it is recomputed later from its tokens (its full blocks usually survive in the prefix cache).
Requests waiting for remote KV hold their blocks and are never preempted. Pure Python.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """``num_new_tokens`` tokens of ``request`` computed from position ``start``."""

    request: Request
    start: int
    num_new_tokens: int
    block_ids: list[int]

    @property
    def needs_sample(self) -> bool:
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan: the requests to compute (decodes first, then prefill chunks)
    and the running requests preempted to free blocks (recomputed later)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Owns the request queues; the block manager owns their blocks."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int):
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_remote_kv: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request in any state and free every block it holds."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decodes_first = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        for request in decodes_first:
            if request.status is not RequestStatus.RUNNING or budget == 0:
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            block_ids = self._allocate_or_preempt(request, num_new, output)
            if block_ids is None:
                continue
            output.scheduled.append(
                ScheduledRequest(request, request.num_computed_tokens, num_new, block_ids))
            budget -= num_new
        if not output.preempted:
            self._admit_waiting(budget, output)
        return output

    def _allocate_or_preempt(self, request: Request, num_new: int,
                             output: SchedulerOutput) -> list[int] | None:
        while True:
            block_ids = self.block_manager.allocate(
                request.request_id, request.num_computed_tokens + num_new)
            if block_ids is not None:
                return block_ids
            scheduled = {id(s.request) for s in output.scheduled}
            victims = [r for r in self.running if id(r) not in scheduled and r is not request
                       and r.status is RequestStatus.RUNNING]
            victim = max(victims, key=lambda r: r.arrival_index) if victims else request
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is request:
                return None

    def _admit_waiting(self, budget: int, output: SchedulerOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            prefix = self.block_manager.match_prefix(request.all_token_ids)
            num_new = min(request.num_tokens - prefix.num_tokens, budget)
            block_ids = self.block_manager.allocate(
                request.request_id, prefix.num_tokens + num_new, prefix)
            if block_ids is None:
                return
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = request.num_cached_tokens = prefix.num_tokens
            self.running.append(request)
            output.scheduled.append(
                ScheduledRequest(request, prefix.num_tokens, num_new, block_ids))
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record a finished step: advance computed tokens, append sampled tokens, finish
        requests that stopped. Returns the requests that finished in this step."""
        finished: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens = item.start + item.num_new_tokens
            request.num_prompt_tokens_computed += max(
                0, min(request.num_computed_tokens, len(request.prompt_token_ids)) - item.start)
            if request.is_cacheable:
                self.block_manager.cache_full_blocks(
                    request.request_id, request.all_token_ids, request.num_computed_tokens)
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.append_output(token)
            status = request.stop_status(self.max_model_len)
            if status is not None:
                self._finish(request, status)
                finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request in self.running:
            self.running.remove(request)
        self.waiting_for_remote_kv.pop(request.request_id, None)
        self.block_manager.free(request.request_id)
        self.requests.pop(request.request_id, None)
        request.status = status

    # Remote prefill (the decode worker's path): blocks are allocated for the whole prompt
    # and a prefill worker writes their KV; the request never runs or is preempted meanwhile.

    def allocate_for_remote_kv(self, request: Request) -> list[int] | None:
        """Take a waiting request out of the queue with blocks for all but its last prompt
        token (the cached prefix shared); None if the pool is short."""
        prefix = self.block_manager.match_prefix(request.all_token_ids)
        block_ids = self.block_manager.allocate(
            request.request_id, request.num_tokens - 1, prefix)
        if block_ids is None:
            return None
        self.waiting.remove(request)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        request.num_computed_tokens = request.num_cached_tokens = prefix.num_tokens
        self.waiting_for_remote_kv[request.request_id] = request
        return block_ids

    def remote_kv_landed(self, request_id: str) -> None:
        """All but the last prompt token's KV is in the blocks: run the last one here."""
        request = self.waiting_for_remote_kv.pop(request_id)
        request.num_computed_tokens = request.num_tokens - 1
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def take_back_remote(self, request_id: str, keep_blocks_as: str) -> Request:
        """The remote prefill failed or was cancelled: the request goes back to the front of
        the queue to prefill here, into fresh blocks. Its old blocks move to the table
        ``keep_blocks_as`` and stay allocated until no late write can land in them."""
        self.block_manager.rename(request_id, keep_blocks_as)
        request = self.waiting_for_remote_kv.pop(request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)
        return request
