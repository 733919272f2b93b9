"""A tiny training run writes checkpoints that HF and the engine read alike, and the
engine's per-position scoring equals HF's log-softmax on them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from engine import LLM, SamplingParams
from engine.scoring import score_tokens
from engine.train import ModelPlan, TrainSpec, train_pair, trained_pair_dir
from engine.train_corpus import load_heldout
from pdserve.bpe import VOCAB_SIZE
from pdserve.modelgen import ModelShape
from tests.unit.engine_oracle import hf_greedy, hf_model

TINY_PLANS = {"target": ModelPlan(ModelShape(64, 2, 4, 2, 16, 128, 64), 1e-2),
              "draft": ModelPlan(ModelShape(32, 1, 2, 1, 16, 64, 64), 1e-2)}
# 200 steps is where the tiny target's greedy output stops being one token repeated.
TINY_SPEC = TrainSpec(steps=200, batch_size=4, seq_len=64, warmup_steps=5,
                      max_corpus_bytes=100_000, heldout_every=4, eval_tokens=1024,
                      num_threads=1)
# fp32 on both sides: measured max |difference| about 2e-6.
SCORE_ATOL = 1e-4
NUM_NEW_TOKENS = 24
RECORD_FIELDS = {"corpus", "steps", "batch_size", "seq_len", "lr", "seed", "wall_time_s",
                 "first_train_loss", "final_train_loss", "heldout_loss", "num_parameters"}
CORPUS_FIELDS = {"python_version", "stdlib_path", "num_files", "bytes", "train_tokens",
                 "heldout_tokens"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return train_pair(tmp_path_factory.mktemp("trained"), TINY_SPEC, plans=TINY_PLANS)


def test_checkpoint_holds_hf_names_and_loads_in_transformers(pair):
    from transformers import LlamaForCausalLM

    target, _ = pair
    with safe_open(str(target / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.post_attention_layernorm.weight"} <= names
    model, info = LlamaForCausalLM.from_pretrained(str(target), dtype=torch.float32,
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_key_value_heads == 2


def test_engine_greedy_equals_hf(pair):
    target, _ = pair
    heldout = load_heldout(target)
    prompts = [heldout[start : start + 20] for start in (0, 300, 700)]
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0, ignore_eos=True)
    with LLM(str(target), num_blocks=32, block_size=8) as llm:
        outputs = llm.generate(prompts, params)
    references = [hf_greedy(str(target), prompt, NUM_NEW_TOKENS)[0] for prompt in prompts]
    assert [output.token_ids for output in outputs] == references
    assert len({token for tokens in references for token in tokens}) >= 4


def test_both_models_learned_and_say_how(pair):
    records = [json.loads((path / "training.json").read_text()) for path in pair]
    for record in records:
        assert RECORD_FIELDS <= record.keys() and CORPUS_FIELDS <= record["corpus"].keys()
        assert record["final_train_loss"] < record["first_train_loss"] - 1.0
        assert record["heldout_loss"] < math.log(VOCAB_SIZE) - 1.0  # well under uniform
        assert record["corpus"]["heldout_tokens"] == len(load_heldout(pair[0]))
    target, draft = records
    assert draft["num_parameters"] * 3 < target["num_parameters"]
    assert (target["steps"], target["seed"]) == (TINY_SPEC.steps, TINY_SPEC.seed)


@pytest.mark.parametrize("backend", ["reference", "paged"])
def test_scoring_equals_hf_log_softmax(pair, backend):
    target, _ = pair
    token_ids = load_heldout(target)[100:164]  # the whole 64-token context
    with torch.inference_mode():
        logits = hf_model(str(target))(torch.tensor([token_ids])).logits[0]
    with LLM(str(target), num_blocks=16, block_size=8, attention_backend=backend) as llm:
        scored = score_tokens(llm.engine, token_ids)
        assert llm.engine.block_manager.num_free_blocks == 16  # the borrowed blocks are back
    torch.testing.assert_close(scored, torch.log_softmax(logits.float(), dim=-1),
                               atol=SCORE_ATOL, rtol=0)


def test_scoring_refuses_a_window_the_pool_cannot_hold(pair):
    target, _ = pair
    with LLM(str(target), num_blocks=8, block_size=8) as llm, \
            pytest.raises(ValueError, match="too few for 64 tokens"):
        llm.engine.block_manager.allocate("other", 8)
        score_tokens(llm.engine, load_heldout(target)[:64])


def test_cache_directory_names_the_fields_that_differ(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_HOME", str(tmp_path))
    assert trained_pair_dir() == tmp_path / "models" / "trained-v1"
    assert trained_pair_dir(TrainSpec(steps=300, seed=1)).name == "trained-v1-steps300-seed1"
