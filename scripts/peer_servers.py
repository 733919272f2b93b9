"""The peer benchmark's two servers and the load on them (scripts/bench_vs_vllm.py): how
pdserve and vLLM are started, pinned and warmed, the workloads, and one `pdserve bench` run."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from peer_processes import Server
from vllm_install import vllm_env

BIN = Path(sys.executable).parent  # the project's venv: pdserve and its bench
SERVER_CORE, CLIENT_CORE = 0, 1
PREFILL_CORE = 1  # --disagg: prefill roles on the other core, as the decode roles keep 0
IDLE_SAMPLE_S = 10.0
IDLE_SPIN_CORES = 0.25  # an idle tree above this keeps a core busy: run one server at a time
BENCH_TIMEOUT_S = 1800.0


@dataclass(frozen=True, slots=True)
class Workload:
    """One `pdserve bench` load; ``trace`` workloads get a generated trace file per seed."""

    name: str
    num_requests: int
    num_quick_requests: int
    bench_args: tuple[str, ...]
    is_trace: bool = False

    def args(self, quick: bool) -> list[str]:
        num = self.num_quick_requests if quick else self.num_requests
        return ["--num-requests", str(num), *self.bench_args]


WORKLOADS = {w.name: w for w in (
    Workload("burst", 64, 16, ("--workload", "random", "--rate", "inf", "--input-len", "320",
                               "--output-len", "136", "--range-ratio", "0.6")),
    Workload("poisson", 32, 8, ("--workload", "random", "--rate", "1", "--input-len", "256",
                                "--output-len", "64", "--range-ratio", "0")),
    Workload("sharegpt-like", 48, 8, ("--workload", "trace"), is_trace=True),
)}
WARMUP_ARGS = ("--workload", "random", "--num-requests", "4", "--rate", "inf",
               "--input-len", "64", "--output-len", "16")
# sharegpt-like: lognormal lengths (median, sigma, clip range) in tokens, Poisson arrivals.
SHAREGPT_PROMPT = (180.0, 0.9, 16, 1024)
SHAREGPT_OUTPUT = (120.0, 0.7, 8, 384)
SHAREGPT_RATE = 1.0


def start_and_warm(servers: list[Server], overlap: bool = False) -> None:
    """Start the servers one after the other (servers pinned to one core time out starting
    side by side), or all at once with ``overlap``; then warm each up."""
    for server in servers:
        server.start()
        if not overlap:
            server.wait_ready()
    for server in servers:
        if overlap:
            server.wait_ready()
        warm_up(server)


def stop_servers(servers: list[Server]) -> None:
    for server in servers:
        server.stop()


@contextmanager
def running(servers: list[Server], overlap: bool = False) -> Iterator[list[Server]]:
    """The servers up and warm for the block; always stopped after it."""
    try:
        start_and_warm(servers, overlap)
        yield servers
    finally:
        stop_servers(servers)


# ---- the servers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """What every server of a run shares: model, dtype, vLLM venv, ports, where logs go."""

    model_dir: Path
    dtype: str
    venv: Path
    tcmalloc: str
    port_base: int
    work_dir: Path


def pdserve_server(setup: Setup, disagg: bool) -> Server:
    """``disagg``: 1 prefill + 1 decode worker (conditional), else 1 decode worker alone."""
    config = {"model_dir": str(setup.model_dir), "dtype": setup.dtype, "num_threads": 1,
              "decode": {"num_workers": 1, "pin_cpus": [SERVER_CORE],
                         "disagg_mode": "conditional" if disagg else "never"},
              "prefill": {"num_workers": 1 if disagg else 0, "pin_cpus": [PREFILL_CORE]},
              "router": {"port": setup.port_base + (2 if disagg else 0)}}
    name = f"pdserve-{'disagg' if disagg else 'agg'}-{setup.dtype}"
    config_path = setup.work_dir / f"{name}.json"  # JSON is YAML
    config_path.write_text(json.dumps(config, indent=1))
    cores = f"{SERVER_CORE},{PREFILL_CORE}" if disagg else str(SERVER_CORE)
    argv = ["taskset", "-c", cores, str(BIN / "pdserve"), "serve", "--config", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return Server("pdserve", argv, env, config["router"]["port"],
                  setup.work_dir / f"{name}.log")


def vllm_server(setup: Setup, port: int, core: int, kv_role: str | None = None,
                side_channel_port: int | None = None) -> Server:
    argv = ["taskset", "-c", str(core), str(setup.venv / "bin" / "vllm"), "serve",
            str(setup.model_dir), "--dtype", setup.dtype, "--port", str(port)]
    if kv_role:
        argv += ["--kv-transfer-config", json.dumps(
            {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu"})]
    name = f"vllm-{kv_role or 'agg'}-{setup.dtype}"
    env = vllm_env(setup.venv, setup.tcmalloc, core, side_channel_port)
    return Server("vllm" if kv_role is None else name, argv, env, port,
                  setup.work_dir / f"{name}.log")


def proxy_server(setup: Setup, prefill: Server, decode: Server) -> Server:
    port = setup.port_base + 5
    script = Path(__file__).with_name("bench_vs_vllm.py")  # its --serve-proxy runs serve_proxy
    argv = [sys.executable, str(script), "--serve-proxy", prefill.url, decode.url, str(port)]
    return Server("vllm-proxy", argv, dict(os.environ), port, setup.work_dir / "proxy.log")


# ---- load: `pdserve bench` ----------------------------------------------------------------


def run_bench(server: Server, bench_args: list[str], out: Path, seed: int,
              pin_client: bool = True) -> dict[str, Any]:
    """One `pdserve bench` run against ``server``; the whole JSON it writes."""
    argv = ["taskset", "-c", str(CLIENT_CORE)] if pin_client else []
    argv += [str(BIN / "pdserve"), "bench", "--url", server.url, "--seed", str(seed),
             "--no-progress", "--out", str(out), *bench_args]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    if completed.returncode != 0:
        raise RuntimeError(f"pdserve bench against {server.name} failed "
                           f"({completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(out.read_text())


def warm_up(server: Server) -> None:
    """A few short requests, so first-request costs (lazy compiles, allocations) are paid
    before anything is timed."""
    result = run_bench(server, list(WARMUP_ARGS), server.log_path.with_suffix(".warmup.json"),
                       seed=999)
    summary = result["runs"][0]["summary"]
    if summary["num_ok"] < summary["num_requests"]:
        raise RuntimeError(f"{server.name}: warm-up requests failed: {summary['errors']}; "
                           f"log: {server.log_path}")


def workload_args(workload: Workload, quick: bool, seed: int, work_dir: Path) -> list[str]:
    args = workload.args(quick)
    if workload.is_trace:
        num = workload.num_quick_requests if quick else workload.num_requests
        trace = work_dir / f"{workload.name}-seed{seed}.jsonl"
        write_sharegpt_like_trace(trace, num, seed)
        args += ["--trace", str(trace)]
    return args


def write_sharegpt_like_trace(path: Path, num: int, seed: int) -> None:
    """A Mooncake-format trace: lognormal lengths, exponential gaps, no shared prefixes."""
    rng = random.Random(f"sharegpt-like:{seed}")
    lines, timestamp_ms = [], 0.0
    for _ in range(num):
        lines.append(json.dumps({"timestamp": round(timestamp_ms, 3),
                                 "input_length": _lognormal(rng, *SHAREGPT_PROMPT),
                                 "output_length": _lognormal(rng, *SHAREGPT_OUTPUT),
                                 "hash_ids": []}))
        timestamp_ms += rng.expovariate(SHAREGPT_RATE) * 1000
    path.write_text("\n".join(lines) + "\n")


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def figures(bench_json: dict[str, Any]) -> dict[str, Any]:
    summary = bench_json["runs"][0]["summary"]
    return {"output_throughput": summary["output_throughput"],
            "tpot_p50_s": summary["tpot"]["p50"], "ttft_p50_s": summary["ttft"]["p50"],
            "itl_p50_s": summary["itl"]["p50"], "itl_p99_s": summary["itl"]["p99"],
            "num_ok": summary["num_ok"], "num_requests": summary["num_requests"],
            "duration_s": summary["duration_s"], "load_average_1m": os.getloadavg()[0]}


def serve_proxy(prefill_url: str, decode_url: str, port: int) -> None:
    """vLLM's P/D front: each completion is prefilled with ``max_tokens: 1`` on the producer,
    whose answer carries the ``kv_transfer_params`` that tell the consumer where to pull the
    KV from; the consumer then decodes the original request, streamed back as it comes."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=None)

    async def models(request: Request) -> Response:
        upstream = await client.get(f"{decode_url}/v1/models")
        return JSONResponse(upstream.json(), status_code=upstream.status_code)

    async def completions(request: Request) -> Response:
        body = await request.json()
        prefill_body = {**body, "max_tokens": 1, "stream": False,
                        "kv_transfer_params": {"do_remote_decode": True,
                                               "do_remote_prefill": False}}
        prefill_body.pop("stream_options", None)
        prefilled = await client.post(f"{prefill_url}/v1/completions", json=prefill_body)
        if prefilled.status_code != 200:
            return JSONResponse(prefilled.json(), status_code=prefilled.status_code)
        decode_body = {**body, "kv_transfer_params": prefilled.json().get("kv_transfer_params")}
        upstream = await client.send(
            client.build_request("POST", f"{decode_url}/v1/completions", json=decode_body),
            stream=True)
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type"),
                                 background=BackgroundTask(upstream.aclose))

    app = Starlette(routes=[Route("/v1/models", models),
                            Route("/v1/completions", completions, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
