from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from pdserve.tokenizer import Tokenizer
from router.detokenizer import TextStream

BOS_ID, EOS_ID = 508, 509
# Byte-level ids of the two UTF-8 bytes of "é", which the tiny BPE keeps as separate tokens.
E_ACUTE_IDS = [195, 169]
ALPHABET = (
    list("abcdefghij klmnop")
    + ["  ", "\n", "\n\n", "é", "ö", "ñ", "ç", "🙂", "👍🏽", "漢", "字", "日本", "the ", "ing"]
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_llama_dir)


def char_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids with at least one token per character, so each character can be pushed alone."""
    return [i for char in text for i in tokenizer.encode(char, add_special_tokens=False)]


def reference(
    tokenizer: Tokenizer, ids: Sequence[int], stops: Sequence[str], skip: bool = True
) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=skip)
    starts = [text.find(stop) for stop in stops if stop in text]
    return text[: min(starts)] if starts else text


def random_chunks(rng: random.Random, ids: list[int]) -> list[list[int]]:
    cuts = sorted(rng.choices(range(len(ids) + 1), k=rng.randint(0, len(ids) + 2)))
    bounds = [0, *cuts, len(ids)]
    return [ids[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]


def stream_checked(
    tokenizer: Tokenizer,
    chunks: list[list[int]],
    stops: Sequence[str],
    expected: str,
    skip: bool = True,
) -> TextStream:
    """Feed chunks, checking after each push that only final, stop-free text came out."""
    stream = TextStream(tokenizer, stops, skip_special_tokens=skip)
    emitted = []
    for chunk in chunks:
        emitted.append(stream.push(chunk))
        assert stream.text == "".join(emitted)
        assert expected.startswith(stream.text)
        assert not any(stop in stream.text for stop in stops)
    emitted.append(stream.finish())
    assert "".join(emitted) == stream.text == expected
    return stream


def random_text(rng: random.Random) -> str:
    return "".join(rng.choices(ALPHABET, k=rng.randint(0, 30)))


def random_stops(rng: random.Random, text: str) -> list[str]:
    stops = []
    for _ in range(rng.randint(0, 3)):
        if text and rng.random() < 0.8:
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 6)])
        else:
            stops.append(rng.choice(["zzz", "Q", "🙂🙂🙂", "\n\n\n\n"]))
    return stops


def test_multibyte_one_token_at_a_time(tokenizer: Tokenizer) -> None:
    text = "héllo 🙂 wörld 漢字"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, [])
    pieces = [stream.push([token_id]) for token_id in ids]
    assert pieces == [
        "h", "", "é", "ll", "o", " ", "", "", "", "🙂", " w", "", "ö", "r", "ld", " ",
        "", "", "漢", "", "", "字",
    ]  # fmt: skip
    assert stream.finish() == ""
    assert stream.text == text == tokenizer.decode(ids)
    assert not stream.stopped and stream.stop_reason is None


def test_whole_output_at_once(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("héllo 🙂 wörld 漢字")
    stream = TextStream(tokenizer, ["wör"])
    assert stream.push(ids) == "héllo 🙂 "
    assert (stream.stopped, stream.stop_reason) == (True, "wör")
    assert stream.finish() == ""


def test_finish_releases_possible_stop(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, ["world!"])
    assert stream.push(tokenizer.encode("hello wor")) == "hello "
    assert stream.text == "hello "
    assert stream.finish() == "wor"
    assert stream.text == "hello wor"
    assert stream.stop_reason is None


def test_held_text_released_once_it_cannot_be_a_stop(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, ["wxyz"])
    assert [stream.push(char_ids(tokenizer, char)) for char in "awxa"] == ["a", "", "", "wxa"]


def test_text_before_incomplete_character_goes_out(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, [])
    assert stream.push(char_ids(tokenizer, "ab") + E_ACUTE_IDS[:1]) == "ab"
    # "c" shows the first lead byte was an invalid character, final as U+FFFD.
    assert stream.push(char_ids(tokenizer, "c") + E_ACUTE_IDS[:1]) == "\ufffdc"
    assert stream.push(E_ACUTE_IDS[1:]) == "é"
    assert stream.finish() == ""


def test_finish_renders_incomplete_character(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, [])
    assert stream.push(char_ids(tokenizer, "a") + E_ACUTE_IDS[:1]) == "a"
    assert stream.finish() == "\ufffd"
    assert stream.text == "a\ufffd"


def test_stopped_stream_ignores_later_pushes(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, ["lo"])
    assert stream.push(tokenizer.encode("hello")) == "hel"
    assert (stream.stopped, stream.stop_reason) == (True, "lo")
    assert stream.push(tokenizer.encode(" more lo text")) == ""
    assert stream.finish() == ""
    assert stream.text == "hel"


def test_stop_at_start_gives_empty_output(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, ["Hello"])
    assert stream.push(tokenizer.encode("Hello world")) == ""
    assert stream.finish() == ""
    assert (stream.text, stream.stop_reason) == ("", "Hello")


def test_stop_spanning_many_tokens_and_chunks(tokenizer: Tokenizer) -> None:
    stop = " brown fox jumps"
    ids = tokenizer.encode("The quick brown fox jumps over", add_special_tokens=False)
    stream = stream_checked(tokenizer, [[token_id] for token_id in ids], [stop], "The quick")
    assert stream.stop_reason == stop


@pytest.mark.parametrize(
    ("text", "expected", "reason"),
    [("abcx", "ab", "c"), ("abcd", "", "abcd"), ("abc", "ab", "c"), ("xabd", "xabd", None)],
)
def test_earlier_longer_stop_is_awaited(
    tokenizer: Tokenizer, text: str, expected: str, reason: str | None
) -> None:
    # "c" completes inside "abc", but "abcd" starts earlier and may still complete.
    chunks = [char_ids(tokenizer, char) for char in text]
    stream = stream_checked(tokenizer, chunks, ["abcd", "c"], expected)
    assert stream.stop_reason == reason


def test_stops_that_are_prefixes_of_each_other(tokenizer: Tokenizer) -> None:
    # "abc" could still complete, but it starts where "ab" does: the cut is known at once.
    stream = TextStream(tokenizer, ["abc", "ab"])
    assert [stream.push(char_ids(tokenizer, char)) for char in "xab"] == ["x", "", ""]
    assert (stream.stopped, stream.stop_reason) == (True, "ab")
    chunks = [char_ids(tokenizer, char) for char in "xaby"]
    stream = stream_checked(tokenizer, chunks, ["ab", "a", "abc"], "x")
    assert stream.stop_reason in ("ab", "a")


def test_empty_stop_string_rejected(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"stop_strings\[1\]"):
        TextStream(tokenizer, ["ok", ""])


def test_push_after_finish_rejected(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, [])
    stream.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        stream.push([BOS_ID])


def test_special_tokens_rendered_and_matched(tokenizer: Tokenizer) -> None:
    ids = [BOS_ID, *tokenizer.encode("hi", add_special_tokens=False), EOS_ID]
    assert stream_checked(tokenizer, [ids], [], "hi").text == "hi"
    stream = stream_checked(tokenizer, [[i] for i in ids], ["<|eos|>"], "<|bos|>hi", skip=False)
    assert stream.stop_reason == "<|eos|>"


def test_special_token_splits_a_character(tokenizer: Tokenizer) -> None:
    # Decoding restarts its bytes at an added token: the halves of "é" around it stay broken
    # when special tokens are rendered, and join when they are skipped.
    ids = [E_ACUTE_IDS[0], BOS_ID, E_ACUTE_IDS[1]]
    stream = TextStream(tokenizer, [], skip_special_tokens=False)
    assert [stream.push([token_id]) for token_id in ids] == ["", "\ufffd<|bos|>", ""]
    assert stream.finish() == "\ufffd"
    assert stream.text == tokenizer.decode(ids, skip_special_tokens=False)
    stream = TextStream(tokenizer, [])
    assert [stream.push([token_id]) for token_id in ids] == ["", "", "é"]


def test_random_texts_random_chunks_random_stops(tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    num_stopped = 0
    for _ in range(400):
        ids = tokenizer.encode(random_text(rng), add_special_tokens=rng.random() < 0.5)
        stops = random_stops(rng, tokenizer.decode(ids))
        expected = reference(tokenizer, ids, stops)
        stream = stream_checked(tokenizer, random_chunks(rng, ids), stops, expected)
        assert "\ufffd" not in stream.text
        num_stopped += stream.stopped
        if stream.stopped:
            full_text = tokenizer.decode(ids)
            assert stream.stop_reason in stops
            assert full_text[len(expected) :].startswith(stream.stop_reason)
    assert 100 < num_stopped < 400  # both outcomes are exercised


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_random_chunks(tokenizer: Tokenizer, skip: bool) -> None:
    rng = random.Random(99 + skip)
    for _ in range(300):
        # Ids 128-255 are lone UTF-8 lead and continuation bytes: partial or invalid characters.
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 25))]
        stops = random_stops(rng, tokenizer.decode(ids, skip_special_tokens=skip))
        expected = reference(tokenizer, ids, stops, skip)
        stream_checked(tokenizer, random_chunks(rng, ids), stops, expected, skip)
