"""Device check: the engine on one accelerator, every figure measured in the same run, as JSON.

1. Greedy parity with HF transformers on a generated checkpoint: float32 token for token,
   bfloat16 by logits cosine and teacher-forced argmax agreement.
2. Decode step time at batch 1 and 32 against the memory floor: (weight bytes + the KV bytes
   the step reads) / the copy bandwidth measured here.
3. Prefill FLOP/s against the bf16 GEMM peak measured here on the model's own shapes.
4. fp8 W8A8 weights (``quantization: fp8``, ``torch._scaled_mm`` on CUDA) against the same
   run's bf16: decode at batch 1 and 32 and prefill, as ratios; and ``_scaled_mm`` against the
   emulated W8A8 (fp8-rounded activations times dequantized weights) on one 1B-class layer.
5. NIXL transfer between two processes, when nixl is importable (it is not on the H200
   machine this was written for; the CPU path is covered by tests/e2e).

``--cpu`` is the smoke run CI does: the tiny model on the CPU, the same steps, seconds.

On the H200 machine (torch, triton, transformers, safetensors, tokenizers, numpy; no ray,
nixl or msgspec): the engine imports msgspec (its SamplingParams), so carry its wheel for
that machine's Python 3.12 (``pip download --no-deps --only-binary=:all: --python-version
3.12 --platform manylinux_2_17_x86_64 -d .whl msgspec==0.20.0`` or newer) and install it
with ``--target`` before the script, as the device tool's README says. Not run on a GPU yet.
Run: ``scripts/device_check.sh [--cpu] [--out FILE]`` (default ``$OUT/device_check.json`` when
``$OUT`` is set, else ``docs/device_check.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.quantization import (  # noqa: E402
    QuantizedLinear,
    fp8_round_rows,
    quantize_rows,
    quantized_linear,
    scaled_mm_linear,
)
from pdserve.modelgen import SIZES, ModelShape, create_model  # noqa: E402

# A 1B-class shape (Llama-3.2-1B's layers with the embedded 512-token vocabulary).
DEVICE_SHAPE = ModelShape(2048, 16, 32, 8, 64, 8192, 4096)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="smoke run: tiny model on the CPU")
    default_out = (Path(os.environ["OUT"]) / "device_check.json" if os.environ.get("OUT")
                   else Path("docs/device_check.json"))
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--model", help="checkpoint directory (default: generated)")
    return parser.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn, *args) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = fn(*args)
    sync(device)
    return time.perf_counter() - start, result


def generated_model(args, root: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.cpu:
        return create_model(root / "tiny", "tiny", "llama")
    SIZES["device"] = DEVICE_SHAPE
    return create_model(root / "device", "device", "llama")


def prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(8, vocab, (n,), generator=generator).tolist() for n in lengths]


def hf_model(model_dir: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


@torch.inference_mode()
def check_parity(model_dir: Path, device: str, vocab: int) -> dict:
    """float32 greedy tokens equal HF's; bf16 logits close to HF float32 along bf16's path."""
    hf = hf_model(model_dir, device)
    batch = prompts(vocab, [7, 33, 100], seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, output_logits=True)
    result = {}
    for dtype in ("float32", "bfloat16"):
        with LLM(model_dir, device=device, dtype=dtype, num_blocks=256) as llm:
            outputs = llm.generate(batch, params)
        same, cosines, agree = 0, [], []
        for prompt, output in zip(batch, outputs, strict=True):
            ids = torch.tensor([prompt + output.token_ids], device=device)
            reference = hf(ids).logits[0, len(prompt) - 1 : -1].float().cpu()
            logits = torch.stack(output.logits).float().cpu()
            cosines += torch.nn.functional.cosine_similarity(logits, reference, -1).tolist()
            choices = reference.argmax(-1).tolist()
            agree += [a == b for a, b in zip(choices, output.token_ids, strict=True)]
            same += int(choices == output.token_ids)
        result[dtype] = {"sequences_identical": same, "sequences": len(batch),
                         "min_cosine": min(cosines), "mean_cosine": statistics.mean(cosines),
                         "argmax_agreement": sum(agree) / len(agree)}
    del hf
    return result


def copy_bandwidth(device: str, num_bytes: int) -> float:
    source = torch.empty(num_bytes // 4, device=device).normal_()
    target = torch.empty_like(source)
    best = min(timed(device, target.copy_, source)[0] for _ in range(5))
    return 2 * num_bytes / best


def decode_steps(llm: LLM, batch: int, context: int, steps: int, vocab: int,
                 device: str) -> float:
    engine = llm.engine
    params = SamplingParams(max_tokens=context + steps + 8, temperature=0, ignore_eos=True)
    ids = {engine.add_request(p, params) for p in prompts(vocab, [context] * batch, seed=2)}
    started: set[str] = set()
    while started != ids:
        started |= {o.request_id for o in engine.step()}
    times = [timed(device, engine.step)[0] for _ in range(steps)]
    for request_id in ids:
        engine.abort_request(request_id)
    return statistics.median(times)


def gemm_peak(device: str, dtype: torch.dtype, shapes: list[tuple[int, int]],
              rows: int) -> float:
    flops, seconds = 0, 0.0
    for in_features, out_features in shapes:
        x = torch.randn(rows, in_features, device=device, dtype=dtype)
        w = torch.randn(out_features, in_features, device=device, dtype=dtype)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        times = [timed(device, torch.nn.functional.linear, x, w)[0] for _ in range(10)]
        flops += 2 * rows * in_features * out_features
        seconds += statistics.median(times)
    return flops / seconds


@torch.inference_mode()
def check_speed(model_dir: Path, device: str, vocab: int, cpu: bool,
                quantization: str = "auto") -> dict:
    dtype = "float32" if cpu else "bfloat16"
    context, steps = (64, 8) if cpu else (512, 32)
    with LLM(model_dir, device=device, dtype=dtype, num_blocks=2048 if not cpu else 256,
             max_model_len=2048 if not cpu else 512, quantization=quantization) as llm:
        runner: ModelRunner = llm.engine.executor.runner
        model, config = runner.model, runner.config
        tensors = [*model.layers.parameters(), *model.layers.buffers(), model.lm_head]
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
        kv_per_token = (config.num_layers * 2 * config.num_kv_heads * config.head_dim
                        * runner.kv_cache.data.element_size())
        bandwidth = copy_bandwidth(device, (64 if cpu else 2048) * 2**20)
        result = {"dtype": dtype, "attention_backend": runner.attention.name,
                  "quantization": quantization, "copy_bandwidth_b_s": bandwidth,
                  "weight_bytes": weight_bytes,
                  "fast_path_layers": sum(isinstance(m, QuantizedLinear)
                                          and m.fast_path != "none" for m in model.modules())}
        for batch in (1, 32):
            step = decode_steps(llm, batch, context, steps, vocab, device)
            floor = (weight_bytes + batch * context * kv_per_token) / bandwidth
            result[f"decode_batch_{batch}"] = {"step_s": step, "floor_s": floor,
                                               "step_over_floor": step / floor}
        tokens = 128 if cpu else 2048
        prompt = prompts(vocab, [tokens], seed=3)
        once = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for _ in range(2):
            llm.generate(prompt, once)
        seconds = min(timed(device, llm.generate, prompts(vocab, [tokens], seed=4 + i), once)[0]
                      for i in range(3))
        layer_params = sum(p.numel() for p in model.layers.parameters())
        attention = (config.num_layers * 4 * config.num_heads * config.head_dim
                     * tokens * (tokens + 1) // 2)
        flops = 2 * layer_params * tokens + attention
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        shapes = [(config.hidden_size, q + 2 * kv), (q, config.hidden_size),
                  (config.hidden_size, 2 * config.intermediate_size),
                  (config.intermediate_size, config.hidden_size)]
        peak = gemm_peak(device, getattr(torch, dtype), shapes, tokens)
        result["prefill"] = {"tokens": tokens, "seconds": seconds, "flop_s": flops / seconds,
                             "gemm_peak_flop_s": peak, "fraction_of_peak": flops / seconds / peak}
    return result


@torch.inference_mode()
def check_quantization(model_dir: Path, device: str, vocab: int, cpu: bool,
                       plain: dict) -> dict:
    """fp8 W8A8 speed as ratios to ``plain`` (check_speed's figures in the compute dtype), and
    ``_scaled_mm`` against the emulated W8A8 on one layer."""
    fp8 = check_speed(model_dir, device, vocab, cpu, quantization="fp8")
    result = {"fp8": fp8}
    for key in ("decode_batch_1", "decode_batch_32"):
        result[f"{key}_fp8_over_{plain['dtype']}"] = fp8[key]["step_s"] / plain[key]["step_s"]
    result[f"prefill_fp8_over_{plain['dtype']}"] = (fp8["prefill"]["seconds"]
                                                    / plain["prefill"]["seconds"])
    rows, (in_features, out_features) = 32, ((256, 512) if cpu else (2048, 8192))
    generator = torch.Generator(device=device).manual_seed(5)
    dtype = torch.float32 if cpu else torch.bfloat16
    x = torch.randn(rows, in_features, device=device, generator=generator).to(dtype)
    values, scale = quantize_rows(
        torch.randn(out_features, in_features, device=device, generator=generator), "fp8")
    exact = quantized_linear(fp8_round_rows(x), values, scale, in_features).float()
    fast = scaled_mm_linear(x, values, scale, None).float()
    result["scaled_mm_vs_emulated_max_rel_error"] = float(
        (fast - exact).abs().max() / exact.abs().max())
    return result


def check_nixl() -> dict:
    try:
        import nixl  # noqa: F401
    except ImportError:
        return {"skipped": "nixl is not installed here"}
    return {"skipped": "nixl is installed; the two-process transfer check runs in tests/e2e "
                       "(tests/e2e/test_kv_transfer.py) on the CPU"}


def main() -> None:
    args = parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device here: pass --cpu for the smoke run")
    device = "cpu" if args.cpu else "cuda"
    report: dict = {"torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "smoke": args.cpu}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        model_dir = generated_model(args, Path(root))
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        report["model"] = {"dir": str(model_dir), "vocab_size": vocab}
        checks = (("parity", lambda: check_parity(model_dir, device, vocab)),
                  ("speed", lambda: check_speed(model_dir, device, vocab, args.cpu)),
                  ("quantization", lambda: check_quantization(model_dir, device, vocab,
                                                              args.cpu, report["speed"])),
                  ("nixl", check_nixl))
        for name, check in checks:
            try:
                report[name] = check()
            except Exception as error:  # one failing check must not hide the others' figures
                report[name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{name}: {json.dumps(report[name], indent=1)}", flush=True)
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")
    failed = [name for name in ("parity", "speed") if "error" in report[name]]
    parity = report["parity"].get("float32", {})
    if failed or parity.get("sequences_identical") != parity.get("sequences"):
        sys.exit(f"device check failed: {failed or 'float32 greedy differs from HF'}")


if __name__ == "__main__":
    main()
