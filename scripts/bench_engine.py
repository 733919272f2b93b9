"""Engine benchmark (issue 2), every figure taken side by side in one run, one thread count.

1. Throughput: output tokens/s of the engine (continuous batching) against HF transformers
   ``generate`` with static batches of the same requests (left padded, greedy, each batch run
   to its longest output; only requested output tokens count), and HF one request at a time.
2. Prefill: model FLOP/s of the engine on one long prompt, as a fraction of the FLOP/s that
   ``torch.matmul`` reaches on the model's own GEMM shapes in this run.
3. Decode: engine step time at batch 1 and 32 against the floor weight bytes / bandwidth,
   with the bandwidth measured in this run.

Each figure is the median of ``--repeats``; the JSON keeps every repeat.
Run: ``.venv/bin/python scripts/bench_engine.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_stats import cpu_name, git_commit, summarize

from engine import LLM, ModelConfig, SamplingParams

HF_BATCH_SIZE = 16
DECODE_BATCHES = (1, 32)
TARGET_SPEEDUP, TARGET_PEAK_FRACTION = 2.0, 0.6
# Decode step over its floor: batch 1 against the weights, batch 32 against weights + KV.
TARGET_DECODE_1, TARGET_DECODE_32 = 1.5, 2.0
BACKENDS = ("reference", "paged")


@dataclass(frozen=True, slots=True)
class Sizes:
    """Request and prompt sizes of one benchmark run."""

    prompt_tokens: tuple[int, int]  # uniform range of the throughput prompts
    output_tokens: tuple[int, int]  # uniform range of their requested outputs
    prefill_tokens: int
    decode_context_tokens: int
    decode_steps: int


FULL = Sizes((128, 512), (16, 256), 1024, 256, 32)
QUICK = Sizes((32, 128), (4, 16), 256, 64, 4)


@dataclass(frozen=True, slots=True)
class Workload:
    """Prompts (token ids) and their output lengths, in arrival order."""

    prompts: list[list[int]]
    output_tokens: list[int]


class TokenSource:
    """Seeded random token ids that avoid every special id, and seeded uniform lengths."""

    def __init__(self, model_dir: Path, config: ModelConfig, seed: int):
        special = {config.bos_token_id, *config.eos_token_ids}
        tokenizer_config = model_dir / "tokenizer_config.json"
        if tokenizer_config.is_file():
            added = json.loads(tokenizer_config.read_text()).get("added_tokens_decoder", {})
            special |= {int(token_id) for token_id in added}
        self.allowed = torch.tensor([t for t in range(config.vocab_size) if t not in special])
        self.generator = torch.Generator().manual_seed(seed)

    def tokens(self, num_tokens: int) -> list[int]:
        picks = torch.randint(len(self.allowed), (num_tokens,), generator=self.generator)
        return self.allowed[picks].tolist()

    def uniform(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def workload(self, num_requests: int, sizes: Sizes) -> Workload:
        prompts = [self.tokens(self.uniform(*sizes.prompt_tokens)) for _ in range(num_requests)]
        outputs = [self.uniform(*sizes.output_tokens) for _ in range(num_requests)]
        return Workload(prompts, outputs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model directory (default: the generated small model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--hf-single-requests", type=int, default=8,
                        help="time HF one-at-a-time on the first K requests only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--quick", action="store_true", help="few short requests, one repeat")
    parser.add_argument("--out", default="docs/bench_engine.json")
    args = parser.parse_args()
    args.sizes = QUICK if args.quick else FULL
    if args.quick:
        args.repeats, args.num_requests = 1, min(args.num_requests, 8)
        args.hf_single_requests = min(args.hf_single_requests, 2)
    return args


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_engine(llm: LLM, workload: Workload) -> tuple[float, list[list[int]]]:
    seconds, outputs = timed(llm.generate, workload.prompts,
                             [greedy(n) for n in workload.output_tokens])
    lengths = [len(o.token_ids) for o in outputs]
    if lengths != workload.output_tokens:
        raise RuntimeError(f"engine returned {lengths} tokens, asked {workload.output_tokens}")
    return seconds, [o.token_ids for o in outputs]


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], num_new_tokens: int) -> torch.Tensor:
    """One static batch, left padded, greedy, exactly ``num_new_tokens`` for every row (no
    EOS: like ``ignore_eos`` in the engine, so both compute the same tokens)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, width]
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         max_new_tokens=num_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[:, width:]  # [B, num_new_tokens]


