"""Cluster benchmark (issue 4, "Memory and speed"): remote against local prefill, one run.

Every cluster is up at once on one local Ray (1 decode worker, TP1, plus for the remote
sides 1 prefill worker, TP1), so the sides take turns request by request:

- ``local``: ``disagg_mode="never"``, no prefill worker: every prompt is prefilled on the
  decode worker.
- ``remote_<wire>``: ``disagg_mode="conditional"`` with the default threshold (256 tokens):
  the long prompts go to the prefill worker and their KV comes over NIXL on that wire, the
  short decode prompts stay local.

1. TTFT of a long prompt on idle workers: submit to the first chunk with a token, fresh
   random prompts (no prefix-cache hit anywhere), the sides alternated trial by trial.
2. Inter-token latency of 8 running decodes (32-token prompts, 128 output tokens) while long
   prompts keep arriving, one in flight at a time (the next is submitted when the previous
   finishes) until the decodes end: every gap between two token chunks of the 8 decodes.

Each repeat takes the median of its TTFT trials and the percentiles of its pooled gaps; the
report gives the median and [min .. max] over repeats, the JSON keeps every repeat and the
decode workers' decision counters that show which path each side took.
Run: ``.venv/bin/python scripts/bench_cluster.py`` (``--repeats 1 --trials 2`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from pdserve.cluster import Cluster, launch
from pdserve.config import ClusterConfig, DecodeConfig, PrefillConfig

TARGET_TTFT_RATIO = 1.15  # remote TTFT / local TTFT
WIRES = ("fp8", "auto")
FIRST_TOKEN_ID = 8  # ids below are the byte-level tokenizer's reserved ones
DECODE_POOL_BLOCKS = 512  # 8 decodes x 10 blocks + long prompts of 64 blocks, with room
PREFILL_POOL_BLOCKS = 256
CPUS_PER_RANK = 0.25  # Ray's accounting only (5 ranks must fit in 2): nothing is pinned
NUM_WARMUP_REQUESTS = 2
SETTLE_S = 0.2  # between TTFT trials, so each one starts on idle workers
LONG_SAMPLING = {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True}
NUM_DECODES, DECODE_PROMPT_TOKENS, DECODE_OUTPUT_TOKENS = 8, 32, 128
DECODE_SAMPLING = {"max_tokens": DECODE_OUTPUT_TOKENS, "temperature": 0.0, "ignore_eos": True}
TIMEOUT_S = 300.0


class TokenSource:
    """Seeded random prompts over every non-special id: distinct, so nothing is cached."""

    def __init__(self, model_dir: Path, seed: int):
        config = json.loads((model_dir / "config.json").read_text())
        special = {config.get("bos_token_id")}
        eos = config.get("eos_token_id")
        special |= set(eos) if isinstance(eos, list) else {eos}
        tokenizer_config = model_dir / "tokenizer_config.json"
        if tokenizer_config.is_file():
            added = json.loads(tokenizer_config.read_text()).get("added_tokens_decoder", {})
            special |= {int(token_id) for token_id in added}
        self.allowed = [t for t in range(FIRST_TOKEN_ID, config["vocab_size"])
                        if t not in special]
        self.random = random.Random(seed)

    def tokens(self, num_tokens: int) -> list[int]:
        return self.random.choices(self.allowed, k=num_tokens)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the generated small model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=5,
                        help="TTFT trials per side in each repeat")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--wire", default="fp8,auto",
                        help="comma-separated kv_transfer_dtype of the remote sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="docs/bench_cluster.json")
    args = parser.parse_args()
    args.wires = [w for w in args.wire.split(",") if w]
    if not args.wires or any(w not in WIRES for w in args.wires):
        parser.error(f"--wire {args.wire!r}: a comma-separated subset of {WIRES}")
    threshold = DecodeConfig().max_local_prefill_tokens
    if args.prompt_tokens <= threshold:
        parser.error(f"--prompt-tokens {args.prompt_tokens} would be prefilled locally "
                     f"(decode.max_local_prefill_tokens={threshold}): use more")
    if args.repeats < 1 or args.trials < 1:
        parser.error("--repeats and --trials must be >= 1")
    return args


def side_config(model_dir: Path, wire: str | None) -> ClusterConfig:
    """``wire=None``: the local side (never, no prefill worker)."""
    decode = DecodeConfig(num_blocks=DECODE_POOL_BLOCKS, cpus_per_rank=CPUS_PER_RANK,
                          disagg_mode="never" if wire is None else "conditional")
    prefill = PrefillConfig(num_workers=0 if wire is None else 1,
                            num_blocks=PREFILL_POOL_BLOCKS, cpus_per_rank=CPUS_PER_RANK)
    return ClusterConfig(model_dir=str(model_dir), decode=decode, prefill=prefill,
                         kv_transfer_dtype=wire or "fp8")


def launch_sides(model_dir: Path, wires: list[str], stack: contextlib.ExitStack,
                 report: dict) -> dict[str, Cluster]:
    sides: dict[str, Cluster] = {}
    for name, wire in [("local", None)] + [(f"remote_{w}", w) for w in wires]:
        start = time.perf_counter()
        sides[name] = stack.enter_context(launch(side_config(model_dir, wire)))
        report["launch_s"][name] = time.perf_counter() - start
        report["cluster_configs"][name] = sides[name].config.to_dict()
    return sides


def time_request(cluster: Cluster, prompt: list[int], sampling: dict) -> tuple[float, int]:
    """(seconds from submit to the first chunk with a token, output tokens); raises on an
    error chunk."""
    start = time.perf_counter()
    stream = cluster.submit(prompt, sampling)
    ttft_s, num_tokens = 0.0, 0
    while True:
        chunk = stream.next_chunk(TIMEOUT_S)
        if chunk.error:
            raise RuntimeError(f"request {chunk.request_id} failed: {chunk.error}")
        if chunk.token_ids and not num_tokens:
            ttft_s = time.perf_counter() - start
        num_tokens += len(chunk.token_ids)
        if chunk.finished:
            if num_tokens != sampling["max_tokens"]:
                raise RuntimeError(f"request {chunk.request_id}: {num_tokens} tokens, asked "
                                   f"{sampling['max_tokens']} ({chunk.finish_reason})")
            return ttft_s, num_tokens


def bench_ttft(sides: dict[str, Cluster], args, source: TokenSource) -> dict:
    """The sides alternate trial by trial, each trial's order reversed from the last."""
    for cluster in sides.values():
        for _ in range(NUM_WARMUP_REQUESTS):
            time_request(cluster, source.tokens(args.prompt_tokens), LONG_SAMPLING)
    runs = []
    for repeat in range(args.repeats):
        trials: dict[str, list[float]] = {name: [] for name in sides}
        for trial in range(args.trials):
            order = list(sides) if trial % 2 == 0 else list(sides)[::-1]
            for name in order:
                time.sleep(SETTLE_S)
                seconds, _ = time_request(sides[name], source.tokens(args.prompt_tokens),
                                          LONG_SAMPLING)
                trials[name].append(seconds)
        run: dict = {f"{name}_s": statistics.median(t) for name, t in trials.items()}
        for name in sides:
            if name != "local":
                run[f"{name}_over_local"] = run[f"{name}_s"] / run["local_s"]
        run["trials_s"] = trials
        run["load_average_1_min"] = os.getloadavg()[0]
        runs.append(run)
        print(f"  ttft repeat {repeat}: {rounded(run)}")
    return summarize(runs)


