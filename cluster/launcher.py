"""Launch a pdserve cluster on Ray: decode and prefill worker groups, wired together.

``launch(config)`` starts every TP group in its own placement group, connects each decode
worker to each prefill worker (request plane and KV plane), and returns a ``Cluster``: the
typed handle the router fronts (``pdserve.cluster_handle.ClusterHandle``), a synchronous
facade for submitting requests directly, and the supervisor. The supervisor thread watches
every rank; when one dies its whole group is killed, the survivors are told (decode workers
fall back and free their blocks once the dead group's NIXL agents are removed), and the
group is started again under new agent names and rejoins.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

from cluster import groups
from cluster.client import ClusterClient, Completion, Stream
from cluster.groups import GroupStarter, WorkerGroup
from pdserve.checkpoint_files import read_json
from pdserve.cluster_handle import ModelInfo, OnAdded, OnRemoved, WorkerAddress
from pdserve.config import ClusterConfig
from pdserve.probe import Probe
from pdserve.protocol import Fingerprint
from pdserve.quant_config import resolve_scheme, weights_fingerprint
from pdserve.sampling import SamplingParams
from pdserve.worker_commands import GetStats
from pdserve.worker_stats import Role, WorkerStats

logger = logging.getLogger(__name__)

_SUPERVISE_WAIT_S = 0.5  # how often the supervisor looks up from its wait to notice a stop


def launch(config: ClusterConfig | str | Path, probe: Probe | None = None) -> Cluster:
    """Start the cluster from a config (or a YAML file holding one); a bad config raises
    ValueError naming the field, a placement Ray cannot satisfy RuntimeError. ``probe`` is
    handed to every worker (tests); the default does nothing."""
    if not isinstance(config, ClusterConfig):
        config = ClusterConfig.from_yaml(config)
    config.check_model()
    _init_ray(config.address)
    return Cluster(config, probe or Probe())


def _init_ray(address: str) -> None:
    if not ray.is_initialized():
        if address == "local":  # a new instance, never one `ray start` runs (maybe multi-node)
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    if address == "local":
        _check_one_node()


def _check_one_node() -> None:
    """``address: local`` binds the request plane to loopback: refuse a Ray this process had
    already joined that spans several nodes (workers elsewhere could not be reached)."""
    num_nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if num_nodes > 1:
        raise ValueError(f"address: 'local' is invalid, must be 'auto' or the head's "
                         f"address: this process is connected to a Ray cluster of "
                         f"{num_nodes} nodes, and a local cluster's workers listen on "
                         f"127.0.0.1 only")


class Cluster:
    """A running cluster: the router's typed handle, a request facade, stats, shutdown."""

    def __init__(self, config: ClusterConfig, probe: Probe):
        self.config = config
        self._secret = secrets.token_hex(16)
        self._fingerprint = Fingerprint.of_model(
            config.model_dir, config.block_size, config.dtype, config.kv_transfer_dtype,
            weights_fingerprint(resolve_scheme(config.quantization, config.model_dir)))
        self._starter = GroupStarter(config, self._fingerprint, self._secret, probe)
        self._lock = threading.RLock()
        self._watchers_lock = threading.Lock()
        self._decode_watchers: list[tuple[OnAdded, OnRemoved]] = []
        self._is_shutting_down = False
        self.num_restarts = 0
        self.decodes: list[WorkerGroup] = []
        self.prefills: list[WorkerGroup] = []
        try:
            self.prefills = [self._starter.start(Role.PREFILL, i, 0)
                             for i in range(config.prefill.num_workers)]
            self.decodes = [self._starter.start(Role.DECODE, i, 0)
                            for i in range(config.decode.num_workers)]
            for prefill in self.prefills:
                groups.introduce_decodes(prefill, self.decodes)
            for decode in self.decodes:
                groups.introduce_prefills(decode, self.prefills)
            decode_stats = self.worker_stats(Role.DECODE)
        except BaseException:
            self._kill_all()
            raise
        # what the router needs: the longest request every decode worker takes, and slots
        self._model = ModelInfo(
            config.model_dir, read_json(Path(config.model_dir) / "config.json")["vocab_size"],
            min(s.max_model_len for s in decode_stats), config.block_size)
        self._max_running = config.decode.num_workers * config.decode.max_num_seqs
        self.client = ClusterClient(self)
        self._supervisor = threading.Thread(target=self._supervise, name="pdserve-supervisor",
                                            daemon=True)
        self._supervisor.start()

    # -- the router's handle (pdserve.cluster_handle.ClusterHandle) -----------------------

    @property
    def model(self) -> ModelInfo:
        return self._model

    @property
    def fingerprint(self) -> Fingerprint:
        return self._fingerprint

    @property
    def secret(self) -> str:
        return self._secret

    @property
    def max_running(self) -> int:
        return self._max_running

    def decode_addresses(self) -> list[WorkerAddress]:
        with self._lock:
            return [g.address for g in self.decodes]

    def watch_decodes(self, added: OnAdded, removed: OnRemoved) -> None:
        with self._watchers_lock:  # not the cluster lock: a restart may hold that a while
            self._decode_watchers.append((added, removed))

    def unwatch_decodes(self, added: OnAdded, removed: OnRemoved) -> None:
        with self._watchers_lock:
            self._decode_watchers.remove((added, removed))

    def worker_stats(self, role: Role | None = None) -> list[WorkerStats]:
        """Every worker's stats (``role``: only decode or prefill workers), decode first."""
        with self._lock:
            chosen = [g for g in self.decodes + self.prefills if role in (None, g.role)]
            return ray.get([g.driver.control.remote(GetStats()) for g in chosen])

    # -- the user's surface ---------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int],
                 sampling: SamplingParams | Mapping[str, Any] | None = None,
                 request_id: str | None = None, timeout_s: float = 300.0) -> Completion:
        """Run one request to the end."""
        return self.client.submit(prompt_token_ids, sampling, request_id).result(timeout_s)

    def submit(self, prompt_token_ids: list[int],
               sampling: SamplingParams | Mapping[str, Any] | None = None,
               request_id: str | None = None) -> Stream:
        """Start a request; the returned ``Stream`` yields its token chunks."""
        return self.client.submit(prompt_token_ids, sampling, request_id)

    def rank_names(self, role: Role, index: int) -> list[str]:
        """The Ray actor names of worker ``index``'s ranks (``ray.get_actor`` finds them)."""
        with self._lock:
            group = (self.decodes if role is Role.DECODE else self.prefills)[index]
            return list(group.rank_names)

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

    # -- the supervisor -------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._is_shutting_down:
            with self._lock:
                watched = {ref: g for g in self.decodes + self.prefills for ref in g.lifetimes}
            ready, _ = ray.wait(list(watched), num_returns=1, timeout=_SUPERVISE_WAIT_S)
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
            groups.kill(dead)
            if dead.role is Role.PREFILL:
                self._restart_prefill(dead)
            else:
                self._restart_decode(dead)
            self.num_restarts += 1

    def _restart_prefill(self, dead: WorkerGroup) -> None:
        for decode in self.decodes:
            groups.lose_prefill(decode, dead)
        new = self._starter.start(Role.PREFILL, dead.index, dead.incarnation + 1)
        self.prefills[self.prefills.index(dead)] = new
        groups.introduce_decodes(new, self.decodes)
        for decode in self.decodes:
            groups.introduce_prefills(decode, [new])

    def _restart_decode(self, dead: WorkerGroup) -> None:
        for prefill in self.prefills:
            groups.lose_decode(prefill, dead)
        for _, removed in self._watchers():
            removed(dead.worker_id)
        new = self._starter.start(Role.DECODE, dead.index, dead.incarnation + 1)
        self.decodes[self.decodes.index(dead)] = new
        for prefill in self.prefills:
            groups.introduce_decodes(prefill, [new])
        groups.introduce_prefills(new, self.prefills)
        for added, _ in self._watchers():
            added(new.address)

    def _watchers(self) -> list[tuple[OnAdded, OnRemoved]]:
        with self._watchers_lock:
            return list(self._decode_watchers)

    def _kill_all(self) -> None:
        for group in self.decodes + self.prefills:
            groups.kill(group)
