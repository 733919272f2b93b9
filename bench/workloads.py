"""Requests to send: random prompts, shared-prefix groups, ShareGPT samples and trace replays.

Every generator is deterministic for its seed, so two runs side by side send the same prompts.
Synthetic prompts are token ids drawn from ``token_range`` (half-open): the default suits the
embedded tiny model (vocabulary 512) as well as any real one.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.tokenizer import Tokenizer

DEFAULT_TOKEN_RANGE = (10, 500)
HUMAN_ROLES = frozenset({"human", "user"})
MODEL_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "model"})
# Lengths scaled by range_ratio land on products such as 100 * 0.93 = 93.00000000000001.
_LENGTH_TOLERANCE = 1e-9


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a benchmark: an OpenAI completions prompt and the exact number of tokens
    to ask for (the runner sends ``ignore_eos``)."""

    prompt: str | list[int]
    num_prompt_tokens: int  # exact for token ids; for text, -1 unless a tokenizer counted it
    max_tokens: int
    arrival_s: float | None = None  # trace replay: offset from the start; None: arrivals decide


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[BenchRequest]:
    """``num`` prompts of random token ids; each length uniform in
    [len * (1 - range_ratio), len * (1 + range_ratio)], at least 1."""
    _require_at_least("num", num, 1)
    _require_at_least("input_len", input_len, 1)
    _require_at_least("output_len", output_len, 1)
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range_ratio must be in [0, 1], got {range_ratio!r}")
    vocab = _token_population(token_range)
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        num_prompt_tokens = _draw_length(rng, input_len, range_ratio)
        max_tokens = _draw_length(rng, output_len, range_ratio)
        requests.append(BenchRequest(rng.choices(vocab, k=num_prompt_tokens),
                                     num_prompt_tokens, max_tokens))
    return requests


def shared_prefix_requests(num_groups: int, prompts_per_group: int, prefix_len: int,
                           suffix_len: int, output_len: int, seed: int,
                           token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
                           shuffle: bool = False) -> list[BenchRequest]:
    """Groups of prompts sharing a random system prefix, each with its own random suffix.

    Interleaved (group 0 prompt 0, group 1 prompt 0, ..., group 0 prompt 1, ...) so that a
    group's later prompts arrive after its first has been prefilled; shuffled if asked.
    """
    _require_at_least("num_groups", num_groups, 1)
    _require_at_least("prompts_per_group", prompts_per_group, 1)
    _check_prompt_parts(prefix_len, suffix_len)
    _require_at_least("output_len", output_len, 1)
    vocab = _token_population(token_range)
    rng = random.Random(seed)
    prefixes = [rng.choices(vocab, k=prefix_len) for _ in range(num_groups)]
    requests = [_with_suffix(rng, vocab, prefixes[group], suffix_len, output_len)
                for _ in range(prompts_per_group) for group in range(num_groups)]
    if shuffle:
        rng.shuffle(requests)
    return requests


