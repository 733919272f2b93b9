"""Requests the router must refuse with an OpenAI-style error and leave nothing behind, as
test_router.py sends them to a running server: ``(path, body, status, param)``. A dict body
goes as JSON with its model ``"MODEL"`` replaced by the served one; bytes go as they are."""

from __future__ import annotations

from typing import NamedTuple


class Sent(NamedTuple):
    """A body sent with this Content-Type (None: with none) instead of application/json."""

    body: dict | bytes
    content_type: str | None


BAD_REQUESTS = [
    # (path, body or raw bytes, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": "MODEL"}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": "MODEL", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "MODEL", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "MODEL", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "MODEL", "prompt": [1, 999999]}, 400, "prompt"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": "5"}, 400,
     "max_tokens"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi " * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "temperature": -1}, 400,
     "temperature"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "stream_options": {}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "logprobs": 1}, 400, "logprobs"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "presence_penalty": 0.5}, 400,
     "presence_penalty"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "logit_bias": {"1": 5}}, 400,
     "logit_bias"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "bogus": 1}, 400, "bogus"),
    ("/v1/chat/completions", {"model": "MODEL", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "robot",
                                                              "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user",
                                                              "content": 3}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "top_k": 10**30}, 400, "top_k"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "stop_token_ids": [10**30]}, 400,
     "stop_token_ids"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "stop_token_ids": [10**6]}, 400,
     "stop_token_ids"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "stop": "x" * 2000}, 400, "stop"),
    ("/v1/completions", b'{"model": "m", "max_tokens": ' + b"1" * 5000 + b"}", 400, None),
    ("/v1/completions", b"[" * 100_000, 400, None),
    ("/v1/completions", b'{"prompt": "' + b"x" * (5 << 20) + b'"}', 413, None),
    ("/v1/nowhere", {}, 404, None),
    # a "simple" cross-origin POST a web page may send without asking, and no media type
    ("/v1/completions", Sent({"model": "MODEL", "prompt": "hi"}, "text/plain"), 415,
     "Content-Type"),
    ("/v1/chat/completions", Sent({"model": "MODEL", "messages": [
        {"role": "user", "content": "x"}]}, "application/x-www-form-urlencoded"), 415,
     "Content-Type"),
    ("/v1/completions", Sent({"model": "MODEL", "prompt": "hi"}, None), 415, "Content-Type"),
    # lone UTF-16 surrogates (legal JSON escapes, not text), wherever they sit
    ("/v1/completions", {"model": "MODEL", "prompt": "hi \ud800"}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user",
                                                              "content": "\udfff"}]}, 400,
     "messages[0].content"),
    ("/v1/completions", {"model": "\ud800", "prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "bogus\ud800": 1}, 400,
     "bogus\\ud800"),
    ("/v1/completions", {"model": "MODEL", "prompt": "hi", "stop": ["ok", "\ud800"]}, 400,
     "stop[1]"),
    ("/v1/completions", b'{"model": "m", "prompt": "\xed\xa0\x80"}', 400, None),  # not UTF-8
]
