"""Peer benchmark: `pdserve serve` against vLLM's CPU build, same checkpoint, same load.

Both servers run the generated ``small`` model (``tiny`` has head_dim 16; vLLM needs >= 32)
with one compute thread, pinned to the same core; the load generator (`pdserve bench`) runs on
the other core. vLLM is no dependency of this project: it is installed into a virtual
environment of its own (``--vllm-venv``, default ``~/.cache/pdserve/vllm-venv``), created on
first use and reused after (see docs/bench_vs_vllm.md for what the install needs).

For each dtype, each repeat runs every workload on both servers, the server order alternating
between repeats; each repeat draws fresh prompts (its own seed), the same for both servers, so
neither hits its prefix cache across repeats. Both servers stay up together when neither spins
while idle (measured over 10 s, across each process tree); otherwise one is up at a time.
Workloads (``--quick``: fewer requests, one repeat, float32 only):

- ``burst``: 64 requests at once, prompts 128-512 tokens, outputs 54-218.
- ``poisson``: 1 request/s, 256-token prompts, 64 output tokens, 32 requests.
- ``sharegpt-like``: no ShareGPT file ships here, so a synthetic trace with lognormal prompt
  and output lengths (ShareGPT's long right tail) and Poisson arrivals at 1 request/s.

Reported: output tok/s, TPOT p50, TTFT p50 per run and the per-repeat pdserve/vLLM ratios,
whose medians are checked against the issue's targets. ``--disagg`` adds a second phase:
pdserve with 1 prefill + 1 decode worker against two ``vllm serve`` (NixlConnector producer
and consumer) behind a small proxy (``--serve-proxy``), measuring the inter-token latency of
running decodes while long prompts arrive. Every process started here is stopped on exit,
Ctrl-C or error (each server in its own session, its process tree killed).

Run: ``make bench-vs-vllm`` or ``.venv/bin/python scripts/bench_vs_vllm.py`` (``--quick`` for
a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peer_processes import (
    Server,
    ServerExited,
    _raise_interrupt,
    cpu_seconds,
    descendants,
    stop_all,
)
from peer_report import (
    DTYPES,
    FIGURES,
    SERVERS,
    TARGETS,
    _ms,
    git_commit,
    machine,
    markdown_report,
    write_markdown,
    write_plots,
)
from peer_servers import (
    BENCH_TIMEOUT_S,
    BIN,
    IDLE_SAMPLE_S,
    IDLE_SPIN_CORES,
    PREFILL_CORE,
    SERVER_CORE,
    WORKLOADS,
    Setup,
    figures,
    pdserve_server,
    proxy_server,
    run_bench,
    running,
    serve_proxy,
    start_and_warm,
    stop_servers,
    vllm_server,
    workload_args,
)
from vllm_install import VLLM_PYTHON, ensure_vllm

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one repeat, few requests, float32 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {list(WORKLOADS)}")
    parser.add_argument("--dtypes", default=None,
                        help=f"comma-separated subset of {list(DTYPES)} (default: all; "
                             f"with --quick: float32)")
    parser.add_argument("--disagg", action="store_true",
                        help="also the disaggregated phase (1 prefill + 1 decode each)")
    parser.add_argument("--vllm-venv", type=Path,
                        default=Path.home() / ".cache" / "pdserve" / "vllm-venv")
    parser.add_argument("--vllm-python", default=VLLM_PYTHON,
                        help="interpreter that creates the vLLM venv")
    parser.add_argument("--port-base", type=int, default=8300,
                        help="ports from here up to +12 are used")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_vs_vllm.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "bench_vs_vllm.md")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "plots")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="never keep both servers up, even when neither spins idle")
    parser.add_argument("--serve-proxy", nargs=3, metavar=("PREFILL_URL", "DECODE_URL", "PORT"),
                        help=argparse.SUPPRESS)  # the vLLM P/D proxy, run as a child process
    args = parser.parse_args()
    args.workload_names = _subset(parser, "--workloads", args.workloads, WORKLOADS)
    dtypes = args.dtypes or (DTYPES[0] if args.quick else ",".join(DTYPES))
    args.dtype_names = _subset(parser, "--dtypes", dtypes, DTYPES)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    return args


def _subset(parser: argparse.ArgumentParser, flag: str, text: str, known: Any) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        parser.error(f"{flag} {text!r}: a comma-separated subset of {list(known)}")
    return names


# ---- the aggregated comparison ----------------------------------------------------------


def measure_idle(servers: list[Server]) -> dict[str, float]:
    """Idle cores of each server's tree, sampled over the same window."""
    time.sleep(2.0)  # let the warm-up's tail settle
    trees = {s.name: descendants(s.process.pid) for s in servers if s.process}
    before = {name: cpu_seconds(tree) for name, tree in trees.items()}
    time.sleep(IDLE_SAMPLE_S)
    idle = {name: (cpu_seconds(tree) - before[name]) / IDLE_SAMPLE_S
            for name, tree in trees.items()}
    print("idle CPU (cores): " + ", ".join(f"{k} {v:.3f}" for k, v in idle.items()), flush=True)
    return idle