def run_hf_static(model, workload: Workload, batch_size: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(workload.prompts), batch_size):
        batch = slice(first, first + batch_size)
        hf_generate(model, workload.prompts[batch], max(workload.output_tokens[batch]))
    return time.perf_counter() - start


def run_hf_single(model, workload: Workload, count: int) -> tuple[float, list[list[int]]]:
    start, tokens = time.perf_counter(), []
    for prompt, num_new in zip(workload.prompts[:count], workload.output_tokens[:count],
                               strict=True):
        tokens.append(hf_generate(model, [prompt], num_new)[0].tolist())
    return time.perf_counter() - start, tokens


def bench_throughput(llm: LLM, hf_model, args, source: TokenSource) -> dict:
    """Per repeat, a fresh workload (so no prefix-cache hit across repeats) run by all three."""
    runs = []
    for _ in range(args.repeats):
        workload = source.workload(args.num_requests, args.sizes)
        single = min(args.hf_single_requests, len(workload.prompts))
        engine_s, engine_tokens = run_engine(llm, workload)
        hf_static_s = run_hf_static(hf_model, workload, HF_BATCH_SIZE)
        hf_single_s, hf_tokens = run_hf_single(hf_model, workload, single)
        total, single_tokens = sum(workload.output_tokens), sum(workload.output_tokens[:single])
        same = sum(a == b for a, b in zip(hf_tokens, engine_tokens[:single], strict=True))
        runs.append({"output_tokens": total, "engine_s": engine_s, "hf_static_s": hf_static_s,
                     "engine_tok_s": total / engine_s, "hf_static_tok_s": total / hf_static_s,
                     "engine_over_hf_static": hf_static_s / engine_s,
                     "hf_single_requests_timed": single, "hf_single_same_tokens_as_engine": same,
                     "hf_single_tok_s": single_tokens / hf_single_s,
                     "hf_single_s_extrapolated": hf_single_s * total / single_tokens,
                     "load_average_1_min": os.getloadavg()[0]})
        print(f"  repeat: {json.dumps({k: round(v, 2) for k, v in runs[-1].items()})}")
    return summarize(runs)


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each GEMM in one layer, fused as the engine runs them."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"qkv": (config.hidden_size, q + 2 * kv), "o": (q, config.hidden_size),
            "gate_up": (config.hidden_size, 2 * config.intermediate_size),
            "down": (config.intermediate_size, config.hidden_size)}


def gemm_peak(config: ModelConfig, num_tokens: int, iterations: int = 20) -> float:
    """FLOP/s torch.matmul reaches on [num_tokens x in] @ [in x out] for the layer's mix."""
    flops, seconds = 0, 0.0
    for in_features, out_features in linear_shapes(config).values():
        x, weight = torch.randn(num_tokens, in_features), torch.randn(out_features, in_features)
        for _ in range(3):
            torch.matmul(x, weight.t())
        times = [timed(torch.matmul, x, weight.t())[0] for _ in range(iterations)]
        flops += 2 * num_tokens * in_features * out_features
        seconds += statistics.median(times)
    return flops / seconds


def prefill_flops(model: torch.nn.Module, config: ModelConfig, num_tokens: int) -> int:
    layer_params = sum(p.numel() for p in model.layers.parameters())
    dense = 2 * layer_params * num_tokens + 2 * config.hidden_size * config.vocab_size
    causal_pairs = num_tokens * (num_tokens + 1) // 2  # sum over positions of (position + 1)
    attention = config.num_layers * 2 * 2 * config.num_heads * config.head_dim * causal_pairs
    return dense + attention


def bench_prefill(llm: LLM, config: ModelConfig, args, source: TokenSource) -> dict:
    num_tokens = args.sizes.prefill_tokens
    flops = prefill_flops(llm.engine.executor.runner.model, config, num_tokens)
    for _ in range(2):  # warm-up: a fresh process's first long prefills run slower
        llm.generate([source.tokens(num_tokens)], greedy(1))
    runs = []
    for _ in range(args.repeats):
        peak = gemm_peak(config, num_tokens)
        seconds, _ = timed(llm.generate, [source.tokens(num_tokens)], greedy(1))
        runs.append({"seconds": seconds, "flop_s": flops / seconds, "gemm_peak_flop_s": peak,
                     "fraction_of_peak": flops / seconds / peak,
                     "load_average_1_min": os.getloadavg()[0]})
    return {"prompt_tokens": num_tokens, "flops": flops, **summarize(runs)}


