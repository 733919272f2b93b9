"""A lost DONE notice: every KV write landed but decode never hears of it. Decode's deadline
passes, it cancels the job and prefills locally into fresh blocks, and the request still
returns the engine's greedy tokens, with nothing left allocated on either side."""

from __future__ import annotations

from cluster.launcher import launch
from engine.config import ModelConfig
from pdserve.worker_stats import PrefillCounts, Role
from tests.e2e.cluster_harness import (
    GREEDY,
    cluster_config,
    is_idle,
    offline_greedy,
    wait_for,
    worker_stats,
)
from tests.e2e.probes import DropNoticeProbe
from tests.unit.engine_oracle import random_prompts


def test_a_lost_completion_notice_falls_back_at_the_deadline(ray_session, tiny_llama_dir):
    vocab = ModelConfig.from_dir(tiny_llama_dir).vocab_size
    lost, fine = random_prompts([90, 80], vocab, seed=31)  # both long: prefilled remotely
    expected = offline_greedy(tiny_llama_dir, [lost, fine])
    config = cluster_config(tiny_llama_dir, remote_prefill_timeout_s=3.0)
    with launch(config, probe=DropNoticeProbe(frozenset({"lost-notice"}))) as cluster:
        assert cluster.generate(lost, GREEDY, request_id="lost-notice").token_ids == \
            expected[0]
        (decode,) = worker_stats(cluster, Role.DECODE)
        # decided remote, then fell back: its KV never counted as arrived
        assert decode.prefills == PrefillCounts(local=0, remote=1, fallback=1)
        assert cluster.generate(fine, GREEDY).token_ids == expected[1]  # the plane still works
        wait_for(lambda: is_idle(cluster), "the pools to be idle after the lost notice")
        (decode,) = worker_stats(cluster, Role.DECODE)
        assert decode.prefills == PrefillCounts(local=0, remote=2, fallback=1)
