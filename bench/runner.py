"""Drive an OpenAI-compatible server: send requests on a schedule, time every token.

Each request is a streamed ``/v1/completions`` call (``ignore_eos`` so the output length is
the one asked for, ``stream_options.include_usage`` for exact token counts). What a request
sees is one ``RequestRecord``: time to the first streamed text, every gap between text
events, end-to-end latency, token counts, or the error. A server that answers an error,
ends a stream with an error event, or goes away mid-run makes failed records, never an
exception out of ``run``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from bench.stats import RequestRecord
from bench.workloads import BenchRequest
from pdserve import client_wire as wire

_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Target:
    """The server to load: its base URL, the model id to ask for, and how long one request
    may take."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0


async def discover_model(base_url: str, api_key: str | None) -> str:
    """The first model the server lists; ValueError (one line) when it cannot be asked."""
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=_CONNECT_TIMEOUT_S,
                                     headers=wire.request_headers(api_key, None,
                                                                  stream=False)) as http:
            response = await http.get("/v1/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
        raise ValueError(f"cannot list the models at {base_url}/v1/models: "
                         f"{type(error).__name__}: {error}") from None


async def run(target: Target, schedule: Sequence[tuple[float, BenchRequest]],
              concurrency: int | None = None, progress: bool = True, *,
              transport: httpx.AsyncBaseTransport | None = None,
              ) -> tuple[list[RequestRecord], float]:
    """Send every request, open loop at its offset (seconds from the start), or closed loop
    with ``concurrency`` requests in flight (offsets ignored). Records in schedule order,
    and the run's duration (first send to last end). ``transport`` replaces the network."""
    bar = _progress(len(schedule), progress)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=target.base_url, limits=limits,
                                 headers=wire.request_headers(target.api_key, None,
                                                              stream=True),
                                 timeout=httpx.Timeout(target.timeout_s,
                                                       connect=_CONNECT_TIMEOUT_S),
                                 transport=transport) as http:
        start = time.perf_counter()

        async def one(index: int, offset: float) -> RequestRecord:
            record = await _send(http, target.model, schedule[index][1], start)
            bar.update(1)
            return record

        if concurrency is None:
            tasks = []
            for index, (offset, _) in enumerate(schedule):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(index, offset)))
            records = list(await asyncio.gather(*tasks))
        else:
            records = await _closed_loop(one, len(schedule), concurrency)
        duration_s = time.perf_counter() - start
    bar.close()
    return records, duration_s


async def _closed_loop(one, num: int, concurrency: int) -> list[RequestRecord]:
    records: list[RequestRecord | None] = [None] * num
    next_index = iter(range(num))

    async def worker() -> None:
        for index in next_index:
            records[index] = await one(index, 0.0)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, num))))
    return records  # type: ignore[return-value]


async def _send(http: httpx.AsyncClient, model: str, request: BenchRequest,
                run_start: float) -> RequestRecord:
    sampling = {"max_tokens": request.max_tokens, "ignore_eos": True}
    body = wire.completion_body(model, request.prompt, sampling, stream=True)
    sent = time.perf_counter()
    start_s = sent - run_start
    timing = _Timing(sent)
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                error = wire.error_from_response(response.status_code, response.headers,
                                                 await response.aread())
                return _failed(request, start_s, f"HTTP {response.status_code}: {error.message}")
            parser = wire.StreamParser(response.headers.get("x-request-id"))
            async for chunk in response.aiter_bytes():
                arrived = time.perf_counter()
                for _ in parser.feed(chunk):  # each non-empty text event is a token event
                    timing.token_event(arrived)
                if parser.is_done:
                    break
    except wire.APIError as error:  # an error event, or an event that is not JSON
        return _failed(request, start_s, f"stream error: {error.message}")
    except (httpx.HTTPError, OSError, ValueError) as error:
        return _failed(request, start_s, f"{type(error).__name__}: {error}")
    if not parser.is_done:
        return _failed(request, start_s, "stream ended without [DONE]")
    completion = parser.completion(timing.ttft_s, time.perf_counter() - sent)
    usage = completion.usage
    return RequestRecord(
        ok=True, error="", start_s=start_s, ttft_s=completion.ttft_s, e2e_s=completion.e2e_s,
        num_prompt_tokens=usage.prompt_tokens if usage else request.num_prompt_tokens,
        num_output_tokens=usage.completion_tokens if usage else timing.num_events,
        itl_s=tuple(timing.gaps_s))


class _Timing:
    def __init__(self, sent: float):
        self.sent, self.last = sent, sent
        self.ttft_s: float | None = None
        self.gaps_s: list[float] = []
        self.num_events = 0

    def token_event(self, now: float) -> None:
        if self.ttft_s is None:
            self.ttft_s = now - self.sent
        else:
            self.gaps_s.append(now - self.last)
        self.last = now
        self.num_events += 1


def _failed(request: BenchRequest, start_s: float, error: str) -> RequestRecord:
    return RequestRecord(ok=False, error=error[:300], num_prompt_tokens=request.num_prompt_tokens,
                         num_output_tokens=0, start_s=start_s, ttft_s=None, e2e_s=None,
                         itl_s=())


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:
        return _NoProgress()
    return tqdm(total=total, file=sys.stderr, unit="req", dynamic_ncols=True, leave=False)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
