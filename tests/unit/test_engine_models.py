"""Checkpoint variants (Mistral, sharded, replicated KV heads under TP) and engine lifecycle."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig
from pdserve.hashing import hash_blocks
from pdserve.modelgen import create_model
from tests.unit.engine_oracle import random_prompts
from tests.unit.test_engine_parity import GREEDY, assert_matches_hf


def generate(model_dir, prompts, **options):
    with LLM(str(model_dir), **options) as llm:
        return llm.generate(prompts, GREEDY)


def test_mistral_checkpoint(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "mistral"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral",
                  sliding_window=None, rope_scaling=None)
    (model_dir / "config.json").write_text(json.dumps(config))
    prompts = random_prompts([19, 6], 500, seed=11)
    assert_matches_hf(str(model_dir), prompts,
                      generate(model_dir, prompts, num_blocks=32, block_size=8))


def test_sharded_checkpoint(tmp_path):
    model_dir = create_model(tmp_path / "sharded", "tiny", "qwen2", num_shards=3)
    assert len(list(model_dir.glob("*.safetensors"))) == 3
    prompts = random_prompts([25], 500, seed=12)
    assert_matches_hf(str(model_dir), prompts,
                      generate(model_dir, prompts, num_blocks=32, block_size=8))


def test_tensor_parallel_4_replicates_kv_heads(tiny_llama_dir):
    # 2 KV heads on 4 ranks: each rank holds one replica and one query head.
    prompts = random_prompts([14], 500, seed=13)
    assert_matches_hf(str(tiny_llama_dir), prompts,
                      generate(tiny_llama_dir, prompts, num_blocks=16, block_size=8,
                               tensor_parallel_size=4))


def test_bfloat16_runs_and_mostly_agrees(tiny_llama_dir):
    prompts = random_prompts([20], 500, seed=14)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, output_logits=True)
    with LLM(str(tiny_llama_dir), num_blocks=16, dtype="bfloat16") as llm:
        assert llm.engine.executor.runner.kv_cache.data.dtype == torch.bfloat16
        (low,) = llm.generate(prompts, params)
    (full,) = generate(tiny_llama_dir, prompts, num_blocks=16)
    cosine = torch.nn.functional.cosine_similarity(low.logits[0], full.logits[0], dim=0)
    assert float(cosine) > 0.99


def test_abort_mid_flight_returns_every_block(tiny_llama_dir):
    engine = LLMEngine(tiny_llama_dir, EngineConfig(num_blocks=32, block_size=4,
                                                    max_num_batched_tokens=8))
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in random_prompts([10, 30, 5], 500, seed=15)]
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_free_blocks < 32
    for request_id in ids:
        assert engine.abort_request(request_id)
    assert engine.block_manager.num_free_blocks == 32
    assert not engine.has_unfinished_requests and engine.step() == []
    engine.shutdown()


def test_kv_events_describe_the_prefix_cache(tiny_llama_dir):
    engine = LLMEngine(tiny_llama_dir, EngineConfig(num_blocks=8, block_size=4))
    (prompt,) = random_prompts([9], 500, seed=16)
    engine.add_request(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests:
        engine.step()
    events = engine.drain_kv_events()
    # 9 prompt tokens + 2 fed-back outputs = 11 computed: two full blocks are cached.
    assert [e.kind for e in events] == ["stored", "stored"]
    assert [e.block_hash for e in events] == hash_blocks(prompt, 4)
    assert sorted(engine.block_manager.cached_hashes()) == sorted(hash_blocks(prompt, 4))
    engine.shutdown()


def test_requests_stream_token_by_token(tiny_llama_dir):
    engine = LLMEngine(tiny_llama_dir, EngineConfig(num_blocks=16, block_size=4))
    request_id = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests:
        for output in engine.step():
            assert output.request_id == request_id
            seen += output.new_token_ids
            last = output
    assert seen == last.token_ids and len(seen) == 4 and last.finished
    engine.shutdown()


@pytest.mark.parametrize("size", [1, 3])
def test_prompt_text_and_token_ids_give_the_same_output(tiny_llama_dir, size):
    with LLM(str(tiny_llama_dir), num_blocks=32) as llm:
        text = ["Hello, my name is"] * size
        by_text = llm.generate(text, GREEDY)
        by_ids = llm.generate([llm.tokenizer.encode(t) for t in text], GREEDY)
    assert [o.token_ids for o in by_text] == [o.token_ids for o in by_ids]