def mixed_requests(num: int, short_len: int, output_len: int, shared_fraction: float,
                   num_groups: int, prefix_len: int, suffix_len: int, seed: int,
                   token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[BenchRequest]:
    """Short random prompts mixed with shared-prefix ones, in shuffled positions.

    round(num * shared_fraction) (halves up) are prefix + suffix prompts taken round-robin from
    ``num_groups`` groups; the rest are random prompts of ``short_len`` tokens.
    """
    _require_at_least("num", num, 1)
    _require_at_least("short_len", short_len, 1)
    _require_at_least("output_len", output_len, 1)
    if not 0.0 <= shared_fraction <= 1.0:
        raise ValueError(f"shared_fraction must be in [0, 1], got {shared_fraction!r}")
    _require_at_least("num_groups", num_groups, 1)
    _check_prompt_parts(prefix_len, suffix_len)
    vocab = _token_population(token_range)
    rng = random.Random(seed)
    num_shared = math.floor(num * shared_fraction + 0.5)
    prefixes = [rng.choices(vocab, k=prefix_len) for _ in range(num_groups)]
    requests = [_with_suffix(rng, vocab, prefixes[index % num_groups], suffix_len, output_len)
                for index in range(num_shared)]
    requests += [BenchRequest(rng.choices(vocab, k=short_len), short_len, output_len)
                 for _ in range(num - num_shared)]
    rng.shuffle(requests)
    return requests


def sharegpt_requests(path: str | Path, num: int, seed: int, tokenizer: Tokenizer | None = None,
                      max_input_len: int | None = None, max_output_len: int | None = None,
                      fixed_output_len: int | None = None) -> list[BenchRequest]:
    """``num`` text prompts sampled from a ShareGPT-format JSON file.

    Each conversation gives its first human turn as the prompt and the first model turn after
    it as the output length: counted by ``tokenizer``, else estimated as 4 characters a token
    (the estimate also applies ``max_input_len`` without a tokenizer). ``fixed_output_len``
    replaces that length, and ``max_output_len`` applies to what is asked for. Sampled without
    replacement while enough conversations are usable, then cycled.
    """
    _require_at_least("num", num, 1)
    for name, value in (("max_input_len", max_input_len), ("max_output_len", max_output_len),
                        ("fixed_output_len", fixed_output_len)):
        if value is not None:
            _require_at_least(name, value, 1)
    entries = _read_json_list(path)
    rng = random.Random(seed)
    order = list(range(len(entries)))
    rng.shuffle(order)
    usable: list[BenchRequest] = []
    for index in order:  # tokenizes only as many conversations as it needs
        request = _sharegpt_request(entries[index], tokenizer, fixed_output_len)
        if request is None or _exceeds(request, max_input_len, max_output_len):
            continue
        usable.append(request)
        if len(usable) == num:
            return usable
    if not usable:
        raise ValueError(f"{path}: no usable conversation among {len(entries)} (each needs a "
                         f"non-empty human turn then a model turn, within max_input_len="
                         f"{max_input_len} and max_output_len={max_output_len})")
    return [usable[index % len(usable)] for index in range(num)]


def trace_requests(path: str | Path, num: int | None = None, block_size: int = 512,
                   time_scale: float = 1.0, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
                   seed: int = 0) -> list[BenchRequest]:
    """Replay a JSONL trace in the Mooncake format, one request a line:
    {"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [id, ...]}.

    Each hash id stands for a block of ``block_size`` token ids derived from the id and the seed
    alone, so requests sharing hash ids share prefixes. The blocks are cut to ``input_length``,
    or padded with the request's own random ids. ``time_scale`` stretches the arrival offsets
    (0.5 replays twice as fast).
    """
    if num is not None:
        _require_at_least("num", num, 1)
    _require_at_least("block_size", block_size, 1)
    if not (math.isfinite(time_scale) and time_scale >= 0):
        raise ValueError(f"time_scale must be finite and >= 0, got {time_scale!r}")
    vocab = _token_population(token_range)
    entries = _read_trace(path, num)
    rng = random.Random(seed)
    first_ms = entries[0].timestamp_ms
    requests = []
    for entry in entries:
        prompt: list[int] = []
        for hash_id in entry.hash_ids:
            if len(prompt) >= entry.input_length:
                break
            prompt += _hash_block(hash_id, seed, block_size, vocab)
        del prompt[entry.input_length:]
        prompt += rng.choices(vocab, k=entry.input_length - len(prompt))
        arrival_s = (entry.timestamp_ms - first_ms) / 1000 * time_scale
        requests.append(BenchRequest(prompt, entry.input_length, entry.output_length, arrival_s))
    return requests


def _hash_block(hash_id: int, seed: int, block_size: int, vocab: range) -> list[int]:
    """The token ids a trace's hash id stands for: a string seed hashes the same in every
    process (unlike ``hash()``), so equal ids give equal blocks across runs."""
    return random.Random(f"pdserve-trace:{seed}:{hash_id}").choices(vocab, k=block_size)


def _require_at_least(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_prompt_parts(prefix_len: int, suffix_len: int) -> None:
    _require_at_least("prefix_len", prefix_len, 0)
    _require_at_least("suffix_len", suffix_len, 0)
    if prefix_len + suffix_len == 0:
        raise ValueError("prefix_len + suffix_len must be >= 1: a prompt needs a token")


def _token_population(token_range: tuple[int, int]) -> range:
    if (len(token_range) != 2 or not all(_is_int(bound) for bound in token_range)
            or not 0 <= token_range[0] < token_range[1]):
        raise ValueError(f"token_range must be (low, high) with 0 <= low < high, "
                         f"got {token_range!r}")
    return range(token_range[0], token_range[1])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _draw_length(rng: random.Random, length: int, range_ratio: float) -> int:
    low = max(1, math.ceil(length * (1 - range_ratio) - _LENGTH_TOLERANCE))
    high = max(low, math.floor(length * (1 + range_ratio) + _LENGTH_TOLERANCE))
    return rng.randint(low, high)


def _with_suffix(rng: random.Random, vocab: range, prefix: list[int], suffix_len: int,
                 output_len: int) -> BenchRequest:
    prompt = prefix + rng.choices(vocab, k=suffix_len)
    return BenchRequest(prompt, len(prompt), output_len)


def _read_json_list(path: str | Path) -> list[Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read ShareGPT file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"cannot read ShareGPT file {path}: not UTF-8 ({error.reason} at "
                         f"byte {error.start})") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error.msg} at line {error.lineno} "
                         f"column {error.colno}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold a JSON list of conversations, "
                         f"found a {type(entries).__name__}")
    return entries