def compare_dtype(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Every repeat of every workload on both servers at one dtype; raises ServerExited when
    a server refuses to start."""
    servers = {"pdserve": pdserve_server(setup, disagg=False),
               "vllm": vllm_server(setup, setup.port_base + 1, SERVER_CORE)}
    both = list(servers.values())
    try:
        start_and_warm(both)
        idle = measure_idle(both)
        startup = {name: s.startup_s for name, s in servers.items()}
        together = not args.one_at_a_time and max(idle.values()) < IDLE_SPIN_CORES
        print(f"servers {'up together' if together else 'one at a time'} (idle threshold "
              f"{IDLE_SPIN_CORES} cores)", flush=True)
        if not together:
            stop_servers(both)
        repeats = []
        for repeat in range(args.repeats):
            order = list(SERVERS) if repeat % 2 == 0 else list(reversed(SERVERS))
            repeats.append(run_repeat(setup, args, servers, order, repeat, together))
    finally:
        stop_servers(both)
    return {"dtype": setup.dtype, "idle_cores": idle, "startup_s": startup,
            "servers_together": together, "repeats": repeats,
            "median_ratios": median_ratios(repeats, args.workload_names)}


def run_repeat(setup: Setup, args: argparse.Namespace, servers: dict[str, Server],
               order: list[str], repeat: int, together: bool) -> dict[str, Any]:
    seed = repeat  # fresh prompts per repeat, the same for both servers
    results: dict[str, dict[str, Any]] = {name: {} for name in args.workload_names}
    for name in order:
        with running([] if together else [servers[name]]):
            for workload_name in args.workload_names:
                workload = WORKLOADS[workload_name]
                out = setup.work_dir / f"{setup.dtype}-r{repeat}-{workload_name}-{name}.json"
                bench_args = workload_args(workload, args.quick, seed, setup.work_dir)
                result = figures(run_bench(servers[name], bench_args, out, seed))
                result["bench_json"] = str(out)
                results[workload_name][name] = result
                print(f"[{setup.dtype} repeat {repeat}] {workload_name:13s} {name:7s} "
                      f"{_row(result)}", flush=True)
    for per_server in results.values():
        per_server["ratio"] = {k: _ratio(per_server["pdserve"][k], per_server["vllm"][k])
                               for k in FIGURES}
    return {"repeat": repeat, "order": order, "seed": seed, "workloads": results}


def _row(result: dict[str, Any]) -> str:
    return (f"{result['output_throughput']:7.1f} tok/s  TPOT p50 {_ms(result['tpot_p50_s'])}  "
            f"TTFT p50 {_ms(result['ttft_p50_s'])}  ok {result['num_ok']}/"
            f"{result['num_requests']}  load {result['load_average_1m']:.2f}")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def median_ratios(repeats: list[dict], workload_names: list[str]) -> dict[str, dict]:
    medians: dict[str, dict] = {}
    for workload in workload_names:
        medians[workload] = {}
        for figure in FIGURES:
            values = [r["workloads"][workload]["ratio"][figure] for r in repeats]
            values = [v for v in values if v is not None]
            medians[workload][figure] = statistics.median(values) if values else None
    return medians


def check_targets(median: dict[str, dict]) -> list[dict[str, Any]]:
    checks = []
    for workload, figure, bound, is_upper, text in TARGETS:
        value = median.get(workload, {}).get(figure)
        met = None if value is None else (value <= bound if is_upper else value >= bound)
        checks.append({"target": text, "ratio": value, "met": met})
    return checks


# ---- the disaggregated comparison -------------------------------------------------------

DISAGG_DECODES = ("--workload", "random", "--rate", "inf", "--input-len", "32",
                  "--output-len", "128", "--range-ratio", "0")
DISAGG_LONG = ("--workload", "random", "--rate", "1", "--input-len", "1024",
               "--output-len", "2", "--range-ratio", "0")
DISAGG_NUM_DECODES, DISAGG_NUM_LONG = 8, 8
DISAGG_LONG_DELAY_S = 1.0  # long prompts start once the decodes run


def compare_disagg(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """ITL of 8 running decodes alone, then while 1024-token prompts arrive at 1/s."""
    results = {}
    base = setup.port_base
    prefill = vllm_server(setup, base + 3, PREFILL_CORE, "kv_producer", base + 10)
    decode = vllm_server(setup, base + 4, SERVER_CORE, "kv_consumer", base + 11)
    sides: dict[str, Callable[[], list[Server]]] = {
        "pdserve": lambda: [pdserve_server(setup, disagg=True)],
        "vllm": lambda: [prefill, decode, proxy_server(setup, prefill, decode)],
    }
    for repeat in range(args.repeats):
        order = list(SERVERS) if repeat % 2 == 0 else list(reversed(SERVERS))
        for name in order:
            servers = sides[name]()
            with running(servers, overlap=True):  # vLLM's pair: one core each
                idle = measure_idle(servers)
                trial = disagg_trial(servers[-1], setup.work_dir / f"disagg-r{repeat}-{name}",
                                     repeat)
            results.setdefault(name, []).append({**trial, "idle_cores": idle})
            print(f"[disagg repeat {repeat}] {name}: {json.dumps(trial)}", flush=True)
    return {"dtype": setup.dtype, "runs": results}


def disagg_trial(front: Server, prefix: Path, seed: int) -> dict[str, Any]:
    decodes = ["--num-requests", str(DISAGG_NUM_DECODES), *DISAGG_DECODES]
    alone = run_bench(front, decodes, prefix.with_suffix(".alone.json"), seed, pin_client=False)
    long_out = prefix.with_suffix(".long.json")
    long_argv = [str(BIN / "pdserve"), "bench", "--url", front.url, "--seed", str(seed + 500),
                 "--no-progress", "--out", str(long_out), "--num-requests",
                 str(DISAGG_NUM_LONG), *DISAGG_LONG]
    with subprocess.Popen(long_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as long:
        time.sleep(DISAGG_LONG_DELAY_S)  # the long prompts' first lands mid-decode
        mixed = run_bench(front, decodes, prefix.with_suffix(".mixed.json"), seed + 1,
                          pin_client=False)
        _, stderr = long.communicate(timeout=BENCH_TIMEOUT_S)
    if long.returncode != 0:
        raise RuntimeError(f"long-prompt load against {front.name} failed: {stderr[-2000:]}")
    long_summary = json.loads(long_out.read_text())["runs"][0]["summary"]
    return {"itl_alone": _itl(alone), "itl_with_long_prompts": _itl(mixed),
            "long_ttft_p50_s": long_summary["ttft"]["p50"],
            "long_ok": f"{long_summary['num_ok']}/{long_summary['num_requests']}"}


def _itl(bench_json: dict[str, Any]) -> dict[str, float | None]:
    run = bench_json["runs"][0]
    gaps = [gap for record in run["records"] if record["ok"] for gap in record["itl_s"]]
    return {"p50_s": run["summary"]["itl"]["p50"], "p99_s": run["summary"]["itl"]["p99"],
            "max_s": max(gaps) if gaps else None}


# ---- main -------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    from pdserve.config import ClusterConfig
    from pdserve.modelgen import ensure_default_model

    began = time.monotonic()
    install = ensure_vllm(args.vllm_venv, args.vllm_python, args.disagg)
    model_dir = ensure_default_model("small")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "repeats": args.repeats,
        "command": " ".join([".venv/bin/python", "scripts/bench_vs_vllm.py", *sys.argv[1:]]),
        "commit": git_commit(), "machine": machine(), "vllm": install,
        "model_dir": str(model_dir),
        "workloads": {name: "pdserve bench " + " ".join(WORKLOADS[name].args(args.quick))
                      for name in args.workload_names},
        "load_average_start": os.getloadavg(), "dtypes": {}}
    for dtype in args.dtype_names:
        setup = Setup(model_dir, dtype, args.vllm_venv, install["tcmalloc"], args.port_base,
                      work_dir)
        try:
            ClusterConfig(model_dir=str(model_dir), dtype=dtype)
            phase = compare_dtype(setup, args)
        except (ValueError, ServerExited) as error:
            if dtype == DTYPES[0]:  # the baseline both must run: a failure is a failure
                raise
            print(f"skipping {dtype}: the server refused it or failed to start at it: "
                  f"{error}", flush=True)
            report["dtypes"][dtype] = {"skipped": _skip_reason(error)}
            continue
        phase["targets"] = check_targets(phase["median_ratios"])
        report["dtypes"][dtype] = phase
    if args.disagg:
        setup = Setup(model_dir, DTYPES[0], args.vllm_venv, install["tcmalloc"],
                      args.port_base, work_dir)
        try:
            report["disagg"] = compare_disagg(setup, args)
        except (RuntimeError, subprocess.SubprocessError) as error:
            print(f"the disaggregated phase failed: {error}", flush=True)
            report["disagg"] = {"failed": _skip_reason(error)}
    report["load_average_end"] = os.getloadavg()
    report["elapsed_s"] = time.monotonic() - began
    return report


def _skip_reason(error: Exception) -> str:
    """The error's first line and, for a server that exited, its log's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


def main() -> int:
    args = parse_args()
    if args.serve_proxy:
        prefill_url, decode_url, port = args.serve_proxy
        serve_proxy(prefill_url, decode_url, int(port))
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    work_dir = Path(tempfile.mkdtemp(prefix="bench_vs_vllm-"))
    print(f"logs and raw bench results: {work_dir}", flush=True)
    try:
        report = run_all(args, work_dir)
    except KeyboardInterrupt:
        print("interrupted: stopping every server", flush=True)
        return 130
    finally:
        stop_all()
    table = markdown_report(report)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(args.markdown, table)
    for path in write_plots(report, args.plots):
        print(f"plot: {path}")
    print(f"results: {args.out}, {args.markdown}; logs and raw results: {work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
