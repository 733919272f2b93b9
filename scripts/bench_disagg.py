"""Does disaggregation pay? Goodput of aggregated vs always- vs conditionally-disaggregated
clusters on one hardware budget, by bisection on the request rate.

- Budget: the machine's cores, one per worker process (``pin_cpus``), one torch thread each.
  aggregated (``--disagg-mode never``): decode workers only, one per core, chunked prefill
  (``max_num_batched_tokens``); always / conditional: one prefill worker and the rest decode
  workers. The router (a thread of this process) and the load generator (``pdserve bench``
  in a subprocess) are not pinned: on a 2-core machine there is no core to spare for them.
- SLOs, fixed before any probe: TTFT <= K_TTFT x and TPOT <= K_TPOT x the idle TTFT and
  TPOT of the workload's median request, measured one request at a time on the aggregated
  cluster.
- Goodput (DESIGN.md): the highest rate at which >= 90% of requests meet both SLOs. Each
  mode is bisected on its own; at every step the three modes are probed back to back (order
  rotated) so machine drift hits all of them. Every probe is appended to the JSON as it
  finishes; ``--resume`` replays saved probes instead of running them again.

    .venv/bin/python scripts/bench_disagg.py [--repeats 3] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import goodput, stats

MODES = ("never", "always", "conditional")
K_TTFT, K_TPOT = 3.0, 3.0
THRESHOLD = 0.9
WORKLOADS = {
    # long prompts, short outputs: prefill interference is what hurts decode
    "long": {"args": ["--workload", "random", "--input-len", "512", "--output-len", "32"],
             "start_rate": 1.0},
    # short prompts and ~50% shared-prefix prompts: local prefill of short and cached
    # prompts should beat sending every one to a prefill worker
    "mixed": {"args": ["--workload", "mixed", "--input-len", "64", "--output-len", "32",
                       "--shared-fraction", "0.5", "--num-groups", "4", "--prefix-len",
                       "384", "--suffix-len", "32"],
              "start_rate": 2.0},
}
SLO_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="long,mixed")
    parser.add_argument("--requests", type=int, default=32, help="requests per probe")
    parser.add_argument("--steps", type=int, default=5, help="probes per mode per repeat")
    parser.add_argument("--min-rate", type=float, default=0.5,
                        help="do not probe below this rate: goodput is then reported as 0")
    parser.add_argument("--out", default="docs/bench_disagg.json")
    parser.add_argument("--plots", default="docs/plots")
    parser.add_argument("--plot-prefix", default="disagg")
    parser.add_argument("--slo-from", default=None,
                        help="take the SLOs from an earlier run's JSON (same workloads)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--wire", default="fp8", choices=("fp8", "auto"),
                        help="kv_transfer_dtype; with fp8 into model-dtype pools, landed "
                             "blocks are lossy and stay out of decode's prefix cache")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import ray
    from bench_stats import cpu_name, git_commit

    from cluster.launcher import launch
    from pdserve.modelgen import ensure_default_model
    from router.server import RouterThread

    cores = sorted(os.sched_getaffinity(0))
    out = Path(args.out)
    saved = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    state = {"command": "python scripts/bench_disagg.py " + " ".join(sys.argv[1:]),
             "commit": git_commit("router", "decode", "prefill", "engine", "pdserve"),
             "cpu": cpu_name(), "cores": cores, "size": args.size, "wire": args.wire,
             "k_ttft": K_TTFT,
             "k_tpot": K_TPOT, "requests_per_probe": args.requests,
             "min_rate": args.min_rate,
             "slo": saved.get("slo", {}), "points": saved.get("points", [])}
    if args.slo_from:
        slo = json.loads(Path(args.slo_from).read_text())["slo"]
        state["slo"] = {w: slo[w] for w in args.workloads.split(",") if w in slo}
        state["slo_from"] = args.slo_from
    model_dir = str(ensure_default_model(args.size))
    ray.init(num_cpus=4 * len(cores), include_dashboard=False, log_to_driver=False)
    servers, clusters = {}, []
    try:
        for mode in MODES:
            cluster = launch(_config(model_dir, mode, cores, args.wire))
            clusters.append(cluster)
            servers[mode] = RouterThread(cluster)
        print(f"clusters up on cores {cores}: " + ", ".join(
            f"{m} {s.url}" for m, s in servers.items()), flush=True)
        for workload in args.workloads.split(","):
            if workload not in state["slo"]:
                state["slo"][workload] = _idle_slo(servers["never"].url, workload)
                _save(out, state)
            print(f"{workload}: SLO {state['slo'][workload]}", flush=True)
            for repeat in range(args.repeats):
                _bisect(state, out, servers, workload, repeat, args)
    finally:
        for server in servers.values():
            server.close()
        for cluster in clusters:
            cluster.shutdown()
        ray.shutdown()
    state["goodput"] = _goodputs(state)
    _save(out, state)
    _plot(state, Path(args.plots), args.plot_prefix)
    _print_table(state)
    return 0


def _config(model_dir: str, mode: str, cores: list[int], wire: str):
    from pdserve.config import ClusterConfig, DecodeConfig, PrefillConfig

    num_prefill = 0 if mode == "never" else 1
    decode_cores = cores[num_prefill:]
    return ClusterConfig(
        model_dir=model_dir, kv_transfer_dtype=wire, num_threads=1,
        decode=DecodeConfig(num_workers=len(decode_cores), disagg_mode=mode,
                            max_num_batched_tokens=256, pin_cpus=decode_cores,
                            cpus_per_rank=1.0),
        prefill=PrefillConfig(num_workers=num_prefill, pin_cpus=cores[:1] or None,
                              cpus_per_rank=1.0))


def _bench(url: str, workload: str, extra: list[str]) -> dict:
    """One `pdserve bench` run in its own process; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--url", url,
                        *WORKLOADS[workload]["args"], *extra, "--out", str(result_path),
                        "--no-progress"], check=True, capture_output=True, text=True)
        return json.loads(result_path.read_text())


