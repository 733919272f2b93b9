"""Worker groups on Ray: one TP group (one decode or prefill worker) of rank actors, placed
together, started, introduced to its peers and killed as a whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.worker_actor import RankIdentity, WorkerRank
from pdserve.cluster_handle import WorkerAddress
from pdserve.config import ClusterConfig, DecodeConfig, PrefillConfig
from pdserve.probe import Probe
from pdserve.protocol import Fingerprint
from pdserve.worker_commands import (
    AddDecode,
    AddPrefill,
    EndpointWire,
    LoseDecode,
    LosePrefill,
    agent_names,
)
from pdserve.worker_stats import Role

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerGroup:
    """One TP group of Ray actors, rank 0 first, under one worker id per incarnation."""

    role: Role
    index: int
    incarnation: int
    ranks: list[Any]
    rank_names: list[str]  # the actors' Ray names, by rank
    placement: Any
    host: str = ""
    port: int = 0
    endpoints: list[EndpointWire] = field(default_factory=list)
    lifetimes: list[Any] = field(default_factory=list)

    @property
    def worker_id(self) -> str:
        return f"{self.role.value}{self.index}.{self.incarnation}"

    @property
    def agents(self) -> list[str]:
        return agent_names(self.endpoints)

    @property
    def driver(self) -> Any:
        return self.ranks[0]

    @property
    def address(self) -> WorkerAddress:
        return WorkerAddress(self.worker_id, self.host, self.port)


@dataclass(frozen=True, slots=True)
class GroupStarter:
    """What every group of one cluster is started with."""

    config: ClusterConfig
    fingerprint: Fingerprint
    secret: str
    probe: Probe

    def start(self, role: Role, index: int, incarnation: int) -> WorkerGroup:
        """Place and start one group; RuntimeError when Ray cannot place it in time."""
        role_config = self._role_config(role)
        size = role_config.tensor_parallel_size
        bundle = {"CPU": role_config.cpus_per_rank}
        if role_config.gpus_per_rank:
            bundle["GPU"] = role_config.gpus_per_rank
        placement = placement_group([dict(bundle) for _ in range(size)],
                                    strategy="STRICT_PACK" if "GPU" in bundle else "PACK")
        group = WorkerGroup(role, index, incarnation, [], [], placement)
        try:
            ray.get(placement.ready(), timeout=self.config.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(placement)
            raise RuntimeError(
                f"cannot place {role.value} worker {index}: it needs {size} x {bundle} and the "
                f"Ray cluster has {ray.available_resources()} free after "
                f"{self.config.placement_timeout_s} s; lower {role.value}.cpus_per_rank / "
                f"{role.value}.tensor_parallel_size or add nodes") from None
        try:
            self._start_ranks(group, role_config)
        except BaseException:
            kill(group)  # a rank that failed to start must not leave its peers behind
            raise
        logger.info("%s started at %s:%d", group.worker_id, group.host, group.port)
        return group

    def _role_config(self, role: Role) -> DecodeConfig | PrefillConfig:
        return self.config.decode if role is Role.DECODE else self.config.prefill

    def _start_ranks(self, group: WorkerGroup, role_config: DecodeConfig | PrefillConfig) -> None:
        size = role_config.tensor_parallel_size
        for rank in range(size):
            strategy = PlacementGroupSchedulingStrategy(group.placement,
                                                        placement_group_bundle_index=rank)
            name = f"pdserve-{self.secret[:8]}-{group.worker_id}-r{rank}"
            identity = RankIdentity(group.role, group.worker_id, rank, size)
            group.rank_names.append(name)
            group.ranks.append(WorkerRank.options(
                num_cpus=role_config.cpus_per_rank, num_gpus=role_config.gpus_per_rank,
                scheduling_strategy=strategy, max_concurrency=8, name=name,
            ).remote(identity, self.config, self.fingerprint, self.secret,
                     _pinned_cpu(role_config, group.index * size + rank), self.probe))
        host, port = ray.get(group.driver.master_address.remote())
        started = ray.get([r.start.remote(host, port) for r in group.ranks])[0]
        group.host, group.port, group.endpoints = started.host, started.port, started.endpoints
        group.lifetimes = [r.wait_stopped.remote() for r in group.ranks]


def _pinned_cpu(role_config: DecodeConfig | PrefillConfig, slot: int) -> int | None:
    """The core of the ``slot``-th rank of a role (worker-major), when the role is pinned."""
    cpus = role_config.pin_cpus
    return None if not cpus else cpus[slot % len(cpus)]


def introduce_decodes(prefill: WorkerGroup, decodes: list[WorkerGroup]) -> None:
    """Let ``prefill`` write into the decode groups' pools."""
    endpoints = [e for d in decodes for e in d.endpoints]
    ray.get(prefill.driver.control.remote(AddDecode(endpoints)))


def introduce_prefills(decode: WorkerGroup, prefills: list[WorkerGroup]) -> None:
    """Let ``decode`` send jobs to the prefill groups."""
    ray.get([decode.driver.control.remote(AddPrefill(p.worker_id, p.host, p.port, p.endpoints))
             for p in prefills])


def lose_prefill(decode: WorkerGroup, dead: WorkerGroup) -> None:
    ray.get(decode.driver.control.remote(LosePrefill(dead.worker_id)))


def lose_decode(prefill: WorkerGroup, dead: WorkerGroup) -> None:
    ray.get(prefill.driver.control.remote(LoseDecode(dead.agents)))


def kill(group: WorkerGroup) -> None:
    """Kill every rank of ``group`` (as a crash would) and free its placement."""
    for rank in group.ranks:
        ray.kill(rank, no_restart=True)
    remove_placement_group(group.placement)
