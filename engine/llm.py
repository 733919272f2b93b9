"""The offline API: ``LLM(model_dir, **engine_options).generate(prompts, sampling_params)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.engine import LLMEngine, RequestOutput
from pdserve.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate for a batch of prompts (strings or token id lists) with continuous batching."""

    def __init__(self, model_dir: str | Path, **engine_options: Any):
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        self.engine = LLMEngine(model_dir, EngineConfig(**engine_options))
        self.tokenizer = _load_tokenizer(Path(model_dir))

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params has {len(params_list)} entries for "
                             f"{len(prompts)} prompts")
        token_lists = [self._tokenize(p) for p in prompts]
        for tokens in token_lists:  # validate all before queueing any
            self.engine.validate_prompt(tokens)
        ids = [self.engine.add_request(t, p) for t, p in zip(token_lists, params_list, strict=True)]
        results: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests:
            for output in self.engine.step():
                if output.finished:
                    results[output.request_id] = output
        outputs = [results[i] for i in ids]
        for output in outputs:
            if self.tokenizer is not None:
                output.text = self.tokenizer.decode(output.token_ids)
        return outputs

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or token")
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model directory has no tokenizer.json; "
                                 "pass token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list):
            raise ValueError(f"prompt must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        return prompt

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _load_tokenizer(model_dir: Path):
    if not (model_dir / "tokenizer.json").is_file():
        return None
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)
