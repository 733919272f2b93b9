"""The router's metrics (router.router_metrics): exact values as a scraper parses them."""

from __future__ import annotations

import ast
import asyncio
import math
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pdserve.worker_stats import DecodeStats, PrefillCounts, PrefillStats, WorkerStats
from router.router_metrics import RouterMetrics

SOURCE = Path(__file__).parents[2] / "router" / "router_metrics.py"


def decode_stats(worker_id: str, *, local: int = 0, remote: int = 0, fallback: int = 0,
                 prompt_tokens_computed: int = 0) -> DecodeStats:
    return DecodeStats(
        worker_id=worker_id, decisions={}, prompt_tokens_computed=prompt_tokens_computed,
        prefills=PrefillCounts(local=local, remote=remote, fallback=fallback),
        num_finished=0, num_running=0, num_waiting=0, num_waiting_for_remote_kv=0,
        num_remote=0, num_stale=0, num_streams=0, num_free_blocks=16, num_blocks=16,
        max_model_len=256, ranks=[], prefill_peers={}, num_subscribers=0, rss_bytes=0)


def prefill_stats(worker_id: str, *, bytes_sent: int = 0,
                  prompt_tokens_computed: int = 0) -> PrefillStats:
    return PrefillStats(
        worker_id=worker_id, jobs_done=0, jobs_failed=0, jobs_cancelled=0,
        bytes_sent=bytes_sent, prompt_tokens_computed=prompt_tokens_computed, queue_depth=0,
        num_active=0, num_free_blocks=16, num_blocks=16, num_connections=0, rss_bytes=0,
        ranks=[])


def make_metrics(worker_stats=None, queue_depth=lambda: 0, num_running=lambda: 0,
                 free_blocks=dict) -> RouterMetrics:
    return RouterMetrics(worker_stats, queue_depth, num_running, free_blocks)


def scrape(metrics: RouterMetrics) -> dict[str, float]:
    """Every sample as ``name{label="value",...}`` (labels sorted) -> its value."""
    text = asyncio.run(metrics.render()).decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def starting_with(values: dict[str, float], prefix: str) -> dict[str, float]:
    return {name: value for name, value in values.items() if name.startswith(prefix)}


WORKER_COUNTERS = ('pdserve_prefill_total{where="local"}', 'pdserve_prefill_total{where="remote"}',
                   'pdserve_prefill_total{where="fallback"}',
                   'pdserve_prompt_tokens_computed_total{role="decode"}',
                   'pdserve_prompt_tokens_computed_total{role="prefill"}',
                   "pdserve_kv_transfer_bytes_total")


def worker_counters(values: dict[str, float]) -> tuple[float, ...]:
    return tuple(values[name] for name in WORKER_COUNTERS)


def test_families_keep_their_names_types_and_help():
    text = asyncio.run(make_metrics().render()).decode()
    families = [(f.name, f.type, f.documentation)
                for f in text_string_to_metric_families(text) if not f.name.endswith("_created")]
    assert families == [
        ("pdserve_time_to_first_token_seconds", "histogram",
         "From the HTTP request in to its first token out of the router."),
        ("pdserve_inter_token_latency_seconds", "histogram",
         "Gap between successive token chunks of a request, at the router."),
        ("pdserve_e2e_request_latency_seconds", "histogram",
         "From the HTTP request in to its last token out of the router."),
        ("pdserve_router_overhead_seconds", "histogram",
         "Time a request spends in the router: 'in' from the HTTP request to its Generate "
         "on the request plane, 'out' from a token chunk's arrival to its SSE event "
         "written (streamed requests)."),
        # a counter's family is named without "_total"; its sample keeps it
        ("pdserve_requests", "counter",
         "Requests by how they ended: success, error, cancelled (the client left), "
         "rejected (429), invalid (4xx)."),
        ("pdserve_slow_readers", "counter",
         "Streamed requests cut off because the client read too slowly: a write waited "
         "past router.stream_write_timeout_s (write_timeout), or more token chunks than "
         "router.stream_max_unsent_chunks waited for it (unsent_cap)."),
        ("pdserve_prefix_cache_hit_tokens", "counter",
         "Prompt tokens of finished requests found in a decode worker's prefix cache."),
        ("pdserve_prefill", "counter", "Prompts prefilled, by where: local (decode worker), "
         "remote (prefill worker), fallback (remote failed, then local)."),
        ("pdserve_prompt_tokens_computed", "counter",
         "Prompt tokens run through the model, by role."),
        ("pdserve_kv_transfer_bytes", "counter",
         "Bytes of KV cache prefill workers wrote into decode workers."),
        ("pdserve_kv_checksum_failures", "counter",
         "Remote prefills whose landed KV failed its checksum (kv_transfer_checksum), "
         "then prefilled locally."),
        ("pdserve_queue_depth", "gauge", "Requests waiting in the router's admission queue."),
        ("pdserve_requests_running", "gauge",
         "Requests admitted and in flight to the workers."),
        ("pdserve_kv_blocks_free", "gauge",
         "Free KV blocks of each decode worker (its last load report)."),
        ("pdserve_requests_moved", "counter",
         "Requests moved off a decode worker that died: before their first token "
         "(resubmitted) or with tokens, replayed on another worker (migrated)."),
        ("pdserve_migrated_tokens", "counter",
         "Output tokens migrated requests carried to their new worker as prompt."),
    ]


