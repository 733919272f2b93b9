"""Runs model steps on every tensor-parallel rank of one engine.

Rank 0 lives in the engine's process and drives: each step it broadcasts the plain-Python
``ModelInput`` to the other ranks (spawned processes, gloo on CPU / nccl on CUDA), then all
ranks run the same forward pass. Only rank 0's logits are used.
"""

from __future__ import annotations

import dataclasses
import multiprocessing

import torch
import torch.distributed as dist

from engine.model_runner import ModelInput, ModelRunner, RunnerOptions
from engine.parallel import TensorParallel
from engine.rank_group import free_port, join_group


class LocalExecutor:
    """A single rank in this process."""

    def __init__(self, options: RunnerOptions, num_threads: int | None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.runner = ModelRunner(options, TensorParallel())

    def execute(self, batch: ModelInput) -> torch.Tensor:
        return self.runner.execute(batch)

    def shutdown(self) -> None:
        pass


def _init_rank(options: RunnerOptions, rank: int, size: int, port: int,
               num_threads: int | None) -> ModelRunner:
    if num_threads:
        torch.set_num_threads(num_threads)
    is_cuda = options.device.startswith("cuda")
    if is_cuda:
        torch.cuda.set_device(rank)
        options = dataclasses.replace(options, device=f"cuda:{rank}")
    join_group("127.0.0.1", port, rank, size, is_cuda)
    return ModelRunner(options, TensorParallel(rank, size))


def _worker_main(options: RunnerOptions, rank: int, size: int, port: int,
                 num_threads: int | None) -> None:
    runner = _init_rank(options, rank, size, port, num_threads)
    while True:
        message: list = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            break
        runner.execute(message[0])
    dist.destroy_process_group()


class MultiprocessExecutor:
    """Rank 0 here, ranks 1.. in spawned processes, one process group."""

    def __init__(self, options: RunnerOptions, tp_size: int, num_threads: int | None):
        port = free_port()
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=_worker_main, daemon=True,
                            args=(options, rank, tp_size, port, num_threads))
            for rank in range(1, tp_size)
        ]
        for process in self.processes:
            process.start()
        self.runner = _init_rank(options, 0, tp_size, port, num_threads)

    def execute(self, batch: ModelInput) -> torch.Tensor:
        self._check_alive()
        dist.broadcast_object_list([batch], src=0)
        return self.runner.execute(batch)

    def _check_alive(self) -> None:
        dead = [p.pid for p in self.processes if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker process(es) {dead} died")

    def shutdown(self) -> None:
        if dist.is_initialized():
            if all(p.is_alive() for p in self.processes):
                dist.broadcast_object_list([None], src=0)
            dist.destroy_process_group()
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def default_num_threads(device: str) -> int | None:
    """One torch thread per rank on CPU (DESIGN.md): ranks and workers share few cores, and
    intra-op threads spinning on a busy core cost far more than they save on small GEMMs.
    Set ``num_threads`` to give a lone engine more."""
    return 1 if device == "cpu" else None
