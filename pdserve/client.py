"""Python SDK for pdserve's OpenAI-compatible HTTP API: ``Client`` and ``AsyncClient``.

    with Client("http://127.0.0.1:8000") as client:
        print(client.complete("Once upon a time", max_tokens=32).text)
        with client.chat([{"role": "user", "content": "Hi"}], stream=True) as stream:
            for delta in stream:
                print(delta, end="")
        print(stream.completion.usage)

Bodies, results, errors and SSE parsing live in pdserve.client_wire and are shared by both
clients; this file only moves bytes. It imports neither torch nor ray.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import httpx

from pdserve import client_wire as wire
from pdserve.client_wire import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    Completion,
    RateLimitError,
    ServerError,
    Usage,
)

__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "AsyncClient", "AsyncCompletionStream",
    "AuthenticationError", "BadRequestError", "Client", "Completion", "CompletionStream",
    "RateLimitError", "ServerError", "Usage",
]

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]


def _resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get("PDSERVE_API_KEY") or None


class _StreamState:
    """What both stream classes track: timing from the call, and the result at the end."""

    def __init__(self, response: httpx.Response, parser: wire.StreamParser, start_s: float,
                 clock: Callable[[], float]):
        self.request_id = parser.request_id
        self._response = response
        self._parser = parser
        self._start_s = start_s
        self._clock = clock
        self._ttft_s: float | None = None
        self._is_started = False
        self._completion: Completion | None = None

    @property
    def completion(self) -> Completion:
        if self._completion is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._completion

    def _start(self) -> None:
        if self._is_started:
            raise RuntimeError(f"a {type(self).__name__} can be iterated only once")
        self._is_started = True

    def _deltas(self, chunk: bytes) -> list[str]:
        deltas = self._parser.feed(chunk)
        if deltas and self._ttft_s is None:
            self._ttft_s = self._clock() - self._start_s
        return deltas

    def _finish(self) -> None:
        self._completion = self._parser.completion(self._ttft_s, self._clock() - self._start_s)


class CompletionStream(_StreamState):
    """The text deltas of one streamed completion, in order; iterate it once.

    ``completion`` is safe to read only after iteration ran to the end. Leaving the ``with``
    block (or breaking out of the loop) closes the HTTP response.
    """

    def __iter__(self) -> Iterator[str]:
        self._start()
        try:
            for chunk in self._response.iter_bytes():
                yield from self._deltas(chunk)
                if self._parser.is_done:
                    break
        except httpx.TransportError as exc:
            raise wire.transport_error(exc) from exc
        finally:
            self.close()
        self._finish()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client:
    """A blocking client; ``model=None`` uses the first model the server lists."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 model: str | None = None, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_s: float = 0.5, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.perf_counter,
                 transport: httpx.BaseTransport | None = None):
        self.config = wire.ClientConfig(base_url.rstrip("/"), _resolve_api_key(api_key),
                                        timeout_s, max_retries, backoff_s)
        self.model = model
        self._sleep = sleep
        self._clock = clock
        self._http = httpx.Client(base_url=self.config.base_url, timeout=httpx.Timeout(timeout_s),
                                  transport=transport)

    def complete(self, prompt: Prompt, *, max_tokens: int = 16, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 priority: int | None = None, request_id: str | None = None,
                 stream: bool = False) -> Completion | CompletionStream:
        sampling = wire.sampling_fields(max_tokens, temperature, top_p, top_k, seed, stop,
                                        ignore_eos, priority)
        body = wire.completion_body(self._model_id(), prompt, sampling, stream)
        return self._generate("/v1/completions", body, request_id, stream)

    def chat(self, messages: Messages, *, max_tokens: int = 16, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
             stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
             priority: int | None = None, request_id: str | None = None,
             stream: bool = False) -> Completion | CompletionStream:
        sampling = wire.sampling_fields(max_tokens, temperature, top_p, top_k, seed, stop,
                                        ignore_eos, priority)
        body = wire.chat_body(self._model_id(), messages, sampling, stream)
        return self._generate("/v1/chat/completions", body, request_id, stream)

    def models(self) -> list[str]:
        return wire.model_ids(self._get_json("/v1/models"))

    def health(self) -> bool:
        """True when the server answers /health with 200; never retried."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _model_id(self) -> str:
        if self.model is None:
            self.model = wire.first_model(self._get_json("/v1/models"), self.config.base_url)
        return self.model

    def _get_json(self, path: str) -> Any:
        response = self._send("GET", path, None, None, stream=False)
        request_id = response.headers.get("x-request-id")
        return wire.parse_json(self._read(response), response.status_code, request_id)

    def _generate(self, path: str, body: dict[str, Any], request_id: str | None,
                  stream: bool) -> Completion | CompletionStream:
        start_s = self._clock()
        response = self._send("POST", path, body, request_id, stream)
        request_id = response.headers.get("x-request-id", request_id)
        if stream:
            return CompletionStream(response, wire.StreamParser(request_id), start_s, self._clock)
        payload = wire.parse_json(self._read(response), response.status_code, request_id)
        elapsed_s = self._clock() - start_s
        return wire.parse_completion(payload, request_id, elapsed_s, elapsed_s)

    def _send(self, method: str, path: str, body: dict[str, Any] | None,
              request_id: str | None, stream: bool) -> httpx.Response:
        """The first 2xx response, unread; retries only what failed before any byte came back."""
        headers = wire.request_headers(self.config.api_key, request_id, stream)
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=body, headers=headers)
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                error: APIError = wire.transport_error(exc)
            else:
                if response.is_success:
                    return response
                error = wire.error_from_response(response.status_code, response.headers,
                                                 self._read(response))
            if not self.config.should_retry(error, attempt):
                raise error
            self._sleep(self.config.delay_s(error, attempt))
            attempt += 1

    @staticmethod
    def _read(response: httpx.Response) -> bytes:
        try:
            return response.read()
        except httpx.TransportError as exc:
            raise wire.transport_error(exc) from exc
        finally:
            response.close()


class AsyncCompletionStream(_StreamState):
    """``CompletionStream`` for ``AsyncClient``: ``async for`` it, inside ``async with``."""

    async def __aiter__(self) -> AsyncIterator[str]:
        self._start()
        try:
            async for chunk in self._response.aiter_bytes():
                for delta in self._deltas(chunk):
                    yield delta
                if self._parser.is_done:
                    break
        except httpx.TransportError as exc:
            raise wire.transport_error(exc) from exc
        finally:
            await self.close()
        self._finish()

    async def close(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncCompletionStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncClient:
    """``Client`` for asyncio: the same arguments and methods, awaited."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 model: str | None = None, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_s: float = 0.5, *,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 clock: Callable[[], float] = time.perf_counter,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = wire.ClientConfig(base_url.rstrip("/"), _resolve_api_key(api_key),
                                        timeout_s, max_retries, backoff_s)
        self.model = model
        self._sleep = sleep
        self._clock = clock
        self._http = httpx.AsyncClient(base_url=self.config.base_url,
                                       timeout=httpx.Timeout(timeout_s), transport=transport)

    async def complete(self, prompt: Prompt, *, max_tokens: int = 16,
                       temperature: float | None = None, top_p: float | None = None,
                       top_k: int | None = None, seed: int | None = None,
                       stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                       priority: int | None = None, request_id: str | None = None,
                       stream: bool = False) -> Completion | AsyncCompletionStream:
        sampling = wire.sampling_fields(max_tokens, temperature, top_p, top_k, seed, stop,
                                        ignore_eos, priority)
        body = wire.completion_body(await self._model_id(), prompt, sampling, stream)
        return await self._generate("/v1/completions", body, request_id, stream)

    async def chat(self, messages: Messages, *, max_tokens: int = 16,
                   temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, seed: int | None = None,
                   stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                   priority: int | None = None, request_id: str | None = None,
                   stream: bool = False) -> Completion | AsyncCompletionStream:
        sampling = wire.sampling_fields(max_tokens, temperature, top_p, top_k, seed, stop,
                                        ignore_eos, priority)
        body = wire.chat_body(await self._model_id(), messages, sampling, stream)
        return await self._generate("/v1/chat/completions", body, request_id, stream)

    async def models(self) -> list[str]:
        return wire.model_ids(await self._get_json("/v1/models"))

    async def health(self) -> bool:
        """True when the server answers /health with 200; never retried."""
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.TransportError:
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _model_id(self) -> str:
        if self.model is None:
            self.model = wire.first_model(await self._get_json("/v1/models"), self.config.base_url)
        return self.model

    async def _get_json(self, path: str) -> Any:
        response = await self._send("GET", path, None, None, stream=False)
        request_id = response.headers.get("x-request-id")
        return wire.parse_json(await self._read(response), response.status_code, request_id)

    async def _generate(self, path: str, body: dict[str, Any], request_id: str | None,
                        stream: bool) -> Completion | AsyncCompletionStream:
        start_s = self._clock()
        response = await self._send("POST", path, body, request_id, stream)
        request_id = response.headers.get("x-request-id", request_id)
        if stream:
            parser = wire.StreamParser(request_id)
            return AsyncCompletionStream(response, parser, start_s, self._clock)
        payload = wire.parse_json(await self._read(response), response.status_code, request_id)
        elapsed_s = self._clock() - start_s
        return wire.parse_completion(payload, request_id, elapsed_s, elapsed_s)

    async def _send(self, method: str, path: str, body: dict[str, Any] | None,
                    request_id: str | None, stream: bool) -> httpx.Response:
        headers = wire.request_headers(self.config.api_key, request_id, stream)
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=body, headers=headers)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                error: APIError = wire.transport_error(exc)
            else:
                if response.is_success:
                    return response
                error = wire.error_from_response(response.status_code, response.headers,
                                                 await self._read(response))
            if not self.config.should_retry(error, attempt):
                raise error
            await self._sleep(self.config.delay_s(error, attempt))
            attempt += 1

    @staticmethod
    async def _read(response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.TransportError as exc:
            raise wire.transport_error(exc) from exc
        finally:
            await response.aclose()
