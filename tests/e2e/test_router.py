"""The HTTP router end to end: a real local Ray cluster (1 decode + 1 prefill worker, real
NIXL, the tiny model), the real uvicorn server, and real clients (the official `openai`
package, httpx, and pdserve's own SDK). Greedy output must equal the offline engine's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from cluster.launcher import launch
from pdserve.worker_stats import Role
from router.server import RouterThread
from tests.e2e.bad_requests import BAD_REQUESTS, Sent
from tests.e2e.cluster_harness import (
    cluster_config,
    is_idle,
    offline_greedy,
    wait_for,
    worker_stats,
)
from tests.e2e.probes import PREFILL, Holds

MAX_TOKENS = 12
LONG_PROMPT = ("The decode worker looks at how much of the prompt it already holds, and when "
               "the rest is long it hands the prefill to a prefill worker. ") * 2


def fresh_long_prompt(tag: str) -> str:
    """A long prompt no cache holds a block of (its first block differs)."""
    return f"{tag}: {LONG_PROMPT}"
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def holds(ray_session):
    return Holds("carried-id", "leaver", "again", "leaver-remote", "first", "draining")


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_llama_dir, holds):
    with launch(cluster_config(tiny_llama_dir), probe=holds.probe()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(cluster):
    with RouterThread(cluster) as server:
        yield server


@pytest.fixture(scope="module")
def openai_client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def _expected_text(tiny_llama_dir, tiny_tokenizer, token_ids: list[int],
                   max_tokens: int = MAX_TOKENS) -> str:
    (output,) = offline_greedy(tiny_llama_dir, [token_ids], max_tokens)
    return tiny_tokenizer.decode(output)


def _stream_text(stream) -> tuple[str, list]:
    """Joined text deltas of an openai stream, and its chunks."""
    chunks = list(stream)
    parts = []
    for chunk in chunks:
        if chunk.choices:
            choice = chunk.choices[0]
            parts.append(choice.text if hasattr(choice, "text") else
                         (choice.delta.content or ""))
    return "".join(parts), chunks


def _remote_count(cluster) -> int:
    (stats,) = worker_stats(cluster, Role.DECODE)
    return stats.prefills.remote


def test_openai_completions_equal_the_offline_engine(cluster, server, openai_client, tiny_tokenizer,
                                                     tiny_llama_dir, model_name, greedy_prompts):
    remote_before = _remote_count(cluster)
    for prompt in (*greedy_prompts[:3], LONG_PROMPT):
        expected = _expected_text(tiny_llama_dir, tiny_tokenizer, tiny_tokenizer.encode(prompt))
        result = openai_client.completions.create(
            model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body=NO_EOS)
        assert result.choices[0].text == expected
        assert result.choices[0].finish_reason == "length"
        assert result.usage.prompt_tokens == len(tiny_tokenizer.encode(prompt))
        assert result.usage.completion_tokens == MAX_TOKENS
        streamed, chunks = _stream_text(openai_client.completions.create(
            model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body=NO_EOS))
        assert streamed == expected
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # the long prompt was prefilled remotely once; the second time its blocks were cached
    assert _remote_count(cluster) == remote_before + 1
    token_ids = tiny_tokenizer.encode(greedy_prompts[4])
    result = openai_client.completions.create(model=model_name, prompt=token_ids,
                                              max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body=NO_EOS)
    assert result.choices[0].text == _expected_text(tiny_llama_dir, tiny_tokenizer, token_ids)


def test_openai_chat_equals_the_offline_engine(server, openai_client, tiny_tokenizer,
                                               tiny_llama_dir, model_name):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    token_ids = tiny_tokenizer.encode(tiny_tokenizer.apply_chat_template(messages),
                                 add_special_tokens=False)
    expected = _expected_text(tiny_llama_dir, tiny_tokenizer, token_ids)
    result = openai_client.chat.completions.create(
        model=model_name, messages=messages, max_completion_tokens=MAX_TOKENS, temperature=0,
        extra_body=NO_EOS)
    assert result.choices[0].message.content == expected
    assert result.choices[0].message.role == "assistant"
    assert result.usage.prompt_tokens == len(token_ids)
    streamed, chunks = _stream_text(openai_client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body=NO_EOS))
    assert streamed == expected
    assert chunks[0].choices[0].delta.role == "assistant"


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stop_strings_cut_the_text_streamed_or_not(server, openai_client, tiny_tokenizer,
                                                   tiny_llama_dir, model_name, greedy_prompts,
                                                   kind):
    if kind == "completion":
        token_ids = tiny_tokenizer.encode(greedy_prompts[0])

        def create(**options):
            return openai_client.completions.create(model=model_name,
                                                    prompt=greedy_prompts[0], **options)
    else:
        messages = [{"role": "user", "content": greedy_prompts[1]}]
        token_ids = tiny_tokenizer.encode(tiny_tokenizer.apply_chat_template(messages),
                                     add_special_tokens=False)

        def create(**options):
            return openai_client.chat.completions.create(model=model_name, messages=messages,
                                                         **options)
    full = _expected_text(tiny_llama_dir, tiny_tokenizer, token_ids, 24)
    stop = full[8:11]  # three characters from the middle of the greedy text
    expected = full[:full.index(stop)]
    result = create(max_tokens=24, temperature=0, stop=[stop, "never-there"], extra_body=NO_EOS)
    choice = result.choices[0]
    assert (choice.text if kind == "completion" else choice.message.content) == expected
    assert choice.finish_reason == "stop"
    assert result.usage.completion_tokens < 24
    streamed, chunks = _stream_text(create(max_tokens=24, temperature=0, stop=stop,
                                           stream=True, extra_body=NO_EOS))
    assert streamed == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_sdk_sync_and_async_streaming_and_not(server, tiny_tokenizer, tiny_llama_dir,
                                              greedy_prompts):
    from pdserve import AsyncClient, Client

    prompt = greedy_prompts[3]
    expected = _expected_text(tiny_llama_dir, tiny_tokenizer, tiny_tokenizer.encode(prompt))
    options = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    with Client(server.url) as client:
        result = client.complete(prompt, **options, request_id="sdk-sync")
        assert (result.text, result.finish_reason, result.request_id) == \
            (expected, "length", "sdk-sync")
        assert result.usage.completion_tokens == MAX_TOKENS
        with client.complete(prompt, **options, stream=True) as stream:
            assert "".join(stream) == expected
        assert stream.completion.text == expected
        assert stream.completion.usage.completion_tokens == MAX_TOKENS
        assert 0 < stream.completion.ttft_s <= stream.completion.e2e_s
        chat = client.chat([{"role": "user", "content": "hi"}], **options)
        assert chat.usage.completion_tokens == MAX_TOKENS

    async def run_async() -> tuple[str, str]:
        async with AsyncClient(server.url) as client:
            result = await client.complete(prompt, **options)
            stream = await client.complete(prompt, **options, stream=True)
            parts = [delta async for delta in stream]
            return result.text, "".join(parts)

    assert asyncio.run(run_async()) == (expected, expected)


def test_bad_requests_get_openai_errors_and_leave_nothing_behind(cluster, server, model_name):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, body, status, param in BAD_REQUESTS:
            body, content_type = body if isinstance(body, Sent) else (body, "application/json")
            if isinstance(body, dict):
                body = json.dumps({k: model_name if v == "MODEL" else v
                                   for k, v in body.items()}).encode()
            headers = {} if content_type is None else {"Content-Type": content_type}
            response = http.post(path, content=body, headers=headers)
            assert response.status_code == status, (path, body, response.text)
            assert response.headers["content-type"] == "application/json"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == param, (body, error)
            assert error["message"]
            assert http.get("/health").status_code == 200, (path, body)
        assert http.post("/v1/completions", content=b"{}",
                         headers={"X-Request-Id": "bad id!"}).status_code == 400
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", json={"model": model_name, "prompt": "hi",
                                                "max_tokens": 2})
        assert ok.status_code == 200
    router = server.router
    assert (router.admission.num_running, router.num_in_flight) == (0, 0)
    assert router.links.requests == {}
    assert all(router.index.num_in_flight(w) == 0 for w in router.index.worker_ids)
    wait_for(lambda: is_idle(cluster), "the pools to be idle")


def test_request_id_is_returned_and_carried_to_the_worker(holds, cluster, server, model_name):
    holds.hold("carried-id", 2)
    result: dict = {}

    def call() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            response = http.post("/v1/completions", headers={"X-Request-Id": "carried-id"},
                                 json={"model": model_name, "prompt": "hi", "max_tokens": 4,
                                       "temperature": 0, "ignore_eos": True})
            result["response"] = response

    thread = threading.Thread(target=call)
    thread.start()
    assert holds.wait_holding()  # the worker saw the client's id
    holds.release()
    thread.join(60)
    response = result["response"]
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "carried-id"
    assert response.json()["id"] == "cmpl-carried-id"
    assert response.json()["usage"]["completion_tokens"] == 4


def test_client_disconnect_mid_stream_cancels_and_frees_every_block(holds, cluster, server,
                                                                    model_name):
    (before,) = worker_stats(cluster, Role.DECODE)
    holds.hold("leaver", 2)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", headers={"X-Request-Id": "leaver"},
                         json={"model": model_name, "prompt": "hi", "max_tokens": 500,
                               "ignore_eos": True, "stream": True}) as response:
            assert response.status_code == 200
            assert holds.wait_holding()
    # the client is gone while the worker holds the request after 2 of 500 tokens
    wait_for(lambda: "leaver" not in server.router.links.requests, "the router to cancel")
    holds.release()
    wait_for(lambda: is_idle(cluster), "every block back in the pools")
    (after,) = worker_stats(cluster, Role.DECODE)
    assert after.num_finished == before.num_finished  # aborted, not run to 500


def test_an_id_reused_while_its_cancel_is_in_flight_gets_only_its_own_tokens(holds,
        cluster, server, model_name):
    holds.hold("again", 2)
    body = {"model": model_name, "prompt": "hi", "max_tokens": 4, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", headers={"X-Request-Id": "again"},
                         json=body | {"stream": True}) as response:
            assert holds.wait_holding()
    wait_for(lambda: server.router.links.handle("again") is None, "the router to cancel")
    result: dict = {}

    def retry() -> None:  # the same id while the worker has not confirmed the cancel
        with httpx.Client(base_url=server.url, timeout=120) as http:
            result["response"] = http.post("/v1/completions", json=body,
                                           headers={"X-Request-Id": "again"})

    thread = threading.Thread(target=retry)
    thread.start()
    wait_for(lambda: server.router.links.handle("again") is not None, "the retry to start")
    assert server.router.links.handle("again").wire_id == "again#1"
    holds.release()
    thread.join(120)
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "again"
    assert response.json()["usage"]["completion_tokens"] == 4
    wait_for(lambda: not server.router.links.retired, "the cancel to be confirmed")
    wait_for(lambda: is_idle(cluster), "every block back in the pools")


def test_client_disconnect_during_remote_prefill_cancels_the_job(holds, cluster, server, model_name,
                                                                 tiny_tokenizer):
    prompt = fresh_long_prompt("leaver")
    holds.hold("leaver-remote", 0, PREFILL)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", headers={"X-Request-Id": "leaver-remote"},
                         json={"model": model_name, "prompt": prompt, "max_tokens": 8,
                               "stream": True}) as response:
            assert response.status_code == 200
            assert holds.wait_holding()
    wait_for(lambda: "leaver-remote" not in server.router.links.requests,
             "the router to cancel")
    holds.release()
    wait_for(lambda: is_idle(cluster), "every block back in the pools")


def test_admission_queues_then_answers_429_when_full(holds, cluster, model_name):
    responses: dict[str, httpx.Response] = {}

    def call(request_id: str, prompt: str, priority: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            responses[request_id] = http.post(
                "/v1/completions", headers={"X-Request-Id": request_id},
                json={"model": model_name, "prompt": prompt, "max_tokens": 2,
                      "priority": priority})

    with RouterThread(cluster, max_running=1, max_queue=2) as server:
        holds.hold("first", 0, PREFILL)
        threads = [threading.Thread(target=call, args=("first", fresh_long_prompt("first"), 0))]
        threads[0].start()
        assert holds.wait_holding()  # "first" holds the one slot
        for num_queued, (request_id, priority) in enumerate((("low", 5), ("high", 1)), 1):
            threads.append(threading.Thread(target=call, args=(request_id, "hi", priority)))
            threads[-1].start()
            wait_for(lambda n=num_queued: server.router.admission.num_waiting == n,
                     "the request to queue")
        with httpx.Client(base_url=server.url, timeout=60) as http:
            refused = http.post("/v1/completions", json={"model": model_name, "prompt": "hi"})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
        holds.release()
        for thread in threads:
            thread.join(120)
    assert {r: responses[r].status_code for r in responses} == \
        {"first": 200, "high": 200, "low": 200}
    wait_for(lambda: is_idle(cluster), "the pools to be idle")


def test_api_key_guards_every_route_but_health(cluster, model_name):
    with RouterThread(cluster, api_key="sekrit") as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = http.get("/v1/models", headers=headers)
                assert response.status_code == 401
                assert response.json()["error"]["type"] == "authentication_error"
                assert http.get("/metrics", headers=headers).status_code == 401
        with openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit") as client:
            assert [m.id for m in client.models.list()] == [model_name]
            result = client.completions.create(model=model_name, prompt="hi", max_tokens=2)
            assert result.usage.completion_tokens == 2


def test_metrics_count_what_happened(cluster, server, model_name):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = _metrics(http)
        for prompt in ("hi", fresh_long_prompt("metrics")):
            assert http.post("/v1/completions", json={
                "model": model_name, "prompt": prompt, "max_tokens": 3,
                "ignore_eos": True}).status_code == 200
        http.post("/v1/completions", json={"model": model_name})
        after = _metrics(http)
    assert after['pdserve_requests_total{status="success"}'] == \
        before.get('pdserve_requests_total{status="success"}', 0) + 2
    assert after['pdserve_requests_total{status="invalid"}'] == \
        before.get('pdserve_requests_total{status="invalid"}', 0) + 1
    assert after["pdserve_time_to_first_token_seconds_count"] == \
        before["pdserve_time_to_first_token_seconds_count"] + 2
    assert after["pdserve_inter_token_latency_seconds_count"] >= \
        before["pdserve_inter_token_latency_seconds_count"] + 4
    assert after['pdserve_prefill_total{where="remote"}'] == \
        before['pdserve_prefill_total{where="remote"}'] + 1
    assert after["pdserve_kv_transfer_bytes_total"] > before["pdserve_kv_transfer_bytes_total"]
    assert after['pdserve_prompt_tokens_computed_total{role="prefill"}'] > \
        before['pdserve_prompt_tokens_computed_total{role="prefill"}']
    assert after["pdserve_queue_depth"] == 0
    (decode,) = worker_stats(cluster, Role.DECODE)
    assert after[f'pdserve_kv_blocks_free{{worker="{decode.worker_id}"}}'] == \
        decode.num_blocks
    assert "pdserve_prefix_cache_hit_tokens_total" in after
    assert "pdserve_e2e_request_latency_seconds_count" in after


def _metrics(http: httpx.Client) -> dict[str, float]:
    """Every sample as ``name{label="value",...}`` (labels sorted) -> its value. Sample
    names, not family names: a counter's family drops "_total", its sample keeps it."""
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_models_and_health(server, model_name):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [model_name]
        health = http.get("/health")
        assert health.status_code == 200
        assert health.json()["workers"] == ["decode0.0"]


