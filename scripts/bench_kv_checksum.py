"""What ``kv_transfer_checksum`` costs: off against sample against all, side by side in one run.

1. Prefill wall time, on the KV plane alone (``scripts/kv_bench_sides.py``: this process
   computes a prompt with the engine's model runner and streams it through a ``KVProducer``
   per mode; a second process holds the decode pools and a ``KVConsumer`` per mode). Per
   repeat, each mode in turn (order rotated): ``done`` (compute + stream until the notice is
   out) and ``landed`` (+ decode's verify and dequantize: the KV is usable). Median over
   repeats, ratios to ``off`` per repeat.
2. TTFT on a real cluster: one local Ray cluster per mode (1 prefill + 1 decode worker,
   TP1), all up together, a fresh long prompt (no cache hit) submitted to each in turn per
   round, the order rotated; ratios to ``off`` per round. An idle cluster keeps 0.06 of a
   core busy (docs/benchmarks.md, "KV transfer"), so the others barely disturb the one
   measured. Every request must have gone remote with no checksum failure.

Pools are fp32. The KV plane runs both wires: fp8 (send buffer -> staging, the default)
and auto (lossless, pool -> pool, about 3.8x the bytes to digest); the cluster the fp8 one.
Run: ``.venv/bin/python scripts/bench_kv_checksum.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import LONG_SAMPLING, TokenSource, side_config, time_request  # noqa: E402
from bench_stats import cpu_name  # noqa: E402
from kv_bench_sides import BLOCK_SIZE, DecodeSide, PrefillSide  # noqa: E402

from cluster.launcher import launch  # noqa: E402
from pdserve.choices import KVChecksum  # noqa: E402
from pdserve.worker_stats import Role  # noqa: E402

MODES = tuple(KVChecksum)
WIRES = ("fp8", "auto")  # between fp32 pools: send buffer -> staging, or pool -> pool
NUM_WARMUP_REQUESTS = 2
SETTLE_S = 0.2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the generated small model)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15, help="KV-plane repeats")
    parser.add_argument("--rounds", type=int, default=15, help="cluster TTFT rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few repeats and rounds")
    parser.add_argument("--json", default="docs/bench_kv_checksum.json")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rounds = 2, 2
    return args


def rotated(items: tuple, turn: int) -> tuple:
    return items[turn % len(items):] + items[:turn % len(items)]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(runs: list[dict], key: str) -> dict:
    """Per run, each mode's ``key`` over off's; summarized over runs."""
    return {mode.value: summary([run[mode.value][key] / run["off"][key] for run in runs])
            for mode in MODES[1:]}


def bench_kv_plane(model_dir: str, args, source: TokenSource, wire: str) -> dict:
    tokens = source.tokens(args.prompt_tokens - 1)  # all but the last prompt token
    blocks = list(range(-(-len(tokens) // BLOCK_SIZE)))
    paths = {mode.value: ("auto", wire) for mode in MODES}
    decode = DecodeSide(model_dir, len(blocks), paths)
    side = PrefillSide(model_dir, decode, len(blocks), paths,
                       {mode.value: mode for mode in MODES})
    try:
        for mode in MODES:  # warm up: allocator, kernels, UCX connections
            side.prefill(tokens, blocks, mode.value)
        runs = []
        for repeat in range(args.repeats):
            runs.append({mode.value: side.prefill(tokens, blocks, mode.value)
                         for mode in rotated(MODES, repeat)})
    finally:
        side.close()
        decode.close()
    problems = [f"{mode}: {run[mode]['num_mismatches']} mismatches" for run in runs
                for mode in run if run[mode]["num_mismatches"]]
    return {"blocks": len(blocks), "runs": runs, "problems": problems,
            **{f"{mode.value}_{key}": summary([run[mode.value][key] for run in runs])
               for mode in MODES for key in ("done_s", "landed_s", "verify_s")},
            "num_digests": {mode.value: runs[0][mode.value]["num_digests"] for mode in MODES},
            "done_over_off": ratios(runs, "done_s"), "landed_over_off": ratios(runs, "landed_s")}


def bench_ttft(model_dir: Path, args, source: TokenSource) -> dict:
    configs = {mode.value: dataclasses.replace(side_config(model_dir, "fp8"),
                                               kv_transfer_checksum=mode) for mode in MODES}
    clusters = {mode: launch(config) for mode, config in configs.items()}
    try:
        for cluster in clusters.values():
            for _ in range(NUM_WARMUP_REQUESTS):
                time_request(cluster, source.tokens(args.prompt_tokens), LONG_SAMPLING)
        rounds = []
        for turn in range(args.rounds):
            ttft = {}
            for mode in rotated(tuple(clusters), turn):
                time.sleep(SETTLE_S)
                ttft[mode] = {"ttft_s": time_request(clusters[mode],
                                                     source.tokens(args.prompt_tokens),
                                                     LONG_SAMPLING)[0]}
            rounds.append(ttft)
        num_requests = NUM_WARMUP_REQUESTS + args.rounds
        problems = [f"{mode}: {problem}" for mode, cluster in clusters.items()
                    for problem in path_problems(cluster, num_requests)]
    finally:
        for cluster in clusters.values():
            cluster.shutdown()
    return {"rounds": rounds, "problems": problems,
            **{f"{mode.value}_ttft_s": summary([r[mode.value]["ttft_s"] for r in rounds])
               for mode in MODES}, "ttft_over_off": ratios(rounds, "ttft_s"),
            "cluster_configs": {mode: config.to_dict() for mode, config in configs.items()}}


def path_problems(cluster, num_requests: int) -> list[str]:
    """Every long prompt went remote and passed its digests."""
    (decode,) = cluster.worker_stats(Role.DECODE)
    problems = []
    if decode.prefills.remote != num_requests or decode.prefills.fallback:
        problems.append(f"prefills {decode.prefills}, expected {num_requests} remote")
    if decode.checksum_failures:
        problems.append(f"{decode.checksum_failures} checksum failures")
    return problems


def print_ratios(figures: dict, name: str) -> None:
    for mode, figure in figures[name].items():
        print(f"  {name} {mode:6}: {figure['median']:.4f} "
              f"[{figure['min']:.4f} .. {figure['max']:.4f}]")


def print_report(report: dict) -> None:
    ttft = report["ttft"]
    for wire, kv in report["kv_plane"].items():
        print(f"\nKV plane, {wire} wire, {report['prompt_tokens']}-token prompt "
              f"({kv['blocks']} blocks), median of {len(kv['runs'])} [min .. max]; digests "
              f"per request {kv['num_digests']}")
        for mode in MODES:
            row = [f"{key} {kv[f'{mode.value}_{key}']['median'] * 1e3:8.2f} ms"
                   for key in ("done_s", "landed_s", "verify_s")]
            print(f"  {mode.value:6}: " + ", ".join(row))
        print_ratios(kv, "done_over_off")
        print_ratios(kv, "landed_over_off")
    print("\ncluster, fp8 wire:")
    print_ratios(ttft, "ttft_over_off")
    for mode in MODES:
        figure = ttft[f"{mode.value}_ttft_s"]
        print(f"TTFT {mode.value:6}: {figure['median'] * 1e3:.1f} ms "
              f"[{figure['min'] * 1e3:.1f} .. {figure['max'] * 1e3:.1f}]")
    problems = [p for kv in report["kv_plane"].values() for p in kv["problems"]]
    print(f"problems: {problems + ttft['problems'] or 'none'}")


def main() -> None:
    start = time.perf_counter()
    args = parse_args()
    torch.set_num_threads(1)
    if args.model is None:
        from pdserve.modelgen import ensure_default_model

        args.model = str(ensure_default_model("small"))
    model_dir = Path(args.model)
    source = TokenSource(model_dir, args.seed)
    report = {"command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                          "load_average_1_5_15_min_at_start": os.getloadavg()},
              "model_dir": str(model_dir), "prompt_tokens": args.prompt_tokens}
    report["kv_plane"] = {wire: bench_kv_plane(str(model_dir), args, source, wire)
                          for wire in WIRES}
    ray.init(address="local", num_cpus=len(MODES), include_dashboard=False,
             log_to_driver=False)
    try:
        report["ttft"] = bench_ttft(model_dir, args, source)
    finally:
        ray.shutdown()
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    print_report(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json} after {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
