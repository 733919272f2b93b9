"""Model runtime shared by prefill and decode workers: model, paged KV, scheduler, sampler."""

from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine, RequestOutput
from engine.llm import LLM
from pdserve.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "ModelConfig", "RequestOutput", "SamplingParams"]