def test_histograms_keep_their_buckets():
    metrics = make_metrics()
    metrics.overhead.labels("in").observe(0.0002)
    text = asyncio.run(metrics.render()).decode()
    bounds = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bounds[sample.name].append(float(sample.labels["le"]))
    latency = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
               1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, math.inf]
    assert dict(bounds) == {
        "pdserve_time_to_first_token_seconds_bucket": latency,
        "pdserve_inter_token_latency_seconds_bucket": latency,
        "pdserve_e2e_request_latency_seconds_bucket": latency,
        "pdserve_router_overhead_seconds_bucket": [
            0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025,
            0.05, 0.1, math.inf],
    }


def test_each_observation_counts_once_into_its_buckets():
    metrics = make_metrics()
    before = scrape(metrics)
    metrics.ttft.observe(0.25)
    after_one = scrape(metrics)
    metrics.ttft.observe(0.5)  # equal to a bound: counted in that bound's bucket
    after_two = scrape(metrics)
    name = "pdserve_time_to_first_token_seconds"
    assert [values[f"{name}_count"] for values in (before, after_one, after_two)] == [0, 1, 2]
    assert after_two[f"{name}_sum"] == 0.75
    assert [after_two[f'{name}_bucket{{le="{le}"}}'] for le in ("0.2", "0.3", "0.5", "+Inf")] \
        == [0, 1, 2, 2]
    assert after_two["pdserve_inter_token_latency_seconds_count"] == 0


def test_overhead_counts_by_direction():
    metrics = make_metrics()
    metrics.overhead.labels("in").observe(0.0001)
    metrics.overhead.labels("in").observe(0.002)
    metrics.overhead.labels("out").observe(0.0003)
    values = scrape(metrics)
    assert values['pdserve_router_overhead_seconds_count{direction="in"}'] == 2
    assert values['pdserve_router_overhead_seconds_count{direction="out"}'] == 1
    assert values['pdserve_router_overhead_seconds_bucket{direction="in",le="0.0001"}'] == 1


def test_requests_count_by_status_and_cached_tokens_add_up():
    metrics = make_metrics()
    assert starting_with(scrape(metrics), "pdserve_requests_total") == {}
    assert scrape(metrics)["pdserve_prefix_cache_hit_tokens_total"] == 0
    for status in ("success", "success", "invalid", "cancelled"):
        metrics.requests.labels(status).inc()
    metrics.cached_tokens.inc(16)
    metrics.cached_tokens.inc(0)
    metrics.cached_tokens.inc(32)
    values = scrape(metrics)
    assert starting_with(values, "pdserve_requests_total") == {
        'pdserve_requests_total{status="success"}': 2,
        'pdserve_requests_total{status="invalid"}': 1,
        'pdserve_requests_total{status="cancelled"}': 1,
    }
    assert values["pdserve_prefix_cache_hit_tokens_total"] == 48


def test_worker_counters_are_summed_by_role():
    stats: list[WorkerStats] = [
        decode_stats("decode0.0", local=3, remote=2, fallback=1, prompt_tokens_computed=40),
        decode_stats("decode1.0", local=1, prompt_tokens_computed=8),
        prefill_stats("prefill0.0", bytes_sent=4096, prompt_tokens_computed=64),
        prefill_stats("prefill1.0", bytes_sent=1024, prompt_tokens_computed=16),
    ]
    values = scrape(make_metrics(lambda: stats))
    assert worker_counters(values) == (4, 2, 1, 48, 80, 5120)


