"""The router's core, below HTTP: tokenize, admit, pick a worker, stream text back.

``Router.open`` does everything that can refuse a request (tokenizing in a thread pool,
length checks, admission, the choice of worker) and returns a ``Generation`` whose
``events()`` yield text deltas and then an ``Outcome``. Whatever way a generation ends (its
last chunk, a stop string, the client going away, an error), its worker request is
cancelled or finished and its admission slot released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jinja2

from pdserve.cluster_handle import ModelInfo
from pdserve.config import RouterConfig
from pdserve.hashing import hash_blocks
from pdserve.protocol import Fingerprint, FinishReason
from pdserve.tokenizer import Tokenizer
from pdserve.worker_stats import WorkerStats
from router.admission import Admission, QueueFull
from router.detokenizer import TextStream
from router.kv_index import KVIndex
from router.openai_api import APIError, GenerateRequest, bad_request
from router.router_metrics import RouterMetrics
from router.workers import DecodeLinks, NoWorker, RequestHandle

logger = logging.getLogger(__name__)

MAX_INDEX_BLOCKS_PER_WORKER = 1 << 20
# Prompts up to these sizes are tokenized and hashed on the event loop (tens of microseconds);
# longer ones, and every chat template, in the thread pool.
INLINE_MAX_TOKEN_IDS = 512
INLINE_MAX_CHARS = 256


class ClientGone(Exception):
    """The client disconnected before its request started."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a generation ended, with the counts its usage reports."""

    finish_reason: str  # "stop" or "length"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


