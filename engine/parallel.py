"""Tensor parallelism: the process group, how heads split, and the parallel linear layers.

Column-parallel layers split output features across ranks and need no communication;
row-parallel layers split input features and all-reduce their partial sums. Attention heads
split evenly; KV heads are replicated when there are fewer of them than ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.linear import linear


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place in its tensor-parallel group."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor


def check_head_split(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    if num_heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} does not divide num_attention_heads={num_heads}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp_size} neither divides nor is a multiple of "
            f"num_key_value_heads={num_kv_heads}")


def local_kv_heads(num_kv_heads: int, tp: TensorParallel) -> tuple[int, int]:
    """(first KV head, number of KV heads) held by this rank; replicas when heads < ranks."""
    return kv_head_range(num_kv_heads, tp.rank, tp.size)


def kv_head_range(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """``local_kv_heads`` of any rank of any group size (the KV layout maps need both
    sides' ranks)."""
    if num_kv_heads >= tp_size:
        count = num_kv_heads // tp_size
        return tp_rank * count, count
    return tp_rank * num_kv_heads // tp_size, 1


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's rows (output features) split into named shards.

    ``shards`` gives, per checkpoint tensor this layer fuses (e.g. q, k, v), the
    (first row, number of rows) of that tensor this rank holds.
    """

    def __init__(self, in_features: int, shards: dict[str, tuple[int, int]], bias: bool,
                 dtype: torch.dtype):
        super().__init__()
        self.shards = shards
        self.offsets: dict[str, int] = {}
        total = 0
        for name, (_, rows) in shards.items():
            self.offsets[name] = total
            total += rows
        self.weight = nn.Parameter(torch.empty(total, in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(total, dtype=dtype), requires_grad=False)
                     if bias else None)

    def load(self, shard: str, param: str, full: torch.Tensor) -> bool:
        """Copy this rank's rows of one checkpoint tensor; False if ``param`` is not here."""
        target = {"weight": self.weight, "bias": self.bias}.get(param)
        if target is None:
            return False
        first, rows = self.shards[shard]
        target[self.offsets[shard] : self.offsets[shard] + rows].copy_(full[first : first + rows])
        return True

    def missing(self, shard: str) -> list[str]:
        return []  # weight and bias are in the model's expected tensor names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_local W_local^T)``: W's columns (input features) are split."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel,
                 dtype: torch.dtype):
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"in_features={in_features} not divisible by tp size {tp.size}")
        self.tp = tp
        self.local_in = in_features // tp.size
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype),
                                   requires_grad=False)

    def load(self, shard: None, param: str, full: torch.Tensor) -> bool:
        """Copy this rank's columns of the checkpoint weight; False for any other param."""
        if param != "weight":
            return False
        start = self.tp.rank * self.local_in
        self.weight.copy_(full[:, start : start + self.local_in])
        return True

    def missing(self, shard: None) -> list[str]:
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(linear(x, self.weight))
