"""`pdserve serve` until the HTTP router lands: a local cluster on the embedded model.

Creates the embedded tiny model on first use (no download), starts a local Ray cluster with
one prefill and one decode worker, sends a short prompt (prefilled on the decode worker) and
a long one (prefilled on the prefill worker, its KV streamed over NIXL), prints both with
where they were prefilled, and shuts the cluster down.
"""

from __future__ import annotations

import argparse
import time

SHORT_PROMPT = "Once upon a time"
LONG_PROMPT = ("The decode worker looks at how much of the prompt it already holds, and "
               "when the rest is long it hands the prefill to a prefill worker, which "
               "streams the KV cache layer by layer into the decode worker's blocks. ") * 3


def run_demo(args: argparse.Namespace) -> int:
    from pdserve.cluster import launch
    from pdserve.config import ClusterConfig, DecodeConfig
    from pdserve.modelgen import ensure_default_model
    from pdserve.tokenizer import Tokenizer

    model_dir = args.model or str(ensure_default_model(getattr(args, "size", None) or "tiny"))
    print(f"pdserve: model {model_dir}; starting a local Ray cluster (1 prefill + 1 decode)")
    tokenizer = Tokenizer.from_dir(model_dir)
    config = ClusterConfig(model_dir=model_dir, decode=DecodeConfig(max_local_prefill_tokens=64))
    started = time.perf_counter()
    with launch(config) as cluster:
        print(f"cluster up in {time.perf_counter() - started:.1f} s")
        sampling = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
        for prompt in (SHORT_PROMPT, LONG_PROMPT):
            token_ids = tokenizer.encode(prompt)
            before = _prefills(cluster)
            started = time.perf_counter()
            result = cluster.generate(token_ids, sampling)
            elapsed_s = time.perf_counter() - started
            where = [k for k, v in _prefills(cluster).items() if v != before.get(k, 0)]
            print(f"\n> {prompt[:60]}{'...' if len(prompt) > 60 else ''} "
                  f"({len(token_ids)} tokens, prefilled {'/'.join(where)}, {elapsed_s:.2f} s)")
            print(repr(tokenizer.decode(result.token_ids)))
    print("\nThe embedded model has random weights: the text is deterministic, not meaningful.")
    print("From Python (.venv/bin/python):\n"
          "  from pdserve.cluster import launch\n"
          "  from pdserve.config import ClusterConfig\n"
          f"  cluster = launch(ClusterConfig(model_dir={model_dir!r}))\n"
          "  cluster.generate([1, 2, 3], {'max_tokens': 8, 'temperature': 0}).token_ids\n"
          "The OpenAI-compatible HTTP server arrives with the router issue.")
    return 0


def _prefills(cluster) -> dict:
    totals: dict = {}
    for stats in cluster.stats("decode").values():
        for where, count in stats["prefills"].items():
            totals[where] = totals.get(where, 0) + count
    return totals
