"""Bad input is a ValueError naming the field and value; nothing is allocated for it."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.config import ModelConfig


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), num_blocks=16, block_size=4, max_model_len=64) as engine:
        yield engine


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens=0"),
    ({"temperature": -0.5}, "temperature=-0.5"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"top_k": -2}, "top_k=-2"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt is empty"),
    ("", "prompt is empty"),
    (list(range(8, 8 + 65)), "65 tokens, more than max_model_len=64"),
    ([5, 100000], "100000, outside the vocabulary"),
    ([5, -1], "-1, outside the vocabulary"),
])
def test_bad_prompt_allocates_nothing(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[9, 10, 11], prompt], SamplingParams(max_tokens=2))
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == 16
    assert not engine.has_unfinished_requests


def test_prompt_of_exactly_max_model_len_gives_one_token(llm):
    (output,) = llm.generate([list(range(8, 8 + 64))], SamplingParams(max_tokens=5))
    assert len(output.token_ids) == 1 and output.finish_reason == "length"


def test_unknown_engine_option(tiny_llama_dir):
    with pytest.raises(ValueError, match="unknown engine option.*'blok_size'"):
        LLM(str(tiny_llama_dir), blok_size=4)


@pytest.mark.parametrize("option, message", [
    ({"kv_cache_dtype": "int4"}, "kv_cache_dtype='int4'"),
    ({"block_size": 0}, "block_size=0"),
    ({"max_model_len": 10**6}, "max_model_len=1000000 exceeds"),
    ({"num_blocks": 2, "block_size": 4, "max_model_len": 64}, "num_blocks=2"),
    ({"tensor_parallel_size": 3}, "tensor_parallel_size=3"),
])
def test_bad_engine_options(tiny_llama_dir, option, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_llama_dir), **option)


def test_unsupported_architecture(tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        ModelConfig.from_dir(tmp_path / "m")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_file_is_named(tmp_path, tiny_llama_dir, missing):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (tmp_path / "m" / missing).unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="config.json|safetensors"):
        LLM(str(tmp_path / "m"), num_blocks=8)


def test_missing_config_field_is_named(tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'hidden_size' is missing"):
        ModelConfig.from_dir(tmp_path / "m")


def test_generation_config_eos_list(tiny_llama_dir):
    config = ModelConfig.from_dir(tiny_llama_dir)
    generation = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    assert list(config.eos_token_ids) == generation["eos_token_id"]
    assert len(config.eos_token_ids) == 2