def _idle_slo(url: str, workload: str) -> dict:
    (run,) = _bench(url, workload, ["--num-requests", "9", "--concurrency", "1",
                                    "--seed", "99"])["runs"]
    idle_ttft = run["summary"]["ttft"]["p50"]
    idle_tpot = run["summary"]["tpot"]["p50"]
    return {"idle_ttft_s": idle_ttft, "idle_tpot_s": idle_tpot,
            "ttft_s": K_TTFT * idle_ttft, "tpot_s": K_TPOT * idle_tpot}


def _bisect(state: dict, out: Path, servers: dict, workload: str, repeat: int,
            args: argparse.Namespace) -> None:
    slo = state["slo"][workload]

    def attainment_at(mode: str) -> Callable[[float], float]:
        return lambda rate: _probe(state, out, servers[mode].url, workload, repeat, mode, rate,
                                   slo, args.requests)["attainment"]

    def report(mode: str, probe: goodput.Probe, next_rate: float) -> None:
        print(f"  {workload} r{repeat} {mode:11s} {probe.rate:7.3f} req/s: attainment "
              f"{probe.attainment:.0%} -> next {next_rate:.3f}", flush=True)

    search = goodput.GoodputSearch(WORKLOADS[workload]["start_rate"], args.steps,
                                   min_rate=args.min_rate, threshold=THRESHOLD)
    goodput.search_goodput({mode: attainment_at(mode) for mode in MODES}, search, report)


def _probe(state: dict, out: Path, url: str, workload: str, repeat: int, mode: str,
           rate: float, slo: dict, num_requests: int) -> dict:
    key = (workload, repeat, mode, round(rate, 6))
    for point in state["points"]:
        if (point["workload"], point["repeat"], point["mode"], round(point["rate"], 6)) == key:
            return point
    seed = 1000 * repeat + int(rate * 1000) % 997
    result = _bench(url, workload, ["--num-requests", str(num_requests), "--rate",
                                    str(rate), "--seed", str(seed), "--slo-ttft-ms",
                                    str(slo["ttft_s"] * 1e3), "--slo-tpot-ms",
                                    str(slo["tpot_s"] * 1e3)])
    (run,) = result["runs"]
    summary = run["summary"]
    point = {"workload": workload, "repeat": repeat, "mode": mode, "rate": rate,
             "attainment": summary["slo"]["attainment"], "finished_at": time.time(),
             "summary": {k: summary[k] for k in ("num_ok", "num_errors", "duration_s",
                                                  "request_throughput", "ttft", "tpot",
                                                  "e2e", "slo")},
             # enough of each request to recompute attainment at other SLO scales
             "requests": [[r["ok"], r["ttft_s"], _tpot(r)] for r in run["records"]]}
    state["points"].append(point)
    _save(out, state)
    return point


