"""Quantized weights across processes: an engine of two ranks, and the cluster's local and
remote prefill at other tensor-parallel sizes on each side, give the TP1 engine's greedy
tokens for the same quantization."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.launcher import launch
from engine import LLM, SamplingParams
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
from tests.unit.quant_checkpoints import write_fp8_block

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


@pytest.mark.parametrize("variant", ["int8", "fp8", "block"])
def test_an_engine_of_two_ranks_equals_one(tiny_llama_dir, tmp_path, variant):
    """The scales shard with their rows and columns, and a row-parallel rank's fp8 token
    scales come from the whole row: TP=2 computes TP=1's tokens (two processes, gloo)."""
    model_dir, options = tiny_llama_dir, {"quantization": variant}
    if variant == "block":
        model_dir, options = write_fp8_block(tiny_llama_dir, tmp_path / "block", (32, 32)), {}
    prompts = random_prompts([21, 6], 400, seed=4)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = []
    for size in (1, 2):
        with LLM(str(model_dir), num_blocks=64, block_size=4, tensor_parallel_size=size,
                 **options) as llm:
            outputs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert outputs[0] == outputs[1]
