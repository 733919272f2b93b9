"""Unit tests of the SDK (pdserve.client) against a scripted server on httpx.MockTransport.

Every scenario runs on both ``Client`` and ``AsyncClient``. Time is a fake clock that moves
only when the scripted server says so (a reply, a stream chunk) or when the client sleeps, so
timings and retry waits are asserted exactly and nothing really sleeps.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from pdserve.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    Completion,
    RateLimitError,
    ServerError,
    Usage,
)
from pdserve.client_wire import ClientConfig, SSEDecoder

KINDS = ("sync", "async")
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ChunkedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body arriving in the given chunks, one clock second each; may then fail."""

    def __init__(self, chunks: list[bytes], clock: FakeClock, fails: bool = False):
        self.chunks = chunks
        self.clock = clock
        self.fails = fails

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.clock.now += 1.0
            yield chunk
        if self.fails:
            raise httpx.ReadError("connection reset by peer")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk


Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Scenario:
    """A scripted server (the MockTransport handler) and a record of what the client did."""

    def __init__(self, *replies: Reply):
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.waits: list[float] = []
        self.deltas: list[str] = []
        self.clock = FakeClock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply if isinstance(reply, httpx.Response) else reply(request)

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]

    def json_reply(self, payload: Any, status: int = 200, elapsed_s: float = 3.0,
                   headers: dict[str, str] | None = None) -> Callable[[httpx.Request], Any]:
        def reply(request: httpx.Request) -> httpx.Response:
            self.clock.now += elapsed_s
            return httpx.Response(status, json=payload, headers=headers)
        return reply

    def stream_reply(self, chunks: list[bytes], fails: bool = False,
                     headers: dict[str, str] | None = None) -> httpx.Response:
        headers = {"content-type": "text/event-stream", **(headers or {})}
        return httpx.Response(200, headers=headers, stream=ChunkedStream(chunks, self.clock, fails))


def call(kind: str, scenario: Scenario, method: str, *args: Any,
         client_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """One client call; a stream is drained into ``scenario.deltas`` and its result returned."""
    options = {"model": "m", "transport": httpx.MockTransport(scenario), "clock": scenario.clock,
               **(client_kwargs or {})}
    if kind == "sync":
        with Client(sleep=scenario.sleep, **options) as client:
            result = getattr(client, method)(*args, **kwargs)
            if not kwargs.get("stream"):
                return result
            with result as stream:
                scenario.deltas.extend(stream)
            return stream.completion

    async def run() -> Any:
        async with AsyncClient(sleep=scenario.async_sleep, **options) as client:
            result = await getattr(client, method)(*args, **kwargs)
            if not kwargs.get("stream"):
                return result
            async with result as stream:
                async for delta in stream:
                    scenario.deltas.append(delta)
            return stream.completion

    return asyncio.run(run())


def sse(*events: Any) -> list[bytes]:
    """One chunk per event; strings (``[DONE]``) go as they are."""
    return [b"data: " + (e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)).encode()
            + b"\n\n" for e in events]


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def completion_payload(text: str = "Paris.", finish_reason: str = "stop") -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                         "logprobs": None}], "usage": USAGE}


