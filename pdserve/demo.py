"""`pdserve serve` until the cluster lands: the engine on the embedded model, in one process.

Creates the embedded tiny model on first use (no download), generates for a few prompts
with continuous batching, and prints each completion with the engine's speed.
"""

from __future__ import annotations

import argparse
import time

DEMO_PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "In a distant land there lived",
    "The meaning of life is",
]


def run_demo(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    from pdserve.modelgen import ensure_default_model

    model_dir = args.model or str(ensure_default_model(getattr(args, "size", None) or "tiny"))
    print(f"pdserve: model {model_dir}")
    started = time.perf_counter()
    with LLM(model_dir) as llm:
        load_s = time.perf_counter() - started
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        outputs = llm.generate(DEMO_PROMPTS, params)
        elapsed_s = time.perf_counter() - started
    num_tokens = sum(len(o.token_ids) for o in outputs)
    for prompt, output in zip(DEMO_PROMPTS, outputs, strict=True):
        print(f"\n> {prompt}\n{output.text!r}")
    print(f"\nloaded in {load_s:.2f} s; {len(outputs)} requests, {num_tokens} tokens in "
          f"{elapsed_s:.2f} s = {num_tokens / elapsed_s:.0f} output tokens/s")
    print("The embedded model has random weights: the text is deterministic, not meaningful.")
    print("Call it from Python (.venv/bin/python):\n"
          "  from engine import LLM, SamplingParams\n"
          f"  llm = LLM({model_dir!r})\n"
          "  llm.generate(['Hello'], SamplingParams(max_tokens=16, temperature=0))[0].text\n"
          "The HTTP server and the Ray cluster arrive with the router and worker issues.")
    return 0
