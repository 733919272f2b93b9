"""Weight quantization speed (issue 16): fp32, bf16, int8 and fp8 side by side in one run.

1. Engine, in this process, one thread: decode step at batch 1 and 32 against each
   precision's weights floor (its own weight bytes / the memory bandwidth measured in this
   run), and the prefill of one 1,024-token prompt.
2. Served: ``pdserve serve`` (one decode worker pinned to core 0) under ``pdserve bench``
   with 64 requests at once (the peer benchmark's ``burst`` load, client on core 1): output
   tokens/s.

Configurations alternate order between repeats; every figure is the median of ``--repeats``.
Run: ``.venv/bin/python scripts/bench_quant.py`` (``--quick``: a smoke run, no served part
unless ``--served``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import TokenSource, decode_step_times, greedy, memory_bandwidth, timed
from bench_stats import cpu_name, git_commit, summarize
from peer_processes import Server
from peer_servers import BIN, SERVER_CORE, WORKLOADS, figures, run_bench, running

from engine import LLM, ModelConfig

# name -> engine options; the served part runs the ones in SERVED.
CONFIGS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "int8-bf16": {"dtype": "bfloat16", "quantization": "int8"},
    "fp8": {"dtype": "float32", "quantization": "fp8"},
    "fp8-bf16": {"dtype": "bfloat16", "quantization": "fp8"},
}
SERVED = ("fp32", "bf16", "int8", "int8-bf16", "fp8-bf16")
DECODE_BATCHES = (1, 32)
TARGET_INT8_OVER_FP32_BATCH_1 = 0.6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model directory (default: the generated small model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--served-repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--served", action="store_true", help="with --quick: run it anyway")
    parser.add_argument("--out", default="docs/bench_quant.json")
    args = parser.parse_args()
    args.context, args.steps, args.prefill = (64, 4, 256) if args.quick else (256, 32, 1024)
    if args.quick:
        args.repeats, args.served_repeats = 1, 1
    return args


def weight_bytes(llm: LLM) -> int:
    """Bytes a decode step must read: every layer tensor (quantized weights, scales, norms)
    and the output layer."""
    model = llm.engine.executor.runner.model
    tensors = [*model.layers.parameters(), *model.layers.buffers(), model.lm_head]
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_engine_config(name: str, args, source: TokenSource) -> dict:
    options = CONFIGS[name]
    figures_ = {}
    with LLM(args.model, num_threads=1, enable_prefix_caching=False, num_blocks=1024,
             max_num_batched_tokens=max(2048, args.prefill), **options) as llm:
        llm.generate([source.tokens(64)], greedy(4))  # warm-up
        figures_["weight_bytes"] = float(weight_bytes(llm))
        bandwidth = memory_bandwidth()
        figures_["bandwidth_b_s"] = bandwidth
        for batch in DECODE_BATCHES:
            step = statistics.median(decode_step_times(llm, batch, args.context, args.steps,
                                                       source))
            figures_[f"decode_batch_{batch}_s"] = step
            figures_[f"decode_batch_{batch}_over_floor"] = step * bandwidth / weight_bytes(llm)
        llm.generate([source.tokens(args.prefill)], greedy(1))  # warm the long shapes
        figures_["prefill_s"], _ = timed(llm.generate, [source.tokens(args.prefill)], greedy(1))
    figures_["load_average_1_min"] = os.getloadavg()[0]
    return figures_


def bench_engine(args, source: TokenSource) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        for name in (list(CONFIGS) if repeat % 2 == 0 else list(CONFIGS)[::-1]):
            runs[name].append(bench_engine_config(name, args, source))
            print(f"  {name}: {json.dumps({k: round(v, 4) for k, v in runs[name][-1].items()})}")
    result = {name: summarize(value) for name, value in runs.items()}
    for name in CONFIGS:  # ratios per repeat, then their median
        for key in ("decode_batch_1_s", "decode_batch_32_s", "prefill_s"):
            ratios = [r[key] / f[key] for r, f in zip(runs[name], runs["fp32"], strict=True)]
            result[name][f"{key}_over_fp32"] = statistics.median(ratios)
    return result


def pdserve_server(name: str, args, work_dir: Path, port: int) -> Server:
    config = {"model_dir": str(args.model), "num_threads": 1, **CONFIGS[name],
              "decode": {"num_workers": 1, "pin_cpus": [SERVER_CORE], "disagg_mode": "never"},
              "prefill": {"num_workers": 0}, "router": {"port": port}}
    path = work_dir / f"pdserve-{name}.json"  # JSON is YAML
    path.write_text(json.dumps(config, indent=1))
    argv = ["taskset", "-c", str(SERVER_CORE), str(BIN / "pdserve"), "serve", "--config",
            str(path)]
    return Server(f"pdserve-{name}", argv, {**os.environ, "OMP_NUM_THREADS": "1"}, port,
                  work_dir / f"pdserve-{name}.log")


def bench_served(args, work_dir: Path) -> dict:
    workload = WORKLOADS["burst"]
    runs: dict[str, list[dict]] = {name: [] for name in SERVED}
    for repeat in range(args.served_repeats):
        for index, name in enumerate(SERVED if repeat % 2 == 0 else SERVED[::-1]):
            with running([pdserve_server(name, args, work_dir, 8300 + index)]) as (server,):
                out = work_dir / f"bench-{name}-{repeat}.json"
                runs[name].append(figures(run_bench(server, workload.args(args.quick), out,
                                                    seed=args.seed + repeat)))
            print(f"  served {name}: {runs[name][-1]['output_throughput']:.1f} tok/s")
    result = {name: summarize(value) for name, value in runs.items()}
    for name in SERVED:
        ratios = [r["output_throughput"] / f["output_throughput"]
                  for r, f in zip(runs[name], runs["fp32"], strict=True)]
        result[name]["output_throughput_over_fp32"] = statistics.median(ratios)
    return {"workload": workload.args(args.quick), **result}


def print_table(report: dict) -> None:
    engine = report["engine"]
    print(f"\n{'config':<11}{'weights MB':>11}{'b1 ms':>8}{'/floor':>7}{'/fp32':>7}"
          f"{'b32 ms':>8}{'/floor':>7}{'/fp32':>7}{'prefill s':>10}{'/fp32':>7}{'served':>8}")
    for name, figure in engine.items():
        served = report.get("served", {}).get(name, {}).get("output_throughput", {})
        print(f"{name:<11}{figure['weight_bytes']['median'] / 1e6:>11.1f}"
              f"{figure['decode_batch_1_s']['median'] * 1e3:>8.2f}"
              f"{figure['decode_batch_1_over_floor']['median']:>7.2f}"
              f"{figure['decode_batch_1_s_over_fp32']:>7.2f}"
              f"{figure['decode_batch_32_s']['median'] * 1e3:>8.1f}"
              f"{figure['decode_batch_32_over_floor']['median']:>7.2f}"
              f"{figure['decode_batch_32_s_over_fp32']:>7.2f}"
              f"{figure['prefill_s']['median']:>10.3f}{figure['prefill_s_over_fp32']:>7.2f}"
              f"{served.get('median', float('nan')):>8.1f}")
    print(f"served: output tok/s, {report.get('served', {}).get('workload')}")
    print(f"targets: {json.dumps(report['targets'])}")


def main() -> None:
    start = time.perf_counter()
    args = parse_args()
    torch.set_num_threads(1)
    if args.model is None:
        from pdserve.modelgen import ensure_default_model

        args.model = str(ensure_default_model("small"))
    config = ModelConfig.from_dir(args.model)
    source = TokenSource(Path(args.model), config, args.seed)
    report = {"command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
              "git_commit": git_commit("engine", "pdserve"),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": 1,
                          "load_average_1_5_15_min_at_start": os.getloadavg()},
              "model": args.model, "configs": CONFIGS,
              "context_tokens": args.context, "prefill_tokens": args.prefill}
    print("engine ...")
    report["engine"] = bench_engine(args, source)
    if not args.quick or args.served:
        print("served ...")
        with tempfile.TemporaryDirectory(prefix="bench-quant-") as work_dir:
            report["served"] = bench_served(args, Path(work_dir))
    int8 = report["engine"]["int8"]["decode_batch_1_s_over_fp32"]
    report["targets"] = {f"int8 decode batch 1 <= {TARGET_INT8_OVER_FP32_BATCH_1} x fp32 "
                         f"({int8:.2f})": int8 <= TARGET_INT8_OVER_FP32_BATCH_1}
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} after {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
