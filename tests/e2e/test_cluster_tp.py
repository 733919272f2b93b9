"""Prefill and decode at different tensor-parallel sizes give the TP1 engine's tokens.

The TP2 + TP2 cluster asks for exactly the 2 CPUs this machine has (0.5 per rank), and its
prefill group, killed at one rank while it holds a job, restarts as a whole.
"""

from __future__ import annotations

import pytest

from cluster.launcher import launch
from engine.config import ModelConfig
from pdserve.worker_stats import PrefillCounts, Role
from tests.e2e.cluster_harness import (
    GREEDY,
    cluster_config,
    is_idle,
    kill_rank,
    offline_greedy,
    wait_for,
    worker_stats,
)
from tests.e2e.probes import PREFILL, Holds
from tests.unit.engine_oracle import random_prompts

LENGTHS = [100, 12, 70, 45]  # remote, local, remote, remote (threshold 32)


@pytest.fixture(scope="module")
def holds(ray_session):
    return Holds("doomed")


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 2), (2, 1), (2, 2)])
def test_tensor_parallel_pairs_give_the_tp1_tokens(ray_session, tiny_llama_dir, holds,
                                                   prefill_tp, decode_tp):
    vocab = ModelConfig.from_dir(tiny_llama_dir).vocab_size
    # The last two are fresh for the kill check (the decode prefix cache holds the others).
    prompts = random_prompts(LENGTHS + [100, 90], vocab, seed=5)
    expected = offline_greedy(tiny_llama_dir, prompts)
    config = cluster_config(tiny_llama_dir, decode_tp=decode_tp, prefill_tp=prefill_tp)
    with launch(config, probe=holds.probe()) as cluster:
        outputs = [cluster.generate(p, GREEDY).token_ids for p in prompts[:len(LENGTHS)]]
        assert outputs == expected[:len(LENGTHS)]
        (decode,) = worker_stats(cluster, Role.DECODE)
        assert decode.prefills == PrefillCounts(local=1, remote=3)
        assert len(decode.ranks) == decode_tp
        wait_for(lambda: is_idle(cluster), "an idle cluster")
        if (prefill_tp, decode_tp) == (2, 2):
            _kill_one_rank_of_the_prefill_group(cluster, holds, prompts[-2:], expected[-2:])


def _kill_one_rank_of_the_prefill_group(cluster, holds, prompts, expected):
    holds.hold("doomed", 0, PREFILL)
    stream = cluster.submit(prompts[0], GREEDY, request_id="doomed")
    assert holds.wait_holding()
    kill_rank(cluster, Role.PREFILL, 0, rank=1)
    holds.release()  # the killed ranks\' waits at the gate end
    assert stream.result(timeout_s=120).token_ids == expected[0]
    wait_for(lambda: cluster.num_restarts == 1, "the prefill group to restart")
    (decode,) = worker_stats(cluster, Role.DECODE)
    assert decode.prefills.fallback == 1
    wait_for(lambda: list(worker_stats(cluster, Role.DECODE)[0].prefill_peers.values())
             == [True], "decode to know the restarted prefill group")
    assert cluster.generate(prompts[1], GREEDY).token_ids == expected[1]
    (prefill,) = worker_stats(cluster, Role.PREFILL)
    assert prefill.jobs_done == 1 and len(prefill.ranks) == 2
    wait_for(lambda: is_idle(cluster), "an idle cluster")
