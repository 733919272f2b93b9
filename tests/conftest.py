"""Fixtures shared by every test: the deterministic tiny checkpoints, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.modelgen import create_model

# Prompts whose greedy continuations on the tiny models were checked for a clear top-1 margin
# at every one of 48 steps (see test_modelgen.py); parity tests should draw from these.
GREEDY_PROMPTS = (
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3, 4,",
    "héllo 🙂 wörld",
    "The decode worker",
    "In the morning the market",
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_model(tmp_path_factory.mktemp("tiny-llama"), "tiny", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_model(tmp_path_factory.mktemp("tiny-qwen2"), "tiny", "qwen2")


@pytest.fixture(scope="session")
def greedy_prompts() -> tuple[str, ...]:
    return GREEDY_PROMPTS


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per test session with the CPUs of this 2-core machine: the workers'
    fractional CPU requests must fit it (DESIGN.md)."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir):
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_llama_dir)


@pytest.fixture(scope="session")
def model_name(tiny_llama_dir) -> str:
    """The tiny model's id on the HTTP API: its directory's name."""
    return tiny_llama_dir.name
