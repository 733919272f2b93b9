"""The SDK's wire format: request bodies, results, errors and SSE parsing, free of I/O.

``Client`` and ``AsyncClient`` (pdserve.client) share everything here, so the two differ only
in how they move bytes.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER_S = 60.0  # the longest wait a Retry-After header can ask for


@dataclass(frozen=True, slots=True)
class Usage:
    """The server's token counts for one completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Completion:
    """One finished completion; ``ttft_s`` and ``e2e_s`` are measured by the client.

    ``ttft_s`` is the time to the first non-empty text delta when streamed, and the time to the
    whole response otherwise. Both count from the call, retries and their waits included.
    """

    text: str
    finish_reason: str | None
    usage: Usage | None
    request_id: str | None
    ttft_s: float
    e2e_s: float


class APIError(Exception):
    """The server refused or failed a request; ``status`` is None when no response came."""

    def __init__(self, status: int | None, message: str, type: str | None = None,
                 param: str | None = None, code: Any = None, request_id: str | None = None,
                 retry_after_s: float | None = None):
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"HTTP {self.status}" if self.status is not None else "no response"
        kind = f" {self.type}" if self.type else ""
        tail = f" [request_id={self.request_id}]" if self.request_id else ""
        return f"{head}{kind}: {self.message}{tail}"


class BadRequestError(APIError):
    """A 4xx other than 401 and 429: fix the request before sending it again."""


class AuthenticationError(APIError):
    """401: the api key is missing or wrong (set PDSERVE_API_KEY or pass api_key=)."""


class RateLimitError(APIError):
    """429: the server is saturated; retried automatically up to ``max_retries``."""


class ServerError(APIError):
    """5xx, or an error event in the middle of a stream."""


class APIConnectionError(APIError):
    """No response: the server could not be reached or dropped the connection."""


class APITimeoutError(APIConnectionError):
    """The request ran past ``timeout_s``; never retried, as the server may still be working."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a client reaches the server and how hard it retries."""

    base_url: str
    api_key: str | None
    timeout_s: float
    max_retries: int
    backoff_s: float

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r} is invalid: must be > 0")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries!r} is invalid: must be an int >= 0")
        if not self.backoff_s >= 0:
            raise ValueError(f"backoff_s={self.backoff_s!r} is invalid: must be >= 0")

    def should_retry(self, error: APIError, attempt: int) -> bool:
        """For errors raised before any response byte arrived; ``attempt`` counts from 0."""
        is_retryable = error.status in RETRY_STATUSES or (
            isinstance(error, APIConnectionError) and not isinstance(error, APITimeoutError))
        return is_retryable and attempt < self.max_retries

    def delay_s(self, error: APIError, attempt: int) -> float:
        """The wait before the next try: the server's ``Retry-After``, else exponential."""
        if error.retry_after_s is not None:  # bounded: a server's header is not trusted
            return min(error.retry_after_s, MAX_RETRY_AFTER_S)
        return self.backoff_s * 2**attempt


def sampling_fields(max_tokens: int, temperature: float | None, top_p: float | None,
                    top_k: int | None, seed: int | None, stop: str | Sequence[str] | None,
                    ignore_eos: bool, priority: int | None) -> dict[str, Any]:
    """The body fields the caller set; everything left out takes the server's default."""
    fields: dict[str, Any] = {"max_tokens": max_tokens}
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
             "stop": stop if stop is None or isinstance(stop, str) else list(stop),
             "priority": priority}
    fields.update((name, value) for name, value in given.items() if value is not None)
    if ignore_eos:
        fields["ignore_eos"] = True
    return fields


def completion_body(model: str, prompt: str | Sequence[int], sampling: dict[str, Any],
                    stream: bool) -> dict[str, Any]:
    prompt_value = prompt if isinstance(prompt, str) else [int(t) for t in prompt]
    return _with_stream({"model": model, "prompt": prompt_value, **sampling}, stream)


def chat_body(model: str, messages: Sequence[Mapping[str, Any]], sampling: dict[str, Any],
              stream: bool) -> dict[str, Any]:
    return _with_stream({"model": model, "messages": [dict(m) for m in messages], **sampling},
                        stream)


