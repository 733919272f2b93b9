"""Next-token sampling: greedy, temperature, top-k, top-p, with optional per-request seeds."""

from __future__ import annotations

import torch

from pdserve.sampling import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits ``[V]`` with everything outside the top-k / nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the top-1 always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Samples one token per row of a float32 logits matrix ``[S, V]``."""

    def __init__(self, seed: int = 0):
        self._default_generator = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams]) -> list[int]:
        logits = logits.float().cpu()
        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int] = []
        for row, (request_id, p) in enumerate(zip(request_ids, params, strict=True)):
            if p.is_greedy:
                tokens.append(greedy[row])
                continue
            filtered = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
            probs = filtered.softmax(-1)
            token = torch.multinomial(probs, 1, generator=self._generator(request_id, p))
            tokens.append(int(token))
        return tokens

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._default_generator
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator().manual_seed(params.seed)
            self._generators[request_id] = generator
        return generator
