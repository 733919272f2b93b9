"""KV-aware routing and decode-worker failures through the router, on a real local Ray
cluster with two decode workers and one prefill worker (tiny model, small pools)."""

from __future__ import annotations

import threading

import httpx
import pytest

from cluster.launcher import launch
from engine import LLM, SamplingParams
from pdserve.hashing import hash_blocks
from pdserve.worker_stats import Role
from router.server import RouterThread
from tests.e2e.cluster_harness import (
    BLOCK_SIZE,
    cluster_config,
    is_idle,
    kill_rank,
    offline_greedy,
    wait_for,
)
from tests.e2e.probes import PREFILL, Holds

PREFIX_BLOCKS = 3
NUM_GROUPS = 4


@pytest.fixture(scope="module")
def holds(ray_session):
    return Holds("moved", "orphan")


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_llama_dir, holds):
    config = cluster_config(tiny_llama_dir, num_blocks=32, max_local_prefill_tokens=64,
                            num_workers=2)
    with launch(config, probe=holds.probe()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(cluster):
    with RouterThread(cluster) as server:
        yield server


def _group_prompt(group: int, member: int) -> list[int]:
    """Token ids: the group's 3-block prefix, then 10 tokens of the member's own."""
    prefix = [(7 * group + 3 * i) % 400 + 40 for i in range(PREFIX_BLOCKS * BLOCK_SIZE)]
    return prefix + [(11 * member + i + 1) % 400 + 40 for i in range(10)]


def _complete(http: httpx.Client, model_name: str, prompt, max_tokens: int = 4,
              **extra) -> httpx.Response:
    response = http.post("/v1/completions", json={
        "model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, **extra})
    assert response.status_code == 200, response.text
    return response


def test_prefix_groups_stick_to_their_worker_until_its_blocks_are_removed(
        cluster, server, model_name):
    index = server.router.index
    placed: dict[int, set[str]] = {g: set() for g in range(NUM_GROUPS)}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for member in range(3):  # interleaved: g0 g1 g2 g3 g0 g1 ...
            for group in range(NUM_GROUPS):
                response = _complete(http, model_name, _group_prompt(group, member))
                placed[group].add(response.headers["x-pdserve-worker"])
        assert all(len(workers) == 1 for workers in placed.values()), placed
        home = {g: next(iter(w)) for g, w in placed.items()}
        assert set(home.values()) == {"decode0.0", "decode1.0"}  # both workers got groups

        # Fill group 0's worker with other prompts until its prefix cache evicts the group,
        # then give the group's prefix to the other worker: the group moves there.
        old_home = home[0]
        other = ({"decode0.0", "decode1.0"} - {old_home}).pop()
        group_hashes = hash_blocks(_group_prompt(0, 9), BLOCK_SIZE)
        assert index.blocks_to_prefill(old_home, group_hashes) == 0
        for filler in range(10):
            prompt = [(13 * filler + i) % 300 + 100 for i in range(60)]
            cluster.client.submit(prompt, {"max_tokens": 4}, worker_id=old_home).result(120)
        wait_for(lambda: index.blocks_to_prefill(old_home, group_hashes) == PREFIX_BLOCKS,
                 "the router to see the group's blocks removed")
        cluster.client.submit(_group_prompt(0, 8), {"max_tokens": 1},
                              worker_id=other).result(120)
        wait_for(lambda: index.blocks_to_prefill(other, group_hashes) == 0,
                 "the router to see the group's blocks stored on the other worker")
        response = _complete(http, model_name, _group_prompt(0, 9))
        assert response.headers["x-pdserve-worker"] == other
        assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == \
            PREFIX_BLOCKS * BLOCK_SIZE
    wait_for(lambda: is_idle(cluster), "the pools to be idle")


def _decode_index(worker_id: str) -> int:
    return int(worker_id.removeprefix("decode").split(".")[0])


def test_a_request_not_yet_started_on_a_dead_worker_goes_to_another(holds,
        cluster, server, model_name, tiny_tokenizer, tiny_llama_dir):
    """The prefill worker holds the request's job, so its decode worker has streamed nothing
    when it dies: the router sends the request to the other decode worker."""
    prompt = [(5 * i) % 300 + 60 for i in range(100)]  # long: prefilled remotely
    (expected,) = offline_greedy(tiny_llama_dir, [prompt], 6)
    holds.hold("moved", 0, PREFILL)
    result: dict = {}

    def call() -> None:
        with httpx.Client(base_url=server.url, timeout=180) as http:
            with http.stream("POST", "/v1/completions", headers={"X-Request-Id": "moved"},
                             json={"model": model_name, "prompt": prompt, "max_tokens": 6,
                                   "temperature": 0, "ignore_eos": True,
                                   "stream": True}) as response:
                result["worker"] = response.headers["x-pdserve-worker"]
                result["lines"] = [line for line in response.iter_lines() if line]

    thread = threading.Thread(target=call)
    thread.start()
    assert holds.wait_holding()
    first_worker = server.router.links.requests["moved"].worker_id
    kill_rank(cluster, Role.DECODE, _decode_index(first_worker))
    wait_for(lambda: server.router.links.requests["moved"].worker_id != first_worker,
             "the router to move the request")
    holds.release()
    thread.join(180)
    assert result["worker"] == first_worker
    assert result["lines"][-1] == "data: [DONE]"
    assert "error" not in "".join(result["lines"])
    assert server.router.links.num_resubmitted == 1
    text = "".join(_event_text(line) for line in result["lines"][:-1])
    assert text == tiny_tokenizer.decode(expected)
    _wait_for_two_workers(cluster, server)


def test_a_stream_whose_worker_dies_mid_way_is_migrated_and_goes_on(holds, cluster, server,
                                                                   model_name, tiny_llama_dir,
                                                                   tiny_tokenizer):
    """Seeded sampling: the stream held after 2 tokens loses its worker; the router replays it
    (prompt + those 2 tokens) on the other worker, and the client reads exactly the text an
    unkilled run gives, with no error, no gap and no repeat."""
    prompt, seed = tiny_tokenizer.encode("hello there"), 4242
    params = {"max_tokens": 24, "temperature": 0.9, "seed": seed, "ignore_eos": True}
    with LLM(str(tiny_llama_dir), num_blocks=64, block_size=BLOCK_SIZE) as llm:
        (unkilled,) = llm.generate([prompt], SamplingParams(**params))
    holds.hold("orphan", 2)  # whichever worker the router picks holds after 2 tokens
    result: dict = {}

    def call() -> None:
        with httpx.Client(base_url=server.url, timeout=180) as http:
            with http.stream("POST", "/v1/completions", headers={"X-Request-Id": "orphan"},
                             json={"model": model_name, "prompt": prompt, "stream": True,
                                   "stream_options": {"include_usage": True},
                                   **params}) as response:
                result["status"] = response.status_code
                result["lines"] = [line for line in response.iter_lines() if line]

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: server.router.links.requests.get("orphan") is not None
             and server.router.links.requests["orphan"].num_tokens_received == 2,
             "two tokens at the router")
    migrations = server.router.links.num_migrations
    worker_id = server.router.links.requests["orphan"].worker_id
    kill_rank(cluster, Role.DECODE, _decode_index(worker_id))
    thread.join(180)
    holds.release()  # the dead worker's wait at the gate ends
    assert result["status"] == 200
    assert result["lines"][-1] == "data: [DONE]"
    assert "error" not in "".join(result["lines"])
    assert server.router.links.num_migrations == migrations + 1
    assert "".join(_event_text(line) for line in result["lines"][:-1]) == \
        tiny_tokenizer.decode(unkilled.token_ids)
    usage = httpx.Response(200, content=result["lines"][-2].removeprefix("data: ")).json()
    assert (usage["usage"]["prompt_tokens"], usage["usage"]["completion_tokens"]) == (
        len(prompt), 24)
    _wait_for_two_workers(cluster, server)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        _complete(http, model_name, "still serving")  # the restarted cluster serves
        metrics = http.get("/metrics").text
    assert f'pdserve_requests_moved_total{{how="migrated"}} {float(migrations + 1)}' in metrics
    assert "pdserve_migrated_tokens_total" in metrics


def _event_text(line: str) -> str:
    body = httpx.Response(200, content=line.removeprefix("data: ")).json()
    return body["choices"][0]["text"] if body.get("choices") else ""


def _wait_for_two_workers(cluster, server) -> None:
    wait_for(lambda: len(server.router.links.ready_workers) == 2, "the restarted worker",
             timeout_s=180)
    wait_for(lambda: is_idle(cluster), "the pools to be idle", timeout_s=180)
