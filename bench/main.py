"""`pdserve bench`: load any OpenAI-compatible server and report latency, throughput and
goodput, as JSON and PNG plots.

A run is one workload sent at one request rate (or concurrency); ``--rate 1,2,4`` sweeps.
Results: every request's record and a summary per run (TTFT, TPOT, ITL, end-to-end at
p50/p90/p99/mean; request and token throughput; SLO attainment and goodput when
``--slo-ttft-ms`` and ``--slo-tpot-ms`` are given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
from pathlib import Path

from bench import arrivals, stats, workloads
from pdserve.argtypes import int_in, positive_float

WORKLOADS = ("random", "shared-prefix", "mixed", "sharegpt", "trace")
SLO_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    server.add_argument("--model", default=None, help="model id (default: the first listed)")
    server.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY") or None)
    load = parser.add_argument_group("load")
    load.add_argument("--workload", choices=WORKLOADS, default="random")
    load.add_argument("--num-requests", type=int_in(1), default=100)
    load.add_argument("--duration", type=positive_float, default=None,
                      help="send for this many seconds instead of --num-requests (open loop)")
    load.add_argument("--rate", type=_rates, default=[math.inf],
                      help="requests/s, or a comma list to sweep; inf sends all at once")
    load.add_argument("--burstiness", type=positive_float, default=1.0,
                      help="gamma arrivals' shape: 1 is Poisson, below 1 burstier")
    load.add_argument("--concurrency", type=int_in(1), default=None,
                      help="closed loop with this many requests in flight (instead of --rate)")
    load.add_argument("--seed", type=int_in(0), default=0)
    shape = parser.add_argument_group("workload shape")
    shape.add_argument("--input-len", type=int_in(1), default=128)
    shape.add_argument("--output-len", type=int_in(1), default=16)
    shape.add_argument("--range-ratio", type=float, default=0.0,
                       help="random: lengths uniform in len*(1 +- ratio)")
    shape.add_argument("--num-groups", type=int_in(1), default=4)
    shape.add_argument("--prefix-len", type=int_in(1), default=256)
    shape.add_argument("--suffix-len", type=int_in(1), default=32)
    shape.add_argument("--shared-fraction", type=float, default=0.5,
                       help="mixed: the share of shared-prefix prompts")
    shape.add_argument("--dataset", default=None, help="sharegpt: the JSON file")
    shape.add_argument("--tokenizer", default=None,
                       help="sharegpt: a checkpoint directory whose tokenizer counts tokens")
    shape.add_argument("--trace", default=None, help="trace: a Mooncake-format JSONL file")
    shape.add_argument("--trace-block-size", type=int_in(1), default=512)
    shape.add_argument("--trace-time-scale", type=positive_float, default=1.0)
    report = parser.add_argument_group("report")
    report.add_argument("--slo-ttft-ms", type=positive_float, default=None)
    report.add_argument("--slo-tpot-ms", type=positive_float, default=None)
    report.add_argument("--out", default="bench-results.json", help="JSON results file")
    report.add_argument("--plots", default=None, help="directory for PNG plots")
    report.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """ValueError (bad input files, arguments) is reported in one line by the CLI."""
    from bench.runner import Target, discover_model, run  # httpx: only when running

    if (args.slo_ttft_ms is None) != (args.slo_tpot_ms is None):
        raise ValueError("give both --slo-ttft-ms and --slo-tpot-ms, or neither")
    if args.concurrency is not None and args.duration is not None:
        raise ValueError("--duration is for open-loop rates: with --concurrency, give "
                         "--num-requests")
    requests = build_requests(args)
    model = args.model or asyncio.run(discover_model(args.url, args.api_key))
    target = Target(args.url.rstrip("/"), model, args.api_key)
    slo_ttft_s = args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None
    slo_tpot_s = args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None
    runs = []
    for rate in ([None] if args.concurrency else args.rate):
        schedule = build_schedule(requests, rate, args)
        records, duration_s = asyncio.run(run(target, schedule, args.concurrency,
                                              progress=not args.no_progress))
        summary = stats.summarize(records, duration_s, slo_ttft_s, slo_tpot_s)
        runs.append({"rate": _finite(rate), "concurrency": args.concurrency, "summary": summary,
                     "records": [r.to_dict() for r in records]})
        print(format_summary(summary, rate, args.concurrency), flush=True)
    result = {"config": _config(args, model), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {args.out}")
    if args.plots:
        for path in write_plots(runs, Path(args.plots), slo_ttft_s, slo_tpot_s):
            print(f"plot: {path}")
    return 0


def build_requests(args: argparse.Namespace) -> list[workloads.BenchRequest]:
    num = args.num_requests
    if args.duration is not None:  # enough for the longest plausible schedule
        num = len(arrivals.arrivals_until(args.duration, max(args.rate), args.burstiness,
                                          args.seed)) if math.isfinite(max(args.rate)) else num
    if args.workload == "random":
        return workloads.random_requests(num, args.input_len, args.output_len,
                                         args.range_ratio, args.seed)
    if args.workload == "shared-prefix":
        per_group = -(-num // args.num_groups)
        return workloads.shared_prefix_requests(args.num_groups, per_group, args.prefix_len,
                                                args.suffix_len, args.output_len,
                                                args.seed)[:num]
    if args.workload == "mixed":
        return workloads.mixed_requests(num, args.input_len, args.output_len,
                                        args.shared_fraction, args.num_groups, args.prefix_len,
                                        args.suffix_len, args.seed)
    if args.workload == "sharegpt":
        if not args.dataset:
            raise ValueError("--workload sharegpt needs --dataset FILE")
        tokenizer = None
        if args.tokenizer:
            from pdserve.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(args.tokenizer)
        return workloads.sharegpt_requests(args.dataset, num, args.seed, tokenizer)
    if not args.trace:
        raise ValueError("--workload trace needs --trace FILE")
    return workloads.trace_requests(args.trace, num, args.trace_block_size,
                                    args.trace_time_scale, seed=args.seed)


def build_schedule(requests: list[workloads.BenchRequest], rate: float | None,
                   args: argparse.Namespace) -> list[tuple[float, workloads.BenchRequest]]:
    if rate is None:  # closed loop: offsets are not used
        return [(0.0, r) for r in requests]
    schedule = arrivals.schedule(requests, rate, args.burstiness, args.seed)
    if args.duration is not None:
        schedule = [(t, r) for t, r in schedule if t < args.duration]
    return schedule


def format_summary(summary: dict, rate: float | None, concurrency: int | None) -> str:
    load = f"concurrency {concurrency}" if concurrency else f"rate {rate:g} req/s"
    lines = [f"== {load}: {summary['num_ok']}/{summary['num_requests']} ok in "
             f"{summary['duration_s']:.1f} s; {summary['request_throughput']:.2f} req/s, "
             f"{summary['output_throughput']:.1f} output tok/s"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        figures = summary[name]
        lines.append(f"   {name:5s} " + "  ".join(
            f"{key} {_ms(figures[key])}" for key in ("mean", "p50", "p90", "p99")))
    if "slo" in summary:
        slo = summary["slo"]
        lines.append(f"   SLO TTFT <= {slo['ttft_s'] * 1e3:g} ms, TPOT <= "
                     f"{slo['tpot_s'] * 1e3:g} ms: attainment {slo['attainment']:.1%}, "
                     f"goodput {slo['goodput']:.2f} req/s")
    if summary.get("errors"):
        lines.append(f"   errors: {summary['errors']}")
    return "\n".join(lines)


def write_plots(runs: list[dict], directory: Path, slo_ttft_s: float | None,
                slo_tpot_s: float | None) -> list[Path]:
    from bench import plots  # matplotlib only when plotting

    labels = [_label(run) for run in runs]
    records = {label: run["records"] for label, run in zip(labels, runs, strict=True)}
    paths = [plots.plot_latency_cdfs(records, directory / "latency_cdf.png", slo_ttft_s,
                                     slo_tpot_s)]
    points = [{"rate": run["rate"], "summary": run["summary"]} for run in runs
              if isinstance(run["rate"], float) and "slo" in run["summary"]]
    if len(points) > 1:
        paths.append(plots.plot_rate_sweep({"server": points}, directory / "rate_sweep.png"))
    if slo_ttft_s is not None:
        curves = {label: stats.attainment_vs_scale(
            [stats.RequestRecord.from_dict(r) for r in run["records"]], slo_ttft_s,
            slo_tpot_s, SLO_SCALES) for label, run in zip(labels, runs, strict=True)}
        paths.append(plots.plot_slo_scale(curves, directory / "slo_scale.png"))
    return paths


def _label(run: dict) -> str:
    if run["concurrency"]:
        return f"concurrency {run['concurrency']}"
    return f"{run['rate']} req/s" if run["rate"] == "inf" else f"{run['rate']:g} req/s"


def _config(args: argparse.Namespace, model: str) -> dict:
    config = {k: v for k, v in vars(args).items() if k not in ("handler", "api_key")}
    config["model"] = model
    config["rate"] = [_finite(rate) for rate in args.rate]
    return config


def _finite(rate: float | None) -> float | str | None:
    """JSON has no infinity: an all-at-once rate is written "inf"."""
    return "inf" if rate is not None and math.isinf(rate) else rate


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}ms"


def _rates(text: str) -> list[float]:
    return [positive_float(part) for part in text.split(",")]
