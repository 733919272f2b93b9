"""Router-added latency: how long a request spends inside the HTTP router.

Two figures per request, both measured inside the router process:

- **in**: from the request reaching the ASGI app to its ``Generate`` written to the decode
  worker's request-plane socket (JSON parsing, validation, tokenizing in the thread pool,
  block hashing, admission and the choice of worker);
- **out**: from a token chunk's arrival on the request plane to its SSE event written to
  the client's socket (detokenizing, stop-string check, JSON, the HTTP write), per chunk.

A separate load process sends 128-token prompts for 16 output tokens (streamed) with
Poisson arrivals at 20 req/s. "idle": nothing else runs; "busy": 8 more streams keep the
decode worker generating long outputs the whole time (their samples are left out). The
cluster is the embedded tiny model, 1 decode + 1 prefill worker, the router in this
process on its own thread. Each repeat runs both conditions, order rotated; median over
repeats with [min..max].

    .venv/bin/python scripts/bench_router.py [--requests 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 16
BUSY_OUTPUT_TOKENS = 600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-streams", type=int, default=8)
    parser.add_argument("--out", default="docs/bench_router.json")
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)  # the load process
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        return asyncio.run(_load(args))
    return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    import ray

    from cluster.launcher import launch
    from pdserve.config import ClusterConfig
    from pdserve.modelgen import ensure_default_model
    from router.server import RouterThread

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_stats import cpu_name, git_commit, summarize

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = ClusterConfig(model_dir=str(ensure_default_model("tiny")))
    runs: list[dict] = []
    with launch(config) as cluster, RouterThread(cluster) as server:
        conditions = ["idle", "busy"]
        for repeat in range(args.repeats):
            for condition in conditions[repeat % 2:] + conditions[:repeat % 2]:
                runs.append(_run(server, args, condition, seed=repeat))
                print(json.dumps(runs[-1]), flush=True)
    ray.shutdown()
    result = {
        "command": "python scripts/bench_router.py " + " ".join(sys.argv[1:]),
        "commit": git_commit("router", "pdserve"), "cpu": cpu_name(),
        "requests": args.requests, "rate": args.rate, "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS, "busy_streams": args.busy_streams,
        **{condition: summarize([r for r in runs if r["condition"] == condition])
           for condition in ("idle", "busy")},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for condition in ("idle", "busy"):
        figures = result[condition]
        print(condition, "  ".join(
            f"{key} {figures[key]['median'] * 1e3:.3f} ms "
            f"[{figures[key]['min'] * 1e3:.3f}..{figures[key]['max'] * 1e3:.3f}]"
            for key in ("in_p50_s", "in_p99_s", "out_p50_s", "out_p99_s")))
    return 0


def _run(server, args: argparse.Namespace, condition: str, seed: int) -> dict:
    router = server.router
    router.overhead_log = log = []
    command = [sys.executable, __file__, "--load", server.url, "--requests",
               str(args.requests), "--rate", str(args.rate), "--seed", str(seed),
               "--busy-streams", str(args.busy_streams if condition == "busy" else 0)]
    load = json.loads(subprocess.run(command, check=True, capture_output=True,
                                     text=True).stdout)
    router.overhead_log = None
    samples = {d: [s for r, direction, s in log if direction == d and not r.startswith("busy")]
               for d in ("in", "out")}
    figures = {"condition": condition, "num_requests": load["num_ok"],
               "num_errors": float(load["num_errors"])}
    for direction, values in samples.items():
        values.sort()
        figures[f"{direction}_p50_s"] = _percentile(values, 50)
        figures[f"{direction}_p99_s"] = _percentile(values, 99)
        figures[f"{direction}_samples"] = len(values)
    figures["client_ttft_p50_s"] = load["ttft_p50_s"]
    return figures


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(values) * q // 100))
    return values[int(rank) - 1]


async def _load(args: argparse.Namespace) -> int:
    import httpx

    rng = random.Random(args.seed)
    model = None
    async with httpx.AsyncClient(base_url=args.load, timeout=120,
                                 limits=httpx.Limits(max_connections=512)) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        stop = asyncio.Event()

        async def busy(index: int) -> None:
            round_ = 0
            while not stop.is_set():
                await _stream(http, model, f"busy-{index}-{round_}", _prompt(rng),
                              BUSY_OUTPUT_TOKENS)
                round_ += 1

        busy_tasks = [asyncio.ensure_future(busy(i)) for i in range(args.busy_streams)]
        tasks, start = [], time.perf_counter()
        next_s = 0.0
        for index in range(args.requests):
            next_s += rng.expovariate(args.rate)
            delay = start + next_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_stream(
                http, model, f"req-{args.seed}-{index}", _prompt(rng), OUTPUT_TOKENS)))
        results = await asyncio.gather(*tasks)
        stop.set()
        await asyncio.gather(*busy_tasks)
    ttfts = sorted(r for r in results if r is not None)
    print(json.dumps({"num_ok": len(ttfts), "num_errors": len(results) - len(ttfts),
                      "ttft_p50_s": statistics.median(ttfts) if ttfts else -1.0}))
    return 0


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(40, 500) for _ in range(PROMPT_TOKENS)]


async def _stream(http, model: str, request_id: str, prompt: list[int],
                  max_tokens: int) -> float | None:
    """Time to the first streamed text event, or None on an error."""
    started = time.perf_counter()
    first = None
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    async with http.stream("POST", "/v1/completions", json=body,
                           headers={"X-Request-Id": request_id}) as response:
        if response.status_code != 200:
            await response.aread()
            return None
        async for line in response.aiter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter() - started
            if '"error"' in line:
                return None
    return first


if __name__ == "__main__":
    sys.exit(main())
