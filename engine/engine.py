"""LLMEngine: the step loop (schedule, run the model, sample, update) over one TP group."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.executor import LocalExecutor, MultiprocessExecutor, default_num_threads
from engine.kv_cache import bytes_per_block
from engine.model_runner import ModelInput, RunnerOptions, SequenceInput
from engine.parallel import TensorParallel, check_head_split, local_kv_heads
from engine.request import Request, RequestId, RequestStatus
from engine.sampler import Sampler
from engine.scheduler import Scheduler, SchedulerOutput
from pdserve.protocol import FinishReason, KVEvent
from pdserve.quant_config import resolve_scheme
from pdserve.sampling import SamplingParams


@dataclass(slots=True)
class RequestOutput:
    """A request's progress after a step: the tokens it gained and, once done, why it ended."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_cached_tokens: int
    num_prompt_tokens_computed: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)
    text: str = ""


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def kv_bytes_per_block(model: ModelConfig, config: EngineConfig, dtype: str) -> int:
    tp = TensorParallel(0, config.tensor_parallel_size)
    _, num_kv_heads = local_kv_heads(model.num_kv_heads, tp)
    return bytes_per_block(model.num_layers, num_kv_heads, config.block_size, model.head_dim,
                           getattr(torch, dtype), config.kv_cache_dtype)


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_pool(model: ModelConfig, config: EngineConfig, device: str,
              dtype: str) -> tuple[int, int]:
    """(num_blocks, max_model_len) for this engine; refuses a pool that cannot hold one
    request of max_model_len tokens."""
    limit = model.max_position_embeddings
    if model.sliding_window is not None:
        limit = min(limit, model.sliding_window)  # full attention is exact up to the window
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's limit of "
                         f"{limit} positions (max_position_embeddings / sliding_window)")
    max_model_len = config.max_model_len or limit
    blocks_per_seq = -(-max_model_len // config.block_size)
    num_blocks = config.num_blocks
    if num_blocks is None:
        budget = int(_available_bytes(device) * config.kv_cache_memory_fraction)
        num_blocks = budget // kv_bytes_per_block(model, config, dtype)
        # Never past what max_num_seqs full-length requests could use: a tiny model should
        # not take gigabytes of KV just because memory is free.
        num_blocks = min(num_blocks, blocks_per_seq * config.max_num_seqs)
    if num_blocks * config.block_size < max_model_len:
        if config.max_model_len is not None:
            raise ValueError(
                f"num_blocks={num_blocks} x block_size={config.block_size} holds fewer tokens "
                f"than max_model_len={max_model_len}: raise num_blocks or lower max_model_len")
        max_model_len = num_blocks * config.block_size
    if num_blocks < 1:
        raise ValueError("no memory left for the KV cache: set num_blocks explicitly")
    return num_blocks, max_model_len


def plan_runner(model_dir: str | Path, config: EngineConfig) -> RunnerOptions:
    """Every rank's model and pool options: the device, dtype and pool size resolved once
    (on the driver), so all ranks of a group build the same pool."""
    model = ModelConfig.from_dir(model_dir)
    check_head_split(model.num_heads, model.num_kv_heads, config.tensor_parallel_size)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    num_blocks, max_model_len = plan_pool(model, config, device, dtype)
    return RunnerOptions(str(model_dir), model, dtype, device, num_blocks, config.block_size,
                         config.kv_cache_dtype, max_model_len, config.attention_backend,
                         config.enforce_eager, config.max_num_seqs,
                         resolve_scheme(config.quantization, model_dir))


class LLMEngine:
    """One engine: a scheduler and block manager on rank 0 driving every TP rank's model."""

    def __init__(self, model_dir: str | Path, config: EngineConfig, executor=None,
                 options: RunnerOptions | None = None):
        """``executor`` (anything with ``execute(batch) -> logits`` and ``shutdown()``)
        replaces the engine's own, and ``options`` its pool plan: a serving worker passes
        its rank group's, planned once on rank 0."""
        self.model_dir = str(model_dir)
        self.config = config
        options = options or plan_runner(model_dir, config)
        self.model_config = options.model
        self.num_blocks, self.max_model_len = options.num_blocks, options.max_model_len
        device = options.device
        threads = config.num_threads or default_num_threads(device)
        if executor is not None:
            self.executor = executor
        elif config.tensor_parallel_size == 1:
            self.executor = LocalExecutor(options, threads)
        else:
            self.executor = MultiprocessExecutor(options, config.tensor_parallel_size, threads)
        self.block_manager = BlockManager(self.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens,
                                   config.max_num_seqs, self.max_model_len)
        self.sampler = Sampler(config.seed)
        self._arrivals = itertools.count()

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> RequestId:
        """Queue a request; bad input raises ValueError and allocates nothing."""
        self.validate_prompt(prompt_token_ids)
        arrival = next(self._arrivals)
        request_id = RequestId(request_id if request_id is not None else f"req-{arrival}")
        eos = () if params.ignore_eos else self.model_config.eos_token_ids
        request = Request(request_id, list(prompt_token_ids), params, arrival, eos)
        self.scheduler.add_request(request)
        return request_id

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty: give at least one token")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens, more than "
                             f"max_model_len={self.max_model_len}")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids holds {bad[0]!r}, outside the vocabulary "
                             f"[0, {vocab})")

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    def drain_kv_events(self) -> list[KVEvent]:
        return self.block_manager.drain_events()

    def step(self) -> list[RequestOutput]:
        """One scheduling round and one forward pass; outputs for requests that advanced."""
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            return []
        batch = ModelInput([
            SequenceInput(item.request.all_token_ids[item.start : item.start + item.num_new_tokens],
                          item.start, item.block_ids, item.needs_sample)
            for item in scheduled.scheduled])
        logits = self.executor.execute(batch)
        sampled = self._sample(scheduled, logits)
        finished = {r.request_id for r in self.scheduler.update(scheduled, sampled)}
        return [self._output(item.request, sampled, finished) for item in scheduled.scheduled
                if item.request.request_id in sampled]

    def _sample(self, scheduled: SchedulerOutput, logits: torch.Tensor) -> dict[str, int]:
        requests = [item.request for item in scheduled.scheduled if item.needs_sample]
        tokens = self.sampler.sample(logits, [r.request_id for r in requests],
                                     [r.sampling_params for r in requests],
                                     [len(r.output_token_ids) for r in requests])
        for row, request in enumerate(requests):
            if request.sampling_params.output_logits:
                request.output_logits.append(logits[row].cpu())
        return {r.request_id: t for r, t in zip(requests, tokens, strict=True)
                if r.status is RequestStatus.RUNNING}

    def _output(self, request: Request, sampled: dict[str, int],
                finished: set[str]) -> RequestOutput:
        is_finished = request.request_id in finished
        return RequestOutput(
            request.request_id, request.prompt_token_ids, [sampled[request.request_id]],
            list(request.output_token_ids), is_finished, request.finish_reason,
            request.num_cached_tokens, request.num_prompt_tokens_computed,
            request.output_logits)

    def shutdown(self) -> None:
        self.executor.shutdown()
