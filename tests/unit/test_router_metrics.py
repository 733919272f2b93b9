"""The router's Prometheus exposition (router.metrics): exact rendered text."""

from __future__ import annotations

import math

import pytest

from router.metrics import (
    CallbackCounter,
    CallbackGauge,
    Counter,
    Gauge,
    Histogram,
    Registry,
    format_value,
)


def test_small_registry_renders_exactly():
    registry = Registry()
    requests = registry.register(
        Counter("pdserve_requests_total", "Requests answered.", ("route", "status")))
    running = registry.register(Gauge("pdserve_running", "Requests running."))
    ttft = registry.register(
        Histogram("pdserve_ttft_seconds", "Time to first token.", (0.1, 0.5, 2)))
    requests.inc(labels=("/v1/completions", "200"))
    requests.inc(2, labels=("/v1/completions", "200"))
    requests.inc(labels=("/v1/chat/completions", "429"))
    running.inc(3)
    running.dec()
    for seconds in (0.05, 0.25, 0.5, 3.0):
        ttft.observe(seconds)

    assert registry.render() == (
        "# HELP pdserve_requests_total Requests answered.\n"
        "# TYPE pdserve_requests_total counter\n"
        'pdserve_requests_total{route="/v1/chat/completions",status="429"} 1\n'
        'pdserve_requests_total{route="/v1/completions",status="200"} 3\n'
        "# HELP pdserve_running Requests running.\n"
        "# TYPE pdserve_running gauge\n"
        "pdserve_running 2\n"
        "# HELP pdserve_ttft_seconds Time to first token.\n"
        "# TYPE pdserve_ttft_seconds histogram\n"
        'pdserve_ttft_seconds_bucket{le="0.1"} 1\n'
        'pdserve_ttft_seconds_bucket{le="0.5"} 3\n'
        'pdserve_ttft_seconds_bucket{le="2"} 3\n'
        'pdserve_ttft_seconds_bucket{le="+Inf"} 4\n'
        "pdserve_ttft_seconds_sum 3.8\n"
        "pdserve_ttft_seconds_count 4\n"
    )


def test_unused_metrics_render_zero_unless_labelled():
    registry = Registry()
    registry.register(Counter("plain_total", "No labels."))
    registry.register(Counter("labelled_total", "With labels.", ("worker",)))
    registry.register(Histogram("latency_seconds", "Latency.", (1,)))
    assert registry.render() == (
        "# HELP plain_total No labels.\n"
        "# TYPE plain_total counter\n"
        "plain_total 0\n"
        "# HELP labelled_total With labels.\n"
        "# TYPE labelled_total counter\n"
        "# HELP latency_seconds Latency.\n"
        "# TYPE latency_seconds histogram\n"
        'latency_seconds_bucket{le="1"} 0\n'
        'latency_seconds_bucket{le="+Inf"} 0\n'
        "latency_seconds_sum 0\n"
        "latency_seconds_count 0\n"
    )


def test_histogram_bucket_edges_and_labels():
    histogram = Histogram("tokens", "Prompt tokens.", (1, 10, 100), ("worker",))
    # A value equal to a bound is counted in that bound's bucket (le = less or equal).
    for value in (-5, 1, 1.0000001, 10, 100, 100.5):
        histogram.observe(value, labels=("w0",))
    histogram.observe(0.5, labels=("w1",))
    assert histogram.render() == (
        "# HELP tokens Prompt tokens.\n"
        "# TYPE tokens histogram\n"
        'tokens_bucket{worker="w0",le="1"} 2\n'
        'tokens_bucket{worker="w0",le="10"} 4\n'
        'tokens_bucket{worker="w0",le="100"} 5\n'
        'tokens_bucket{worker="w0",le="+Inf"} 6\n'
        'tokens_sum{worker="w0"} 207.5000001\n'
        'tokens_count{worker="w0"} 6\n'
        'tokens_bucket{worker="w1",le="1"} 1\n'
        'tokens_bucket{worker="w1",le="10"} 1\n'
        'tokens_bucket{worker="w1",le="100"} 1\n'
        'tokens_bucket{worker="w1",le="+Inf"} 1\n'
        'tokens_sum{worker="w1"} 0.5\n'
        'tokens_count{worker="w1"} 1\n'
    )


def test_label_values_and_help_are_escaped():
    gauge = Gauge("odd", 'Help with a \\ backslash,\na newline and "quotes".', ("path",))
    gauge.set(1.5, labels=('C:\\dir "x"\nnext',))
    assert gauge.render() == (
        '# HELP odd Help with a \\\\ backslash,\\na newline and "quotes".\n'
        "# TYPE odd gauge\n"
        'odd{path="C:\\\\dir \\"x\\"\\nnext"} 1.5\n'
    )


