"""The HTTP front door: FastAPI routes over a ``Router``, OpenAI-compatible.

Every generation response carries ``X-Request-Id`` (the client's, or a new one) and every
refusal an OpenAI-style error body, a failure nobody foresaw included (a 500 naming the
request id its log line carries). A streamed response whose worker fails ends with an error
event and ``[DONE]``; a client that goes away cancels its request all the way down. Browsers
get CORS headers only from the origins ``router.cors_allow_origins`` lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from router.bounded_stream import BoundedStreamingResponse
from router.openai_api import (
    APIError,
    GenerateRequest,
    bad_request,
    chunk,
    full_response,
    internal_error,
    parse_chat,
    parse_completion,
    usage,
    usage_chunk,
)
from router.request_body import read_json
from router.service import ClientGone, Generation, Outcome, Router

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_PUBLIC_PATHS = ("/health",)
_CORS_HEADERS = ["Authorization", "Content-Type", "X-Request-Id"]
_CORS_EXPOSED = ["X-Request-Id", "X-Pdserve-Worker", "Retry-After"]


def build_app(router: Router, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="pdserve", openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        body = APIError(error.status_code, str(error.detail)).body()
        request_id = request.scope.get("pdserve.request_id")
        return JSONResponse(body, error.status_code,
                            headers={"X-Request-Id": request_id} if request_id else None)

    @app.get("/health")
    async def health() -> Response:
        if router.is_ready:
            return JSONResponse({"status": "ok", "workers": router.links.ready_workers})
        reason = "draining" if router.is_draining else "no decode worker is ready"
        return JSONResponse({"status": reason}, 503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": router.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": router.max_model_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(router, request, parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(router, request, parse_chat)

    # Each middleware added runs before the ones added earlier.
    if api_key is not None:
        app.add_middleware(_RequireAPIKey, api_key=api_key)
    origins = router.config.cors_allow_origins
    if origins:  # outside the key check: a preflight carries no Authorization
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=_CORS_HEADERS, expose_headers=_CORS_EXPOSED)
    app.add_middleware(_Edge)
    return app


class _Edge:
    """The outermost layer: notes when a request arrived and its id, before routing and any
    middleware, and turns an exception nothing caught into a logged 500 with an OpenAI-style
    body naming the id (plain ASGI: it must not buffer streamed responses)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["pdserve.arrived_s"] = time.perf_counter()
        request_id = scope["pdserve.request_id"] = _request_id(scope)
        is_started = False

        async def send_noting_start(message) -> None:
            nonlocal is_started
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception:
            logger.exception("request %s failed in the router", request_id)
            if not is_started:  # else the client sees the response cut short
                response = _internal_error_response(request_id, {"X-Request-Id": request_id})
                await response(scope, receive, send)


