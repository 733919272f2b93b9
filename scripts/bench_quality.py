"""Quality of two engine configurations of one model, side by side on the same held-out text.

Each configuration is a set of engine options (``EngineConfig`` fields, given as
``key=value``: ``--a kv_cache_dtype=auto --b kv_cache_dtype=fp8``, or ``quantization=int8``)
passed as they are to ``engine.llm.LLM(model_dir, **options)``. For each it reports the
held-out perplexity, teacher-forced over windows of the held-out tokens no longer than the
model's context (``engine/scoring.py``: every position's log-probabilities from the real
engine), and its next-token accuracy. Between the two it reports the teacher-forced top-1
(argmax) agreement, the mean |Δ log-prob| of the actual next token, and greedy agreement:
for prompts cut from the held-out text, the share of generated positions before the first
divergence and the mean length of the common prefix.

The held-out tokens are those a trained checkpoint carries (``pdserve model train``;
``--trained`` uses the cached pair's target). Quality is measured here, never in tests.
Run: ``.venv/bin/python scripts/bench_quality.py --trained --a kv_cache_dtype=auto
--b kv_cache_dtype=fp8 --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_stats import cpu_name, git_commit

from engine import LLM, ModelConfig, SamplingParams
from engine.scoring import score_tokens
from engine.train_corpus import load_heldout


@dataclass(frozen=True, slots=True)
class ConfigRun:
    """What one configuration gave: per scored position, and per greedy prompt."""

    name: str
    options: dict[str, Any]
    next_logprobs: torch.Tensor  # [N] log-prob of the actual next token
    argmax: torch.Tensor  # [N] the top-1 token
    targets: torch.Tensor  # [N] the actual next token
    greedy: list[list[int]]  # [P][G]
    sample_text: str  # the first prompt's greedy continuation, decoded
    wall_s: float

    def summary(self) -> dict[str, Any]:
        nll = float(-self.next_logprobs.mean())
        return {"name": self.name, "options": self.options, "nll_nats_per_token": nll,
                "perplexity": math.exp(nll),
                "next_token_accuracy": float((self.argmax == self.targets).float().mean()),
                "greedy_sample": self.sample_text, "wall_s": round(self.wall_s, 1)}


def parse_value(text: str) -> Any:
    """``true``/``false`` -> bool, ``none`` -> None, then int, float, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: list[str], flag: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> engine options; ValueError names the malformed one."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected key=value, e.g. kv_cache_dtype=fp8")
        options[key] = parse_value(value)
    return options


def run_config(model_dir: str, name: str, options: dict[str, Any], windows: list[list[int]],
               prompts: list[list[int]], num_generated: int) -> ConfigRun:
    """Score every window and generate greedily from every prompt with one engine."""
    began = time.perf_counter()
    logprobs, argmax, targets = [], [], []
    with LLM(model_dir, **options) as llm:
        for window in windows:
            rows = score_tokens(llm.engine, window)[:-1]  # [W - 1, vocab]
            following = torch.tensor(window[1:])
            logprobs.append(rows.gather(1, following[:, None]).squeeze(1))
            argmax.append(rows.argmax(dim=-1))
            targets.append(following)
        params = SamplingParams(max_tokens=num_generated, temperature=0, ignore_eos=True)
        outputs = llm.generate(prompts, params)
    greedy = [output.token_ids for output in outputs]
    return ConfigRun(name, options, torch.cat(logprobs), torch.cat(argmax), torch.cat(targets),
                     greedy, outputs[0].text, time.perf_counter() - began)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two equally long outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def agreement(a: ConfigRun, b: ConfigRun, num_generated: int) -> dict[str, float]:
    """How B departs from A: teacher-forced per position, and greedy per prompt."""
    prefixes = [common_prefix(x, y) for x, y in zip(a.greedy, b.greedy, strict=True)]
    delta = (a.next_logprobs - b.next_logprobs).abs()
    return {
        "top1_agreement": float((a.argmax == b.argmax).float().mean()),
        "mean_abs_delta_logprob": float(delta.mean()),
        "max_abs_delta_logprob": float(delta.max()),
        "greedy_share_before_divergence": sum(prefixes) / (len(prefixes) * num_generated),
        "greedy_mean_common_prefix": sum(prefixes) / len(prefixes),
        "greedy_identical_share": sum(p == num_generated for p in prefixes) / len(prefixes),
    }