def error_payload(message: str, type: str, param: str | None = None,
                  code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


COMPLETION_EVENTS = sse(
    {"choices": [{"index": 0, "text": "Hé", "finish_reason": None}]},
    {"choices": [{"index": 0, "text": "llo 🙂", "finish_reason": None}]},
    {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
    {"choices": [], "usage": USAGE},
    "[DONE]",
)
CHAT_EVENTS = sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": USAGE},
    "[DONE]",
)


# --- request bodies and headers ---


@pytest.mark.parametrize("kind", KINDS)
def test_completion_body_sends_only_given_params(kind: str) -> None:
    scenario = Scenario()
    scenario.replies = [scenario.json_reply(completion_payload()) for _ in range(2)]
    call(kind, scenario, "complete", "Hello")
    call(kind, scenario, "complete", [1, 2, 3], max_tokens=5, temperature=0.0, top_p=0.9,
         top_k=40, seed=7, stop=("\n", "."), ignore_eos=True, priority=2)
    assert [(r.method, r.url.path) for r in scenario.requests] == [
        ("POST", "/v1/completions"), ("POST", "/v1/completions")]
    assert scenario.bodies() == [
        {"model": "m", "prompt": "Hello", "max_tokens": 16},
        {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0.0, "top_p": 0.9,
         "top_k": 40, "seed": 7, "stop": ["\n", "."], "priority": 2, "ignore_eos": True},
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_chat_stream_body_asks_for_usage(kind: str) -> None:
    scenario = Scenario()
    scenario.replies = [scenario.stream_reply(CHAT_EVENTS)]
    messages = [{"role": "user", "content": "Hi"}]
    call(kind, scenario, "chat", messages, stop="\n", stream=True)
    assert scenario.requests[0].url.path == "/v1/chat/completions"
    assert scenario.requests[0].headers["accept"] == "text/event-stream"
    assert scenario.bodies() == [
        {"model": "m", "messages": messages, "max_tokens": 16, "stop": "\n", "stream": True,
         "stream_options": {"include_usage": True}}]


@pytest.mark.parametrize("kind", KINDS)
def test_model_none_asks_the_server_once(kind: str) -> None:
    scenario = Scenario()
    models = {"object": "list", "data": [{"id": "tiny-llama"}, {"id": "other"}]}
    scenario.replies = [scenario.json_reply(models), scenario.json_reply(completion_payload()),
                        scenario.json_reply(completion_payload())]

    async def twice_async() -> None:
        async with AsyncClient(transport=httpx.MockTransport(scenario)) as client:
            await client.complete("a")
            await client.complete("b")

    if kind == "sync":
        with Client(transport=httpx.MockTransport(scenario)) as client:
            client.complete("a")
            client.complete("b")
    else:
        asyncio.run(twice_async())
    assert [r.url.path for r in scenario.requests] == [
        "/v1/models", "/v1/completions", "/v1/completions"]
    assert [body and body["model"] for body in scenario.bodies()] == [
        None, "tiny-llama", "tiny-llama"]


@pytest.mark.parametrize("kind", KINDS)
def test_api_key_header(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    scenario = Scenario()
    scenario.replies = [scenario.json_reply(completion_payload()) for _ in range(2)]
    call(kind, scenario, "complete", "x")
    call(kind, scenario, "complete", "x", client_kwargs={"api_key": "explicit"})
    assert [r.headers["authorization"] for r in scenario.requests] == [
        "Bearer from-env", "Bearer explicit"]


@pytest.mark.parametrize("kind", KINDS)
def test_no_api_key_no_header(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    scenario = Scenario()
    scenario.replies = [scenario.json_reply(completion_payload())]
    call(kind, scenario, "complete", "x")
    assert "authorization" not in scenario.requests[0].headers


@pytest.mark.parametrize("kind", KINDS)
def test_request_id_passed_through(kind: str) -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        headers = {"X-Request-Id": request.headers.get("x-request-id", "server-made")}
        return httpx.Response(200, json=completion_payload(), headers=headers)

    scenario = Scenario(echo, echo)
    assert call(kind, scenario, "complete", "x", request_id="mine-1").request_id == "mine-1"
    assert call(kind, scenario, "complete", "x").request_id == "server-made"
    assert scenario.requests[0].headers["x-request-id"] == "mine-1"
    assert "x-request-id" not in scenario.requests[1].headers


# --- results ---


@pytest.mark.parametrize("kind", KINDS)
def test_completion_result(kind: str) -> None:
    scenario = Scenario()
    scenario.replies = [scenario.json_reply(completion_payload("Paris.", "length"),
                                            headers={"X-Request-Id": "req-1"})]
    assert call(kind, scenario, "complete", "The capital of France is") == Completion(
        "Paris.", "length", Usage(3, 4, 7), "req-1", ttft_s=3.0, e2e_s=3.0)


@pytest.mark.parametrize("kind", KINDS)
def test_chat_result(kind: str) -> None:
    payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "Hello!"}}],
               "usage": USAGE}
    scenario = Scenario()
    scenario.replies = [scenario.json_reply(payload, elapsed_s=1.5)]
    result = call(kind, scenario, "chat", [{"role": "user", "content": "Hi"}])
    assert result == Completion("Hello!", "stop", Usage(3, 4, 7), None, 1.5, 1.5)


@pytest.mark.parametrize("kind", KINDS)
def test_models_and_health(kind: str) -> None:
    scenario = Scenario(httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]}),
                        httpx.Response(200), httpx.Response(503),
                        httpx.ConnectError("connection refused"))
    assert call(kind, scenario, "models") == ["a", "b"]
    assert [call(kind, scenario, "health") for _ in range(3)] == [True, False, False]
    assert [r.url.path for r in scenario.requests] == ["/v1/models"] + ["/health"] * 3
    assert scenario.waits == []


# --- streams ---