def _with_stream(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    if stream:
        # Usage is always asked for: it is the only source of token counts in a stream.
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def request_headers(api_key: str | None, request_id: str | None, stream: bool) -> dict[str, str]:
    headers = {"Accept": "text/event-stream" if stream else "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return headers


def parse_usage(payload: Mapping[str, Any] | None) -> Usage | None:
    if not payload:
        return None
    return Usage(int(payload["prompt_tokens"]), int(payload["completion_tokens"]),
                 int(payload["total_tokens"]))


def parse_completion(payload: Mapping[str, Any], request_id: str | None, ttft_s: float,
                     e2e_s: float) -> Completion:
    """A non-streamed /v1/completions or /v1/chat/completions body."""
    try:
        choice = payload["choices"][0]
        text = choice["message"].get("content") if "message" in choice else choice.get("text")
        usage = parse_usage(payload.get("usage"))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise ServerError(200, f"unexpected response shape ({exc!r}): {str(payload)[:200]}",
                          request_id=request_id) from None
    return Completion(text or "", choice.get("finish_reason"), usage, request_id, ttft_s, e2e_s)


def model_ids(payload: Any) -> list[str]:
    """The ids in a /v1/models body."""
    return [str(entry["id"]) for entry in payload.get("data", [])]


def first_model(payload: Any, base_url: str) -> str:
    ids = model_ids(payload)
    if not ids:
        raise RuntimeError(f"the server at {base_url} lists no models; pass model= explicitly")
    return ids[0]


def parse_json(body: bytes, status: int, request_id: str | None) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ServerError(status, f"response is not JSON ({exc}): {body[:200]!r}",
                          request_id=request_id) from None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header; the HTTP-date form is not used by pdserve."""
    try:
        seconds = float(value) if value is not None else -1.0
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_class(status: int) -> type[APIError]:
    if status == 401:
        return AuthenticationError
    if status == 429:
        return RateLimitError
    if status >= 500:
        return ServerError
    return BadRequestError if status >= 400 else APIError


def error_from_response(status: int, headers: Mapping[str, str], body: bytes) -> APIError:
    """The exception for a non-2xx response, carrying the server's ``error`` object."""
    request_id = headers.get("x-request-id")
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        error = {"message": body.decode("utf-8", "replace")[:500] or f"HTTP {status}"}
    if not isinstance(error, Mapping):
        error = {"message": str(error)}
    return error_class(status)(status, str(error.get("message", "")), error.get("type"),
                               error.get("param"), error.get("code"), request_id,
                               parse_retry_after(headers.get("retry-after")))


def error_from_event(error: Any, request_id: str | None) -> APIError:
    """The exception for an ``{"error": ...}`` event in a stream whose status was 200.

    The status is the event's ``code`` when that is an HTTP status, else 500.
    """
    error = error if isinstance(error, Mapping) else {"message": str(error)}
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return error_class(status)(status, str(error.get("message", "")), error.get("type"),
                               error.get("param"), code, request_id)


def transport_error(exc: httpx.TransportError) -> APIConnectionError:
    # A connect timeout means nothing reached the server, so it counts as a connection error.
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        error: APIConnectionError = APITimeoutError(None, f"timed out: {exc!r}")
    else:
        error = APIConnectionError(None, f"connection failed: {exc!r}")
    error.__cause__ = exc
    return error


class SSEDecoder:
    """Splits a server-sent-event byte stream into the ``data`` of each event.

    Bytes may arrive cut anywhere, even inside a UTF-8 character or a ``\\r\\n``.
    """

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._data_lines: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += self._text.decode(chunk)
        events = []
        while True:
            end = _line_end(self._buffer)
            if end is None:
                return events
            line, self._buffer = self._buffer[:end[0]], self._buffer[end[1]:]
            if not line:
                if self._data_lines:
                    events.append("\n".join(self._data_lines))
                self._data_lines = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data_lines.append(value[1:] if value.startswith(" ") else value)
            # Comments (":...") and the event/id/retry fields carry nothing pdserve uses.


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(line end, next line start) of the first complete line, or None."""
    for index, char in enumerate(buffer):
        if char == "\n":
            return index, index + 1
        if char == "\r":
            if index + 1 == len(buffer):
                return None  # the "\n" of a "\r\n" may be in the next chunk
            return index, index + (2 if buffer[index + 1] == "\n" else 1)
    return None


class StreamParser:
    """Turns a completion stream's bytes into text deltas and, at the end, its result."""

    def __init__(self, request_id: str | None):
        self.request_id = request_id
        self.is_done = False
        self._events = SSEDecoder()
        self._parts: list[str] = []
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    def feed(self, chunk: bytes) -> list[str]:
        """The non-empty text deltas in ``chunk``; raises the server's error event."""
        deltas = []
        for data in self._events.feed(chunk):
            if self.is_done:
                break
            if data == "[DONE]":
                self.is_done = True
                break
            event = parse_json(data.encode(), 200, self.request_id)
            try:
                delta = self._take(event)
            except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
                raise ServerError(200, f"unexpected event shape ({exc!r}): {data[:200]}",
                                  request_id=self.request_id) from None
            if delta:
                self._parts.append(delta)
                deltas.append(delta)
        return deltas

    def _take(self, event: Mapping[str, Any]) -> str:
        if "error" in event:
            raise error_from_event(event["error"], self.request_id)
        self._usage = parse_usage(event.get("usage")) or self._usage
        choices = event.get("choices") or []
        if not choices:
            return ""
        choice = choices[0]
        self._finish_reason = choice.get("finish_reason") or self._finish_reason
        if "delta" in choice:
            return choice["delta"].get("content") or ""
        return choice.get("text") or ""

    def completion(self, ttft_s: float | None, e2e_s: float) -> Completion:
        if not self.is_done:
            raise APIConnectionError(None, "stream ended before [DONE]",
                                     request_id=self.request_id)
        return Completion("".join(self._parts), self._finish_reason, self._usage,
                          self.request_id, e2e_s if ttft_s is None else ttft_s, e2e_s)
