"""Kill workers under load and count what is lost (issue 18): a longer run than the e2e tests.

A local cluster (two decode workers, one prefill worker, the tiny model) serves rounds of
``--streams`` concurrent requests through the cluster facade, half greedy and half seeded
sampling. In each round, once every stream has tokens, one worker is killed (``kill -9`` of
its Ray actor), alternating decode and prefill; the round's streams must all end with exactly
the tokens the offline engine gives for the same requests. Reported: lost requests (must be
0), migrated streams whose tokens differ (must be 0), every other stream whose tokens differ
with its first differing position (a prompt prefilled on another path after a prefill
worker's death can flip a float32 near-tie many tokens later; check the margin there), decode
migrations, and the time to resume a migrated stream: from the kill to that stream's first
token from its new worker (p50 / p99 over all rounds).
Run: ``.venv/bin/python scripts/chaos.py [--rounds 4] [--streams 32]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import ray
import torch

from cluster.launcher import launch
from engine import LLM, SamplingParams
from pdserve.config import ClusterConfig, DecodeConfig, PrefillConfig
from pdserve.modelgen import ensure_default_model
from pdserve.worker_stats import Role

MAX_TOKENS = 400
BLOCK_SIZE = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    return parser.parse_args()


def workload(num: int, vocab: int, round_index: int) -> tuple[list[list[int]], list]:
    generator = torch.Generator().manual_seed(round_index)
    prompts = [torch.randint(8, vocab, (int(torch.randint(8, 90, (1,), generator=generator)),),
                             generator=generator).tolist() for _ in range(num)]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=100 * round_index + i,
                             ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
              for i in range(num)]
    return prompts, params


def wait_until(condition, what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def run_round(cluster, offline: LLM, args, round_index: int, vocab: int) -> dict:
    prompts, params = workload(args.streams, vocab, round_index)
    expected = [o.token_ids for o in offline.generate(prompts, params)]
    streams = [cluster.submit(p, s) for p, s in zip(prompts, params, strict=True)]
    links = cluster.client._links
    role = Role.DECODE if round_index % 2 == 0 else Role.PREFILL
    if role is Role.DECODE:  # mid-stream; a prefill worker dies at once, holding jobs
        wait_until(lambda: all(s.handle.num_tokens_received for s in streams),
                   "every stream's first token")
    victim = streams[0].worker_id if role is Role.DECODE else None
    index = int(victim.removeprefix("decode").split(".")[0]) if victim else 0
    on_victim = {s.request_id for s in streams if s.handle.worker_id == victim}
    migrations_before = links.num_migrations
    killed_s = time.perf_counter()
    ray.kill(ray.get_actor(cluster.rank_names(role, index)[0]), no_restart=True)
    if role is Role.DECODE:
        wait_until(lambda: victim not in links.ready_workers, "the router to see the kill")
    noticed_s = time.perf_counter() - killed_s
    resume_s, lost, mismatched, diverged, migrated_mismatched = [], 0, 0, [], 0
    for number, (stream, want) in enumerate(zip(streams, expected, strict=True)):
        tokens, first_after = [], None
        while True:
            received_s, chunk = stream._chunks.get(timeout=180)
            replayed = chunk.request_id != stream.request_id  # a migrated run's wire id
            if chunk.token_ids and replayed and first_after is None:
                first_after = received_s - killed_s
            tokens += chunk.token_ids
            if chunk.finished:
                break
        lost += bool(chunk.error)
        mismatched += tokens != want
        migrated_mismatched += tokens != want and stream.request_id in on_victim
        if tokens != want:  # (stream, seeded?, first differing output position)
            diverged.append((number, number % 2 == 1, next(
                (i for i, (a, b) in enumerate(zip(tokens, want, strict=False)) if a != b),
                min(len(tokens), len(want)))))
        if stream.request_id in on_victim and first_after is not None:
            resume_s.append(first_after)
    wait_until(lambda: len(links.ready_workers) == 2, "the killed worker to come back")
    return {"killed": role.value, "victim": victim, "on_victim": len(on_victim),
            "kill_noticed_s": round(noticed_s, 3),
            "streams": len(streams), "lost": lost,
            "mismatched": mismatched, "migrated_mismatched": migrated_mismatched,
            "diverged": diverged,
            "migrations": links.num_migrations - migrations_before,
            "resume_s": resume_s}


def main() -> None:
    args = parse_args()
    model_dir = str(ensure_default_model("tiny"))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    config = ClusterConfig(
        model_dir=model_dir, block_size=BLOCK_SIZE, kv_transfer_dtype="auto",
        decode=DecodeConfig(num_workers=2, num_blocks=256, max_local_prefill_tokens=32),
        prefill=PrefillConfig(num_workers=1, num_blocks=256))
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    rounds = []
    with LLM(model_dir, num_blocks=1024, block_size=BLOCK_SIZE) as offline, \
            launch(config) as cluster:
        for round_index in range(args.rounds):
            rounds.append(run_round(cluster, offline, args, round_index, vocab))
            print(json.dumps({k: v for k, v in rounds[-1].items() if k != "resume_s"}))
    resume = sorted(s for r in rounds for s in r["resume_s"])
    report = {"rounds": rounds, "lost": sum(r["lost"] for r in rounds),
              "mismatched": sum(r["mismatched"] for r in rounds),
              "migrated_mismatched": sum(r["migrated_mismatched"] for r in rounds),
              "migrations": sum(r["migrations"] for r in rounds),
              "resume_p50_s": statistics.median(resume) if resume else None,
              "resume_p99_s": resume[min(len(resume) - 1, int(0.99 * len(resume)))]
              if resume else None}
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if report["lost"] or report["migrated_mismatched"]:
        raise SystemExit("requests were lost, or a migrated stream changed")


if __name__ == "__main__":
    main()
