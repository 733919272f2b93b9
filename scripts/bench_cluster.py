"""Cluster benchmark (issue 4, "Memory and speed"): remote against local prefill, one run.

Two sides of the same shape (1 decode worker and 1 prefill worker, TP1 each, on one local
Ray with 2 CPUs), differing only in where a long prompt is prefilled:

- ``local``: ``disagg_mode="never"``: on the decode worker (the prefill worker idles).
- ``remote_<wire>``: ``disagg_mode="conditional"`` with the default threshold (256 tokens):
  the long prompts go to the prefill worker and their KV comes over NIXL on that wire; the
  short decode prompts stay local.

One cluster is up at a time, so an idle cluster never takes CPU from the one being measured
(before NIXL's progress thread was given a delay, each agent kept a core busy when idle;
``idle_cores`` below checks it). Each repeat launches every side in turn, the order
rotated by one per repeat, and takes on it, after two warm-up requests:

1. TTFT of a long prompt on idle workers: submit to the first chunk with a token, fresh
   random prompts (no prefix-cache hit anywhere), ``--trials`` of them, the median kept.
2. Inter-token latency of 8 running decodes (32-token prompts, 128 output tokens) while long
   prompts keep arriving, one in flight at a time (the next is submitted when the previous
   finishes) until the decodes end: every gap between two token chunks of the 8 decodes,
   pooled; p50, p99, max. The same 8 decodes alone first, as the baseline.
3. Footprint: CPU cores the idle worker processes use, and their resident memory.

The report gives the median and [min .. max] over repeats of each figure and of each
per-repeat ratio; the JSON keeps every repeat, every trial and the decode worker's decision
counters, checked against the path each request must have taken.
Run: ``.venv/bin/python scripts/bench_cluster.py`` (``--repeats 1 --trials 2 --wire fp8``
for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import ray

from cluster.launcher import Cluster, launch
from pdserve.config import ClusterConfig, DecodeConfig, PrefillConfig
from pdserve.worker_stats import Role

sys.path.insert(0, str(Path(__file__).parent))
from bench_stats import cpu_name, git_commit, summarize  # noqa: E402
from worker_processes import idle_footprint  # noqa: E402

TARGET_TTFT_RATIO = 1.15  # remote TTFT / local TTFT
WIRES = ("fp8", "auto")
FIRST_TOKEN_ID = 8  # ids below are the byte-level tokenizer's reserved ones
DECODE_POOL_BLOCKS = 512  # 8 decodes x 10 blocks + long prompts of 64 blocks, with room
PREFILL_POOL_BLOCKS = 256
NUM_WARMUP_REQUESTS = 2
SETTLE_S = 0.2  # before each TTFT trial, so it starts on idle workers
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
    """``wire=None``: the local side. Defaults everywhere but the pool sizes and the mode."""
    decode = DecodeConfig(num_blocks=DECODE_POOL_BLOCKS,
                          disagg_mode="never" if wire is None else "conditional")
    prefill = PrefillConfig(num_blocks=PREFILL_POOL_BLOCKS)
    return ClusterConfig(model_dir=str(model_dir), decode=decode, prefill=prefill,
                         kv_transfer_dtype=wire or "fp8")


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


def ttft_trials(cluster: Cluster, args, source: TokenSource) -> list[float]:
    trials = []
    for _ in range(args.trials):
        time.sleep(SETTLE_S)
        trials.append(time_request(cluster, source.tokens(args.prompt_tokens),
                                   LONG_SAMPLING)[0])
    return trials


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


def run_decodes(cluster: Cluster, source: TokenSource, prompt_tokens: int | None) -> dict:
    """One ITL run: start the decodes, then (unless ``prompt_tokens`` is None) the long
    prompts once every decode has its first token."""
    started, stop = threading.Semaphore(0), threading.Event()
    prompts = [source.tokens(DECODE_PROMPT_TOKENS) for _ in range(NUM_DECODES)]
    start, long_ttfts = time.perf_counter(), []
    with ThreadPoolExecutor(NUM_DECODES + 1) as pool:
        try:
            readers = [pool.submit(collect_chunk_times, cluster.submit(p, DECODE_SAMPLING),
                                   started) for p in prompts]
            for _ in range(NUM_DECODES):
                if not started.acquire(timeout=TIMEOUT_S):
                    raise RuntimeError(f"a decode had no first token after {TIMEOUT_S} s")
            if prompt_tokens is not None:
                arrivals = pool.submit(keep_arriving, cluster, source, prompt_tokens, stop)
            chunk_times = [reader.result() for reader in readers]
        finally:
            stop.set()
        if prompt_tokens is not None:
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


def run_side(model_dir: Path, name: str, wire: str | None, args,
             source: TokenSource) -> dict:
    """Launch one side, take its figures, check its paths, shut it down."""
    start = time.perf_counter()
    with launch(side_config(model_dir, wire)) as cluster:
        figures: dict = {"launch_s": time.perf_counter() - start, **idle_footprint()}
        for _ in range(NUM_WARMUP_REQUESTS):
            time_request(cluster, source.tokens(args.prompt_tokens), LONG_SAMPLING)
        trials = ttft_trials(cluster, args, source)
        figures.update(ttft_s=statistics.median(trials), ttft_trials_s=trials)
        quiet = run_decodes(cluster, source, None)
        figures.update({f"quiet_{k}": quiet[k] for k in ("itl_p50_ms", "itl_p99_ms")})
        figures.update(run_decodes(cluster, source, args.prompt_tokens))
        # typed stats as plain data, for the JSON and the path checks
        (counters,) = msgspec.to_builtins(cluster.worker_stats(Role.DECODE))
        prefill_counters = msgspec.to_builtins(cluster.worker_stats(Role.PREFILL))
    num_long = NUM_WARMUP_REQUESTS + args.trials + figures["num_long_prompts"]
    num_short = 2 * NUM_DECODES  # the quiet run's and the loaded run's
    figures["counters"] = {k: counters[k] for k in ("decisions", "prefills",
                                                    "prompt_tokens_computed")}
    figures["counters"]["prefill_jobs_done"] = [p["jobs_done"] for p in prefill_counters]
    figures["path_problems"] = check_path(name, figures["counters"], num_long, num_short,
                                          args.prompt_tokens)
    return figures


def check_path(name: str, counters: dict, num_long: int, num_short: int,
               prompt_tokens: int) -> list[str]:
    """What contradicts the intended paths. Remote is proven as in tests/test_cluster.py:
    the decode worker computed only the last token of each long prompt."""
    if name == "local":
        expected = {"decisions": {"local:mode_never": num_long + num_short},
                    "prefills": {"local": num_long + num_short},
                    "prompt_tokens_computed": num_long * prompt_tokens
                    + num_short * DECODE_PROMPT_TOKENS, "prefill_jobs_done": [0]}
    else:
        expected = {"decisions": {"remote:long_uncached": num_long,
                                  "local:short_uncached": num_short},
                    "prefills": {"remote": num_long, "local": num_short},
                    "prompt_tokens_computed": num_long + num_short * DECODE_PROMPT_TOKENS,
                    "prefill_jobs_done": [num_long]}
    return [f"{name}: {key} is {counters[key]}, expected {value}"
            for key, value in expected.items() if counters[key] != value]


def bench(model_dir: Path, args, source: TokenSource) -> dict:
    """Every side once per repeat, the order rotated by one each repeat."""
    sides = [("local", None)] + [(f"remote_{w}", w) for w in args.wires]
    runs = []
    for repeat in range(args.repeats):
        run: dict = {"order": []}
        for name, wire in sides[repeat % len(sides):] + sides[:repeat % len(sides)]:
            figures = run_side(model_dir, name, wire, args, source)
            run.update({f"{name}_{key}": value for key, value in figures.items()})
            run["order"].append(name)
            print(f"  repeat {repeat} {name}: {rounded(figures)}")
        for name, _ in sides[1:]:
            run[f"ttft_{name}_over_local"] = run[f"{name}_ttft_s"] / run["local_ttft_s"]
            run[f"itl_p99_local_over_{name}"] = (run["local_itl_p99_ms"]
                                                 / run[f"{name}_itl_p99_ms"])
        run["load_average_1_min"] = os.getloadavg()[0]
        runs.append(run)
    return summarize(runs)


def rounded(figures: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()
            if not isinstance(v, list | dict) or k == "path_problems"}


def describe(args, model_dir: Path) -> dict:
    cpu = cpu_name()
    return {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "git_commit": git_commit("engine", "pdserve", "decode", "prefill", "kvtransfer"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "ray_num_cpus": 2,
                    "load_average_1_5_15_min_at_start": os.getloadavg(),
                    "ray": ray.__version__},
        "model_dir": str(model_dir),
        "workload": {"prompt_tokens": args.prompt_tokens, "long_sampling": LONG_SAMPLING,
                     "ttft_trials_per_side_per_repeat": args.trials, "repeats": args.repeats,
                     "warmup_requests_per_side": NUM_WARMUP_REQUESTS,
                     "num_decodes": NUM_DECODES, "decode_prompt_tokens": DECODE_PROMPT_TOKENS,
                     "decode_sampling": DECODE_SAMPLING, "seed": args.seed},
        "cluster_configs": {name: side_config(model_dir, wire).to_dict() for name, wire
                            in [("local", None)] + [(f"remote_{w}", w) for w in args.wires]},
    }


def print_table(report: dict) -> None:
    figures, names = report["figures"], report["figures"]["repeats"][0]["order"]
    names = ["local"] + sorted(n for n in names if n != "local")
    rows = []
    for name in names:
        rows += [(f"{name}: TTFT, {report['workload']['prompt_tokens']}-token prompt, ms",
                  f"{name}_ttft_s", 1e3),
                 (f"{name}: ITL p50 ms", f"{name}_itl_p50_ms", 1),
                 (f"{name}: ITL p99 ms", f"{name}_itl_p99_ms", 1),
                 (f"{name}: ITL max ms", f"{name}_itl_max_ms", 1),
                 (f"{name}: ITL p50 ms, no long prompts", f"{name}_quiet_itl_p50_ms", 1),
                 (f"{name}: ITL p99 ms, no long prompts", f"{name}_quiet_itl_p99_ms", 1),
                 (f"{name}: long-prompt TTFT under decode, s",
                  f"{name}_long_prompt_ttft_median_s", 1),
                 (f"{name}: idle worker processes, cores busy", f"{name}_idle_cores", 1)]
    for name in names[1:]:
        rows += [(f"TTFT {name} / local", f"ttft_{name}_over_local", 1),
                 (f"ITL p99 local / {name}", f"itl_p99_local_over_{name}", 1)]
    print(f"\n{'figure':<52}{'median  [min .. max]':>30}")
    for label, key, scale in rows:
        median, low, high = (figures[key][k] * scale for k in ("median", "min", "max"))
        print(f"{label:<52}{median:>10.3f}  [{low:.3f} .. {high:.3f}]")
    served = {n: [r[f"{n}_num_long_prompts"] for r in figures["repeats"]] for n in names}
    print(f"long prompts served during the decodes, per repeat: {served}")
    print(f"targets: {json.dumps(report['targets'])}")


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
    try:
        report["figures"] = bench(model_dir, args, source)
    finally:
        ray.shutdown()
    problems = [p for run in report["figures"]["repeats"] for key, value in run.items()
                if key.endswith("path_problems") for p in value]
    report["path_problems"] = problems
    report["targets"] = {
        f"ttft remote_{w} / local <= {TARGET_TTFT_RATIO}":
            report["figures"][f"ttft_remote_{w}_over_local"]["median"] <= TARGET_TTFT_RATIO
        for w in args.wires}
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    print_table(report)
    print(f"path problems: {problems or 'none'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json} after {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