def _request_id(scope) -> str:
    """The client's ``X-Request-Id`` when it is well-formed, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = value.decode("latin-1")
            return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return uuid.uuid4().hex


class _RequireAPIKey:
    """Every route but /health needs ``Authorization: Bearer <key>`` (plain ASGI: it must not
    buffer streamed responses)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in _PUBLIC_PATHS:
            headers = dict(scope["headers"])
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                error = APIError(401, "a valid API key is required: send 'Authorization: "
                                      "Bearer <key>'", code="invalid_api_key")
                response = JSONResponse(error.body(), 401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _generate(router: Router, http: Request,
                    parse: Callable[[object], GenerateRequest]) -> Response:
    """Refuse what must be refused, else answer with the generation; every way out counts
    the request once (a started generation counts itself when it closes)."""
    request_id = http.scope["pdserve.request_id"]
    headers = {"X-Request-Id": request_id}
    try:
        generation = await _start(router, http, parse, request_id)
    except ClientDisconnect:
        logger.info("request %s: the client disconnected before its body ended", request_id)
        router.metrics.requests.labels("cancelled").inc()
        return Response(status_code=499, headers=headers)
    except ClientGone:
        router.metrics.requests.labels("cancelled").inc()
        return Response(status_code=499, headers=headers)
    except APIError as error:
        status = "rejected" if error.status in (429, 503) else "invalid"
        router.metrics.requests.labels(status).inc()
        return _error_response(router, error, headers)
    except Exception:
        logger.exception("request %s failed in the router", request_id)
        router.metrics.requests.labels("error").inc()
        return _internal_error_response(request_id, headers)
    headers["X-Pdserve-Worker"] = generation.handle.worker_id
    if generation.request.stream:
        return BoundedStreamingResponse(
            _sse(generation), media_type="text/event-stream",
            headers=headers | {"Cache-Control": "no-cache"},
            write_timeout_s=router.config.stream_write_timeout_s, request_id=request_id,
            on_slow=lambda: router.metrics.slow_readers.labels("write_timeout").inc())
    return await _respond(router, http, generation, headers)


async def _start(router: Router, http: Request, parse: Callable[[object], GenerateRequest],
                 request_id: str) -> Generation:
    given_id = http.headers.get("x-request-id")
    if given_id is not None and given_id != request_id:
        raise bad_request("X-Request-Id must be 1-128 of [A-Za-z0-9._:-]", "X-Request-Id")
    request = parse(await read_json(http, router.config.max_request_bytes))
    return await router.open(request, request_id, http.scope["pdserve.arrived_s"],
                             client_gone=lambda: _disconnected(http))


async def _respond(router: Router, http: Request, generation: Generation,
                   headers: dict) -> Response:
    """The whole non-streamed answer, or 499 when the client leaves first."""
    request, request_id = generation.request, generation.handle.request_id
    try:
        result = await _until_disconnect(http, _collect(generation))
    except APIError as error:
        return _error_response(router, error, headers)
    except Exception:
        logger.exception("request %s failed in the router", request_id)
        generation.close("error")
        return _internal_error_response(request_id, headers)
    finally:
        generation.close()
    if result is None:
        return Response(status_code=499, headers=headers)
    text, outcome = result
    body = full_response(request, request_id, text, outcome.finish_reason, _usage(outcome))
    return JSONResponse(body, headers=headers)


def _error_response(router: Router, error: APIError, headers: dict) -> JSONResponse:
    if error.status in (429, 503):
        headers = headers | {"Retry-After": str(router.config.retry_after_s)}
    return JSONResponse(error.body(), error.status, headers=headers)


def _internal_error_response(request_id: str, headers: dict) -> JSONResponse:
    return JSONResponse(internal_error(request_id).body(), 500, headers=headers)


async def _collect(generation: Generation) -> tuple[str, Outcome]:
    parts: list[str] = []
    async with contextlib.aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, Outcome):
                return "".join(parts), event
            parts.append(event)
    raise RuntimeError("a generation ended without an outcome")


async def _sse(generation: Generation) -> AsyncIterator[str]:
    request, request_id = generation.request, generation.handle.request_id
    created = generation.created
    try:
        if request.kind == "chat":
            yield _event(chunk(request, request_id, created, None, role=True))
        async with contextlib.aclosing(generation.events()) as events:
            async for event in events:
                if isinstance(event, Outcome):
                    yield _event(chunk(request, request_id, created,
                                       None if request.kind == "chat" else "",
                                       event.finish_reason))
                    if request.include_usage:
                        yield _event(usage_chunk(request, request_id, created,
                                                 _usage(event)))
                else:
                    yield _event(chunk(request, request_id, created, event))
    except APIError as error:
        yield _event(error.body())
    except Exception:
        logger.exception("request %s failed in the router", request_id)
        generation.close("error")
        yield _event(internal_error(request_id).body())
    finally:
        generation.close()
    yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(outcome: Outcome) -> dict:
    return usage(outcome.num_prompt_tokens, outcome.num_output_tokens,
                 outcome.num_cached_tokens)


async def _until_disconnect(http: Request, work):
    """``work``'s result, or None (and ``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, APIError):
        pass
    return None


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass
