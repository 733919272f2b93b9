"""The checkpoint's tokenizer and chat template, without transformers or torch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.checkpoint_files import read_bytes, read_json


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template of one checkpoint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        digest: str,
    ) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self._digest = digest

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json from a checkpoint directory."""
        tokenizer_path = Path(model_dir) / "tokenizer.json"
        config = read_json(Path(model_dir) / "tokenizer_config.json")
        raw = read_bytes(tokenizer_path)
        try:
            backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as error:  # the Rust parser raises a bare Exception
            raise ValueError(f"{tokenizer_path} is not a valid tokenizer: {error}") from error
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token"), "bos_token"),
            eos_token=_token_content(config.get("eos_token"), "eos_token"),
            chat_template=_default_template(config.get("chat_template")),
            digest=hashlib.sha256(raw).hexdigest(),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    @property
    def digest(self) -> str:
        """Hex sha256 of tokenizer.json: two workers agree on token ids iff their digests match."""
        return self._digest

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_without_gil(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``encode`` for a worker thread: the batch call releases the GIL while it runs,
        where the single call holds it and so stalls every other thread (an event loop)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render messages with the checkpoint's jinja2 template, as HF transformers does."""
        _check_messages(messages)
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat_template in tokenizer_config.json")
        return _compile(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            raise_exception=_raise_exception,
        )

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)


def _compile(template: str) -> Any:
    # Templates come with downloaded checkpoints, so they run sandboxed; the whitespace options
    # are HF's, without which the rendered prompt (and so the token ids) would differ from theirs.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template)


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation they cannot render: the caller's input is bad.
    raise ValueError(f"chat template rejected the messages: {message}")


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise ValueError(
                    f"messages[{index}].{field} must be a str, got {message.get(field)!r}"
                )


def _token_content(value: object, field: str) -> str | None:
    # tokenizer_config.json writes a special token either as its text or as a serialized
    # AddedToken, {"content": ..., "lstrip": ..., ...}.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(
        f"tokenizer_config.json {field} must be a str or {{'content': str}}, got {value!r}"
    )


def _default_template(value: object) -> str | None:
    # Some checkpoints ship several named templates (e.g. "default", "tool_use").
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"tokenizer_config.json chat_template has no 'default' template: {value!r}")
