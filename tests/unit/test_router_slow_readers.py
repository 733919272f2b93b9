"""A streamed client that stops reading is cut off within the configured bounds: its worker
request cancelled, its slot freed, counted once; other requests never wait on it."""

from __future__ import annotations

import asyncio

from tests.unit.router_harness import FLOOD, Edge, edge

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True}


def run(model_dir, scenario, **options):
    async def main():
        async with edge(model_dir, **options) as server:
            return await scenario(server, model_dir.name)

    return asyncio.run(main())


async def slow_readers(server: Edge) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await server.router.metrics.render()).decode()
    return {sample.labels["why"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "pdserve_slow_readers_total"}


async def arrives(condition, what: str, timeout_s: float = 10.0) -> None:
    """Wait on the loop until ``condition()`` holds (the request plane is asynchronous)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def freed(server: Edge) -> None:
    assert (server.router.num_in_flight, server.router.admission.num_running) == (0, 0)
    assert server.router.links.requests == {}


def test_a_client_that_never_reads_is_cut_off_after_the_write_timeout(tiny_llama_dir):
    async def scenario(server: Edge, model: str) -> None:
        slow = asyncio.ensure_future(server.call(
            "POST", "/v1/chat/completions", {"model": model, **CHAT},
            headers={"x-request-id": "hold-slow"}, stalled=True))
        # Meanwhile another client is served as usual.
        other = await server.call("POST", "/v1/completions",
                                  {"model": model, "prompt": "hi", "max_tokens": 2})
        assert other.status == 200
        answer = await slow  # returns: the response was cut off, not left waiting
        assert answer.status == 200 and answer.body == b""
        await arrives(lambda: server.worker.cancels, "the worker to get the Cancel")
        assert server.worker.cancels == ["hold-slow"]
        assert await slow_readers(server) == {"write_timeout": 1.0}
        assert (await server.requests_total())["cancelled"] == 1.0
        await freed(server)

    run(tiny_llama_dir, scenario, stream_write_timeout_s=0.05)


def test_chunks_piling_up_for_a_reader_past_the_cap_cancel_the_request(tiny_llama_dir):
    async def scenario(server: Edge, model: str) -> None:
        answer = await server.call(
            "POST", "/v1/chat/completions", {"model": model, **CHAT},
            headers={"x-request-id": "flood-1"}, stalled=True)
        assert answer.body == b""
        await arrives(lambda: server.worker.cancels, "the worker to get the Cancel")
        assert server.worker.cancels == ["flood-1"]  # at the cap, before FLOOD chunks
        counts = await slow_readers(server)
        assert counts["unsent_cap"] == 1.0
        await freed(server)

    assert FLOOD > 8
    run(tiny_llama_dir, scenario, stream_max_unsent_chunks=8, stream_write_timeout_s=0.5)