def memory_bandwidth(num_bytes: int = 512 * 2**20) -> float:
    """Bytes/s of the faster of a copy (read + write) and a sum (read) of a large tensor,
    best of 5: the higher the bandwidth, the lower (stricter) the decode floor."""
    source = torch.randn(num_bytes // 4)
    target = torch.empty_like(source)
    copy_s = min(timed(target.copy_, source)[0] for _ in range(5))
    sum_s = min(timed(torch.sum, source)[0] for _ in range(5))
    return max(2 * num_bytes / copy_s, num_bytes / sum_s)


def decode_step_times(llm: LLM, batch: int, context: int, num_steps: int,
                      source: TokenSource) -> list[float]:
    """Prefill ``batch`` prompts of ``context`` tokens, then time each pure decode step."""
    engine = llm.engine
    params = greedy(engine.max_model_len - context)  # never finishes by itself: aborted below
    ids = {engine.add_request(source.tokens(context), params) for _ in range(batch)}
    started: set[str] = set()
    while started != ids:  # every request has its first token: the rest are decode steps
        started |= {o.request_id for o in engine.step()}
    times = []
    for _ in range(num_steps):
        seconds, outputs = timed(engine.step)
        if len(outputs) != batch:
            raise RuntimeError(f"decode step ran {len(outputs)} requests, expected {batch}")
        times.append(seconds)
    for request_id in ids:
        engine.abort_request(request_id)
    return times


def bench_decode(llm: LLM, config: ModelConfig, args, source: TokenSource) -> dict:
    model = llm.engine.executor.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    weight_bytes += model.lm_head.numel() * model.lm_head.element_size()
    context, num_steps = args.sizes.decode_context_tokens, args.sizes.decode_steps
    kv_bytes_per_token = (config.num_layers * 2 * config.num_kv_heads * config.head_dim
                          * llm.engine.executor.runner.kv_cache.data.element_size())
    result = {"weight_bytes": weight_bytes, "context_tokens": context}
    for batch in DECODE_BATCHES:
        runs = []
        for _ in range(args.repeats):
            bandwidth = memory_bandwidth()
            step_s = statistics.median(decode_step_times(llm, batch, context, num_steps, source))
            kv_bytes = batch * (context + num_steps // 2) * kv_bytes_per_token
            runs.append({"step_s": step_s, "bandwidth_b_s": bandwidth,
                         "floor_s": weight_bytes / bandwidth,
                         "floor_with_kv_s": (weight_bytes + kv_bytes) / bandwidth,
                         "step_over_floor": step_s * bandwidth / weight_bytes,
                         "load_average_1_min": os.getloadavg()[0]})
        result[f"batch_{batch}"] = summarize(runs)
    return result


def bench_backends(model_dir: Path, config: ModelConfig, args, source: TokenSource) -> dict:
    """Decode step of each attention backend at batch 1 and 32, repeats alternating."""
    context, num_steps = args.sizes.decode_context_tokens, args.sizes.decode_steps
    engines = {name: LLM(model_dir, num_threads=args.threads, dtype=args.dtype,
                         attention_backend=name, num_blocks=1024) for name in BACKENDS}
    runs: dict[str, list] = {f"{n}_batch_{b}": [] for n in BACKENDS for b in DECODE_BATCHES}
    try:
        for repeat in range(args.repeats):
            for name in BACKENDS if repeat % 2 == 0 else BACKENDS[::-1]:
                for batch in DECODE_BATCHES:
                    step = statistics.median(decode_step_times(engines[name], batch, context,
                                                               num_steps, source))
                    runs[f"{name}_batch_{batch}"].append({"step_s": step})
    finally:
        for llm in engines.values():
            llm.shutdown()
    result = {key: summarize(value) for key, value in runs.items()}
    for batch in DECODE_BATCHES:
        ratios = [r["step_s"] / p["step_s"] for r, p in zip(
            runs[f"reference_batch_{batch}"], runs[f"paged_batch_{batch}"], strict=True)]
        result[f"reference_over_paged_batch_{batch}"] = statistics.median(ratios)
    return result


def describe(config: ModelConfig, hf_model, threads: int) -> dict:
    cpu = cpu_name()
    import transformers

    return {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "git_commit": git_commit("engine", "pdserve"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
                    "load_average_1_5_15_min_at_start": os.getloadavg(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "model": {"parameters": sum(p.numel() for p in hf_model.parameters()),
                  "hidden_size": config.hidden_size, "num_layers": config.num_layers,
                  "num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
                  "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
                  "vocab_size": config.vocab_size,
                  "layer_parameters": sum(p.numel() for p in hf_model.model.layers.parameters()),
                  "gemm_in_out_per_layer": linear_shapes(config)},
    }


def print_table(report: dict) -> None:
    t, p = report["throughput"], report["prefill"]
    rows = [("engine output tok/s", t["engine_tok_s"], 1, 1),
            ("HF static batches tok/s", t["hf_static_tok_s"], 1, 1),
            ("HF one request at a time tok/s (*)", t["hf_single_tok_s"], 1, 1),
            ("engine / HF static", t["engine_over_hf_static"], 1, 2),
            ("prefill GFLOP/s", p["flop_s"], 1e-9, 1),
            ("GEMM-mix peak GFLOP/s", p["gemm_peak_flop_s"], 1e-9, 1),
            ("prefill fraction of peak", p["fraction_of_peak"], 1, 2)]
    for batch in DECODE_BATCHES:
        decode = report["decode"][f"batch_{batch}"]
        rows += [(f"decode step ms, batch {batch}", decode["step_s"], 1e3, 1),
                 ("  floor: weights / bandwidth ms", decode["floor_s"], 1e3, 1),
                 ("  floor: weights + KV / bandwidth ms", decode["floor_with_kv_s"], 1e3, 1)]
    print(f"\n{'figure':<38}{'median  [min .. max]':>28}")
    for label, figure, scale, digits in rows:
        median, low, high = (figure[k] * scale for k in ("median", "min", "max"))
        print(f"{label:<38}{median:>9.{digits}f}  [{low:.{digits}f} .. {high:.{digits}f}]")
    print(f"(*) timed on the first {t['repeats'][0]['hf_single_requests_timed']} requests only")
    backends = report["backends"]
    for batch in DECODE_BATCHES:
        reference = backends[f"reference_batch_{batch}"]["step_s"]["median"] * 1e3
        paged = backends[f"paged_batch_{batch}"]["step_s"]["median"] * 1e3
        ratio = backends[f"reference_over_paged_batch_{batch}"]
        print(f"decode batch {batch}: reference {reference:.1f} ms, paged {paged:.1f} ms, "
              f"reference / paged {ratio:.2f}")
    print(f"targets: {json.dumps(report['targets'])}")


def main() -> None:
    start = time.perf_counter()
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    if args.model is None:
        from pdserve.modelgen import ensure_default_model

        args.model = str(ensure_default_model("small"))
    model_dir = Path(args.model)
    config = ModelConfig.from_dir(model_dir)
    source = TokenSource(model_dir, config, args.seed)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    report = describe(config, hf_model, args.threads)
    report["model"]["dtype"] = args.dtype
    print(json.dumps(report, indent=1))
    with LLM(model_dir, num_threads=args.threads, dtype=args.dtype) as llm:  # its defaults
        run_engine(llm, Workload([source.tokens(32)] * 2, [4, 4]))  # warm-up
        hf_generate(hf_model, [source.tokens(32)], 4)
        print("throughput (engine vs HF) ...")
        report["throughput"] = bench_throughput(llm, hf_model, args, source)
    del hf_model, llm  # one KV pool at a time
    with LLM(model_dir, num_threads=args.threads, enable_prefix_caching=False, dtype=args.dtype,
             max_num_batched_tokens=max(2048, args.sizes.prefill_tokens)) as llm:
        print("prefill ...")
        report["prefill"] = bench_prefill(llm, config, args, source)
        print("decode ...")
        report["decode"] = bench_decode(llm, config, args, source)
    print("attention backends ...")
    report["backends"] = bench_backends(model_dir, config, args, source)
    decode_1, decode_32 = report["decode"]["batch_1"], report["decode"]["batch_32"]
    over_32 = decode_32["step_s"]["median"] / decode_32["floor_with_kv_s"]["median"]
    report["targets"] = {
        "engine_over_hf_static >= 2": report["throughput"]["engine_over_hf_static"]["median"]
        >= TARGET_SPEEDUP,
        f"prefill_fraction_of_peak >= {TARGET_PEAK_FRACTION}":
            report["prefill"]["fraction_of_peak"]["median"] >= TARGET_PEAK_FRACTION,
        f"decode_batch_1 <= {TARGET_DECODE_1} x weights floor":
            decode_1["step_over_floor"]["median"] <= TARGET_DECODE_1,
        f"decode_batch_32 <= {TARGET_DECODE_32} x weights+KV floor ({over_32:.2f})":
            over_32 <= TARGET_DECODE_32}
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_average_1_5_15_min_at_end"] = os.getloadavg()
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} after {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