def test_local_workers_listen_on_loopback_only(cluster):
    assert {group.host for group in cluster.decodes + cluster.prefills} == {"127.0.0.1"}


def test_local_mode_refuses_a_ray_that_spans_nodes(ray_session, tiny_llama_dir, monkeypatch):
    import ray

    nodes = [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(ValueError, match=r"^address: 'local' is invalid, .* of 2 nodes"):
        launch(cluster_config(tiny_llama_dir))


def test_router_process_imports_no_torch():
    code = ("import sys, router.server, router.app, cluster.launcher, pdserve.client; "
            "print(sorted(m for m in ('torch', 'engine', 'nixl') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert output.strip() == "[]"


def test_drain_finishes_running_requests_and_refuses_new_ones(holds, cluster, model_name):
    holds.hold("draining", 2)
    result: dict = {}
    server = RouterThread(cluster)

    def call() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            result["response"] = http.post(
                "/v1/completions", headers={"X-Request-Id": "draining"},
                json={"model": model_name, "prompt": "hi", "max_tokens": 6,
                      "ignore_eos": True})

    thread = threading.Thread(target=call)
    thread.start()
    try:
        assert holds.wait_holding()
        server.server.drain()  # what SIGTERM does
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get("/health").status_code == 503
            refused = http.post("/v1/completions", json={"model": model_name, "prompt": "x"})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "shutting_down"
        holds.release()
        thread.join(120)
        assert result["response"].status_code == 200
        assert result["response"].json()["usage"]["completion_tokens"] == 6
    finally:
        server.close()
    assert not server._thread.is_alive()  # drained, then stopped
