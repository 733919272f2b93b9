"""SamplingParams (pdserve.sampling): each field's range, checked once, and its wire form."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from pdserve.sampling import MAX_INT32, MAX_SEED, MAX_STOP_TOKEN_IDS, SamplingError, SamplingParams

EXPECTED = {
    "max_tokens": "an integer in [1, 2147483647] or None",
    "temperature": "a finite number >= 0",
    "top_p": "in (0, 1]",
    "top_k": "-1 or 0 (off) or an integer >= 1",
    "seed": f"an integer in [0, {MAX_SEED}] or None",
    "stop_token_ids": f"at most {MAX_STOP_TOKEN_IDS} token ids in [0, {MAX_INT32}]",
    "ignore_eos": "true or false",
    "output_logits": "true or false",
}

INVALID = [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.0), ("max_tokens", True),
    ("max_tokens", "8"),
    ("temperature", -0.1), ("temperature", -1), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", True), ("temperature", "0.5"),
    ("temperature", None),
    ("top_p", 0), ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.0000001), ("top_p", 2),
    ("top_p", math.nan), ("top_p", True), ("top_p", None),
    ("top_k", -2), ("top_k", MAX_INT32 + 1), ("top_k", 1.0), ("top_k", True), ("top_k", None),
    ("seed", -1), ("seed", MAX_SEED + 1), ("seed", 1.0), ("seed", True), ("seed", False),
    ("stop_token_ids", (-1,)), ("stop_token_ids", (MAX_INT32 + 1,)),
    ("stop_token_ids", (1, True)), ("stop_token_ids", (1.0,)), ("stop_token_ids", (1, "2")),
    ("stop_token_ids", tuple(range(MAX_STOP_TOKEN_IDS + 1))), ("stop_token_ids", "abc"),
    ("stop_token_ids", 5), ("stop_token_ids", None),
    ("ignore_eos", 1), ("ignore_eos", 0), ("ignore_eos", "yes"), ("ignore_eos", None),
    ("output_logits", 1), ("output_logits", "true"), ("output_logits", None),
]

VALID = [
    ("max_tokens", None), ("max_tokens", 1), ("max_tokens", 4096),
    ("temperature", 0), ("temperature", 0.0), ("temperature", 2),
    ("top_p", 1), ("top_p", 1e-9), ("top_p", 0.5),
    ("top_k", -1), ("top_k", 0), ("top_k", 1), ("top_k", MAX_INT32),
    ("seed", None), ("seed", 0), ("seed", MAX_SEED),
    ("stop_token_ids", ()), ("stop_token_ids", (0, MAX_INT32)),
    ("stop_token_ids", tuple(range(MAX_STOP_TOKEN_IDS))),
    ("ignore_eos", True), ("output_logits", True),
]


def test_defaults():
    params = SamplingParams()
    assert msgspec.structs.asdict(params) == {
        "max_tokens": 16, "temperature": 1.0, "top_k": -1, "top_p": 1.0, "seed": None,
        "stop_token_ids": (), "ignore_eos": False, "output_logits": False,
        "output_offset": 0}
    assert not params.is_greedy
    assert SamplingParams(temperature=0).is_greedy


@pytest.mark.parametrize("field,value", INVALID, ids=lambda v: repr(v)[:20])
def test_an_out_of_range_value_raises_sampling_error_naming_the_field(field: str, value: Any):
    with pytest.raises(SamplingError) as error:
        SamplingParams(**{field: value})
    assert error.value.field == field
    assert str(error.value) == f"{field}={value!r} is invalid: must be {EXPECTED[field]}"
    assert isinstance(error.value, ValueError)  # callers that catch ValueError still do


@pytest.mark.parametrize("field,value", VALID, ids=lambda v: repr(v)[:20])
def test_an_in_range_value_is_kept(field: str, value: Any):
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_the_first_bad_field_in_declaration_order_is_named():
    with pytest.raises(SamplingError) as error:
        SamplingParams(max_tokens=0, temperature=-1, top_p=0)
    assert error.value.field == "max_tokens"


def test_numbers_are_normalized():
    params = SamplingParams(temperature=2, top_p=1, stop_token_ids=[3, 4])
    assert (type(params.temperature), params.temperature) == (float, 2.0)
    assert (type(params.top_p), params.top_p) == (float, 1.0)
    assert params.stop_token_ids == (3, 4)  # a list becomes a tuple: the params hash


def test_params_are_frozen():
    params = SamplingParams()
    with pytest.raises(AttributeError):
        params.max_tokens = 0  # type: ignore[misc]
    assert hash(params) == hash(SamplingParams())


def test_with_max_tokens_replaces_only_max_tokens():
    params = SamplingParams(max_tokens=None, temperature=0.5, top_k=40, top_p=0.9, seed=7,
                            stop_token_ids=(2,), ignore_eos=True, output_logits=True)
    resolved = params.with_max_tokens(12)
    assert resolved == SamplingParams(max_tokens=12, temperature=0.5, top_k=40, top_p=0.9,
                                      seed=7, stop_token_ids=(2,), ignore_eos=True,
                                      output_logits=True)
    assert params.max_tokens is None  # the original is unchanged


@pytest.mark.parametrize("max_tokens", [0, -3, True])
def test_with_max_tokens_checks_the_new_value(max_tokens: Any):
    with pytest.raises(SamplingError) as error:
        SamplingParams().with_max_tokens(max_tokens)
    assert error.value.field == "max_tokens"


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(max_tokens=None, temperature=0),
    SamplingParams(max_tokens=8, temperature=0.5, top_k=40, top_p=0.9, seed=MAX_SEED,
                   stop_token_ids=(0, MAX_INT32), ignore_eos=True, output_logits=True),
], ids=["defaults", "greedy-unbounded", "every-field"])
def test_msgpack_round_trip(params: SamplingParams):
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded == params
    assert type(decoded.stop_token_ids) is tuple


def test_the_wire_form_is_an_array_in_field_order():
    params = SamplingParams(max_tokens=8, temperature=0.5, top_k=40, top_p=0.25, seed=7,
                            stop_token_ids=(3,), ignore_eos=True, output_logits=False)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(params)) == [
        8, 0.5, 40, 0.25, 7, [3], True, False, 0]


@pytest.mark.parametrize("values,reason", [
    ([0, 1.0, -1, 1.0, None, [], False, False],
     "max_tokens=0 is invalid: must be an integer in [1, 2147483647] or None"),
    ([8, 1.0, -1, 1.5, None, [], False, False], "top_p=1.5 is invalid: must be in (0, 1]"),
    ([8, 1.0, -1, 1.0, None, [], 1, False], "Expected `bool`, got `int` - at `$[6]`"),
    ([True, 1.0, -1, 1.0, None, [], False, False],
     "Expected `int | null`, got `bool` - at `$[0]`"),
], ids=["max-tokens", "top-p", "bool-as-int", "int-as-bool"])
def test_decoding_runs_the_same_checks(values: list, reason: str):
    with pytest.raises(msgspec.ValidationError) as error:
        msgspec.msgpack.decode(msgspec.msgpack.encode(values), type=SamplingParams)
    assert str(error.value) == reason


def test_decoding_fills_trailing_defaults():
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode([8, 0.5]), type=SamplingParams)
    assert decoded == SamplingParams(max_tokens=8, temperature=0.5)


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_a_huge_int_is_a_sampling_error_not_an_overflow(field):
    with pytest.raises(SamplingError) as error:
        SamplingParams(**{field: 10**400})
    assert error.value.field == field


def test_max_tokens_beyond_int32_is_refused_before_it_reaches_the_wire():
    with pytest.raises(SamplingError) as error:
        SamplingParams(max_tokens=2**64)
    assert error.value.field == "max_tokens"
