"""A decode worker killed under 33 concurrent streams loses none of them: every stream that had
tokens is migrated (replayed with its tokens so far on the other worker) and ends with exactly
the tokens of an unkilled run, greedy and seeded sampling alike."""

from __future__ import annotations

import pytest

from cluster.launcher import launch
from engine import LLM, SamplingParams
from engine.config import ModelConfig
from pdserve.protocol import FinishReason
from pdserve.worker_stats import Role
from tests.e2e.cluster_harness import (
    BLOCK_SIZE,
    cluster_config,
    is_idle,
    kill_rank,
    wait_for,
)
from tests.e2e.probes import Holds
from tests.unit.engine_oracle import random_prompts

NUM_STREAMS = 32  # plus the anchor
MAX_TOKENS = 20
HOLD_AT = 3  # the anchor's worker stops after the anchor's 3rd token


def _params(index: int) -> SamplingParams:
    if index % 2:
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95,
                              seed=1000 + index, ignore_eos=True)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def holds(ray_session):
    return Holds("anchor")


def test_killing_a_decode_worker_under_33_streams_loses_none(ray_session, holds,
                                                             tiny_llama_dir):
    vocab = ModelConfig.from_dir(tiny_llama_dir).vocab_size
    lengths = [12 + (7 * i) % 50 for i in range(NUM_STREAMS + 1)]  # local and remote prefill
    prompts = random_prompts(lengths, vocab, seed=21)
    params = [_params(i) for i in range(NUM_STREAMS + 1)]
    with LLM(str(tiny_llama_dir), num_blocks=512, block_size=BLOCK_SIZE) as llm:
        expected = [o.token_ids for o in llm.generate(prompts, params)]
    config = cluster_config(tiny_llama_dir, num_blocks=160, num_workers=2)
    with launch(config, probe=holds.probe()) as cluster:
        holds.hold("anchor", HOLD_AT)
        streams = [cluster.submit(prompts[0], params[0], request_id="anchor")]
        streams += [cluster.submit(p, s) for p, s in zip(prompts[1:], params[1:], strict=True)]
        assert holds.wait_holding(), "the anchor's worker never reached the hold"
        links = cluster.client._links
        victim = streams[0].worker_id
        on_victim = [s for s in streams if s.handle.worker_id == victim]
        kill_rank(cluster, Role.DECODE, int(victim.removeprefix("decode").split(".")[0]))
        holds.release()  # the killed worker's wait at the gate ends
        results = [s.result(timeout_s=180) for s in streams]
        assert [r.error for r in results] == [""] * len(streams)
        assert {r.finish_reason for r in results} == {FinishReason.LENGTH}
        assert [r.token_ids for r in results] == expected
        migrated = links.num_migrations
        assert migrated >= 1  # the anchor had HOLD_AT tokens when its worker died
        assert migrated + links.num_resubmitted >= len(on_victim)
        assert links.num_migrated_tokens >= HOLD_AT
        wait_for(lambda: cluster.num_restarts == 1, "the decode worker to restart")
        wait_for(lambda: is_idle(cluster), "an idle cluster", timeout_s=180)
