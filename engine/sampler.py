"""Next-token sampling: greedy, temperature, top-k, top-p, with optional per-request seeds."""

from __future__ import annotations

import hashlib
import struct

import torch

from pdserve.sampling import MAX_SEED, SamplingParams


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


def position_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's output token number ``position``: a fixed
    digest of the pair, so a request replayed elsewhere from its tokens so far (decode worker
    migration) draws the same numbers as it would have."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed, position), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


class Sampler:
    """Samples one token per row of a float32 logits matrix ``[S, V]``.

    A request with a ``seed`` draws its token number ``i`` (``params.output_offset`` plus the
    tokens it has) from a generator seeded with ``position_seed(seed, i)``: a pure function of
    the seed and the position, whatever the batch, the worker or the tokens' history of
    machines. Requests without a seed share one generator.
    """

    def __init__(self, seed: int = 0):
        self._default_generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams], positions: list[int] | None = None) -> list[int]:
        """``positions[row]``: the output index of the token being sampled (0 when omitted)."""
        logits = logits.float().cpu()
        greedy = logits.argmax(dim=-1).tolist()
        positions = positions if positions is not None else [0] * len(params)
        tokens: list[int] = []
        for row, p in enumerate(params):
            if p.is_greedy:
                tokens.append(greedy[row])
                continue
            filtered = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
            probs = filtered.softmax(-1)
            token = torch.multinomial(probs, 1, generator=self._generator(p, positions[row]))
            tokens.append(int(token))
        return tokens

    def _generator(self, params: SamplingParams, position: int) -> torch.Generator:
        if params.seed is None:
            return self._default_generator
        return torch.Generator().manual_seed(position_seed(params.seed,
                                                           params.output_offset + position))
