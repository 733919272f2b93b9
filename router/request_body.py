"""A POST body as the edge reads it: JSON only, and only text the tokenizer can take.

Everything here refuses before parsing, so nothing unreadable reaches the tokenizer or an
error message:

- the media type must be ``application/json`` (a ``charset`` of UTF-8 may follow): a browser
  can send ``text/plain`` cross-origin without a preflight, so accepting it would let any web
  page drive the server through a visitor's browser (415);
- the body must fit ``router.max_request_bytes`` (413) and be UTF-8 JSON (400);
- every string and key in it must be valid Unicode. JSON may escape a lone UTF-16 surrogate
  (``"\\ud800"``), which no UTF-8 text holds; the 400 names where it sits
  (``messages[0].content``).

A client that disconnects before its body ends raises starlette's ``ClientDisconnect``.
"""

from __future__ import annotations

import json

from starlette.requests import Request

from router.openai_api import APIError, bad_request, safe_text

JSON_MEDIA_TYPE = "application/json"
_MAX_SHOWN_CHARS = 100  # of a refused Content-Type, in the error message


async def read_json(http: Request, max_bytes: int) -> object:
    """The body, parsed and checked; ``APIError`` for what the edge refuses."""
    check_content_type(http.headers.get("content-type"))
    raw = await _read_bytes(http, max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(f"the request body is not valid UTF-8: {error}",
                          code="invalid_json") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as error:  # bad JSON, absurd numbers, deep nesting
        raise bad_request(f"the request body is not valid JSON: {error}",
                          code="invalid_json") from None
    check_text(body)
    return body


def check_content_type(content_type: str | None) -> None:
    """Refuse (415) anything but ``application/json``, optionally with a UTF-8 charset."""
    media_type, _, parameters = (content_type or "").partition(";")
    charset = _charset(parameters)
    if media_type.strip().lower() == JSON_MEDIA_TYPE and charset in (None, "utf-8", "utf8"):
        return
    shown = "none" if content_type is None else repr(content_type[:_MAX_SHOWN_CHARS])
    raise APIError(415, f"the request body must be JSON sent with 'Content-Type: "
                        f"{JSON_MEDIA_TYPE}' (UTF-8), got Content-Type {shown}",
                   "Content-Type", code="unsupported_media_type")


def _charset(parameters: str) -> str | None:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


async def _read_bytes(http: Request, max_bytes: int) -> bytes:
    too_large = APIError(413, f"the request body is larger than {max_bytes} bytes "
                              f"(router.max_request_bytes)", code="request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    parts, size = [], 0
    async for part in http.stream():
        size += len(part)
        if size > max_bytes:
            raise too_large
        parts.append(part)
    return b"".join(parts)


def check_text(body: object) -> None:
    """Refuse (400) a body holding a string or key that is not valid Unicode."""
    where = find_invalid_text(body)
    if where is not None:
        raise bad_request(f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode "
                          f"text: send UTF-8 (an escaped character outside the Basic "
                          f"Multilingual Plane needs both halves of its surrogate pair)",
                          where, "invalid_unicode")


def find_invalid_text(value: object) -> str | None:
    """Where a string or key of parsed JSON that UTF-8 cannot encode sits, as a path
    (``messages[0].content``, ``stop[1]``; a bad key shown escaped); None when there is
    none. Iterative: JSON nests as deep as the parser allowed."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                return path or "the request body"
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else key
                if not _is_unicode(key):
                    return f"{path}.{safe_text(key)}" if path else safe_text(key)
                if isinstance(child, (str, dict, list)):
                    children.append((child, child_path))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{index}]")
                         for index, child in reversed(list(enumerate(item)))
                         if isinstance(child, (str, dict, list)))
    return None


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