def _tpot(record: dict) -> float | None:
    return stats.tpot_s(stats.RequestRecord.from_dict(record))


def _attainment(requests: list, ttft_s: float, tpot_s: float) -> float:
    good = sum(1 for ok, ttft, tpot in requests
               if ok and ttft <= ttft_s and (tpot is None or tpot <= tpot_s))
    return good / len(requests)


def _goodput(points: list[dict], slo: dict, scale: float = 1.0) -> float:
    """The highest probed rate whose attainment passes, the SLOs scaled by ``scale``."""
    scaled = [(p["rate"], _attainment(p["requests"], slo["ttft_s"] * scale,
                                      slo["tpot_s"] * scale)) for p in points]
    return goodput.max_passing_rate(scaled, THRESHOLD) or 0.0


def _goodputs(state: dict) -> dict:
    table = {}
    for workload, slo in state["slo"].items():
        table[workload] = {}
        repeats = sorted({p["repeat"] for p in state["points"] if p["workload"] == workload})
        for mode in MODES:
            values = [_goodput([p for p in state["points"] if (p["workload"], p["repeat"],
                                                                p["mode"]) ==
                                (workload, repeat, mode)], slo) for repeat in repeats]
            table[workload][mode] = {"repeats": values,
                                     "median": statistics.median(values) if values else None}
        table[workload]["ratios"] = _ratios(table[workload], repeats)
    return table


def _ratios(modes: dict, repeats: list[int]) -> dict:
    """Per-repeat ratios (same repeat, so the same machine state), median and spread."""
    ratios = {}
    for name, (a, b) in {"always/never": ("always", "never"),
                         "conditional/never": ("conditional", "never"),
                         "conditional/always": ("conditional", "always")}.items():
        values = [x / y for x, y in zip(modes[a]["repeats"], modes[b]["repeats"], strict=True)
                  if y > 0]
        if values:
            ratios[name] = {"median": statistics.median(values), "min": min(values),
                            "max": max(values)}
    return ratios


def _save(out: Path, state: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(out)


def _plot(state: dict, directory: Path, prefix: str) -> None:
    from bench import plots

    for workload, slo in state["slo"].items():
        points = [p for p in state["points"] if p["workload"] == workload]
        if not points:
            continue
        plots.plot_goodput_bars(
            {m: state["goodput"][workload][m]["repeats"] for m in MODES},
            directory / f"{prefix}_{workload}_goodput.png",
            title=f"{workload}: goodput (>= 90% within SLO), {len(_repeats(points))} repeats")
        sweeps = {m: sorted(({"rate": p["rate"], "summary": p["summary"]} for p in points
                             if p["mode"] == m and p["repeat"] == 0),
                            key=lambda q: q["rate"]) for m in MODES}
        plots.plot_rate_sweep(sweeps, directory / f"{prefix}_{workload}_rates.png",
                              title=f"{workload}: probes of repeat 0")
        curves = {m: [(s, statistics.median(
            _goodput([p for p in points if p["mode"] == m and p["repeat"] == r], slo, s)
            for r in _repeats(points))) for s in SLO_SCALES] for m in MODES}
        plots.plot_slo_scale(curves, directory / f"{prefix}_{workload}_slo_scale.png",
                             title=f"{workload}: goodput (req/s) against SLO scale",
                             ylabel="goodput (req/s)")


def _repeats(points: list[dict]) -> list[int]:
    return sorted({p["repeat"] for p in points})


def _print_table(state: dict) -> None:
    for workload, modes in state["goodput"].items():
        print(f"{workload}: " + "  ".join(
            f"{m} {modes[m]['median']:.3f} {modes[m]['repeats']}" for m in MODES))
        for name, ratio in modes["ratios"].items():
            print(f"   {name}: {ratio['median']:.2f} [{ratio['min']:.2f}..{ratio['max']:.2f}]")


if __name__ == "__main__":
    sys.exit(main())
