"""The router's Prometheus metrics: latencies it measures itself, counters from the workers.

Latencies are taken at the router (HTTP in to first token out, token to token, HTTP in to
the end). The workers' counters (where prompts were prefilled, tokens computed, bytes sent
over the KV plane) are read from each worker at scrape time; a restarted worker comes back
under a new id, so the totals keep every incarnation's last values and never go down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from router.metrics import (
    CallbackCounter,
    CallbackGauge,
    Counter,
    Histogram,
    Registry,
)

if TYPE_CHECKING:
    from router.service import Router

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                      0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_OVERHEAD_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005,
                       0.01, 0.025, 0.05, 0.1)
_STATS_TIMEOUT_S = 5.0


class RouterMetrics:
    def __init__(self, router: Router, worker_stats: Callable[[], dict] | None):
        self.router = router
        self.worker_stats = worker_stats
        self.last_stats: dict[str, dict] = {}  # worker id -> its latest stats, every one seen
        registry = self.registry = Registry()
        self.ttft = registry.register(Histogram(
            "pdserve_time_to_first_token_seconds",
            "From the HTTP request in to its first token out of the router.",
            _LATENCY_BUCKETS_S))
        self.itl = registry.register(Histogram(
            "pdserve_inter_token_latency_seconds",
            "Gap between successive token chunks of a request, at the router.",
            _LATENCY_BUCKETS_S))
        self.e2e = registry.register(Histogram(
            "pdserve_e2e_request_latency_seconds",
            "From the HTTP request in to its last token out of the router.", _LATENCY_BUCKETS_S))
        self.overhead = registry.register(Histogram(
            "pdserve_router_overhead_seconds",
            "Time a request spends in the router: 'in' from the HTTP request to its Generate "
            "on the request plane, 'out' from a token chunk's arrival to its SSE event "
            "written (streamed requests).", _OVERHEAD_BUCKETS_S, ("direction",)))
        self.requests = registry.register(Counter(
            "pdserve_requests_total",
            "Requests by how they ended: success, error, cancelled (the client left), "
            "rejected (429), invalid (4xx).", ("status",)))
        self.cached_tokens = registry.register(Counter(
            "pdserve_prefix_cache_hit_tokens_total",
            "Prompt tokens of finished requests found in a decode worker's prefix cache."))
        registry.register(CallbackCounter(
            "pdserve_prefill_total", "Prompts prefilled, by where: local (decode worker), "
            "remote (prefill worker), fallback (remote failed, then local).",
            self._prefills, ("where",)))
        registry.register(CallbackCounter(
            "pdserve_prompt_tokens_computed_total",
            "Prompt tokens run through the model, by role.", self._computed, ("role",)))
        registry.register(CallbackCounter(
            "pdserve_kv_transfer_bytes_total",
            "Bytes of KV cache prefill workers wrote into decode workers.", self._kv_bytes))
        registry.register(CallbackGauge(
            "pdserve_queue_depth", "Requests waiting in the router's admission queue.",
            lambda: {(): float(router.admission.num_waiting)}))
        registry.register(CallbackGauge(
            "pdserve_requests_running", "Requests admitted and in flight to the workers.",
            lambda: {(): float(router.admission.num_running)}))
        registry.register(CallbackGauge(
            "pdserve_kv_blocks_free", "Free KV blocks of each decode worker (its last load "
            "report).", self._free_blocks, ("worker",)))

    async def render(self) -> str:
        if self.worker_stats is not None:
            loop = asyncio.get_running_loop()
            try:
                stats = await asyncio.wait_for(
                    loop.run_in_executor(None, self.worker_stats), _STATS_TIMEOUT_S)
            except Exception as error:  # a scrape shows the last values rather than fail
                logger.warning("metrics: worker stats unavailable (%s)", error)
            else:
                self.last_stats.update(stats)
        return self.registry.render()

    def _role_stats(self, role: str) -> list[dict]:
        return [s for worker_id, s in self.last_stats.items() if worker_id.startswith(role)]

    def _prefills(self) -> dict:
        totals = {("local",): 0.0, ("remote",): 0.0, ("fallback",): 0.0}
        for stats in self._role_stats("decode"):
            for where, count in stats.get("prefills", {}).items():
                totals[(where,)] = totals.get((where,), 0.0) + count
        return totals

    def _computed(self) -> dict:
        return {(role,): float(sum(s.get("prompt_tokens_computed", 0)
                                   for s in self._role_stats(role)))
                for role in ("decode", "prefill")}

    def _kv_bytes(self) -> dict:
        return {(): float(sum(s.get("bytes_sent", 0) for s in self._role_stats("prefill")))}

    def _free_blocks(self) -> dict:
        index = self.router.index
        return {(worker_id,): float(load.num_free_blocks) for worker_id in index.worker_ids
                if (load := index.load(worker_id)) is not None}
