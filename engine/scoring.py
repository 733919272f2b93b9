"""Teacher-forced scoring through the real engine: log-probabilities at every position.

``ModelRunner.execute`` returns logits for the last position of each sequence only, which is
all sampling needs. A quality benchmark needs every position, computed by the same model,
weights, attention backend and KV pool as serving (an fp8 pool quantizes the keys and values
the queries attend to, exactly as in serving). So this runs one sequence as a single fresh
prefill into blocks it takes from the engine's own block manager, keeps the hidden states of
every position, and hands the blocks back. Nothing enters the prefix cache.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, SequenceSpan
from engine.engine import LLMEngine
from engine.executor import LocalExecutor

_SCORING_OWNER = "__scoring__"  # the block-manager owner id of the blocks scoring borrows


@torch.inference_mode()
def score_tokens(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """log_softmax rows ``[T, vocab]`` (float32): row ``i`` is the model's distribution of
    the token after ``token_ids[: i + 1]``.

    Tensor-parallel size 1 only. Run it between generate calls, not while requests hold
    blocks it might need; a pool too small for ``token_ids`` raises ValueError.
    """
    if not isinstance(engine.executor, LocalExecutor):
        raise ValueError("score_tokens runs on a tensor_parallel_size=1 engine only, got "
                         f"tensor_parallel_size={engine.config.tensor_parallel_size}")
    engine.validate_prompt(token_ids)
    manager = engine.block_manager
    block_ids = manager.allocate(_SCORING_OWNER, len(token_ids))
    if block_ids is None:
        raise ValueError(f"the KV pool has {manager.num_free_blocks} free blocks of "
                         f"{manager.block_size}, too few for {len(token_ids)} tokens: raise "
                         f"num_blocks or score a shorter window")
    try:
        return _forward_all_positions(engine.executor.runner, token_ids, block_ids)
    finally:
        manager.free(_SCORING_OWNER)


def _forward_all_positions(runner, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
    device, block_size = runner.device, runner.options.block_size
    positions = torch.arange(len(token_ids), device=device)  # [T]
    table = torch.tensor(block_ids, dtype=torch.long, device=device)
    meta = AttentionMetadata(
        write_block_ids=table[positions // block_size],
        write_offsets=positions % block_size,
        backend=runner.attention,
        plan=runner.attention.plan([SequenceSpan(0, 0, len(token_ids), block_ids)]),
    )
    input_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    hidden = runner.model(input_ids, positions, runner.kv_cache, meta)  # [T, hidden]
    return torch.log_softmax(runner.model.compute_logits(hidden), dim=-1).cpu()