@pytest.mark.parametrize("kind", KINDS)
def test_chat_stream_timings_count_from_first_text(kind: str) -> None:
    scenario = Scenario()
    scenario.replies = [scenario.stream_reply(CHAT_EVENTS, headers={"X-Request-Id": "req-2"})]
    result = call(kind, scenario, "chat", [{"role": "user", "content": "Hi"}], stream=True)
    assert scenario.deltas == ["Hi", " there"]
    # Chunk 1 (the role) carries no text, so the first token is chunk 2; [DONE] is chunk 5.
    assert result == Completion("Hi there", "stop", Usage(3, 4, 7), "req-2", 2.0, 5.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 64])
def test_stream_split_at_any_byte(kind: str, newline: bytes, chunk_size: int) -> None:
    data = b"".join(COMPLETION_EVENTS).replace(b"\n", newline)
    scenario = Scenario()
    scenario.replies = [scenario.stream_reply(split(data, chunk_size))]
    result = call(kind, scenario, "complete", "x", stream=True)
    assert scenario.deltas == ["Hé", "llo 🙂"]
    assert (result.text, result.finish_reason, result.usage) == ("Héllo 🙂", "length",
                                                                 Usage(3, 4, 7))


def test_sse_decoder_fields_comments_and_multiline_data() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": keep-alive\n\nevent: x\nid: 3\ndata: a\ndata:b\n") == []
    assert decoder.feed(b"\r") == []
    assert decoder.feed(b"\ndata: c\r\rdata: [DONE]\n\n") == ["a\nb", "c", "[DONE]"]


@pytest.mark.parametrize("kind", KINDS)
def test_error_event_mid_stream_raises(kind: str) -> None:
    events = sse({"choices": [{"index": 0, "text": "Hel", "finish_reason": None}]},
                 error_payload("decode worker lost", "server_error", code=503), "[DONE]")
    scenario = Scenario()
    scenario.replies = [scenario.stream_reply(events, headers={"X-Request-Id": "req-3"})]
    with pytest.raises(ServerError) as caught:
        call(kind, scenario, "complete", "x", stream=True)
    error = caught.value
    assert (error.status, error.message, error.type, error.code, error.request_id) == (
        503, "decode worker lost", "server_error", 503, "req-3")
    assert scenario.deltas == ["Hel"]
    assert (len(scenario.requests), scenario.waits) == (1, [])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("event", [{"choices": [], "usage": {"prompt_tokens": 3}},
                                   {"choices": [{"index": 0, "delta": "Hi"}]}, [1, 2]])
def test_an_event_of_the_wrong_shape_is_a_server_error(kind: str, event: Any) -> None:
    scenario = Scenario()
    scenario.replies = [scenario.stream_reply(sse(event, "[DONE]"),
                                              headers={"X-Request-Id": "req-4"})]
    with pytest.raises(ServerError, match="unexpected event shape") as caught:
        call(kind, scenario, "complete", "x", stream=True)
    assert (caught.value.status, caught.value.request_id) == (200, "req-4")


@pytest.mark.parametrize("kind", KINDS)
def test_transport_failure_mid_stream_is_not_retried(kind: str) -> None:
    scenario = Scenario()
    scenario.replies = [scenario.stream_reply(COMPLETION_EVENTS[:1], fails=True)]
    with pytest.raises(APIConnectionError, match="connection reset by peer"):
        call(kind, scenario, "complete", "x", stream=True)
    assert (scenario.deltas, len(scenario.requests), scenario.waits) == (["Hé"], 1, [])


@pytest.mark.parametrize("kind", KINDS)
def test_stream_cut_before_done_raises(kind: str) -> None:
    scenario = Scenario()
    scenario.replies = [scenario.stream_reply(COMPLETION_EVENTS[:2])]
    with pytest.raises(APIConnectionError, match=r"stream ended before \[DONE\]"):
        call(kind, scenario, "complete", "x", stream=True)


def test_completion_read_before_the_end_raises() -> None:
    scenario = Scenario()
    scenario.replies = [scenario.stream_reply(COMPLETION_EVENTS)]
    with Client(model="m", transport=httpx.MockTransport(scenario)) as client:
        with client.complete("x", stream=True) as stream:
            assert next(iter(stream)) == "Hé"
            with pytest.raises(RuntimeError, match="has not finished"):
                _ = stream.completion


# --- errors ---


