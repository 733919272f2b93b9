"""The router's Prometheus metrics: latencies it measures itself, counters from the workers.

Latencies are taken at the router (HTTP in to first token out, token to token, HTTP in to
the end). The workers' counters (where prompts were prefilled, tokens computed, bytes sent
over the KV plane) are read from each worker at scrape time; a restarted worker comes back
under a new id, so the totals keep every incarnation's last values and never go down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.worker_stats import Role, WorkerStats

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                      0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_OVERHEAD_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005,
                       0.01, 0.025, 0.05, 0.1)
_STATS_TIMEOUT_S = 5.0


class ScrapeTimeCollector(Collector):
    """The metrics computed when scraped: the workers' counters, summed over every worker
    incarnation seen, and the router's queue and free-block gauges."""

    def __init__(self, queue_depth: Callable[[], int], num_running: Callable[[], int],
                 free_blocks: Callable[[], dict[str, int]],
                 moves: Callable[[], tuple[int, int, int]] | None = None):
        self.queue_depth = queue_depth
        self.num_running = num_running
        self.free_blocks = free_blocks
        self.moves = moves  # (resubmitted, migrated, migrated tokens) off dead decode workers
        # worker id -> its latest stats, for every worker ever seen: a replaced worker's
        # last counts stay in the totals
        self.last_stats: dict[str, WorkerStats] = {}

    def update(self, stats: list[WorkerStats]) -> None:
        for worker_stats in stats:
            self.last_stats[worker_stats.worker_id] = worker_stats

    def collect(self) -> Iterator[Metric]:
        decodes = self._of_role(Role.DECODE)
        prefills = self._of_role(Role.PREFILL)
        prefill_total = CounterMetricFamily(
            "pdserve_prefill_total", "Prompts prefilled, by where: local (decode worker), "
            "remote (prefill worker), fallback (remote failed, then local).", labels=("where",))
        prefill_total.add_metric(["local"], sum(s.prefills.local for s in decodes))
        prefill_total.add_metric(["remote"], sum(s.prefills.remote for s in decodes))
        prefill_total.add_metric(["fallback"], sum(s.prefills.fallback for s in decodes))
        yield prefill_total
        computed = CounterMetricFamily(
            "pdserve_prompt_tokens_computed_total",
            "Prompt tokens run through the model, by role.", labels=("role",))
        for role, stats in ((Role.DECODE, decodes), (Role.PREFILL, prefills)):
            computed.add_metric([role.value], sum(s.prompt_tokens_computed for s in stats))
        yield computed
        yield CounterMetricFamily(
            "pdserve_kv_transfer_bytes_total",
            "Bytes of KV cache prefill workers wrote into decode workers.",
            value=sum(s.bytes_sent for s in prefills))
        yield CounterMetricFamily(
            "pdserve_kv_checksum_failures_total",
            "Remote prefills whose landed KV failed its checksum (kv_transfer_checksum), "
            "then prefilled locally.", value=sum(s.checksum_failures for s in decodes))
        yield GaugeMetricFamily("pdserve_queue_depth",
                                "Requests waiting in the router's admission queue.",
                                value=self.queue_depth())
        yield GaugeMetricFamily("pdserve_requests_running",
                                "Requests admitted and in flight to the workers.",
                                value=self.num_running())
        free = GaugeMetricFamily(
            "pdserve_kv_blocks_free",
            "Free KV blocks of each decode worker (its last load report).", labels=("worker",))
        for worker_id, num_free_blocks in sorted(self.free_blocks().items()):
            free.add_metric([worker_id], num_free_blocks)
        yield free
        resubmitted, migrated, migrated_tokens = self.moves() if self.moves else (0, 0, 0)
        moved = CounterMetricFamily(
            "pdserve_requests_moved_total",
            "Requests moved off a decode worker that died: before their first token "
            "(resubmitted) or with tokens, replayed on another worker (migrated).",
            labels=("how",))
        moved.add_metric(["resubmitted"], resubmitted)
        moved.add_metric(["migrated"], migrated)
        yield moved
        yield CounterMetricFamily(
            "pdserve_migrated_tokens_total",
            "Output tokens migrated requests carried to their new worker as prompt.",
            value=migrated_tokens)

    def _of_role(self, role: Role) -> list:  # of DecodeStats or of PrefillStats, by role
        return [stats for stats in self.last_stats.values() if stats.role is role]


class RouterMetrics:
    """The metrics one router's ``/metrics`` serves, in a registry of its own (several
    routers may live in one process). The router updates ``ttft``, ``itl``, ``e2e``,
    ``overhead``, ``requests`` and ``cached_tokens``; the rest is read when scraped."""

    def __init__(self, worker_stats: Callable[[], list[WorkerStats]] | None,
                 queue_depth: Callable[[], int], num_running: Callable[[], int],
                 free_blocks: Callable[[], dict[str, int]],
                 moves: Callable[[], tuple[int, int, int]] | None = None):
        self.worker_stats = worker_stats
        registry = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "From the HTTP request in to its first token out of the router.",
            buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds",
            "Gap between successive token chunks of a request, at the router.",
            buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "From the HTTP request in to its last token out of the router.",
            buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.overhead = Histogram(
            "pdserve_router_overhead_seconds",
            "Time a request spends in the router: 'in' from the HTTP request to its Generate "
            "on the request plane, 'out' from a token chunk's arrival to its SSE event "
            "written (streamed requests).", ("direction",), buckets=_OVERHEAD_BUCKETS_S,
            registry=registry)
        self.requests = Counter(
            "pdserve_requests_total",
            "Requests by how they ended: success, error, cancelled (the client left), "
            "rejected (429), invalid (4xx).", ("status",), registry=registry)
        self.slow_readers = Counter(
            "pdserve_slow_readers_total",
            "Streamed requests cut off because the client read too slowly: a write waited "
            "past router.stream_write_timeout_s (write_timeout), or more token chunks than "
            "router.stream_max_unsent_chunks waited for it (unsent_cap).", ("why",),
            registry=registry)
        self.cached_tokens = Counter(
            "pdserve_prefix_cache_hit_tokens_total",
            "Prompt tokens of finished requests found in a decode worker's prefix cache.",
            registry=registry)
        self.scrape_time = ScrapeTimeCollector(queue_depth, num_running, free_blocks, moves)
        registry.register(self.scrape_time)

    async def render(self) -> bytes:
        """The exposition text; on a failed stats fetch, the workers' last values."""
        if self.worker_stats is not None:
            loop = asyncio.get_running_loop()
            try:
                stats = await asyncio.wait_for(
                    loop.run_in_executor(None, self.worker_stats), _STATS_TIMEOUT_S)
            except Exception as error:  # a scrape shows the last values rather than fail
                logger.warning("metrics: worker stats unavailable (%s)", error)
            else:
                self.scrape_time.update(stats)
        return generate_latest(self.registry)
