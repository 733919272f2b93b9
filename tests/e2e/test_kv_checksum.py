"""KV integrity on the wire, end to end: a byte flipped in a landed block is caught, the
request falls back to a local prefill and still returns the greedy tokens, the failure is
counted and nothing stays allocated.

A real local Ray cluster with real NIXL: prefill TP1, decode TP2, the fp8 wire into fp32
pools (so what is checked is the fp8 staging area, before it is dequantized), every block
of every layer digested (``kv_transfer_checksum: all``), the prompts chunked by 64 tokens.
"""

from __future__ import annotations

import dataclasses

import pytest

from cluster.launcher import launch
from engine.config import ModelConfig
from pdserve.choices import KVChecksum
from pdserve.worker_stats import DecodeStats, PrefillCounts, Role
from tests.e2e.cluster_harness import (
    GREEDY,
    cluster_config,
    is_idle,
    offline_greedy,
    wait_for,
    worker_stats,
)
from tests.e2e.probes import CorruptProbe
from tests.unit.engine_oracle import random_prompts


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_llama_dir):
    config = dataclasses.replace(cluster_config(tiny_llama_dir, decode_tp=2, wire="fp8"),
                                 kv_transfer_checksum="all")
    assert config.kv_transfer_checksum is KVChecksum.ALL
    # rank 1: the mismatch is found by a rank other than the one that holds the digests
    with launch(config, probe=CorruptProbe(frozenset({"corrupt-me"}), tp_rank=1)) as cluster:
        yield cluster


def _decode(cluster) -> DecodeStats:
    (stats,) = worker_stats(cluster, Role.DECODE)
    return stats


def test_corrupt_kv_falls_back_to_a_local_prefill_and_clean_kv_passes(cluster,
                                                                      tiny_llama_dir):
    vocab = ModelConfig.from_dir(tiny_llama_dir).vocab_size
    corrupt, clean = random_prompts([100, 90], vocab, seed=11)
    (expected,) = offline_greedy(tiny_llama_dir, [corrupt])

    result = cluster.generate(corrupt, GREEDY, request_id="corrupt-me")
    assert result.token_ids == expected and not result.error
    decode = _decode(cluster)
    assert decode.checksum_failures == 1
    assert decode.prefills == PrefillCounts(remote=1, fallback=1)
    assert decode.prompt_tokens_computed == 100  # the whole prompt, here, after the mismatch
    (prefill,) = worker_stats(cluster, Role.PREFILL)
    assert prefill.jobs_done == 1  # the bytes went wrong after the write, not in it
    wait_for(lambda: is_idle(cluster), "an idle cluster")

    # Untouched KV passes every digest: remote, only the last prompt token computed here.
    result = cluster.generate(clean, GREEDY)
    assert len(result.token_ids) == GREEDY["max_tokens"] and not result.error
    decode = _decode(cluster)
    assert decode.checksum_failures == 1
    assert decode.prefills == PrefillCounts(remote=2, fallback=1)
    assert decode.prompt_tokens_computed == 101
    wait_for(lambda: is_idle(cluster), "an idle cluster")