def test_callback_metrics_are_computed_at_render_time():
    stats = {"w0": (3, 12), "w1": (0, 40)}
    registry = Registry()
    registry.register(CallbackGauge(
        "pdserve_worker_free_blocks", "Free KV blocks per decode worker.",
        lambda: {(worker,): free for worker, (_, free) in stats.items()}, ("worker",)))
    registry.register(CallbackCounter(
        "pdserve_worker_steps_total", "Engine steps.", lambda: {(): 7}))
    registry.register(CallbackGauge(
        "pdserve_worker_running", "Running per worker.",
        lambda: {(worker,): running for worker, (running, _) in stats.items()}, ("worker",)))
    first = registry.render()
    stats["w0"] = (4, 8)
    del stats["w1"]
    assert first == (
        "# HELP pdserve_worker_free_blocks Free KV blocks per decode worker.\n"
        "# TYPE pdserve_worker_free_blocks gauge\n"
        'pdserve_worker_free_blocks{worker="w0"} 12\n'
        'pdserve_worker_free_blocks{worker="w1"} 40\n'
        "# HELP pdserve_worker_steps_total Engine steps.\n"
        "# TYPE pdserve_worker_steps_total counter\n"
        "pdserve_worker_steps_total 7\n"
        "# HELP pdserve_worker_running Running per worker.\n"
        "# TYPE pdserve_worker_running gauge\n"
        'pdserve_worker_running{worker="w0"} 3\n'
        'pdserve_worker_running{worker="w1"} 0\n'
    )
    assert registry.render() == (
        "# HELP pdserve_worker_free_blocks Free KV blocks per decode worker.\n"
        "# TYPE pdserve_worker_free_blocks gauge\n"
        'pdserve_worker_free_blocks{worker="w0"} 8\n'
        "# HELP pdserve_worker_steps_total Engine steps.\n"
        "# TYPE pdserve_worker_steps_total counter\n"
        "pdserve_worker_steps_total 7\n"
        "# HELP pdserve_worker_running Running per worker.\n"
        "# TYPE pdserve_worker_running gauge\n"
        'pdserve_worker_running{worker="w0"} 4\n'
    )


def test_callback_returning_the_wrong_number_of_label_values_is_refused():
    gauge = CallbackGauge("g", "G.", lambda: {("w0", "extra"): 1}, ("worker",))
    with pytest.raises(ValueError, match=r"g takes label values for \('worker',\)"):
        gauge.render()


@pytest.mark.parametrize(("value", "text"), [
    (0, "0"), (3, "3"), (3.0, "3"), (-2.0, "-2"), (0.25, "0.25"), (1e-05, "1e-05"),
    (2.0**60, "1.152921504606847e+18"), (math.inf, "+Inf"), (-math.inf, "-Inf"),
    (math.nan, "NaN"),
])
def test_values_render_as_prometheus_parses_them(value, text):
    assert format_value(value) == text


def test_counter_refuses_to_go_down():
    counter = Counter("c_total", "C.", ("kind",))
    counter.inc(2.5, labels=("a",))
    with pytest.raises(ValueError, match=r"c_total is a counter: inc\(-1\) is invalid"):
        counter.inc(-1, labels=("a",))
    with pytest.raises(ValueError, match=r"inc\(nan\)"):
        counter.inc(math.nan, labels=("a",))
    assert counter.value(("a",)) == 2.5


def test_gauge_set_inc_dec():
    gauge = Gauge("g", "G.", ("worker",))
    gauge.set(10, labels=("w0",))
    gauge.inc(2.5, labels=("w0",))
    gauge.dec(labels=("w1",))
    assert (gauge.value(("w0",)), gauge.value(("w1",)), gauge.value(("w2",))) == (12.5, -1, 0)


def test_wrong_label_values_are_refused():
    counter = Counter("c_total", "C.", ("route", "status"))
    with pytest.raises(ValueError, match=r"takes label values for \('route', 'status'\), "
                                         r"got \('200',\)"):
        counter.inc(labels=("200",))
    with pytest.raises(ValueError, match="takes label values"):
        Gauge("g", "G.").set(1, labels=("x",))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Counter("bad-name", "x"), "metric name 'bad-name' is invalid"),
    (lambda: Counter("c", "x", ("__reserved",)), "label name '__reserved' of c"),
    (lambda: Counter("c", "x", ("a", "a")), r"label names of c repeat: \('a', 'a'\)"),
    (lambda: Histogram("h", "x", (1,), ("le",)), "label name 'le' of h"),
    (lambda: Histogram("h", "x", ()), "buckets of h are invalid"),
    (lambda: Histogram("h", "x", (1, math.inf)), r"\+Inf is added"),
    (lambda: Histogram("h", "x", (1, 1)), "must increase strictly"),
])
def test_bad_definitions_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_histogram_refuses_nan_and_registry_refuses_duplicates():
    histogram = Histogram("h", "H.", (1,))
    with pytest.raises(ValueError, match="h cannot observe NaN"):
        histogram.observe(math.nan)
    registry = Registry()
    registry.register(histogram)
    with pytest.raises(ValueError, match="a metric named h is already registered"):
        registry.register(Gauge("h", "Another."))