@pytest.mark.parametrize("kind", KINDS)
def test_error_body_becomes_exception(kind: str) -> None:
    body = error_payload("max_tokens must be >= 1", "invalid_request_error", "max_tokens", 400)
    scenario = Scenario(httpx.Response(400, json=body, headers={"X-Request-Id": "req-9"}))
    with pytest.raises(BadRequestError) as caught:
        call(kind, scenario, "complete", "x", max_tokens=0)
    error = caught.value
    assert (error.status, error.message, error.type, error.param, error.code,
            error.request_id) == (400, "max_tokens must be >= 1", "invalid_request_error",
                                  "max_tokens", 400, "req-9")
    assert str(error) == (
        "HTTP 400 invalid_request_error: max_tokens must be >= 1 [request_id=req-9]")
    assert (len(scenario.requests), scenario.waits) == (1, [])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("status", "error_type"), [
    (401, AuthenticationError), (404, BadRequestError), (422, BadRequestError),
    (500, ServerError)])
def test_status_picks_the_exception_class(kind: str, status: int, error_type: type) -> None:
    scenario = Scenario(httpx.Response(status, json=error_payload("nope", "some_error")))
    with pytest.raises(error_type) as caught:
        call(kind, scenario, "complete", "x")
    assert (type(caught.value), caught.value.status, caught.value.message) == (
        error_type, status, "nope")
    assert len(scenario.requests) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_error_body_that_is_not_json(kind: str) -> None:
    scenario = Scenario(httpx.Response(502, text="Bad Gateway"))
    with pytest.raises(ServerError) as caught:
        call(kind, scenario, "complete", "x")
    assert str(caught.value) == "HTTP 502: Bad Gateway"


# --- retries ---


def too_many(retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(429, json=error_payload("queue full", "rate_limit_error"),
                          headers=headers)


@pytest.mark.parametrize("kind", KINDS)
def test_retry_after_is_honoured(kind: str) -> None:
    scenario = Scenario(too_many("2"), too_many("0.25"))
    scenario.replies.append(scenario.json_reply(completion_payload()))
    result = call(kind, scenario, "complete", "x")
    assert scenario.waits == [2.0, 0.25]
    assert len(scenario.requests) == 3
    # Timings count from the call: both waits plus the 3 s of the reply that succeeded.
    assert (result.text, result.ttft_s, result.e2e_s) == ("Paris.", 5.25, 5.25)


@pytest.mark.parametrize("kind", KINDS)
def test_exponential_backoff_without_retry_after(kind: str) -> None:
    unavailable = [httpx.Response(503, json=error_payload("draining", "server_error"))
                   for _ in range(3)]
    scenario = Scenario(*unavailable)
    scenario.replies.append(scenario.stream_reply(COMPLETION_EVENTS))
    call(kind, scenario, "complete", "x", stream=True, client_kwargs={"backoff_s": 0.5})
    assert scenario.waits == [0.5, 1.0, 2.0]
    assert scenario.deltas == ["Hé", "llo 🙂"]


@pytest.mark.parametrize("kind", KINDS)
def test_gives_up_after_max_retries(kind: str) -> None:
    scenario = Scenario(too_many(), too_many(), too_many())
    with pytest.raises(RateLimitError) as caught:
        call(kind, scenario, "complete", "x", client_kwargs={"max_retries": 2, "backoff_s": 1.0})
    assert (caught.value.status, caught.value.message) == (429, "queue full")
    assert scenario.waits == [1.0, 2.0]
    assert len(scenario.requests) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_connection_error_is_retried(kind: str) -> None:
    scenario = Scenario(httpx.ConnectError("connection refused"))
    scenario.replies.append(scenario.json_reply(completion_payload()))
    assert call(kind, scenario, "complete", "x").text == "Paris."
    assert scenario.waits == [0.5]


@pytest.mark.parametrize("kind", KINDS)
def test_read_timeout_is_not_retried(kind: str) -> None:
    scenario = Scenario(httpx.ReadTimeout("timed out"))
    with pytest.raises(APITimeoutError):
        call(kind, scenario, "complete", "x")
    assert (len(scenario.requests), scenario.waits) == (1, [])


# --- configuration and imports ---


@pytest.mark.parametrize(("field", "value"), [
    ("timeout_s", 0.0), ("max_retries", -1), ("max_retries", 1.5), ("backoff_s", -0.1)])
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    config = {"base_url": "http://x", "api_key": None, "timeout_s": 1.0, "max_retries": 3,
              "backoff_s": 0.5, field: value}
    with pytest.raises(ValueError, match=f"{field}={value!r} is invalid"):
        ClientConfig(**config)


def test_import_pulls_in_neither_torch_nor_ray() -> None:
    code = ("import sys; from pdserve.client import Client, AsyncClient; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert output == "[]\n"