def cut_text(heldout: list[int], args: argparse.Namespace,
             window: int) -> tuple[list[list[int]], list[list[int]]]:
    """Scoring windows from the start of the held-out stream, and prompts spread over it."""
    if args.prompt_tokens + args.generate_tokens > window:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens} + --generate-tokens "
                         f"{args.generate_tokens} exceed the context of {window} tokens")
    num_windows = -(-min(args.tokens, len(heldout)) // window)
    windows = [heldout[i * window : (i + 1) * window] for i in range(num_windows)]
    windows = [w for w in windows if len(w) >= 2]
    span = len(heldout) - args.prompt_tokens
    if span < 0 or not windows:
        raise ValueError(f"the held-out text has only {len(heldout)} tokens")
    starts = [i * span // args.prompts for i in range(args.prompts)]
    return windows, [heldout[s : s + args.prompt_tokens] for s in starts]


def context_of(model_dir: str, requested: int | None) -> int:
    """The scoring window: ``requested``, capped by the model's context (or that context)."""
    model = ModelConfig.from_dir(model_dir)
    limit = min(model.max_position_embeddings, model.sliding_window or math.inf)
    return min(requested, limit) if requested else limit


def print_report(report: dict[str, Any]) -> None:
    """The report as a table on stdout."""
    a, b = report["configs"]["a"], report["configs"]["b"]
    agree = report["agreement"]
    print(f"model {report['model']}: {report['scored_tokens']:,} held-out tokens predicted in "
          f"windows of {report['window']}; {report['prompts']} prompts of "
          f"{report['prompt_tokens']} tokens, {report['generate_tokens']} greedy tokens each")
    width = max(24, len(a["name"]) + 2)
    print(f"{'':24}{'A: ' + a['name']:<{width + 3}}B: {b['name']}")
    for label, key, form in (("perplexity", "perplexity", "{:.4f}"),
                             ("nll (nats/token)", "nll_nats_per_token", "{:.5f}"),
                             ("next-token accuracy", "next_token_accuracy", "{:.2%}"),
                             ("wall time (s)", "wall_s", "{}")):
        print(f"{label:<24}{form.format(a[key]):<{width + 3}}{form.format(b[key])}")
    print(f"A vs B: top-1 agreement {agree['top1_agreement']:.2%}, mean |Δ log-prob| "
          f"{agree['mean_abs_delta_logprob']:.5f} (max {agree['max_abs_delta_logprob']:.3f})")
    print(f"greedy: {agree['greedy_share_before_divergence']:.2%} of positions before the "
          f"first divergence, mean common prefix {agree['greedy_mean_common_prefix']:.1f} of "
          f"{report['generate_tokens']}, {agree['greedy_identical_share']:.0%} of prompts "
          f"identical")
    print(f"A's greedy sample: {a['greedy_sample']!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint directory")
    which.add_argument("--trained", action="store_true",
                       help="the trained pair's target (trained once, ~10 min on 2 cores)")
    parser.add_argument("--heldout", default=None,
                        help="directory whose heldout.bin to read (default: the model's)")
    for side in ("a", "b"):
        parser.add_argument(f"--{side}", action="append", default=[], metavar="KEY=VALUE",
                            help=f"engine option of configuration {side.upper()} (repeat)")
        parser.add_argument(f"--{side}-name", default=None, help="its label in the report")
    parser.add_argument("--tokens", type=int, default=20_000, help="held-out tokens to score")
    parser.add_argument("--window", type=int, default=None,
                        help="scoring window in tokens (default: the model's context)")
    parser.add_argument("--prompts", type=int, default=16, help="greedy prompts")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--generate-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2,
                        help="engine num_threads where an option does not set it")
    parser.add_argument("--json", default=None, help="write the report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure, print, write --json; exit status 2 on a bad option or model."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = measure(args)
    except ValueError as error:  # a bad option, a model without held-out text
        parser.exit(2, f"bench_quality: error: {error}\n")
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run both configurations and compare them: the report as JSON-ready values."""
    if args.trained:
        from engine.train import ensure_trained_pair

        model_dir = str(ensure_trained_pair()[0])
    else:
        model_dir = args.model
    heldout = load_heldout(args.heldout or model_dir)
    window = context_of(model_dir, args.window)
    windows, prompts = cut_text(heldout, args, window)
    runs = []
    for side in ("a", "b"):
        options = {"num_threads": args.threads,
                   **parse_options(getattr(args, side), f"--{side}")}
        name = getattr(args, f"{side}_name") or (" ".join(getattr(args, side)) or "defaults")
        runs.append(run_config(model_dir, name, options, windows, prompts,
                               args.generate_tokens))
    return {
        "model": model_dir, "window": window, "scored_tokens": len(runs[0].targets),
        "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
        "generate_tokens": args.generate_tokens,
        "configs": {"a": runs[0].summary(), "b": runs[1].summary()},
        "agreement": agreement(runs[0], runs[1], args.generate_tokens),
        "git_commit": git_commit("engine", "pdserve"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": cpu_name(), "threads": args.threads},
    }


if __name__ == "__main__":
    sys.exit(main())
