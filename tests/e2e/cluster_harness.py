"""Helpers for the end-to-end cluster tests: launch, reference outputs, idle checks."""

from __future__ import annotations

import ray

from engine.llm import LLM
from pdserve.config import ClusterConfig, DecodeConfig, PrefillConfig
from pdserve.sampling import SamplingParams
from pdserve.worker_stats import Role, WorkerStats
from tests.e2e.kv_host import wait_for  # noqa: F401 (re-exported for the cluster tests)

GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
NUM_BLOCKS = 96
BLOCK_SIZE = 16


def cluster_config(model_dir, decode_tp: int = 1, prefill_tp: int = 1,
                   wire: str = "auto", **decode_options) -> ClusterConfig:
    decode = dict(num_blocks=NUM_BLOCKS, max_local_prefill_tokens=32,
                  tensor_parallel_size=decode_tp, remote_prefill_timeout_s=60.0)
    decode.update(decode_options)
    return ClusterConfig(
        model_dir=str(model_dir), block_size=BLOCK_SIZE, kv_transfer_dtype=wire,
        decode=DecodeConfig(**decode),
        prefill=PrefillConfig(num_blocks=NUM_BLOCKS, tensor_parallel_size=prefill_tp,
                              max_num_batched_tokens=64))


def offline_greedy(model_dir, prompts: list[list[int]], max_tokens: int = 12,
                   **engine_options) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with LLM(str(model_dir), num_blocks=NUM_BLOCKS * 4, block_size=BLOCK_SIZE,
             **engine_options) as llm:
        return [o.token_ids for o in llm.generate(prompts, params)]


def worker_stats(cluster, role: Role) -> list[WorkerStats]:
    return cluster.worker_stats(role)


def kill_rank(cluster, role: Role, index: int, rank: int = 0) -> None:
    """Kill one rank's process of worker ``index``, as a crash would."""
    ray.kill(ray.get_actor(cluster.rank_names(role, index)[rank]), no_restart=True)


def is_idle(cluster) -> bool:
    """Every block back in every pool, nothing expected, queued or streaming."""
    for stats in worker_stats(cluster, Role.DECODE):
        if (stats.num_free_blocks != stats.num_blocks or stats.num_remote
                or stats.num_stale or stats.num_streams
                or any(rank.num_expected for rank in stats.ranks)):
            return False
    for stats in worker_stats(cluster, Role.PREFILL):
        if stats.num_free_blocks != stats.num_blocks or stats.queue_depth:
            return False
    return cluster.client.num_open_streams == 0