def test_stats_are_told_apart_by_role_not_by_worker_id():
    stats: list[WorkerStats] = [decode_stats("prefill-like", local=2, prompt_tokens_computed=5),
                                prefill_stats("decode-like", bytes_sent=7,
                                              prompt_tokens_computed=9)]
    assert worker_counters(scrape(make_metrics(lambda: stats))) == (2, 0, 0, 5, 9, 7)


def test_a_replaced_worker_keeps_its_last_counts_and_totals_never_go_down():
    reports: list[list[WorkerStats]] = [
        [decode_stats("decode0.0", local=3, remote=5, prompt_tokens_computed=30),
         prefill_stats("prefill0.0", bytes_sent=1000, prompt_tokens_computed=50)],
        # decode0.0 died; its successor decode0.1 starts from zero
        [decode_stats("decode0.1", local=1, prompt_tokens_computed=4),
         prefill_stats("prefill0.0", bytes_sent=1500, prompt_tokens_computed=70)],
        # and prefill0.0 was replaced by prefill0.1
        [decode_stats("decode0.1", local=2, remote=1, prompt_tokens_computed=9),
         prefill_stats("prefill0.1", bytes_sent=10, prompt_tokens_computed=2)],
    ]
    metrics = make_metrics(lambda: reports.pop(0))
    scrapes = [worker_counters(scrape(metrics)) for _ in range(3)]
    assert scrapes == [(3, 5, 0, 30, 50, 1000),
                       (4, 5, 0, 34, 70, 1500),
                       (5, 6, 0, 39, 72, 1510)]
    assert sorted(metrics.scrape_time.last_stats) == [
        "decode0.0", "decode0.1", "prefill0.0", "prefill0.1"]


def test_failed_stats_fetch_keeps_the_last_values(caplog):
    calls = []

    def worker_stats() -> list[WorkerStats]:
        calls.append(None)
        if len(calls) > 1:
            raise RuntimeError("the cluster is restarting")
        return [decode_stats("decode0.0", remote=2), prefill_stats("prefill0.0", bytes_sent=9)]

    metrics = make_metrics(worker_stats)
    first = scrape(metrics)
    second = scrape(metrics)
    assert worker_counters(first) == worker_counters(second) == (0, 2, 0, 0, 0, 9)
    assert len(calls) == 2
    assert "worker stats unavailable (the cluster is restarting)" in caplog.text


def test_without_worker_stats_the_worker_counters_are_zero():
    assert worker_counters(scrape(make_metrics(None))) == (0, 0, 0, 0, 0, 0)


def test_gauges_are_read_at_scrape_time():
    state = {"waiting": 3, "running": 2, "free": {"decode0.0": 12, "decode1.0": 40}}
    metrics = make_metrics(queue_depth=lambda: state["waiting"],
                           num_running=lambda: state["running"],
                           free_blocks=lambda: state["free"])
    first = scrape(metrics)
    state.update(waiting=0, running=5, free={"decode0.0": 8})
    second = scrape(metrics)
    assert (first["pdserve_queue_depth"], first["pdserve_requests_running"]) == (3, 2)
    assert (second["pdserve_queue_depth"], second["pdserve_requests_running"]) == (0, 5)
    assert starting_with(first, "pdserve_kv_blocks_free") == {
        'pdserve_kv_blocks_free{worker="decode0.0"}': 12,
        'pdserve_kv_blocks_free{worker="decode1.0"}': 40}
    assert starting_with(second, "pdserve_kv_blocks_free") == {
        'pdserve_kv_blocks_free{worker="decode0.0"}': 8}


def test_each_router_has_its_own_registry():
    first, second = make_metrics(), make_metrics()
    first.requests.labels("success").inc()
    first.ttft.observe(0.1)
    assert scrape(first)['pdserve_requests_total{status="success"}'] == 1
    assert starting_with(scrape(second), "pdserve_requests_total") == {}
    assert scrape(second)["pdserve_time_to_first_token_seconds_count"] == 0


def test_router_metrics_does_not_import_the_router_service():
    imported = set()  # every module and "module.name" it imports, TYPE_CHECKING ones too
    for node in ast.walk(ast.parse(SOURCE.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert "pdserve.worker_stats" in imported  # the walk does see the imports
    assert not {name for name in imported if name.startswith("router.service")}, imported
