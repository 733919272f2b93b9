"""Benchmark statistics on hand-built records: percentiles, TPOT, summaries and SLOs.

Times are binary fractions (0.25, 0.5, ...) wherever a value is compared exactly; an
interpolated percentile such as 0.9 has no exact binary form, so it is compared to 1e-12.
"""

from __future__ import annotations

import json

import pytest

from bench.stats import (
    RequestRecord,
    attainment,
    attainment_vs_scale,
    meets_slo,
    percentile,
    summarize,
    tpot_s,
)


def _ok(num_output_tokens: int, ttft_s: float, e2e_s: float, itl_s: tuple[float, ...] = (),
        num_prompt_tokens: int = 10, start_s: float = 0.0) -> RequestRecord:
    return RequestRecord(True, "", num_prompt_tokens, num_output_tokens, start_s, ttft_s, e2e_s,
                         itl_s)


def _failed(error: str, start_s: float = 0.0) -> RequestRecord:
    return RequestRecord(False, error, 8, 0, start_s)


# ttft 0.5, tpot 0.25; ttft 1.0, tpot 0.5; one token with ttft 0.25; then three errors.
RECORDS = (
    _ok(5, 0.5, 1.5, (0.25, 0.25, 0.25, 0.25), num_prompt_tokens=10),
    _ok(3, 1.0, 2.0, (0.5, 0.5), num_prompt_tokens=20, start_s=0.25),
    _ok(1, 0.25, 0.25, num_prompt_tokens=6, start_s=0.5),
    _failed("timeout", 0.75),
    _failed("HTTP 500: boom", 1.0),
    _failed("timeout", 1.25),
)


# --- percentiles and TPOT -----------------------------------------------------------------------

def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5  # index 1.5: halfway between 2 and 3
    assert percentile(values, 90) == 3.7  # index 2.7
    assert percentile(values, 99) == pytest.approx(3.97, abs=1e-12)  # index 2.97
    assert percentile([0.0, 100.0, 200.0, 300.0], 99) == 297.0
    assert percentile([0.0, 100.0, 200.0, 300.0], 25) == 75.0  # index 0.75


def test_percentile_of_one_value_or_none() -> None:
    assert [percentile([7.0], q) for q in (0, 37.5, 100)] == [7.0, 7.0, 7.0]
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], -1)


def test_tpot_is_per_token_after_the_first() -> None:
    assert tpot_s(RECORDS[0]) == 0.25  # (1.5 - 0.5) / 4
    assert tpot_s(RECORDS[1]) == 0.5  # (2.0 - 1.0) / 2
    assert tpot_s(RECORDS[2]) is None  # one output token
    assert tpot_s(RECORDS[3]) is None  # failed


# --- summary ------------------------------------------------------------------------------------

def test_summarize_counts_throughputs_and_latencies() -> None:
    summary = summarize(RECORDS, duration_s=2.0)
    assert {key: summary[key] for key in ("num_requests", "num_ok", "num_errors", "duration_s",
                                          "request_throughput", "output_throughput",
                                          "input_throughput")} == {
        "num_requests": 6, "num_ok": 3, "num_errors": 3, "duration_s": 2.0,
        "request_throughput": 1.5, "output_throughput": 4.5, "input_throughput": 18.0}
    # ttft sorted [0.25, 0.5, 1.0]: p90 at index 1.8, p99 at 1.98.
    assert summary["ttft"] == pytest.approx(
        {"mean": 1.75 / 3, "p50": 0.5, "p90": 0.9, "p99": 0.99}, abs=1e-12)
    assert summary["ttft"]["p50"] == 0.5
    # tpot [0.25, 0.5]: the one-token request has none.
    assert summary["tpot"] == pytest.approx(
        {"mean": 0.375, "p50": 0.375, "p90": 0.475, "p99": 0.4975}, abs=1e-12)
    # itl pooled: four gaps of 0.25 and two of 0.5.
    assert summary["itl"] == {"mean": 2.0 / 6, "p50": 0.25, "p90": 0.5, "p99": 0.5}
    assert summary["e2e"] == pytest.approx(
        {"mean": 1.25, "p50": 1.5, "p90": 1.9, "p99": 1.99}, abs=1e-12)
    assert summary["errors"] == {"timeout": 2, "HTTP 500: boom": 1}
    assert "slo" not in summary
    json.dumps(summary)  # what the runner writes


