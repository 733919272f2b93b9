"""The load generator's workloads and arrival times: deterministic, exact lengths, real sharing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.arrivals import (
    ScheduledRequest,
    arrivals_until,
    gamma_arrivals,
    poisson_arrivals,
    schedule,
)
from bench.workloads import (
    BenchRequest,
    mixed_requests,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
    trace_requests,
)


def _token_ids(request: BenchRequest) -> list[int]:
    assert isinstance(request.prompt, list)
    return request.prompt


# --- random prompts -----------------------------------------------------------------------------

def test_random_requests_are_deterministic_for_a_seed() -> None:
    first = random_requests(20, 32, 8, 0.5, seed=1)
    assert random_requests(20, 32, 8, 0.5, seed=1) == first
    assert random_requests(20, 32, 8, 0.5, seed=2) != first


def test_random_requests_without_range_have_exact_lengths_and_ids_in_range() -> None:
    requests = random_requests(50, 17, 5, 0.0, seed=0)
    assert len(requests) == 50
    for request in requests:
        assert request.num_prompt_tokens == len(_token_ids(request)) == 17
        assert request.max_tokens == 5
        assert request.arrival_s is None
        assert all(10 <= token_id < 500 for token_id in _token_ids(request))


def test_random_request_lengths_stay_within_the_ratio() -> None:
    requests = random_requests(400, 100, 10, 0.5, seed=3)
    input_lengths = {request.num_prompt_tokens for request in requests}
    output_lengths = {request.max_tokens for request in requests}
    assert min(input_lengths) >= 50 and max(input_lengths) <= 150 and len(input_lengths) > 50
    assert min(output_lengths) >= 5 and max(output_lengths) <= 15
    assert all(len(_token_ids(request)) == request.num_prompt_tokens for request in requests)


def test_random_request_lengths_are_at_least_one() -> None:
    requests = random_requests(200, 1, 1, 1.0, seed=0)
    assert {request.num_prompt_tokens for request in requests} == {1, 2}
    assert {request.max_tokens for request in requests} == {1, 2}


def test_random_requests_draw_from_the_given_token_range() -> None:
    requests = random_requests(10, 64, 4, 0.0, seed=0, token_range=(3, 5))
    assert {token_id for request in requests for token_id in _token_ids(request)} == {3, 4}


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num": 0}, "num"),
    ({"input_len": -1}, "input_len"),
    ({"output_len": 0}, "output_len"),
    ({"range_ratio": 1.5}, "range_ratio"),
    ({"range_ratio": -0.1}, "range_ratio"),
    ({"token_range": (5, 5)}, "token_range"),
    ({"token_range": (-1, 3)}, "token_range"),
])
def test_random_requests_refuse_bad_arguments(kwargs: dict, name: str) -> None:
    arguments = {"num": 4, "input_len": 8, "output_len": 2, "range_ratio": 0.0, "seed": 0}
    with pytest.raises(ValueError, match=name):
        random_requests(**(arguments | kwargs))


# --- shared prefixes ----------------------------------------------------------------------------

def test_shared_prefix_requests_interleave_groups_sharing_their_prefix() -> None:
    requests = shared_prefix_requests(3, 4, prefix_len=16, suffix_len=5, output_len=7, seed=0)
    assert len(requests) == 12
    prefixes = [tuple(_token_ids(request)[:16]) for request in requests]
    assert len(set(prefixes[:3])) == 3  # one prompt of each group, each its own prefix
    assert prefixes == prefixes[:3] * 4  # group 0, 1, 2, then 0, 1, 2 again, ...
    suffixes = {tuple(_token_ids(request)[16:]) for request in requests}
    assert len(suffixes) == 12
    for request in requests:
        assert request.num_prompt_tokens == len(_token_ids(request)) == 21
        assert request.max_tokens == 7


def test_shared_prefix_requests_shuffle_only_when_asked() -> None:
    ordered = shared_prefix_requests(4, 5, 8, 4, 2, seed=9)
    shuffled = shared_prefix_requests(4, 5, 8, 4, 2, seed=9, shuffle=True)
    assert shuffled != ordered
    assert sorted(map(_token_ids, shuffled)) == sorted(map(_token_ids, ordered))
    assert shared_prefix_requests(4, 5, 8, 4, 2, seed=9, shuffle=True) == shuffled
    assert shared_prefix_requests(4, 5, 8, 4, 2, seed=10) != ordered


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num_groups": 0}, "num_groups"),
    ({"prompts_per_group": 0}, "prompts_per_group"),
    ({"prefix_len": -1}, "prefix_len"),
    ({"suffix_len": -2}, "suffix_len"),
    ({"prefix_len": 0, "suffix_len": 0}, "prefix_len \\+ suffix_len"),
    ({"output_len": 0}, "output_len"),
    ({"token_range": (500, 10)}, "token_range"),
])
def test_shared_prefix_requests_refuse_bad_arguments(kwargs: dict, name: str) -> None:
    arguments = {"num_groups": 2, "prompts_per_group": 2, "prefix_len": 4, "suffix_len": 2,
                 "output_len": 3, "seed": 0}
    with pytest.raises(ValueError, match=name):
        shared_prefix_requests(**(arguments | kwargs))


# --- mixed --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shared_fraction", "num_shared"),
                         [(0.0, 0), (0.25, 3), (0.5, 5), (0.3, 3), (1.0, 10)])
def test_mixed_requests_hold_the_rounded_shared_fraction(shared_fraction: float,
                                                         num_shared: int) -> None:
    requests = mixed_requests(10, short_len=8, output_len=3, shared_fraction=shared_fraction,
                              num_groups=2, prefix_len=16, suffix_len=4, seed=0)
    shared = [request for request in requests if request.num_prompt_tokens == 20]
    short = [request for request in requests if request.num_prompt_tokens == 8]
    assert (len(shared), len(short)) == (num_shared, 10 - num_shared)
    assert all(len(_token_ids(request)) == request.num_prompt_tokens for request in requests)
    assert all(request.max_tokens == 3 for request in requests)


def test_mixed_requests_draw_prefixes_round_robin_in_shuffled_positions() -> None:
    requests = mixed_requests(12, 8, 3, 0.5, num_groups=3, prefix_len=16, suffix_len=4, seed=5)
    is_shared = [request.num_prompt_tokens == 20 for request in requests]
    assert is_shared != sorted(is_shared, reverse=True)
    prefixes = [tuple(_token_ids(request)[:16])
                for request in requests if request.num_prompt_tokens == 20]
    assert sorted(prefixes.count(prefix) for prefix in set(prefixes)) == [2, 2, 2]
    assert mixed_requests(12, 8, 3, 0.5, 3, 16, 4, seed=5) == requests
    assert mixed_requests(12, 8, 3, 0.5, 3, 16, 4, seed=6) != requests


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num": 0}, "num"),
    ({"short_len": 0}, "short_len"),
    ({"shared_fraction": 1.01}, "shared_fraction"),
    ({"num_groups": 0}, "num_groups"),
    ({"suffix_len": -1}, "suffix_len"),
])
def test_mixed_requests_refuse_bad_arguments(kwargs: dict, name: str) -> None:
    arguments = {"num": 4, "short_len": 8, "output_len": 2, "shared_fraction": 0.5,
                 "num_groups": 2, "prefix_len": 4, "suffix_len": 2, "seed": 0}
    with pytest.raises(ValueError, match=name):
        mixed_requests(**(arguments | kwargs))


# --- ShareGPT -----------------------------------------------------------------------------------

SHAREGPT = [
    {"conversations": [{"from": "human", "value": "first prompt, 24 chars.."},
                       {"from": "gpt", "value": "r" * 40}]},
    {"conversation": [{"role": "user", "content": "second prompt"},
                      {"role": "assistant", "content": "r" * 9}]},
    {"conversations": [{"from": "system", "value": "be brief"},
                       {"from": "human", "value": "third prompt"},
                       {"from": "gpt", "value": "r" * 3}]},
    {"conversations": [{"from": "human", "value": "only one turn"}]},
    {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "reply"}]},
    {"conversations": [{"from": "human", "value": "no reply"}, {"from": "gpt", "value": ""}]},
    {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
    {"conversations": "not a list"},
    "not a conversation",
]
USABLE = {"first prompt, 24 chars..": 10, "second prompt": 2, "third prompt": 1}


def _write_json(tmp_path: Path, data: object, name: str = "sharegpt.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_takes_the_first_exchange_of_each_usable_conversation(tmp_path: Path) -> None:
    path = _write_json(tmp_path, SHAREGPT)
    requests = sharegpt_requests(path, 3, seed=0)
    assert {request.prompt: request.max_tokens for request in requests} == USABLE
    assert all(request.num_prompt_tokens == -1 for request in requests)
    assert sharegpt_requests(path, 3, seed=0) == requests


def test_sharegpt_samples_with_the_seed_and_cycles_when_short(tmp_path: Path) -> None:
    conversations = [{"conversations": [{"from": "human", "value": f"prompt {index}"},
                                        {"from": "gpt", "value": "reply"}]}
                     for index in range(20)]
    path = _write_json(tmp_path, conversations)
    sample = [request.prompt for request in sharegpt_requests(path, 10, seed=0)]
    assert len(set(sample)) == 10
    assert [request.prompt for request in sharegpt_requests(path, 10, seed=1)] != sample
    cycled = [request.prompt for request in sharegpt_requests(path, 45, seed=0)]
    assert cycled == cycled[:20] * 2 + cycled[:5]
    assert len(set(cycled[:20])) == 20


def test_sharegpt_skips_conversations_over_the_max_lengths(tmp_path: Path) -> None:
    path = _write_json(tmp_path, SHAREGPT)
    # Without a tokenizer the prompt length is estimated at 4 characters a token: 24 -> 6.
    kept = sharegpt_requests(path, 3, seed=0, max_input_len=5)
    assert {request.prompt for request in kept} == {"second prompt", "third prompt"}
    kept = sharegpt_requests(path, 3, seed=0, max_output_len=2)
    assert {request.prompt for request in kept} == {"second prompt", "third prompt"}


def test_sharegpt_fixed_output_len_replaces_the_reply_length(tmp_path: Path) -> None:
    path = _write_json(tmp_path, SHAREGPT)
    requests = sharegpt_requests(path, 3, seed=0, fixed_output_len=64)
    assert [request.max_tokens for request in requests] == [64, 64, 64]
    with pytest.raises(ValueError, match="no usable conversation"):
        sharegpt_requests(path, 3, seed=0, fixed_output_len=64, max_output_len=32)


def test_sharegpt_counts_tokens_with_a_tokenizer(tmp_path: Path, tiny_tokenizer) -> None:
    path = _write_json(tmp_path, SHAREGPT)
    requests = sharegpt_requests(path, 3, seed=0, tokenizer=tiny_tokenizer)
    replies = {"first prompt, 24 chars..": "r" * 40, "second prompt": "r" * 9,
               "third prompt": "r" * 3}
    for request in requests:
        assert isinstance(request.prompt, str)
        assert request.num_prompt_tokens == len(tiny_tokenizer.encode(request.prompt))
        reply = tiny_tokenizer.encode(replies[request.prompt], add_special_tokens=False)
        assert request.max_tokens == len(reply)
    longest = max(request.num_prompt_tokens for request in requests)
    kept = sharegpt_requests(path, 3, seed=0, tokenizer=tiny_tokenizer,
                             max_input_len=longest - 1)
    assert longest not in {request.num_prompt_tokens for request in kept}


def test_sharegpt_refuses_bad_files_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.json: No such file"):
        sharegpt_requests(tmp_path / "missing.json", 1, seed=0)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": ')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        sharegpt_requests(broken, 1, seed=0)
    with pytest.raises(ValueError, match="object.json must hold a JSON list.*dict"):
        sharegpt_requests(_write_json(tmp_path, {"a": 1}, "object.json"), 1, seed=0)
    with pytest.raises(ValueError, match="useless.json: no usable conversation among 6"):
        sharegpt_requests(_write_json(tmp_path, SHAREGPT[3:], "useless.json"), 1, seed=0)
    with pytest.raises(ValueError, match="num"):
        sharegpt_requests(_write_json(tmp_path, SHAREGPT), 0, seed=0)


# --- trace replay -------------------------------------------------------------------------------

TRACE = [
    {"timestamp": 1000, "input_length": 10, "output_length": 3, "hash_ids": [1, 2]},
    {"timestamp": 1500, "input_length": 6, "output_length": 2, "hash_ids": [1, 3, 4]},
    {"timestamp": 3000, "input_length": 5, "output_length": 1},
]


def _write_trace(tmp_path: Path, lines: list, name: str = "trace.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                            for line in lines))
    return path


def test_trace_replays_times_and_lengths(tmp_path: Path) -> None:
    path = _write_trace(tmp_path, [TRACE[0], "\n", TRACE[1], TRACE[2]])
    requests = trace_requests(path, block_size=4, time_scale=0.5)
    assert [request.arrival_s for request in requests] == [0.0, 0.25, 1.0]
    assert [request.num_prompt_tokens for request in requests] == [10, 6, 5]
    assert [len(_token_ids(request)) for request in requests] == [10, 6, 5]
    assert [request.max_tokens for request in requests] == [3, 2, 1]
    assert trace_requests(path, block_size=4, time_scale=0.5) == requests
    assert [request.arrival_s for request in trace_requests(path, num=2)] == [0.0, 0.5]


def test_trace_equal_hash_ids_give_equal_blocks(tmp_path: Path) -> None:
    path = _write_trace(tmp_path, TRACE)
    first, second, _ = trace_requests(path, block_size=4)
    assert _token_ids(first)[:4] == _token_ids(second)[:4]  # hash id 1
    assert _token_ids(first)[4:6] != _token_ids(second)[4:6]  # hash ids 2 and 3
    # A block depends on its hash id and the seed only, not on where it appears.
    alone = _write_trace(tmp_path, [{"timestamp": 0, "input_length": 4, "output_length": 1,
                                     "hash_ids": [2]}], "alone.jsonl")
    assert _token_ids(trace_requests(alone, block_size=4)[0]) == _token_ids(first)[4:8]
    assert _token_ids(trace_requests(alone, block_size=4, seed=1)[0]) != _token_ids(first)[4:8]


def test_trace_pads_short_hash_coverage_with_request_specific_ids(tmp_path: Path) -> None:
    path = _write_trace(tmp_path, [
        {"timestamp": 0, "input_length": 7, "output_length": 1, "hash_ids": [5]},
        {"timestamp": 0, "input_length": 7, "output_length": 1, "hash_ids": [5]},
    ])
    first, second = trace_requests(path, block_size=4, token_range=(0, 1000))
    assert _token_ids(first)[:4] == _token_ids(second)[:4]
    assert _token_ids(first)[4:] != _token_ids(second)[4:]
    assert all(0 <= token_id < 1000 for token_id in _token_ids(first) + _token_ids(second))


@pytest.mark.parametrize(("bad_line", "message"), [
    ("{not json\n", "not valid JSON"),
    ('[1, 2]\n', "expected a JSON object"),
    ({"timestamp": "soon", "input_length": 4, "output_length": 1}, "timestamp"),
    ({"timestamp": 4000, "output_length": 1}, "input_length"),
    ({"timestamp": 4000, "input_length": 4, "output_length": 0}, "output_length"),
    ({"timestamp": 4000, "input_length": 4, "output_length": 1, "hash_ids": [1, "x"]},
     "hash_ids"),
    ({"timestamp": 500, "input_length": 4, "output_length": 1}, "time order"),
])
def test_trace_bad_lines_name_the_file_and_line(tmp_path: Path, bad_line: object,
                                                message: str) -> None:
    path = _write_trace(tmp_path, [TRACE[0], TRACE[1], bad_line])
    with pytest.raises(ValueError, match=f"trace.jsonl, line 3: .*{message}"):
        trace_requests(path)
    assert len(trace_requests(path, num=2)) == 2  # lines past num are not read


def test_trace_refuses_missing_or_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gone.jsonl: No such file"):
        trace_requests(tmp_path / "gone.jsonl")
    with pytest.raises(ValueError, match="empty.jsonl holds no requests"):
        trace_requests(_write_trace(tmp_path, ["\n"], "empty.jsonl"))
    path = _write_trace(tmp_path, TRACE)
    for kwargs, name in (({"block_size": 0}, "block_size"), ({"time_scale": -1.0}, "time_scale"),
                         ({"num": 0}, "num"), ({"token_range": (3, 2)}, "token_range")):
        with pytest.raises(ValueError, match=name):
            trace_requests(path, **kwargs)


# --- arrivals -----------------------------------------------------------------------------------

def test_poisson_arrivals_are_seeded_increasing_offsets() -> None:
    offsets = poisson_arrivals(1000, rate=4.0, seed=0)
    assert len(offsets) == 1000
    assert offsets[0] > 0
    assert all(later >= earlier for earlier, later in zip(offsets, offsets[1:], strict=False))
    assert poisson_arrivals(1000, 4.0, seed=0) == offsets
    assert poisson_arrivals(1000, 4.0, seed=1) != offsets
    assert gamma_arrivals(1000, 4.0, 1.0, seed=0) == offsets  # burstiness 1 is Poisson


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 3.0])
def test_arrival_gaps_average_one_over_the_rate(burstiness: float) -> None:
    offsets = gamma_arrivals(20000, rate=8.0, burstiness=burstiness, seed=0)
    # The standard error of the mean gap is at most 1.5% of it here; 5% never flakes.
    assert abs(offsets[-1] / 20000 - 1 / 8.0) < 0.05 / 8.0


def test_burstier_arrivals_have_more_spread_gaps() -> None:
    def gap_variance(burstiness: float) -> float:
        offsets = gamma_arrivals(20000, 8.0, burstiness, seed=0)
        gaps = [later - earlier for earlier, later in zip([0.0, *offsets], offsets, strict=False)]
        mean = sum(gaps) / len(gaps)
        return sum((gap - mean) ** 2 for gap in gaps) / len(gaps)

    # Gamma gaps have variance 1 / (rate^2 * burstiness): 1/32, 1/64, 1/192.
    assert gap_variance(0.5) > gap_variance(1.0) > gap_variance(3.0)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert poisson_arrivals(5, math.inf, seed=0) == [0.0] * 5
    assert gamma_arrivals(3, math.inf, 0.5, seed=0) == [0.0] * 3
    assert gamma_arrivals(0, 2.0, 1.0, seed=0) == []


@pytest.mark.parametrize(("num", "rate", "burstiness", "name"), [
    (-1, 1.0, 1.0, "num"),
    (3, 0.0, 1.0, "rate"),
    (3, -2.0, 1.0, "rate"),
    (3, math.nan, 1.0, "rate"),
    (3, 1.0, 0.0, "burstiness"),
    (3, 1.0, math.inf, "burstiness"),
])
def test_arrivals_refuse_bad_arguments(num: int, rate: float, burstiness: float,
                                       name: str) -> None:
    with pytest.raises(ValueError, match=name):
        gamma_arrivals(num, rate, burstiness, seed=0)


def test_arrivals_until_is_the_prefix_below_the_duration() -> None:
    offsets = arrivals_until(10.0, rate=5.0, burstiness=0.5, seed=3)
    assert offsets == gamma_arrivals(len(offsets), 5.0, 0.5, seed=3)
    assert offsets[-1] < 10.0 <= gamma_arrivals(len(offsets) + 1, 5.0, 0.5, seed=3)[-1]
    with pytest.raises(ValueError, match="rate must be finite"):
        arrivals_until(10.0, math.inf, 1.0, seed=0)
    with pytest.raises(ValueError, match="duration_s"):
        arrivals_until(0.0, 1.0, 1.0, seed=0)


def test_schedule_keeps_trace_times_and_draws_the_rest() -> None:
    timed = [BenchRequest([1], 1, 1, arrival_s=0.5), BenchRequest([2], 1, 1, arrival_s=0.0)]
    untimed = random_requests(3, 4, 1, 0.0, seed=0)
    scheduled = schedule([timed[0], untimed[0], timed[1], untimed[1], untimed[2]], 2.0, 1.0,
                         seed=4)
    drawn = poisson_arrivals(3, 2.0, seed=4)
    assert [item.offset_s for item in scheduled] == sorted([0.5, 0.0, *drawn])
    assert {(item.offset_s, id(item.request)) for item in scheduled} == (
        {(0.5, id(timed[0])), (0.0, id(timed[1]))}
        | {(offset, id(request)) for offset, request in zip(drawn, untimed, strict=True)})
    assert all(isinstance(item, ScheduledRequest) for item in scheduled)


def test_schedule_at_infinite_rate_keeps_the_requests_order() -> None:
    requests = random_requests(4, 4, 1, 0.0, seed=0)
    scheduled = schedule(requests, math.inf, 1.0, seed=0)
    assert scheduled == [(0.0, request) for request in requests]
