"""`pdserve bench` end to end against a real local cluster and router: the JSON and the plot
files are produced, errors are counted, bad arguments are one-line errors. No speed is
asserted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from cluster.launcher import launch
from pdserve.cli import main
from router.server import RouterThread
from tests.e2e.cluster_harness import cluster_config, is_idle, wait_for

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_llama_dir):
    with launch(cluster_config(tiny_llama_dir)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(cluster):
    with RouterThread(cluster) as server:
        yield server


def test_a_rate_sweep_writes_results_and_plots(cluster, server, tmp_path):
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    assert main(["bench", "--url", server.url, "--workload", "mixed", "--num-requests", "12",
                 "--input-len", "20", "--prefix-len", "48", "--suffix-len", "8",
                 "--output-len", "6", "--rate", "20,50", "--slo-ttft-ms", "5000",
                 "--slo-tpot-ms", "1000", "--out", str(out), "--plots", str(plots),
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert [run["rate"] for run in result["runs"]] == [20.0, 50.0]
    for run in result["runs"]:
        summary = run["summary"]
        assert (summary["num_requests"], summary["num_ok"], summary["num_errors"]) == (12, 12, 0)
        assert len(run["records"]) == 12
        assert all(r["num_output_tokens"] == 6 for r in run["records"])
        assert all(len(r["itl_s"]) <= 5 for r in run["records"])
        assert summary["output_throughput"] > 0
        assert 0 <= summary["slo"]["attainment"] <= 1
        for name in ("ttft", "tpot", "itl", "e2e"):
            assert set(summary[name]) == {"mean", "p50", "p90", "p99"}
    assert result["config"]["workload"] == "mixed"
    for name in ("latency_cdf.png", "rate_sweep.png", "slo_scale.png"):
        assert (plots / name).read_bytes().startswith(PNG)
    wait_for(lambda: is_idle(cluster), "the pools to be idle")


def test_server_errors_are_counted_not_raised(server, tmp_path):
    out = tmp_path / "results.json"
    # 2,000-token prompts exceed the tiny model's context: every request is answered 400
    assert main(["bench", "--url", server.url, "--num-requests", "3", "--input-len", "2000",
                 "--out", str(out), "--no-progress"]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["rate"] == "inf"  # the default: all at once (JSON has no infinity)
    assert (run["summary"]["num_ok"], run["summary"]["num_errors"]) == (0, 3)
    assert all(r["error"].startswith("HTTP 400") for r in run["records"])
    (message,) = run["summary"]["errors"]
    assert "maximum context length" in message


@pytest.mark.parametrize("argv, message", [
    (["--workload", "nonsense"], "invalid choice"),
    (["--rate", "-1"], "expected a number > 0"),
    (["--workload", "sharegpt", "--dataset", "/nonexistent.json"], "/nonexistent.json"),
    (["--workload", "trace"], "needs --trace"),
    (["--concurrency", "2", "--duration", "5"], "--num-requests"),
    (["--slo-ttft-ms", "100"], "give both"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--url",
                              f"http://127.0.0.1:{port}", *argv],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    errors = [line for line in process.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], process.stderr
    assert "Traceback" not in process.stderr


def test_a_server_that_is_not_there_is_a_one_line_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--url",
                              f"http://127.0.0.1:{port}", "--out",
                              str(tmp_path / "r.json")],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.count("\n") == 1 and "cannot list the models" in process.stderr