def collect_chunk_times(stream, started: threading.Semaphore) -> list[tuple[float, int]]:
    """(arrival time, tokens) of every chunk with tokens; ``started`` is released once, at
    the first."""
    times: list[tuple[float, int]] = []
    while True:
        chunk = stream.next_chunk(TIMEOUT_S)
        if chunk.error:
            raise RuntimeError(f"decode request {chunk.request_id} failed: {chunk.error}")
        if chunk.token_ids:
            times.append((time.perf_counter(), len(chunk.token_ids)))
            if len(times) == 1:
                started.release()
        if chunk.finished:
            return times


def keep_arriving(cluster: Cluster, source: TokenSource, prompt_tokens: int,
                  stop: threading.Event) -> list[float]:
    """Long prompts one after another until ``stop``; their TTFTs."""
    ttfts = []
    while not stop.is_set():
        ttfts.append(time_request(cluster, source.tokens(prompt_tokens), LONG_SAMPLING)[0])
    return ttfts


def decodes_under_arrivals(cluster: Cluster, source: TokenSource,
                           prompt_tokens: int) -> dict:
    """One ITL run: start the decodes, then the long prompts once every decode has its
    first token."""
    started, stop = threading.Semaphore(0), threading.Event()
    prompts = [source.tokens(DECODE_PROMPT_TOKENS) for _ in range(NUM_DECODES)]
    start = time.perf_counter()
    with ThreadPoolExecutor(NUM_DECODES + 1) as pool:
        try:
            readers = [pool.submit(collect_chunk_times, cluster.submit(p, DECODE_SAMPLING),
                                   started) for p in prompts]
            for _ in range(NUM_DECODES):
                if not started.acquire(timeout=TIMEOUT_S):
                    raise RuntimeError(f"a decode had no first token after {TIMEOUT_S} s")
            arrivals = pool.submit(keep_arriving, cluster, source, prompt_tokens, stop)
            chunk_times = [reader.result() for reader in readers]
        finally:
            stop.set()
        long_ttfts = arrivals.result()
    return itl_figures(chunk_times, long_ttfts, time.perf_counter() - start)


