"""Every request ends counted exactly once in ``pdserve_requests_total{status}``, under the
status of how it ended, whichever way that was (router.app, router.service)."""

from __future__ import annotations

import asyncio

import pytest

from router.router_metrics import RouterMetrics
from tests.unit.router_harness import Answer, Edge, edge

STATUSES = ("success", "error", "cancelled", "rejected", "invalid")
COMPLETION = {"prompt": "hi", "max_tokens": 2}


async def success(server: Edge, model: str) -> Answer:
    return await server.call("POST", "/v1/completions", COMPLETION | {"model": model},
                             {"x-request-id": "ok-1"})


async def success_streamed(server: Edge, model: str) -> Answer:
    return await server.call("POST", "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True})


async def worker_error(server: Edge, model: str) -> Answer:
    return await server.call("POST", "/v1/completions", COMPLETION | {"model": model},
                             {"x-request-id": "fail-1"})


async def worker_error_streamed(server: Edge, model: str) -> Answer:
    answer = await server.call("POST", "/v1/completions",
                               COMPLETION | {"model": model, "stream": True},
                               {"x-request-id": "fail-2"})
    assert b'"code":"worker_error"' in answer.body  # the error event, then [DONE]
    assert answer.body.endswith(b"data: [DONE]\n\n")
    return answer


async def router_error(server: Edge, model: str) -> Answer:
    def broken_encode(*args, **kwargs):
        raise TypeError("the tokenizer broke")

    server.router.tokenizer.encode = broken_encode
    return await server.call("POST", "/v1/completions", COMPLETION | {"model": model})


async def client_left(server: Edge, model: str) -> Answer:
    leave = asyncio.Event()
    call = asyncio.ensure_future(server.call(
        "POST", "/v1/completions", COMPLETION | {"model": model},
        {"x-request-id": "hold-1"}, leave=leave))
    assert await server.worker.held.get() == "hold-1"
    leave.set()
    return await call


async def body_cut_short(server: Edge, model: str) -> Answer:
    return await server.call("POST", "/v1/completions",
                             headers={"content-type": "application/json"},
                             parts=[b'{"model": "', model.encode()])


async def queue_full(server: Edge, model: str) -> Answer:
    """With the one slot held and no room to wait: a 429 (the holder is counted apart)."""
    leave = asyncio.Event()
    holder = asyncio.ensure_future(server.call(
        "POST", "/v1/completions", COMPLETION | {"model": model},
        {"x-request-id": "hold-slot"}, leave=leave))
    assert await server.worker.held.get() == "hold-slot"
    before = await server.requests_total()
    answer = await server.call("POST", "/v1/completions", COMPLETION | {"model": model})
    after = await server.requests_total()
    leave.set()
    assert (await holder).status == 499
    assert diff(before, after) == {"rejected": 1}
    return answer


async def draining(server: Edge, model: str) -> Answer:
    server.router.is_draining = True
    return await server.call("POST", "/v1/completions", COMPLETION | {"model": model})


async def bad_parameter(server: Edge, model: str) -> Answer:
    return await server.call("POST", "/v1/completions", {"model": model, "prompt": ""})


async def not_json(server: Edge, model: str) -> Answer:
    return await server.call("POST", "/v1/completions", b"{}", {"content-type": "text/plain"})


async def unknown_model(server: Edge, model: str) -> Answer:
    return await server.call("POST", "/v1/completions", COMPLETION | {"model": "nope"})


# (scenario, router options, HTTP status, what it counted)
SCENARIOS = {
    "success": (success, {}, 200, {"success": 1}),
    "success-streamed": (success_streamed, {}, 200, {"success": 1}),
    "worker-error": (worker_error, {}, 500, {"error": 1}),
    "worker-error-streamed": (worker_error_streamed, {}, 200, {"error": 1}),
    "router-error": (router_error, {}, 500, {"error": 1}),
    "client-left": (client_left, {}, 499, {"cancelled": 1}),
    "body-cut-short": (body_cut_short, {}, 499, {"cancelled": 1}),
    # the 429 alone counts one "rejected" (checked inside); its slot's holder then leaves
    "queue-full": (queue_full, {"max_running": 1, "max_queue": 0}, 429,
                   {"rejected": 1, "cancelled": 1}),
    "draining": (draining, {}, 503, {"rejected": 1}),
    "bad-parameter": (bad_parameter, {}, 400, {"invalid": 1}),
    "not-json": (not_json, {}, 415, {"invalid": 1}),
    "unknown-model": (unknown_model, {}, 404, {"invalid": 1}),
}


def diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {status: after.get(status, 0) - before.get(status, 0)
            for status in set(before) | set(after)
            if after.get(status, 0) != before.get(status, 0)}


@pytest.mark.parametrize("scenario,options,http_status,counted", SCENARIOS.values(),
                         ids=SCENARIOS.keys())
def test_each_way_a_request_ends_counts_one_status_once(tiny_llama_dir, scenario, options,
                                                        http_status, counted):
    async def main() -> None:
        async with edge(tiny_llama_dir, **options) as server:
            before = await server.requests_total()
            answer = await scenario(server, tiny_llama_dir.name)
            assert answer.status == http_status, answer.body
            assert diff(before, await server.requests_total()) == counted
            assert server.router.num_in_flight == 0
            assert server.router.admission.num_running == 0

    asyncio.run(main())


def test_every_status_the_counter_documents_is_exercised():
    documented = RouterMetrics(None, lambda: 0, lambda: 0, dict).requests._documentation
    assert all(status in documented for status in STATUSES)
    assert {status for *_, counted in SCENARIOS.values() for status in counted} == \
        set(STATUSES)
