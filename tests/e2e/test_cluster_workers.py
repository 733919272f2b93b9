"""Several decode and prefill workers in one cluster: every decode worker reaches every
prefill worker, and requests spread over both kinds."""

from __future__ import annotations

import dataclasses

from cluster.launcher import launch
from engine.config import ModelConfig
from pdserve.config import PrefillConfig
from pdserve.worker_stats import Role
from tests.e2e.cluster_harness import (
    GREEDY,
    NUM_BLOCKS,
    cluster_config,
    is_idle,
    offline_greedy,
    wait_for,
    worker_stats,
)
from tests.unit.engine_oracle import random_prompts


def test_two_decode_and_two_prefill_workers_share_the_load(ray_session, tiny_llama_dir):
    vocab = ModelConfig.from_dir(tiny_llama_dir).vocab_size
    lengths = [100, 90, 80, 70, 60, 50, 12, 8]  # six remote, two local
    prompts = random_prompts(lengths, vocab, seed=10)
    expected = offline_greedy(tiny_llama_dir, prompts)
    config = cluster_config(tiny_llama_dir, num_workers=2)
    config = dataclasses.replace(config, prefill=PrefillConfig(
        num_workers=2, num_blocks=NUM_BLOCKS, max_num_batched_tokens=64))
    with launch(config) as cluster:
        streams = [cluster.submit(p, GREEDY) for p in prompts]
        assert [s.result(timeout_s=120).token_ids for s in streams] == expected
        decodes = worker_stats(cluster, Role.DECODE)
        # the facade routes like the router (KV- and load-aware): both workers take some
        assert sum(s.num_finished for s in decodes) == 8
        assert all(s.num_finished > 0 for s in decodes), decodes
        assert sum(s.prefills.remote for s in decodes) == 6
        assert all(len(s.prefill_peers) == 2 for s in decodes)
        prefills = worker_stats(cluster, Role.PREFILL)
        assert sum(s.jobs_done for s in prefills) == 6
        wait_for(lambda: is_idle(cluster), "an idle cluster")