def itl_figures(chunk_times: list[list[tuple[float, int]]], long_ttfts: list[float],
                wall_s: float) -> dict:
    num_tokens = [sum(n for _, n in times) for times in chunk_times]
    if num_tokens != [DECODE_OUTPUT_TOKENS] * NUM_DECODES:
        raise RuntimeError(f"decodes returned {num_tokens} tokens, asked {DECODE_OUTPUT_TOKENS}")
    gaps = [b - a for times in chunk_times
            for (a, _), (b, _) in zip(times, times[1:], strict=False)]
    return {"itl_p50_ms": statistics.median(gaps) * 1e3,
            "itl_p99_ms": statistics.quantiles(gaps, n=100, method="inclusive")[98] * 1e3,
            "itl_max_ms": max(gaps) * 1e3, "itl_mean_ms": statistics.fmean(gaps) * 1e3,
            "num_gaps": len(gaps),
            "max_tokens_per_chunk": max(n for times in chunk_times for _, n in times),
            "num_long_prompts": len(long_ttfts),
            "long_prompt_ttft_median_s": statistics.median(long_ttfts) if long_ttfts else None,
            "wall_s": wall_s}


def bench_itl(sides: dict[str, Cluster], args, source: TokenSource) -> dict:
    """Per repeat one run per side, the order rotated so no side always goes first."""
    names, runs = list(sides), []
    for repeat in range(args.repeats):
        run: dict = {}
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            figures = decodes_under_arrivals(sides[name], source, args.prompt_tokens)
            run.update({f"{name}_{key}": value for key, value in figures.items()})
        for name in names[1:]:
            run[f"p99_local_over_{name}"] = run["local_itl_p99_ms"] / run[f"{name}_itl_p99_ms"]
        run["load_average_1_min"] = os.getloadavg()[0]
        runs.append(run)
        print(f"  itl repeat {repeat}: {rounded(run)}")
    return summarize(runs)


def summarize(runs: list[dict]) -> dict:
    """Median, min and max of every float figure across repeats, plus the repeats."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    summary = {k: {"median": statistics.median(r[k] for r in runs),
                   "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys}
    return {**summary, "repeats": runs}


def rounded(run: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()
            if not isinstance(v, dict)}


def path_counters(sides: dict[str, Cluster]) -> dict:
    """Each side's decode and prefill counters: where every prompt was prefilled."""
    paths = {}
    for name, cluster in sides.items():
        (decode,) = cluster.stats("decode").values()
        prefills = list(cluster.stats("prefill").values())
        paths[name] = {key: decode[key] for key in ("decisions", "prefills",
                                                    "prompt_tokens_computed", "num_finished")}
        paths[name]["prefill_workers"] = [{k: p.get(k) for k in ("jobs_done", "bytes_sent")}
                                          for p in prefills]
    return paths


