"""A request's state inside the engine: its tokens, its blocks and where it stands."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NewType

from pdserve.protocol import FinishReason
from pdserve.sampling import SamplingParams

RequestId = NewType("RequestId", str)


class RequestStatus(enum.Enum):
    """Where a request stands in the engine."""

    WAITING = "waiting"
    RUNNING = "running"
    # Blocks allocated, KV being written by a prefill worker; never preempted.
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(slots=True, eq=False)
class Request:
    """One generation request.

    ``num_computed_tokens`` counts tokens whose KV is in the pool: prefix-cache hits plus
    computed prefill chunks plus decoded tokens. After a preemption it drops to 0 and the
    whole sequence (prompt and output so far) is recomputed as a prompt.
    """

    request_id: RequestId
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_index: int
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Prompt tokens this engine computed (not cached, not received from a prefill worker).
    num_prompt_tokens_computed: int = 0
    # False once KV arrived lossy (fp8 wire into a model-dtype pool): its blocks, and every
    # later block that attended to them, stay out of the prefix cache.
    is_cacheable: bool = True
    output_logits: list = field(default_factory=list)
    # Prompt then output, kept whole so the per-step paths slice it instead of concatenating.
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return FINISH_REASONS.get(self.status)

    def stop_status(self, max_model_len: int) -> RequestStatus | None:
        """The finished status after the latest appended token, or None to keep going."""
        last = self.output_token_ids[-1]
        params = self.sampling_params
        if not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_tokens >= max_model_len or (
                params.max_tokens is not None and self.num_output_tokens >= params.max_tokens):
            return RequestStatus.FINISHED_LENGTH
        return None
