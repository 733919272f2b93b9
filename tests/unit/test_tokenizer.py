from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from pdserve.tokenizer import Tokenizer

BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 508, 509, 510, 511


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_llama_dir)


def copy_with_config(source: Path, target: Path, **changes: object) -> Path:
    """A tokenizer directory like source's, with tokenizer_config.json fields replaced."""
    target.mkdir()
    shutil.copy(source / "tokenizer.json", target / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not None}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "héllo wörld, naïve café",
        "日本語のテキスト",
        "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
        "",
    ],
)
def test_roundtrip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids[0] == BOS_ID
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_known_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world") == [BOS_ID, 72, 503, 263, 287, 295]
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [72, 503, 263, 287, 295]


def test_special_tokens(tokenizer: Tokenizer) -> None:
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        512,
        BOS_ID,
        EOS_ID,
    )
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|><|eos|>")
    assert ids == [BOS_ID, IM_START_ID, 117, 115, 270, 10, 104, 105, IM_END_ID, EOS_ID]
    assert tokenizer.decode(ids) == "user\nhi"
    expected = "<|bos|><|im_start|>user\nhi<|im_end|><|eos|>"
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected


def test_digest_is_sha256_of_tokenizer_json(tokenizer: Tokenizer, tiny_llama_dir: Path) -> None:
    expected = hashlib.sha256((tiny_llama_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert tokenizer.digest == expected


def test_chat_template(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert (
        without_prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ("hello", "messages must be a list"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        (
            [{"role": "user", "content": "hi"}, {"role": "user", "content": 3}],
            r"messages\[1\]\.content",
        ),
    ],
)
def test_bad_messages(tokenizer: Tokenizer, messages: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tokenizer.apply_chat_template(messages)  # type: ignore[arg-type]


def test_template_variants(tiny_llama_dir: Path, tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ eos_token }}"
    )
    directory = copy_with_config(
        tiny_llama_dir,
        tmp_path / "named",
        bos_token={"content": "<|bos|>", "lstrip": False},
        chat_template=[
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": template},
        ],
    )
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer.bos_token_id == BOS_ID
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "a"}])
    assert rendered == "<|bos|>[a]<|eos|>"


def test_template_raise_exception(tiny_llama_dir: Path, tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    tokenizer = Tokenizer.from_dir(
        copy_with_config(tiny_llama_dir, tmp_path / "d", chat_template=template)
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}]) == ""
    with pytest.raises(ValueError, match="user first"):
        tokenizer.apply_chat_template([{"role": "system", "content": "a"}])


def test_missing_chat_template(tiny_llama_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(
        copy_with_config(tiny_llama_dir, tmp_path / "d", chat_template=None)
    )
    with pytest.raises(ValueError, match="no chat_template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}])


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_file_names_it(tiny_llama_dir: Path, tmp_path: Path, missing: str) -> None:
    directory = copy_with_config(tiny_llama_dir, tmp_path / "d")
    (directory / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(directory / missing))):
        Tokenizer.from_dir(directory)