class Router:
    """The router's state: tokenizer, KV index, links to the decode workers, admission and
    metrics. It runs on one event loop; ``open`` starts a request."""

    def __init__(self, model: ModelInfo, config: RouterConfig, fingerprint: Fingerprint,
                 secret: str, *, max_running: int,
                 worker_stats: Callable[[], list[WorkerStats]] | None = None):
        self.config = config
        self.model_name = config.served_model_name or Path(model.model_dir).name
        self.tokenizer = Tokenizer.from_dir(model.model_dir)
        self.vocab_size = model.vocab_size
        self.block_size, self.max_model_len = model.block_size, model.max_model_len
        self.index = KVIndex(model.block_size, config.kv_weight, MAX_INDEX_BLOCKS_PER_WORKER)
        self.links = DecodeLinks(
            fingerprint, secret, self.index, max_migrations=config.max_migrations,
            max_unsent_chunks=config.stream_max_unsent_chunks,
            on_slow_reader=lambda: self.metrics.slow_readers.labels("unsent_cap").inc())
        self.admission = Admission(max_running, config.max_queue)
        self.metrics = RouterMetrics(worker_stats, lambda: self.admission.num_waiting,
                                     lambda: self.admission.num_running, self._free_blocks,
                                     self._moves)
        self.pool = ThreadPoolExecutor(config.tokenizer_threads, "pdserve-tokenizer")
        self.is_draining = False
        self.num_in_flight = 0
        # (request id, "in" | "out", seconds) of every overhead sample, when a benchmark
        # sets a list here
        self.overhead_log: list[tuple[str, str, float]] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def is_ready(self) -> bool:
        return not self.is_draining and bool(self.links.ready_workers)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def close(self) -> None:
        self.links.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _moves(self) -> tuple[int, int, int]:
        links = self.links
        return links.num_resubmitted, links.num_migrations, links.num_migrated_tokens

    def _free_blocks(self) -> dict[str, int]:
        """Each decode worker's free KV blocks, as of its last load report."""
        return {worker_id: load.num_free_blocks for worker_id in self.index.worker_ids
                if (load := self.index.load(worker_id)) is not None}

    async def open(self, request: GenerateRequest, request_id: str, arrived_s: float,
                   client_gone: Callable[[], Awaitable[None]] | None = None) -> Generation:
        """Admit and start ``request``; ``APIError`` when it is refused, ``ClientGone`` when
        ``client_gone()`` returns while the request waits in the admission queue."""
        if request.model != self.model_name:
            raise APIError(404, f"the model '{request.model}' does not exist; this server "
                                f"serves '{self.model_name}'", "model", code="model_not_found")
        if self.is_draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        self._begin()
        try:
            return await self._open(request, request_id, arrived_s, client_gone)
        except BaseException:
            self._end()
            raise

    async def _open(self, request: GenerateRequest, request_id: str, arrived_s: float,
                    client_gone: Callable[[], Awaitable[None]] | None) -> Generation:
        if _is_short(request):  # cheaper than the hop to the pool and back
            prompt_token_ids, block_hashes = self._tokenize(request, in_pool=False)
        else:
            prompt_token_ids, block_hashes = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._tokenize, request, True)
        max_tokens = self._max_tokens(request, len(prompt_token_ids))
        bad = next((t for t in request.stop_token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"stop_token_ids holds {bad}, outside the vocabulary "
                              f"[0, {self.vocab_size})", "stop_token_ids")
        if not self.admission.try_acquire():
            await self._wait_for_slot(request.priority, client_gone)
        try:
            handle = self.links.submit(request_id, prompt_token_ids,
                                       request.sampling.with_max_tokens(max_tokens),
                                       request.priority,
                                       block_hashes)
        except NoWorker as error:
            self.admission.release()
            raise APIError(503, f"{error}; retry later", code="no_worker") from None
        except BaseException:
            self.admission.release()
            raise
        return Generation(self, request, handle, len(prompt_token_ids), arrived_s)

    async def _wait_for_slot(self, priority: int,
                             client_gone: Callable[[], Awaitable[None]] | None) -> None:
        waiter = asyncio.ensure_future(self.admission.acquire(priority))
        watcher = asyncio.ensure_future(client_gone()) if client_gone else None
        try:
            await asyncio.wait([t for t in (waiter, watcher) if t],
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # cancelled from outside (shutdown)
            waiter.cancel()  # its own handler passes on a slot it was just handed
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if not waiter.done():  # the client left first
            waiter.cancel()
            try:
                await waiter
            except asyncio.CancelledError:
                raise ClientGone() from None
            self.admission.release()  # the slot came at the same instant: give it back
            raise ClientGone()
        try:
            waiter.result()
        except QueueFull as error:  # counted by whoever answers the 429, like every refusal
            raise APIError(429, f"the server is at capacity: {error}; retry later",
                           code="overloaded") from None

    def _tokenize(self, request: GenerateRequest,
                  in_pool: bool) -> tuple[list[int], list[int]]:
        """The prompt's token ids and block hashes: in the thread pool unless short."""
        encode = self.tokenizer.encode_without_gil if in_pool else self.tokenizer.encode
        if request.prompt_token_ids is not None:
            token_ids = request.prompt_token_ids
            bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise bad_request(f"prompt holds token id {bad}, outside the vocabulary "
                                  f"[0, {self.vocab_size})", "prompt")
        elif request.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(request.messages)
            except (ValueError, jinja2.TemplateError) as error:
                raise bad_request(f"the chat template cannot render these messages: {error}",
                                  "messages") from None
            token_ids = encode(text, add_special_tokens=False)
        else:
            token_ids = encode(request.prompt_text)
        if not token_ids:
            raise bad_request("the prompt has no tokens", "prompt")
        return token_ids, hash_blocks(token_ids, self.block_size)

    def _max_tokens(self, request: GenerateRequest, num_prompt_tokens: int) -> int:
        room = self.max_model_len - num_prompt_tokens
        param = "messages" if request.kind == "chat" else "prompt"
        if room < 1:
            raise bad_request(f"this model's maximum context length is {self.max_model_len} "
                              f"tokens, and the prompt has {num_prompt_tokens}: shorten it",
                              param, "context_length_exceeded")
        if request.max_tokens is None:
            return room
        if request.max_tokens > room:
            raise bad_request(f"this model's maximum context length is {self.max_model_len} "
                              f"tokens; the prompt has {num_prompt_tokens} and max_tokens is "
                              f"{request.max_tokens}: lower max_tokens to at most {room}",
                              "max_tokens", "context_length_exceeded")
        return request.max_tokens

    def _begin(self) -> None:
        self.num_in_flight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.num_in_flight -= 1
        if self.num_in_flight == 0:
            self._idle.set()


def _is_short(request: GenerateRequest) -> bool:
    """Tokenizing and hashing this is cheaper than the hop to the pool and back (in a one-off
    timing: ~0.04 ms for 128 ids against ~0.17 ms for the hop; scripts/bench_router.py
    measures the whole "in" path), so it runs on the loop; anything longer goes to the pool
    so it cannot stall other requests."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids) <= INLINE_MAX_TOKEN_IDS
    if request.prompt_text is not None:
        return len(request.prompt_text) <= INLINE_MAX_CHARS
    return False  # chat: the template renders in the pool


class Generation:
    """A started request: ``events()`` yields text deltas, then one ``Outcome``."""

    def __init__(self, router: Router, request: GenerateRequest, handle: RequestHandle,
                 num_prompt_tokens: int, arrived_s: float):
        self.router, self.request, self.handle = router, request, handle
        self.num_prompt_tokens = num_prompt_tokens
        self.arrived_s = arrived_s
        self.created = int(time.time())
        self._is_closed = False

    async def events(self) -> AsyncIterator[str | Outcome]:
        router, handle, metrics = self.router, self.handle, self.router.metrics
        text = TextStream(router.tokenizer, self.request.stop)
        num_output_tokens = num_cached_tokens = 0
        last_token_s = None
        status = "cancelled"
        self._overhead("in", handle.submitted_s - self.arrived_s)
        try:
            while True:
                received_s, chunk = await handle.chunks.get()
                now = time.perf_counter()
                if chunk.error:
                    status = "error"
                    is_lost = chunk.finish_reason is FinishReason.WORKER_LOST
                    raise self._failure(chunk.error, is_worker_lost=is_lost)
                num_cached_tokens = max(num_cached_tokens, chunk.num_cached_tokens)
                if chunk.token_ids:
                    if last_token_s is None:
                        metrics.ttft.observe(now - self.arrived_s)
                    else:
                        metrics.itl.observe(now - last_token_s)
                    last_token_s = now
                    num_output_tokens += len(chunk.token_ids)
                    delta = text.push(chunk.token_ids)
                    if delta:
                        yield delta  # a streamed response resumes here once it is written
                        if self.request.stream:
                            self._overhead("out", time.perf_counter() - received_s)
                    if text.stopped:
                        router.links.cancel(handle)
                        finish_reason = "stop"
                        break
                if chunk.finished:
                    router.links.finish(handle)
                    if chunk.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
                        status = "error"
                        reason = chunk.finish_reason and chunk.finish_reason.value
                        raise self._failure(f"the request ended: {reason}",
                                            is_worker_lost=False)
                    finish_reason = chunk.finish_reason.value
                    break
            tail = text.finish()
            if tail:
                yield tail
            metrics.e2e.observe(time.perf_counter() - self.arrived_s)
            metrics.cached_tokens.inc(num_cached_tokens)
            self.close("success")  # now: the caller may stop iterating at the outcome
            yield Outcome(finish_reason, self.num_prompt_tokens, num_output_tokens,
                          num_cached_tokens)
        except (APIError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            status = "error"
            logger.exception("request %s failed in the router", self.handle.request_id)
            raise APIError(500, "the router failed on this request; see its log",
                           code="internal_error") from None
        finally:
            self.close(status)

    def _overhead(self, direction: str, seconds: float) -> None:
        self.router.metrics.overhead.labels(direction).observe(seconds)
        if self.router.overhead_log is not None:
            self.router.overhead_log.append((self.handle.request_id, direction, seconds))

    def close(self, status: str = "cancelled") -> None:
        """Idempotent: cancel the worker request if it still runs, give the slot back."""
        if self._is_closed:
            return
        self._is_closed = True
        try:
            if not self.handle.is_done:
                self.router.links.cancel(self.handle)
        finally:
            self.router.admission.release()
            self.router.metrics.requests.labels(status).inc()
            self.router._end()

    def _failure(self, message: str, is_worker_lost: bool) -> APIError:
        """A 5xx: a streamed response sends it as an error event."""
        logger.warning("request %s failed on %s: %s", self.handle.request_id,
                       self.handle.worker_id, message)
        status = 503 if is_worker_lost else 500
        return APIError(status, f"the request failed on the worker: {message}",
                        code="worker_error")
