"""What the HTTP edge refuses before parsing, and how it fails: media type, text that is not
Unicode, unforeseen exceptions, bodies cut short, CORS (router.app, router.request_body)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from pdserve.config import RouterConfig
from router.request_body import find_invalid_text
from tests.unit.router_harness import Answer, Edge, edge

OK_BODY = {"prompt": "hi", "max_tokens": 2}
CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def run(model_dir, scenario, **options):
    """Run ``scenario(edge, model_name)`` against a fresh edge."""
    async def main():
        async with edge(model_dir, **options) as server:
            return await scenario(server, model_dir.name)

    return asyncio.run(main())


def assert_openai_error(answer: Answer, status: int, param: str | None, code: str | None):
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


async def assert_healthy(server: Edge) -> None:
    assert (await server.call("GET", "/health")).status == 200
    assert (server.router.num_in_flight, server.router.admission.num_running) == (0, 0)


# -- media type -------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", 'Application/JSON; Charset="UTF-8"',
    "application/json;charset=utf8"])
def test_json_with_any_spelling_of_its_media_type_is_served(tiny_llama_dir, content_type):
    async def scenario(server: Edge, model: str) -> list[int]:
        statuses = []
        for path, body in (("/v1/completions", OK_BODY), ("/v1/chat/completions", CHAT_BODY)):
            answer = await server.call("POST", path, body | {"model": model},
                                       {"content-type": content_type})
            statuses.append(answer.status)
        return statuses

    assert run(tiny_llama_dir, scenario) == [200, 200]


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/json; charset=latin-1",
    "application/jsonp", "application/json\xff"])
def test_a_body_not_sent_as_json_is_415_before_it_is_read(tiny_llama_dir, content_type):
    async def scenario(server: Edge, model: str) -> None:
        headers = {} if content_type is None else {"content-type": content_type}
        for path, body in (("/v1/completions", OK_BODY), ("/v1/chat/completions", CHAT_BODY)):
            raw = json.dumps(body | {"model": model}).encode()  # bytes: no Content-Type added
            answer = await server.call("POST", path, raw, headers)
            assert_openai_error(answer, 415, "Content-Type", "unsupported_media_type")
            assert answer.json()["error"]["type"] == "invalid_request_error"
        assert server.worker.generates == []
        await assert_healthy(server)

    run(tiny_llama_dir, scenario)


# -- text that is not Unicode ----------------------------------------------------------------

SURROGATE_CASES = {
    "prompt": ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    "prompt-low-half": ("/v1/completions", {"prompt": "\udfff"}, "prompt"),
    "model": ("/v1/completions", {"prompt": "hi", "model": "\ud800"}, "model"),
    "unknown-key": ("/v1/completions", {"prompt": "hi", "bog\ud800us": 1}, "bog\\ud800us"),
    "unknown-key-value": ("/v1/completions", {"prompt": "hi", "bogus": ["\ud800"]},
                          "bogus[0]"),
    "stop": ("/v1/completions", {"prompt": "hi", "stop": ["ok", "\udbff"]}, "stop[1]"),
    "user": ("/v1/completions", {"prompt": "hi", "user": "\ud800"}, "user"),
    "nested-key": ("/v1/completions", {"prompt": "hi", "stream": True,
                                       "stream_options": {"include_usage\ud800": True}},
                   "stream_options.include_usage\\ud800"),
    "chat-content": ("/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "\ud800"}]},
                     "messages[0].content"),
    "chat-part": ("/v1/chat/completions",
                  {"messages": [{"role": "system", "content": "ok"}, {
                      "role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]},
                  "messages[1].content[0].text"),
    "chat-name": ("/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]},
                  "messages[0].name"),
}


@pytest.mark.parametrize("path,body,param", SURROGATE_CASES.values(),
                         ids=SURROGATE_CASES.keys())
def test_a_lone_surrogate_anywhere_is_400_naming_where(tiny_llama_dir, path, body, param):
    async def scenario(server: Edge, model: str) -> None:
        answer = await server.call("POST", path, {"model": model, "max_tokens": 2} | body)
        assert_openai_error(answer, 400, param, "invalid_unicode")
        assert answer.body.isascii()  # escaped: the raw surrogate is never echoed
        assert server.worker.generates == []
        await assert_healthy(server)

    run(tiny_llama_dir, scenario)


def test_a_surrogate_pair_is_text_and_is_served(tiny_llama_dir):
    async def scenario(server: Edge, model: str) -> int:
        body = b'{"model": "%s", "prompt": "smile \\ud83d\\ude42", "max_tokens": 2}' % (
            model.encode())
        answer = await server.call("POST", "/v1/completions", body,
                                   {"content-type": "application/json"})
        return answer.status

    assert run(tiny_llama_dir, scenario) == 200


def test_a_body_that_is_not_utf8_is_400(tiny_llama_dir):
    async def scenario(server: Edge, model: str) -> None:
        # a surrogate encoded as if it were a character (CESU-8): not UTF-8
        body = b'{"model": "m", "prompt": "\xed\xa0\x80"}'
        answer = await server.call("POST", "/v1/completions", body,
                                   {"content-type": "application/json"})
        assert_openai_error(answer, 400, None, "invalid_json")
        assert "not valid UTF-8" in answer.json()["error"]["message"]

    run(tiny_llama_dir, scenario)


def test_find_invalid_text_walks_every_string_and_key():
    assert find_invalid_text({"a": [1, {"b": "ok", "c": ["x", "é🙂"]}]}) is None
    assert find_invalid_text({"a": [1, {"b": "ok", "c": ["x", "\ud800"]}]}) == "a[1].c[1]"
    assert find_invalid_text({"a": {"k\udfff": 1}}) == "a.k\\udfff"
    assert find_invalid_text("\ud800") == "the request body"
    deep: list = ["\ud800"]
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    assert find_invalid_text(deep) == "[0]" * 5000 + "[0]"


# -- failures nobody foresaw -------------------------------------------------------------------

def test_an_unexpected_exception_is_a_json_500_logged_under_the_request_id(
        tiny_llama_dir, caplog, monkeypatch):
    caplog.set_level(logging.INFO)

    async def scenario(server: Edge, model: str) -> None:
        def broken_encode(*args, **kwargs):
            raise TypeError("the tokenizer broke")

        monkeypatch.setattr(server.router.tokenizer, "encode", broken_encode)
        answer = await server.call("POST", "/v1/completions", OK_BODY | {"model": model},
                                   {"x-request-id": "boom-1"})
        assert_openai_error(answer, 500, None, "internal_error")
        assert answer.json()["error"]["type"] == "server_error"
        assert "boom-1" in answer.json()["error"]["message"]
        assert answer.headers["x-request-id"] == "boom-1"
        await assert_healthy(server)

    run(tiny_llama_dir, scenario)
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.getMessage() == "request boom-1 failed in the router"
    assert record.exc_info[0] is TypeError


def test_an_exception_on_any_route_is_a_json_500_with_a_request_id(
        tiny_llama_dir, caplog, monkeypatch):
    async def scenario(server: Edge, model: str) -> Answer:
        async def broken_render() -> bytes:
            raise RuntimeError("the registry broke")

        monkeypatch.setattr(server.router.metrics, "render", broken_render)
        return await server.call("GET", "/metrics")

    answer = run(tiny_llama_dir, scenario)
    assert_openai_error(answer, 500, None, "internal_error")
    request_id = answer.headers["x-request-id"]
    assert request_id in answer.json()["error"]["message"]
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.getMessage() == f"request {request_id} failed in the router"


def test_a_body_cut_short_is_one_log_line_and_frees_everything(tiny_llama_dir, caplog):
    caplog.set_level(logging.INFO)

    async def scenario(server: Edge, model: str) -> None:
        answer = await server.call("POST", "/v1/completions",
                                   headers={"content-type": "application/json",
                                            "transfer-encoding": "chunked",
                                            "x-request-id": "cut-1"},
                                   parts=[b'{"model": "', model.encode()])
        assert answer.status == 499
        assert server.worker.generates == []
        await assert_healthy(server)

    run(tiny_llama_dir, scenario)
    assert [r for r in caplog.records if r.exc_info] == []
    assert [r.getMessage() for r in caplog.records if r.name == "router.app"] == [
        "request cut-1: the client disconnected before its body ended"]


# -- CORS ---------------------------------------------------------------------------------------

PREFLIGHT = {"origin": "https://app.example.com", "access-control-request-method": "POST",
             "access-control-request-headers": "content-type"}


def cors_headers(answer: Answer) -> dict[str, str]:
    return {k: v for k, v in answer.headers.items() if k.startswith("access-control-")}


def test_no_cors_headers_unless_configured(tiny_llama_dir):
    async def scenario(server: Edge, model: str) -> None:
        preflight = await server.call("OPTIONS", "/v1/completions", headers=PREFLIGHT)
        assert (preflight.status, cors_headers(preflight)) == (405, {})
        answer = await server.call("POST", "/v1/completions", OK_BODY | {"model": model},
                                   {"origin": "https://evil.example"})
        assert (answer.status, cors_headers(answer)) == (200, {})

    assert RouterConfig().cors_allow_origins == []
    run(tiny_llama_dir, scenario)


def test_configured_origins_get_cors_and_others_do_not(tiny_llama_dir):
    async def scenario(server: Edge, model: str) -> None:
        preflight = await server.call("OPTIONS", "/v1/completions", headers=PREFLIGHT)
        assert preflight.status == 200  # no Authorization needed to ask
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        answer = await server.call("POST", "/v1/completions", OK_BODY | {"model": model},
                                   {"origin": "https://app.example.com",
                                    "authorization": "Bearer k"})
        assert answer.status == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
        other = await server.call("OPTIONS", "/v1/completions",
                                  headers=PREFLIGHT | {"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        unauthorized = await server.call("POST", "/v1/completions", OK_BODY | {"model": model},
                                         {"origin": "https://app.example.com"})
        assert unauthorized.status == 401

    run(tiny_llama_dir, scenario, api_key="k", cors_allow_origins=["https://app.example.com"])
