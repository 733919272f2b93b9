"""KV transfer benchmark (issue 3), every figure taken side by side in one run.

The prefill side (this process: the engine's model runner and a ``KVProducer``) streams a
prompt's KV to a decode side in a second process (a bare pool and a ``KVConsumer``) over
real NIXL (UCX). One torch thread per process.

1. Bytes: bytes posted per request against the theoretical tokens x layers x 2 x KV heads
   x (head_dim x wire element size + 4 for the fp8 scale), and the ratio to the model dtype.
2. Overlap: prefill wall time of one long prompt with streaming on (until every write has
   completed and the notice is out) against compute only, repeats interleaved.
3. Throughput: the project's streaming path (``begin``, ``send_layer`` per layer,
   ``finish``, result) against raw NIXL WRITEs of the same prepared descriptors, and raw
   NIXL against an in-process copy of the same bytes.
4. FP8 quality: the prompt KV through the fp8 wire (quantized, dequantized on arrival:
   exactly ``dequantize_fp8(quantize_fp8(kv))``, as tests/test_kv_transfer.py shows the bytes
   land unchanged) against the lossless wire; then 64 decode steps teacher-forced on the
   lossless run's greedy tokens: greedy agreement and mean |change| of the chosen token's
   log-probability.

Run: ``.venv/bin/python scripts/bench_kvtransfer.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from kv_bench_sides import BLOCK_SIZE, PATHS, DecodeSide, PrefillSide  # scripts/, beside this file

from engine.config import ModelConfig
from engine.kv_cache import dequantize_fp8, quantize_fp8
from engine.model_runner import ModelInput, ModelRunner, SequenceInput
from pdserve.modelgen import ensure_default_model

STREAMED = ("fp8", "auto")  # the paths the prefill benchmark computes into (model-dtype pool)
TARGET_OVERLAP, TARGET_STREAM_VS_RAW = 1.05, 0.8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model directory (default: the generated small model)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quality-prompts", type=int, default=32)
    parser.add_argument("--quality-tokens", type=int, default=64)
    parser.add_argument("--quality-prompt-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="short prompt, few repeats")
    parser.add_argument("--out", default="docs/bench_kvtransfer.json")
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.repeats = 256, 2
        args.quality_prompts, args.quality_tokens = 4, 8
    return args


# -- the measurements -----------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values)


def theoretical_bytes(config: ModelConfig, num_tokens: int, wire: str, dtype_bytes: int) -> int:
    per_token_head = (config.head_dim + 4) if wire == "fp8" else config.head_dim * dtype_bytes
    return num_tokens * config.num_layers * 2 * config.num_kv_heads * per_token_head


def bench_overlap_and_bytes(side: PrefillSide, tokens: list[int], repeats: int) -> dict:
    """Prefill of ``tokens`` (all but the last prompt token): compute only vs streaming."""
    blocks = list(range(-(-len(tokens) // BLOCK_SIZE)))
    side.prefill(tokens, blocks, None)  # warm up: allocator, kernels, UCX connections
    for wire in STREAMED:
        side.prefill(tokens, blocks, wire)
    runs: dict[str, list[dict]] = {"off": [], **{wire: [] for wire in STREAMED}}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(side.prefill(tokens, blocks, None if mode == "off" else mode))
    off = median([r["done_s"] for r in runs["off"]])
    moved_tokens = len(blocks) * BLOCK_SIZE  # whole blocks travel
    report = {"prompt_tokens": len(tokens) + 1, "blocks": len(blocks), "off_s": off,
              "runs": runs}
    for wire in STREAMED:
        posted = runs[wire][-1]["num_bytes"]
        theory = theoretical_bytes(side.config, moved_tokens, PATHS[wire][1], 4)
        report[wire] = {
            "compute_s": median([r["compute_s"] for r in runs[wire]]),
            "done_s": median([r["done_s"] for r in runs[wire]]),
            "ratio_done_to_off": median([r["done_s"] for r in runs[wire]]) / off,
            "bytes_posted": posted, "bytes_theoretical": theory,
            "ratio_to_fp32": posted / theoretical_bytes(side.config, moved_tokens, "auto", 4),
            "ratio_to_bf16": posted / theoretical_bytes(side.config, moved_tokens, "auto", 2),
        }
    return report


def bench_throughput(side: PrefillSide, num_blocks: int, repeats: int) -> dict:
    blocks = list(range(num_blocks))
    # The in-process copy: the same number of bytes, one flat copy (gathered beforehand).
    copy_source = side.runner.kv_cache.data[:, :, blocks].contiguous().view(torch.uint8).flatten()
    copy_target = torch.empty_like(copy_source)
    quantized, scales = quantize_fp8(side.runner.kv_cache.data[:, :, blocks])
    side.fp8_pool.data[:, :, blocks] = quantized
    side.fp8_pool.scales[:, :, blocks] = scales
    report = {}
    for wire in PATHS:
        side.send_only(blocks, wire)
        side.raw_nixl(blocks, wire)  # warm up
        stream, raw, copy = [], [], []
        num_bytes = 0
        for _ in range(repeats):
            seconds, num_bytes = side.send_only(blocks, wire)
            stream.append(seconds)
            raw.append(side.raw_nixl(blocks, wire))
            start = time.perf_counter()
            copy_target[:num_bytes].copy_(copy_source[:num_bytes])
            copy.append(time.perf_counter() - start)
        report[wire] = {
            "bytes": num_bytes, "stream_s": median(stream), "raw_nixl_s": median(raw),
            "memcpy_s": median(copy),
            "stream_gbps": num_bytes / median(stream) / 1e9,
            "raw_nixl_gbps": num_bytes / median(raw) / 1e9,
            "memcpy_gbps": num_bytes / median(copy) / 1e9,
            "stream_vs_raw": median(raw) / median(stream),
            "raw_vs_memcpy": median(copy) / median(raw),
            "runs": {"stream_s": stream, "raw_nixl_s": raw, "memcpy_s": copy},
        }
    return report


def bench_quality(runner: ModelRunner, args, generator: torch.Generator) -> dict:
    """Teacher-forced decode after the prompt KV went through each wire."""
    config, cache = runner.config, runner.kv_cache
    length, steps = args.quality_prompt_tokens, args.quality_tokens
    per_seq = -(-(length + steps) // BLOCK_SIZE)
    prompts = torch.randint(0, config.vocab_size, (args.quality_prompts, length),
                            generator=generator).tolist()
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    runner.execute(ModelInput([SequenceInput(p[:-1], 0, t, False)
                               for p, t in zip(prompts, tables, strict=True)]))
    prompt_blocks = torch.tensor([b for t in tables for b in t[: -(-(length - 1) // BLOCK_SIZE)]])
    lossless = cache.data.clone()
    reference = decode(runner, lossless, prompts, tables, steps, forced=None)
    report = {"prompts": len(prompts), "prompt_tokens": length, "decode_steps": steps,
              "mean_top1_prob": reference["top1_prob"]}
    # The bf16 round trip is no wire of ours: it shows how sensitive the model itself is.
    for name, round_trip in (("fp8_wire", lambda x: dequantize_fp8(*quantize_fp8(x), x.dtype)),
                             ("bf16_round_trip", lambda x: x.bfloat16().to(x.dtype))):
        lossy = lossless.clone()
        lossy[:, :, prompt_blocks] = round_trip(lossless[:, :, prompt_blocks])
        run = decode(runner, lossy, prompts, tables, steps, forced=reference["tokens"])
        change = (run["logprobs"] - reference["logprobs"]).abs()
        report[name] = {
            "greedy_agreement": (run["argmax"] == reference["tokens"]).float().mean().item(),
            "mean_abs_logprob_change": change.mean().item(),
            "median_abs_logprob_change": change.median().item(),
            "max_abs_logprob_change": change.max().item()}
    return report


def decode(runner: ModelRunner, pool: torch.Tensor, prompts, tables, steps: int,
           forced: torch.Tensor | None) -> dict:
    """``steps`` decode steps from the prompts' last token on a copy of ``pool``; greedy, or
    fed ``forced`` tokens. Log-probabilities are those of the token fed next."""
    runner.kv_cache.data.copy_(pool)
    length = len(prompts[0])
    current = [p[-1] for p in prompts]
    tokens, argmaxes, logprobs, top1 = [], [], [], []
    for step in range(steps):
        logits = runner.execute(ModelInput([SequenceInput([c], length - 1 + step, t, True)
                                            for c, t in zip(current, tables, strict=True)]))
        log_softmax = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1)
        chosen = argmax if forced is None else forced[:, step]
        tokens.append(chosen)
        argmaxes.append(argmax)
        logprobs.append(log_softmax.gather(1, chosen[:, None])[:, 0])
        top1.append(log_softmax.max(dim=-1).values.exp())
        current = chosen.tolist()
    return {"tokens": torch.stack(tokens, 1), "argmax": torch.stack(argmaxes, 1),
            "logprobs": torch.stack(logprobs, 1),
            "top1_prob": torch.stack(top1).mean().item()}


def print_report(report: dict) -> None:
    overlap = report["overlap"]
    print(f"\nprefill of {overlap['prompt_tokens']} tokens ({overlap['blocks']} blocks), "
          f"median of {len(overlap['runs']['off'])}: compute only {overlap['off_s']:.3f} s")
    for wire in STREAMED:
        row = overlap[wire]
        print(f"  stream {wire:4}: compute {row['compute_s']:.3f} s, all landed "
              f"{row['done_s']:.3f} s = {row['ratio_done_to_off']:.3f}x compute only "
              f"(target <= {TARGET_OVERLAP}); bytes posted {row['bytes_posted']:,} vs theory "
              f"{row['bytes_theoretical']:,}; {row['ratio_to_fp32']:.3f} of fp32, "
              f"{row['ratio_to_bf16']:.3f} of bf16")
    for wire, row in report["throughput"].items():
        print(f"throughput {wire:4} ({row['bytes']:,} bytes): stream {row['stream_gbps']:.2f} "
              f"GB/s, raw NIXL {row['raw_nixl_gbps']:.2f} GB/s, memcpy {row['memcpy_gbps']:.2f}"
              f" GB/s; stream/raw {row['stream_vs_raw']:.2f} (target >= {TARGET_STREAM_VS_RAW})"
              f", raw/memcpy {row['raw_vs_memcpy']:.2f}")
    quality = report["quality"]
    print(f"quality, {quality['prompts']} prompts x {quality['decode_steps']} tokens teacher-"
          f"forced, mean top-1 probability {quality['mean_top1_prob']:.3f}:")
    for name in ("fp8_wire", "bf16_round_trip"):
        row = quality[name]
        print(f"  {name:15}: greedy agreement {row['greedy_agreement']:.4f}, |d logprob| mean "
              f"{row['mean_abs_logprob_change']:.4f} median "
              f"{row['median_abs_logprob_change']:.5f} max {row['max_abs_logprob_change']:.3f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    model_dir = args.model or str(ensure_default_model("small", "llama"))
    num_blocks = max(-(-args.prompt_tokens // BLOCK_SIZE),
                     args.quality_prompts * -(-(args.quality_prompt_tokens
                                                + args.quality_tokens) // BLOCK_SIZE))
    generator = torch.Generator().manual_seed(0)
    decode_side_process = DecodeSide(model_dir, num_blocks)
    side = PrefillSide(model_dir, decode_side_process, num_blocks)
    try:
        tokens = torch.randint(0, side.config.vocab_size, (args.prompt_tokens - 1,),
                               generator=generator).tolist()
        report = {
            "command": "scripts/bench_kvtransfer.py" + (" --quick" if args.quick else ""),
            "model": model_dir, "threads_per_process": 1, "repeats": args.repeats,
            "overlap": bench_overlap_and_bytes(side, tokens, args.repeats),
            "throughput": bench_throughput(side, -(-(args.prompt_tokens - 1) // BLOCK_SIZE),
                                           args.repeats),
            "quality": bench_quality(side.runner, args, generator),
        }
    finally:
        side.close()
        decode_side_process.close()
    print_report(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
