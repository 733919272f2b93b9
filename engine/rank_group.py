"""One tensor-parallel group of worker processes running the same calls in lockstep.

Every rank holds a worker object (its model runner and KV side). Rank 0 drives: ``call``
broadcasts a method of the worker's class (the function itself, pickled by its qualified
name, never a name in a string) and plain-Python arguments to ranks 1.. and runs it on its
own worker too, so every rank runs the same forward passes and the same KV-plane operations
in the same order. ``gather`` also collects each rank's return value. Ranks 1.. sit in
``follow`` until rank 0 sends ``stop``. The process group is gloo on CPU, nccl on CUDA, and
the broadcast objects travel over gloo/nccl's object collectives.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Ranks must all join within this; a rank that died before joining fails the start.
JOIN_TIMEOUT = timedelta(seconds=120)
# Collectives wait for the driver's next call, which may be far off when the worker idles.
COLLECTIVE_TIMEOUT = timedelta(days=365)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def join_group(host: str, port: int, rank: int, size: int, is_cuda: bool) -> None:
    """Join (rank 0: host) the group's process group; a no-op for a group of one."""
    if size == 1:
        return
    store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=JOIN_TIMEOUT)
    dist.init_process_group("nccl" if is_cuda else "gloo", store=store, rank=rank,
                            world_size=size, timeout=COLLECTIVE_TIMEOUT)


def broadcast_object(value: Any = None) -> Any:
    """Rank 0 sends ``value``; every rank returns it."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankGroup:
    """Rank 0's handle on its group: run a worker method on every rank."""

    def __init__(self, worker: Any, size: int):
        self.worker = worker
        self.size = size

    def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """Run ``method(worker, *args)`` on every rank (``method``: e.g. ``DecodeRank.expect``);
        rank 0's result."""
        if self.size > 1:
            broadcast_object((method, args, False))
        return method(self.worker, *args)

    def gather(self, method: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``method(worker, *args)`` on every rank; every rank's result, by rank."""
        if self.size == 1:
            return [method(self.worker, *args)]
        broadcast_object((method, args, True))
        mine = method(self.worker, *args)
        results: list[Any] = [None] * self.size
        dist.gather_object(mine, results, dst=0)
        return results

    def stop(self) -> None:
        if self.size > 1 and dist.is_initialized():
            broadcast_object(None)
            dist.destroy_process_group()


def follow(worker: Any) -> None:
    """Ranks 1..: run rank 0's calls until it stops the group."""
    while True:
        command = broadcast_object()
        if command is None:
            break
        method, args, is_gather = command
        result = method(worker, *args)
        if is_gather:
            dist.gather_object(result, None, dst=0)
    dist.destroy_process_group()


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
