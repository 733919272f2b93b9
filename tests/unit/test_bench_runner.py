"""The bench's client against a scripted server on httpx.MockTransport: what it sends, what it
counts as a token event, and how each way a request can fail becomes a failed record.

No timing is asserted beyond what the stream fixes: events that arrive in one chunk share
its arrival time, so their gaps are exactly 0.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from bench.runner import Target, run
from bench.stats import RequestRecord
from bench.workloads import BenchRequest

REQUEST = BenchRequest(prompt=[11, 12, 13], num_prompt_tokens=3, max_tokens=4)
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


class ChunkedStream(httpx.AsyncByteStream):
    """A response body arriving in the given chunks."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def sse(*events: Any) -> list[bytes]:
    """One chunk per event; strings (``[DONE]``, broken JSON) go as they are."""
    return [b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n"
            for e in events]


def text(piece: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": piece, "finish_reason": None}]}


# A first event without text (a role, or an empty piece), three text events, usage, [DONE].
EVENTS = sse(text(""), text("a"), text("b"), text("c"),
             {"choices": [], "usage": USAGE}, "[DONE]")


def bench(reply: Callable[[httpx.Request], httpx.Response], num_requests: int = 1,
          ) -> tuple[list[RequestRecord], list[httpx.Request]]:
    """The records of ``num_requests`` REQUESTs sent at once, and the requests the server saw."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return reply(request)

    target = Target("http://server", "m", api_key="key")
    records, _ = asyncio.run(run(target, [(0.0, REQUEST)] * num_requests, progress=False,
                                 transport=httpx.MockTransport(handler)))
    return records, seen


def stream(chunks: list[bytes]) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                          stream=ChunkedStream(chunks))


def test_a_stream_is_one_request_with_a_token_event_per_text_event() -> None:
    (record,), (request,) = bench(stream(EVENTS))
    assert json.loads(request.content) == {
        "model": "m", "prompt": [11, 12, 13], "max_tokens": 4, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}}
    assert (request.url.path, request.headers["authorization"]) == ("/v1/completions",
                                                                    "Bearer key")
    assert (record.ok, record.error, record.num_prompt_tokens, record.num_output_tokens) == (
        True, "", 3, 4)  # the counts are the server's usage
    assert len(record.itl_s) == 2  # three text events, two gaps; the empty event is none
    assert record.ttft_s is not None and record.e2e_s is not None
    assert 0 < record.ttft_s <= record.e2e_s


def test_events_in_one_chunk_share_its_arrival_and_bytes_may_be_cut_anywhere() -> None:
    data = b"".join(EVENTS)
    (together,), _ = bench(stream([data]))
    assert together.itl_s == (0.0, 0.0)
    (one_byte_each,), _ = bench(stream([data[i:i + 1] for i in range(len(data))]))
    assert (one_byte_each.ok, one_byte_each.num_output_tokens, len(one_byte_each.itl_s)) == (
        True, 4, 2)


def test_without_usage_the_text_events_are_counted() -> None:
    (record,), _ = bench(stream(sse(text("a"), text("b"), "[DONE]")))
    assert (record.ok, record.num_prompt_tokens, record.num_output_tokens) == (True, 3, 2)


def test_events_after_done_are_not_read() -> None:
    (record,), _ = bench(stream(sse(text("a"), "[DONE]", text("b"), "not json")))
    assert (record.ok, record.num_output_tokens, record.itl_s) == (True, 1, ())


def failed(record: RequestRecord) -> tuple[Any, ...]:
    return (record.ok, record.num_prompt_tokens, record.num_output_tokens, record.ttft_s,
            record.e2e_s, record.itl_s)


def test_an_error_event_fails_the_request_with_its_message() -> None:
    error = {"error": {"message": "decode worker lost", "type": "server_error", "code": 503}}
    (record,), _ = bench(stream(sse(text("a"), error, "[DONE]")))
    assert record.error == "stream error: decode worker lost"
    assert failed(record) == (False, 3, 0, None, None, ())


def test_an_event_that_is_not_json_fails_the_request() -> None:
    (record,), _ = bench(stream(sse(text("a"), "{oops", "[DONE]")))
    assert record.error.startswith("stream error: response is not JSON")
    assert failed(record) == (False, 3, 0, None, None, ())


def test_a_stream_cut_before_done_fails_the_request() -> None:
    (record,), _ = bench(stream(EVENTS[:-1]))
    assert record.error == "stream ended without [DONE]"
    assert failed(record) == (False, 3, 0, None, None, ())


def test_an_error_status_fails_the_request_with_the_servers_message() -> None:
    body = {"error": {"message": "This model's maximum context length is 256 tokens",
                      "type": "invalid_request_error", "param": "prompt", "code": 400}}
    records, _ = bench(lambda request: httpx.Response(400, json=body), num_requests=2)
    assert [record.error for record in records] == [
        "HTTP 400: This model's maximum context length is 256 tokens"] * 2
    assert failed(records[0]) == (False, 3, 0, None, None, ())
    (plain,), _ = bench(lambda request: httpx.Response(502, text="Bad Gateway"))
    assert plain.error == "HTTP 502: Bad Gateway"


def test_a_server_that_is_not_there_fails_the_request() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    (record,), _ = bench(refuse)
    assert record.error == "ConnectError: connection refused"
    assert failed(record) == (False, 3, 0, None, None, ())