def test_summarize_with_slos_gives_attainment_and_goodput() -> None:
    slo = summarize(RECORDS, 2.0, slo_ttft_s=0.5, slo_tpot_s=0.25)["slo"]
    # Meeting both: the first request (at both limits) and the one-token request.
    assert slo == {"ttft_s": 0.5, "tpot_s": 0.25, "attainment": 2 / 6, "goodput": 1.0}


def test_summarize_without_data() -> None:
    summary = summarize([], 1.0, slo_ttft_s=1.0, slo_tpot_s=1.0)
    empty = {"mean": None, "p50": None, "p90": None, "p99": None}
    assert [summary[key] for key in ("ttft", "tpot", "itl", "e2e")] == [empty] * 4
    assert (summary["num_requests"], summary["request_throughput"]) == (0, 0.0)
    assert summary["slo"]["attainment"] is None
    assert summary["slo"]["goodput"] == 0.0
    assert summary["errors"] == {}


def test_summarize_input_throughput_is_unknown_with_uncounted_prompts() -> None:
    records = [_ok(2, 0.5, 1.0, num_prompt_tokens=-1), _ok(2, 0.5, 1.0)]
    assert summarize(records, 1.0)["input_throughput"] is None
    assert summarize(records[1:], 1.0)["input_throughput"] == 10.0


def test_summarize_keeps_the_first_ten_distinct_errors() -> None:
    records = [_failed(f"error {index}") for index in range(12)] + [_failed("error 0")]
    errors = summarize(records, 1.0)["errors"]
    assert errors == {f"error {index}": 2 if index == 0 else 1 for index in range(10)}
    assert summarize(records, 1.0)["num_errors"] == 13


def test_summarize_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        summarize(RECORDS, 0.0)
    with pytest.raises(ValueError, match="both slo_ttft_s and slo_tpot_s"):
        summarize(RECORDS, 1.0, slo_ttft_s=0.5)
    with pytest.raises(ValueError, match="slo_tpot_s must be > 0"):
        summarize(RECORDS, 1.0, slo_ttft_s=0.5, slo_tpot_s=0.0)


def test_records_round_trip_through_json() -> None:
    for record in RECORDS:
        assert RequestRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    with pytest.raises(ValueError, match="'ttft_s'"):
        RequestRecord.from_dict({key: value for key, value in RECORDS[0].to_dict().items()
                                 if key != "ttft_s"})


# --- SLO attainment -----------------------------------------------------------------------------

def test_attainment_counts_errors_as_misses_and_one_token_requests_on_ttft() -> None:
    assert attainment(RECORDS, 0.5, 0.25) == 2 / 6
    assert attainment(RECORDS, 0.25, 10.0) == 1 / 6  # only the one-token request
    assert attainment(RECORDS, 10.0, 0.125) == 1 / 6  # tpot: one token means none to miss
    assert attainment(RECORDS[:3], 10.0, 10.0) == 1.0
    assert attainment([], 1.0, 1.0) is None
    assert not meets_slo(RECORDS[1], 1.0, 0.25)  # ttft met, tpot 0.5 missed
    without_ttft = RequestRecord(True, "", 4, 0, 0.0, None, 0.5)
    assert not meets_slo(without_ttft, 10.0, 10.0)


def test_attainment_vs_scale_is_monotonic_and_exact() -> None:
    curve = attainment_vs_scale(RECORDS, 0.5, 0.25, [0.5, 1.0, 2.0, 4.0])
    # x0.5 (0.25, 0.125): the one-token request; x1: and the first; x2 (1.0, 0.5): all ok ones.
    assert curve == [(0.5, 1 / 6), (1.0, 2 / 6), (2.0, 3 / 6), (4.0, 3 / 6)]
    fractions = [fraction for _, fraction in attainment_vs_scale(
        RECORDS, 0.5, 0.25, [scale / 8 for scale in range(1, 64)])]
    assert fractions == sorted(fractions)
    with pytest.raises(ValueError, match="scale"):
        attainment_vs_scale(RECORDS, 0.5, 0.25, [1.0, 0.0])