def _sharegpt_request(entry: Any, tokenizer: Tokenizer | None,
                      fixed_output_len: int | None) -> BenchRequest | None:
    """The entry's first exchange as a request, or None when it has none usable."""
    exchange = _first_exchange(entry)
    if exchange is None:
        return None
    prompt, reply = exchange
    num_prompt_tokens = -1 if tokenizer is None else len(tokenizer.encode(prompt))
    if fixed_output_len is not None:
        max_tokens = fixed_output_len
    elif tokenizer is None:
        max_tokens = max(1, len(reply) // 4)
    else:
        max_tokens = max(1, len(tokenizer.encode(reply, add_special_tokens=False)))
    return BenchRequest(prompt, num_prompt_tokens, max_tokens)


def _exceeds(request: BenchRequest, max_input_len: int | None,
             max_output_len: int | None) -> bool:
    num_input_tokens = request.num_prompt_tokens
    if num_input_tokens < 0:
        num_input_tokens = max(1, len(request.prompt) // 4)
    return ((max_input_len is not None and num_input_tokens > max_input_len)
            or (max_output_len is not None and request.max_tokens > max_output_len))


def _first_exchange(entry: Any) -> tuple[str, str] | None:
    """(first human text, first model text after it), both non-empty, or None."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations", entry.get("conversation"))
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    roles_and_texts = [_role_and_text(turn) for turn in turns]
    human = next((index for index, (role, _) in enumerate(roles_and_texts)
                  if role in HUMAN_ROLES), None)
    if human is None:
        return None
    reply = next((text for role, text in roles_and_texts[human + 1:] if role in MODEL_ROLES),
                 None)
    prompt = roles_and_texts[human][1]
    if not prompt.strip() or reply is None or not reply.strip():
        return None
    return prompt, reply


def _role_and_text(turn: Any) -> tuple[str, str]:
    if not isinstance(turn, dict):
        return "", ""
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    return (role.lower() if isinstance(role, str) else "",
            text if isinstance(text, str) else "")


@dataclass(frozen=True, slots=True)
class _TraceEntry:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _read_trace(path: str | Path, num: int | None) -> list[_TraceEntry]:
    """The first ``num`` entries (all when None) of a JSONL trace, in non-decreasing time."""
    entries: list[_TraceEntry] = []
    try:
        with open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if num is not None and len(entries) == num:
                    break
                if not line.strip():
                    continue
                try:
                    entry = _parse_trace_line(line, entries[-1] if entries else None)
                except ValueError as error:
                    raise ValueError(f"{path}, line {line_number}: {error}") from None
                entries.append(entry)
    except OSError as error:
        raise ValueError(f"cannot read trace file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"cannot read trace file {path}: not UTF-8 ({error.reason})") from None
    if not entries:
        raise ValueError(f"trace file {path} holds no requests: expected one JSON object a line")
    return entries


def _parse_trace_line(line: str, previous: _TraceEntry | None) -> _TraceEntry:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    timestamp_ms = data.get("timestamp")
    if (isinstance(timestamp_ms, bool) or not isinstance(timestamp_ms, (int, float))
            or not math.isfinite(timestamp_ms)):
        raise ValueError(f"timestamp must be a number of milliseconds, got {timestamp_ms!r}")
    if previous is not None and timestamp_ms < previous.timestamp_ms:
        raise ValueError(f"timestamp {timestamp_ms} is earlier than the line before's "
                         f"{previous.timestamp_ms}: the trace must be in time order")
    for name in ("input_length", "output_length"):
        if not _is_int(data.get(name)) or data[name] < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {data.get(name)!r}")
    hash_ids = data.get("hash_ids", [])
    if not isinstance(hash_ids, list):
        raise ValueError(f"hash_ids must be a list of integers, got a {type(hash_ids).__name__}")
    bad = [hash_id for hash_id in hash_ids if not _is_int(hash_id)]
    if bad:
        raise ValueError(f"hash_ids must be a list of integers, it holds {bad[0]!r}")
    return _TraceEntry(timestamp_ms, data["input_length"], data["output_length"],
                       tuple(hash_ids))
