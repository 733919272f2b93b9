"""Launch a pdserve cluster on Ray: decode and prefill worker groups, wired together.

``launch(config)`` starts every TP group in its own placement group, connects each decode
worker to each prefill worker (request plane and KV plane), and returns a ``Cluster`` that
submits requests over the request plane and shuts everything down. A supervisor thread
watches every rank; when one dies its whole group is killed, the survivors are told (decode
workers fall back and free their blocks once the dead group's NIXL agents are removed), and
the group is started again under new agent names and rejoins.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.config import ClusterConfig
from pdserve.protocol import Fingerprint
from cluster.client import RequestPlaneClient
from cluster.worker_actor import WorkerRank

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerGroup:
    """One TP group (one decode or prefill worker) of Ray actors, rank 0 first."""

    role: str
    index: int
    incarnation: int
    ranks: list[Any]
    placement: Any
    address: tuple[str, int] = ("", 0)
    endpoints: list[dict] = field(default_factory=list)
    lifetimes: list[Any] = field(default_factory=list)

    @property
    def worker_id(self) -> str:
        return f"{self.role}{self.index}.{self.incarnation}"

    @property
    def agents(self) -> list[str]:
        return [e["agent_name"] for e in self.endpoints]

    @property
    def driver(self) -> Any:
        return self.ranks[0]


def launch(config: ClusterConfig | str | Path) -> Cluster:
    """Start the cluster from a config (or a YAML file holding one); a bad config raises
    ValueError naming the field, a placement Ray cannot satisfy RuntimeError."""
    if not isinstance(config, ClusterConfig):
        config = ClusterConfig.from_yaml(config)
    config.check_model()
    _init_ray(config.address)
    return Cluster(config)


def _pinned_cpu(role_config, slot: int) -> int | None:
    """The core of the ``slot``-th rank of a role (worker-major), when the role is pinned."""
    cpus = role_config.pin_cpus
    return None if not cpus else cpus[slot % len(cpus)]


def _init_ray(address: str) -> None:
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)


class Cluster:
    """A running cluster: submit requests, read stats, shut down."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.secret = secrets.token_hex(16)
        self.fingerprint = Fingerprint.of_model(config.model_dir, config.block_size,
                                                config.dtype, config.kv_transfer_dtype)
        self._lock = threading.RLock()
        self._watchers_lock = threading.Lock()
        self._decode_watchers: list[tuple[Callable, Callable]] = []
        self._is_shutting_down = False
        self.num_restarts = 0
        self.decodes: list[WorkerGroup] = []
        self.prefills: list[WorkerGroup] = []
        try:
            self.prefills = [self._start_group("prefill", i, 0)
                             for i in range(config.prefill.num_workers)]
            self.decodes = [self._start_group("decode", i, 0)
                            for i in range(config.decode.num_workers)]
            for prefill in self.prefills:
                self._introduce_decodes(prefill, self.decodes)
            for decode in self.decodes:
                self._introduce_prefills(decode, self.prefills)
            self.client = RequestPlaneClient(self.fingerprint, self.secret)
            for decode in self.decodes:
                self.client.add_decode(decode.worker_id, decode.address)
            decode_stats = self.stats("decode").values()
        except BaseException:
            if hasattr(self, "client"):
                self.client.close()
            self._kill_all()
            raise
        # what the router needs: the longest request every decode worker takes, and slots
        self.max_model_len = min(s["max_model_len"] for s in decode_stats)
        self.max_running = config.decode.num_workers * config.decode.max_num_seqs
        self._supervisor = threading.Thread(target=self._supervise, name="pdserve-supervisor",
                                            daemon=True)
        self._supervisor.start()

    # -- groups ---------------------------------------------------------------------------

    def _start_group(self, role: str, index: int, incarnation: int) -> WorkerGroup:
        role_config = self.config.decode if role == "decode" else self.config.prefill
        size = role_config.tensor_parallel_size
        bundle = {"CPU": role_config.cpus_per_rank}
        if role_config.gpus_per_rank:
            bundle["GPU"] = role_config.gpus_per_rank
        placement = placement_group([dict(bundle) for _ in range(size)],
                                    strategy="STRICT_PACK" if "GPU" in bundle else "PACK")
        group = WorkerGroup(role, index, incarnation, [], placement)
        try:
            ray.get(placement.ready(), timeout=self.config.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(placement)
            raise RuntimeError(
                f"cannot place {role} worker {index}: it needs {size} x {bundle} and the Ray "
                f"cluster has {ray.available_resources()} free after "
                f"{self.config.placement_timeout_s} s; lower {role}.cpus_per_rank / "
                f"{role}.tensor_parallel_size or add nodes") from None
        try:
            self._start_ranks(group, role_config)
        except BaseException:
            self._kill(group)  # a rank that failed to start must not leave its peers behind
            raise
        logger.info("%s started at %s:%d", group.worker_id, *group.address)
        return group

    def _start_ranks(self, group: WorkerGroup, role_config) -> None:
        size, placement = role_config.tensor_parallel_size, group.placement
        config = self.config.to_dict()
        for rank in range(size):
            strategy = PlacementGroupSchedulingStrategy(placement,
                                                        placement_group_bundle_index=rank)
            group.ranks.append(WorkerRank.options(
                num_cpus=role_config.cpus_per_rank, num_gpus=role_config.gpus_per_rank,
                scheduling_strategy=strategy, max_concurrency=8,
                name=None).remote(group.role, group.worker_id, rank, size, config, self.secret,
                                  _pinned_cpu(role_config, group.index * size + rank)))
        host, port = ray.get(group.driver.master_address.remote())
        started = ray.get([r.start.remote(host, port) for r in group.ranks])
        group.address = tuple(started[0]["address"])
        group.endpoints = started[0]["endpoints"]
        group.lifetimes = [r.wait_stopped.remote() for r in group.ranks]

    def _introduce_decodes(self, prefill: WorkerGroup, decodes: list[WorkerGroup]) -> None:
        endpoints = [e for d in decodes for e in d.endpoints]
        ray.get(prefill.driver.control.remote("add_decode", endpoints))

    def _introduce_prefills(self, decode: WorkerGroup, prefills: list[WorkerGroup]) -> None:
        ray.get([decode.driver.control.remote("add_prefill", p.worker_id, p.address[0],
                                              p.address[1], p.endpoints) for p in prefills])

    # -- the supervisor -------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._is_shutting_down:
            with self._lock:
                watched = {ref: g for g in self.decodes + self.prefills for ref in g.lifetimes}
            ready, _ = ray.wait(list(watched), num_returns=1, timeout=0.5)
            if not ready or self._is_shutting_down:
                continue
            try:
                self._restart(watched[ready[0]])
            except Exception:
                logger.exception("restarting %s failed", watched[ready[0]].worker_id)

    def _restart(self, dead: WorkerGroup) -> None:
        """A rank of ``dead`` stopped: kill its group, tell the peers, start it again."""
        with self._lock:
            logger.warning("%s lost a rank: restarting the group", dead.worker_id)
            self._kill(dead)
            if dead.role == "prefill":
                for decode in self.decodes:
                    ray.get(decode.driver.control.remote("lose_prefill", dead.worker_id))
                new = self._start_group("prefill", dead.index, dead.incarnation + 1)
                self.prefills[self.prefills.index(dead)] = new
                self._introduce_decodes(new, self.decodes)
                for decode in self.decodes:
                    self._introduce_prefills(decode, [new])
            else:
                for prefill in self.prefills:
                    ray.get(prefill.driver.control.remote("lose_decode", dead.agents))
                self.client.remove_decode(dead.worker_id)
                for _, removed in self._watchers():
                    removed(dead.worker_id)
                new = self._start_group("decode", dead.index, dead.incarnation + 1)
                self.decodes[self.decodes.index(dead)] = new
                for prefill in self.prefills:
                    self._introduce_decodes(prefill, [new])
                self._introduce_prefills(new, self.prefills)
                self.client.add_decode(new.worker_id, new.address)
                for added, _ in self._watchers():
                    added(new.worker_id, new.address)
            self.num_restarts += 1

    def _kill(self, group: WorkerGroup) -> None:
        for rank in group.ranks:
            ray.kill(rank, no_restart=True)
        remove_placement_group(group.placement)

    def _kill_all(self) -> None:
        for group in self.decodes + self.prefills:
            self._kill(group)

    # -- the user's surface ---------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int], sampling: dict | None = None,
                 request_id: str | None = None, timeout_s: float = 300.0):
        """Run one request to the end; a ``Completion``."""
        return self.client.generate(prompt_token_ids, sampling or {}, request_id, timeout_s)

    def submit(self, prompt_token_ids: list[int], sampling: dict | None = None,
               request_id: str | None = None):
        """Start a request; the returned ``Stream`` yields its token chunks."""
        return self.client.submit(prompt_token_ids, sampling or {}, request_id)

    def cancel(self, request_id: str) -> None:
        self.client.cancel(request_id)

    def stats(self, role: str | None = None) -> dict:
        """Each worker's counters by worker id (``role``: only "decode" or "prefill")."""
        with self._lock:
            groups = [g for g in self.decodes + self.prefills if role in (None, g.role)]
            return {g.worker_id: ray.get(g.driver.control.remote("stats")) for g in groups}

    def decode_addresses(self) -> list[tuple[str, tuple[str, int]]]:
        """(worker id, request-plane address) of every decode worker."""
        with self._lock:
            return [(g.worker_id, g.address) for g in self.decodes]

    def watch_decodes(self, added: Callable[[str, tuple[str, int]], None],
                      removed: Callable[[str], None]) -> None:
        """Be told (on the supervisor thread, which the callbacks must not block) when a
        decode worker is replaced: ``removed`` with the dead worker's id, then ``added``
        with its successor's id and address."""
        with self._watchers_lock:  # not the cluster lock: a restart may hold that a while
            self._decode_watchers.append((added, removed))

    def unwatch_decodes(self, added: Callable, removed: Callable) -> None:
        with self._watchers_lock:
            self._decode_watchers.remove((added, removed))

    def _watchers(self) -> list[tuple[Callable, Callable]]:
        with self._watchers_lock:
            return list(self._decode_watchers)

    def kill_decode_rank(self, index: int, rank: int = 0) -> None:
        """Kill one decode rank's process, as a crash would."""
        with self._lock:
            ray.kill(self.decodes[index].ranks[rank], no_restart=True)

    def decode_driver(self, index: int = 0) -> Any:
        """Rank 0's actor of decode worker ``index`` (tests use its hold hook)."""
        with self._lock:
            return self.decodes[index].driver

    def prefill_driver(self, index: int = 0) -> Any:
        """Rank 0's actor of prefill worker ``index`` (tests use its hold hook)."""
        with self._lock:
            return self.prefills[index].driver

    def kill_prefill_rank(self, index: int, rank: int = 0) -> None:
        """Kill one rank's process, as a crash would."""
        with self._lock:
            ray.kill(self.prefills[index].ranks[rank], no_restart=True)

    def shutdown(self) -> None:
        self._is_shutting_down = True
        self._supervisor.join(timeout=10)
        self.client.close()
        with self._lock:
            for group in self.decodes + self.prefills:
                try:
                    ray.get(group.driver.shutdown.remote(), timeout=60)
                except Exception:
                    logger.warning("%s did not shut down cleanly", group.worker_id)
            self._kill_all()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
