"""The OpenAI wire format: request bodies checked into ``GenerateRequest``, responses built.

Every refusal is an ``APIError`` with the status and an OpenAI-style body naming the
parameter. A parameter pdserve does not implement is refused by name, never ignored; a
neutral value of one (``n: 1``, ``logprobs: null``, a zero penalty) is accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.sampling import SamplingError, SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # text that could still become a stop string is held back
# The body's parameters that are SamplingParams fields of the same name, checked there (the one
# validator); max_tokens is resolved against the context after tokenizing.
_SAMPLING_FIELDS = tuple(name for name in SamplingParams.__struct_fields__
                         if name not in ("max_tokens", "output_logits"))

# parameter -> the values that mean "off", which are accepted
_UNSUPPORTED: dict[str, tuple] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # meaningless without tools
    "min_tokens": (None, 0),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
           "stop_token_ids", "ignore_eos", "stream", "stream_options", "priority", "user"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request refused at the edge: HTTP ``status`` and an OpenAI-style error body.

    The message and param may quote the client's text; what UTF-8 cannot encode in it is
    escaped, so the body always encodes."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 error_type: str | None = None, code: str | None = None):
        message = safe_text(message)
        param = None if param is None else safe_text(param)
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.error_type = error_type or _TYPES.get(status, "server_error")
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code=code)


def internal_error(request_id: str) -> APIError:
    """The 500 for a failure the router did not foresee; its log has the traceback."""
    return APIError(500, f"the router failed on request {request_id}; its log has the "
                         f"details under this id", code="internal_error")


def safe_text(text: str) -> str:
    """``text`` with lone surrogates (legal in JSON, not in UTF-8) escaped as ``\\udXXX``."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(slots=True)
class GenerateRequest:
    """One checked request, before tokenization: a prompt (text or ids) or chat messages."""

    kind: str  # "completion" or "chat"
    model: str
    prompt_text: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None  # None: up to the model's context length
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=None))
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    priority: int = 0

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self.sampling.stop_token_ids


def parse_completion(body: Any) -> GenerateRequest:
    body = _check_body(body, _COMPLETION_FIELDS)
    request = GenerateRequest("completion", _model(body), max_tokens=16)
    _common(body, request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        request.prompt_text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        request.prompt_token_ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(
            isinstance(p, (str, list)) for p in prompt):
        raise bad_request("batched prompts are not supported: send one prompt per request",
                          "prompt")
    elif prompt is None:
        raise bad_request("prompt is required", "prompt")
    else:
        raise bad_request("prompt must be a string or a non-empty list of token ids",
                          "prompt")
    return request


def parse_chat(body: Any) -> GenerateRequest:
    body = _check_body(body, _CHAT_FIELDS)
    request = GenerateRequest("chat", _model(body))
    _common(body, request)
    if body.get("max_completion_tokens") is not None:
        request.max_tokens = _int(body, "max_completion_tokens", 1)
    request.messages = _messages(body.get("messages"))
    return request


def _check_body(body: Any, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got "
                          f"{type(body).__name__}")
    for name, neutral in _UNSUPPORTED.items():
        if name in body and not any(_is_same(body[name], v) for v in neutral):
            raise bad_request(f"{name}={body[name]!r} is not supported by pdserve",
                              name, "unsupported_parameter")
    unknown = sorted(k for k in body if k not in known and k not in _UNSUPPORTED)
    if unknown:
        raise bad_request(f"unrecognized request argument: {unknown[0]}", unknown[0],
                          "unknown_parameter")
    return body


def _is_same(value: Any, neutral: Any) -> bool:
    # 0.0 is a neutral penalty, but True is not n=1
    return value is neutral or (value == neutral
                                and isinstance(value, bool) == isinstance(neutral, bool))


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: a model id from GET /v1/models", "model")
    return model


def _common(body: dict, request: GenerateRequest) -> None:
    if body.get("max_tokens") is not None:
        request.max_tokens = _int(body, "max_tokens", 1)
    request.sampling = _sampling(body)
    request.stop = _stop(body.get("stop"))
    request.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not request.stream:
            raise bad_request("stream_options is only allowed with stream=true",
                              "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("stream_options must be {\"include_usage\": bool}",
                              "stream_options")
        request.include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    if body.get("priority") is not None:
        request.priority = _int(body, "priority", -(2**31), 2**31 - 1)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("user must be a string", "user")


def _sampling(body: dict) -> SamplingParams:
    """The body's sampling parameters, checked by ``SamplingParams`` (a 400 names the field)."""
    values = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    for name, value in values.items():  # JSON has one number type: 5.0 is a valid top_k
        if isinstance(value, float) and value.is_integer() and name in ("top_k", "seed"):
            values[name] = int(value)
    if isinstance(values.get("stop_token_ids"), list):
        values["stop_token_ids"] = tuple(values["stop_token_ids"])
    try:
        return SamplingParams(max_tokens=None, **values)
    except SamplingError as error:
        raise bad_request(str(error), error.field) from None


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", where)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise bad_request(f"{where}.{extra[0]} is not supported by pdserve",
                              f"{where}.{extra[0]}", "unsupported_parameter")
        role = message.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role must be one of {list(_ROLES)}, got {role!r}",
                              f"{where}.role")
        checked.append({"role": role, "content": _content(message.get("content"), where)})
        if message.get("name") is not None:
            if not isinstance(message["name"], str):
                raise bad_request(f"{where}.name must be a string", f"{where}.name")
            checked[-1]["name"] = message["name"]
    return checked


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is supported
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}.content: only text parts are supported",
                                  f"{where}.content", "unsupported_parameter")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{where}.content must be a string or a list of text parts",
                      f"{where}.content")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of them", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"a stop string is longer than {MAX_STOP_CHARS} characters", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop holds {len(stops)} strings, more than {MAX_STOP_STRINGS}",
                          "stop")
    return list(stops)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, minimum: int, maximum: int | None = None) -> int:
    value = body[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise bad_request(f"{name} must be an integer, got {body[name]!r}", name)
    if value < minimum or (maximum is not None and value > maximum):
        limit = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise bad_request(f"{name}={value} is out of range: must be {limit}", name)
    return value


def _bool(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{param or name} must be true or false, got {value!r}",
                          param or name)
    return value


# -- responses ------------------------------------------------------------------------------

def usage(num_prompt_tokens: int, num_output_tokens: int, num_cached_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


def response_id(kind: str, request_id: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + request_id


def full_response(request: GenerateRequest, request_id: str, text: str, finish_reason: str,
                  usage_body: dict) -> dict:
    if request.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion"
    return {"id": response_id(request.kind, request_id), "object": kind,
            "created": int(time.time()), "model": request.model, "choices": [choice],
            "usage": usage_body}


def chunk(request: GenerateRequest, request_id: str, created: int, text: str | None,
          finish_reason: str | None = None, role: bool = False) -> dict:
    """One streamed event: a text delta, the first chat event (``role``) or the last."""
    if request.kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
        kind = "text_completion"
    else:
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    return {"id": response_id(request.kind, request_id), "object": kind, "created": created,
            "model": request.model, "choices": [choice]}


def usage_chunk(request: GenerateRequest, request_id: str, created: int,
                usage_body: dict) -> dict:
    kind = "text_completion" if request.kind == "completion" else "chat.completion.chunk"
    return {"id": response_id(request.kind, request_id), "object": kind, "created": created,
            "model": request.model, "choices": [], "usage": usage_body}
