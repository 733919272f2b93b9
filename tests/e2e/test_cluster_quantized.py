"""Quantized weights through the cluster: local and remote prefill, at other tensor-parallel
sizes on each side, give the TP1 engine's greedy tokens for the same quantization."""

from __future__ import annotations

import dataclasses

import pytest

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
from tests.unit.engine_oracle import random_prompts

LENGTHS = [100, 12, 70]  # remote, local, remote (threshold 32)


@pytest.mark.parametrize(("quantization", "prefill_tp", "decode_tp"),
                         [("int8", 1, 2), ("fp8", 2, 1)])
def test_quantized_cluster_gives_the_tp1_engines_tokens(ray_session, tiny_llama_dir,
                                                        quantization, prefill_tp, decode_tp):
    vocab = ModelConfig.from_dir(tiny_llama_dir).vocab_size
    prompts = random_prompts(LENGTHS, vocab, seed=9)  # both quantizations change tokens
    expected = offline_greedy(tiny_llama_dir, prompts, quantization=quantization)
    assert expected != offline_greedy(tiny_llama_dir, prompts)  # quantization changes them
    config = dataclasses.replace(
        cluster_config(tiny_llama_dir, decode_tp=decode_tp, prefill_tp=prefill_tp),
        quantization=quantization)
    with launch(config) as cluster:
        assert [cluster.generate(p, GREEDY).token_ids for p in prompts] == expected
        (decode,) = worker_stats(cluster, Role.DECODE)
        assert decode.prefills == PrefillCounts(local=1, remote=2)
        wait_for(lambda: is_idle(cluster), "an idle cluster")