def check_paths(paths: dict, args) -> list[str]:
    """What contradicts the intended paths: every long prompt remote on a remote side, none
    falling back, everything local on the local side."""
    problems = []
    for name, counters in paths.items():
        prefills = counters["prefills"]
        if prefills.get("fallback", 0):
            problems.append(f"{name}: {prefills['fallback']} remote prefills fell back")
        if name == "local" and set(counters["decisions"]) != {"local:mode_never"}:
            problems.append(f"local: decisions {counters['decisions']}")
        if name != "local":
            long_prompts = counters["num_finished"] - args.repeats * NUM_DECODES
            remote = counters["decisions"].get("remote:long_uncached", 0)
            if remote != long_prompts or prefills.get("remote", 0) != long_prompts:
                problems.append(f"{name}: {remote} remote decisions for {long_prompts} long "
                                f"prompts ({counters})")
    return problems


def git_commit() -> str:
    """HEAD of this checkout, "+dirty" with uncommitted edits to the serving code."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "pdserve",
                                "decode", "prefill", "kvtransfer"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def describe(args, model_dir: Path) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines
                if line.startswith("model name")), platform.processor())
    return {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "git_commit": git_commit(),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "ray_num_cpus": 2,
                    "load_average_1_5_15_min_at_start": os.getloadavg(),
                    "ray": ray.__version__},
        "model_dir": str(model_dir),
        "workload": {"prompt_tokens": args.prompt_tokens, "long_sampling": LONG_SAMPLING,
                     "ttft_trials_per_side_per_repeat": args.trials, "repeats": args.repeats,
                     "warmup_requests_per_side": NUM_WARMUP_REQUESTS,
                     "num_decodes": NUM_DECODES, "decode_prompt_tokens": DECODE_PROMPT_TOKENS,
                     "decode_sampling": DECODE_SAMPLING, "seed": args.seed},
        "launch_s": {}, "cluster_configs": {},
    }


def print_table(report: dict) -> None:
    ttft, itl = report["ttft"], report["itl"]
    rows = [(f"TTFT {name} ({report['workload']['prompt_tokens']} tokens), ms", ttft[key], 1e3)
            for key in ttft if key.endswith("_s") for name in [key[:-2]]]
    rows += [(f"TTFT {key[:-len('_over_local')]} / local", ttft[key], 1)
             for key in ttft if key.endswith("_over_local")]
    for key in [k for k in itl if k.endswith(("_itl_p50_ms", "_itl_p99_ms", "_itl_max_ms"))]:
        rows.append((f"ITL {key.replace('_itl_', ' ')}", itl[key], 1))
    rows += [(f"ITL p99 local / {key[len('p99_local_over_'):]}", itl[key], 1)
             for key in itl if key.startswith("p99_local_over_")]
    print(f"\n{'figure':<44}{'median  [min .. max]':>30}")
    for label, figure, scale in rows:
        median, low, high = (figure[k] * scale for k in ("median", "min", "max"))
        print(f"{label:<44}{median:>10.3f}  [{low:.3f} .. {high:.3f}]")
    served = {k: [r[k] for r in itl["repeats"]] for k in itl["repeats"][0]
              if k.endswith("num_long_prompts")}
    print(f"long prompts served during the decodes, per repeat: {served}")
    print(f"targets: {json.dumps(report['targets'])}")
    print(f"paths: {json.dumps(report['paths'])}")


def main() -> None:
    start = time.perf_counter()
    args = parse_args()
    if args.model is None:
        from pdserve.modelgen import ensure_default_model

        args.model = str(ensure_default_model("small"))
    model_dir = Path(args.model)
    source = TokenSource(model_dir, args.seed)
    report = describe(args, model_dir)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with contextlib.ExitStack() as stack:
        stack.callback(ray.shutdown)
        sides = launch_sides(model_dir, args.wires, stack, report)
        print(f"launched {list(sides)} in {rounded(report['launch_s'])} s")
        print("TTFT on idle workers ...")
        report["ttft"] = bench_ttft(sides, args, source)
        print("ITL of 8 decodes while long prompts arrive ...")
        report["itl"] = bench_itl(sides, args, source)
        report["paths"] = path_counters(sides)
    problems = check_paths(report["paths"], args)
    report["path_problems"] = problems
    report["targets"] = {
        f"ttft {name} / local <= {TARGET_TTFT_RATIO}":
            report["ttft"][f"{name}_over_local"]["median"] <= TARGET_TTFT_RATIO
        for name in (f"remote_{w}" for w in args.wires)}
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    print_table(report)
    if problems:
        print(f"PATH PROBLEMS: {problems}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json} after {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
