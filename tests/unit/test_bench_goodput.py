"""The goodput search on fake attainment curves: the exact rates it probes, in the exact order,
and the exact goodput it finds."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from bench.goodput import (
    GoodputResult,
    GoodputSearch,
    Probe,
    bisect_next,
    is_converged,
    max_passing_rate,
    search_goodput,
)


def _step_curve(boundary: float, log: list[float] | None = None) -> Callable[[float], float]:
    """Attainment 1.0 up to ``boundary`` req/s and 0.5 above; ``log`` collects the rates."""
    def attainment_at(rate: float) -> float:
        if log is not None:
            log.append(rate)
        return 1.0 if rate <= boundary else 0.5
    return attainment_at


def test_the_search_doubles_until_a_failure_then_bisects() -> None:
    (result,) = search_goodput({"a": _step_curve(5.0)}, GoodputSearch(1.0, 5)).values()
    assert result == GoodputResult(4.0, (Probe(1.0, 1.0), Probe(2.0, 1.0), Probe(4.0, 1.0),
                                         Probe(8.0, 0.5), Probe(math.sqrt(32.0), 0.5)))


def test_the_search_halves_until_a_pass_then_bisects() -> None:
    (result,) = search_goodput({"a": _step_curve(0.75)}, GoodputSearch(2.0, 5)).values()
    midpoint = math.sqrt(0.5 * 1.0)
    assert result == GoodputResult(midpoint, (
        Probe(2.0, 0.5), Probe(1.0, 0.5), Probe(0.5, 1.0), Probe(midpoint, 1.0),
        Probe(math.sqrt(midpoint * 1.0), 0.5)))


def test_an_arm_that_fails_at_the_floor_stops_with_goodput_zero() -> None:
    rates: list[float] = []
    results = search_goodput({"a": _step_curve(0.1, rates)},
                             GoodputSearch(1.0, 5, min_rate=0.5))
    assert results == {"a": GoodputResult(0.0, (Probe(1.0, 0.5), Probe(0.5, 0.5)))}
    assert rates == [1.0, 0.5]  # 0.25 is below the floor: never probed


def test_the_threshold_decides_what_passes() -> None:
    attainments = {1.0: 0.95, 2.0: 0.9, 4.0: 0.85, math.sqrt(8.0): 0.85, math.sqrt(2.0): 0.95}
    results = search_goodput({"a": attainments.__getitem__}, GoodputSearch(1.0, 4))
    assert results["a"] == GoodputResult(2.0, (  # 0.9 is enough for a threshold of 0.9
        Probe(1.0, 0.95), Probe(2.0, 0.9), Probe(4.0, 0.85), Probe(math.sqrt(8.0), 0.85)))
    strict = search_goodput({"a": attainments.__getitem__},
                            GoodputSearch(1.0, 3, threshold=0.95))
    assert strict["a"] == GoodputResult(math.sqrt(2.0), (
        Probe(1.0, 0.95), Probe(2.0, 0.9), Probe(math.sqrt(2.0), 0.95)))


def test_arms_take_turns_in_rotated_order_and_each_probe_is_reported() -> None:
    calls: list[tuple[str, float]] = []
    reports: list[tuple[str, Probe, float]] = []

    def arm(name: str, boundary: float) -> Callable[[float], float]:
        def attainment_at(rate: float) -> float:
            calls.append((name, rate))
            return _step_curve(boundary)(rate)
        return attainment_at

    curves = {"never": arm("never", 1.5), "always": arm("always", 0.1),
              "conditional": arm("conditional", 3.0)}
    results = search_goodput(curves, GoodputSearch(1.0, 3, min_rate=0.5),
                             lambda name, probe, next_rate: reports.append(
                                 (name, probe, next_rate)))
    # "always" fails at 1 and at 0.5, then would go below the floor: it sits out step 2.
    assert calls == [("never", 1.0), ("always", 1.0), ("conditional", 1.0),
                     ("always", 0.5), ("conditional", 2.0), ("never", 2.0),
                     ("conditional", 4.0), ("never", math.sqrt(2.0))]
    assert reports[:3] == [("never", Probe(1.0, 1.0), 2.0), ("always", Probe(1.0, 0.5), 0.5),
                           ("conditional", Probe(1.0, 1.0), 2.0)]
    assert reports[3:5] == [("always", Probe(0.5, 0.5), 0.25),
                            ("conditional", Probe(2.0, 1.0), 4.0)]
    assert [report[0] for report in reports] == [name for name, _ in calls]
    assert {name: result.goodput for name, result in results.items()} == {
        "never": math.sqrt(2.0), "always": 0.0, "conditional": 2.0}


def test_with_a_tolerance_the_search_stops_once_the_bracket_is_tight() -> None:
    (result,) = search_goodput({"a": _step_curve(5.0)},
                               GoodputSearch(2.0, 100, rel_tol=0.01)).values()
    failing = min(probe.rate for probe in result.probes if probe.attainment < 0.9)
    assert result.goodput <= 5.0 < failing <= result.goodput * 1.01
    # 2, 4 pass and 8 fails; then each midpoint halves log2(hi / lo) = 1 until 1 / 2^7 of it
    # is within log2(1.01) = 0.0144.
    assert len(result.probes) == 3 + 7


@pytest.mark.parametrize(("fields", "name"), [
    ({"start_rate": 0.0}, "start_rate"), ({"start_rate": math.inf}, "start_rate"),
    ({"num_steps": 0}, "num_steps"), ({"min_rate": -1.0}, "min_rate"),
    ({"threshold": 1.5}, "threshold"), ({"step_factor": 1.0}, "step_factor"),
    ({"rel_tol": 0.0}, "rel_tol")])
def test_a_bad_search_is_refused_naming_the_field(fields: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GoodputSearch(**{"start_rate": 1.0, "num_steps": 3, **fields})


def test_a_search_needs_an_arm() -> None:
    with pytest.raises(ValueError, match="no arm"):
        search_goodput({}, GoodputSearch(1.0, 3))


def test_max_passing_rate_is_the_highest_rate_meeting_the_threshold() -> None:
    points = [(1.0, 1.0), (2.0, 0.95), (4.0, 0.9), (8.0, 0.5), (3.0, 0.89)]
    assert max_passing_rate(points) == 4.0
    assert max_passing_rate(points, threshold=0.95) == 2.0
    assert max_passing_rate([(1.0, 0.5), (2.0, 0.95)]) == 2.0  # not monotonic: still the max
    assert max_passing_rate([(1.0, 0.5), (2.0, None)]) is None
    assert max_passing_rate([]) is None
    with pytest.raises(ValueError, match="threshold"):
        max_passing_rate(points, threshold=1.5)


def test_bisect_next_steps_until_the_rate_is_bracketed_then_takes_the_geometric_midpoint(
        ) -> None:
    assert bisect_next(1.0, None) == 2.0
    assert bisect_next(1.5, None, step_factor=4.0) == 6.0
    assert bisect_next(None, 1.0) == 0.5
    assert bisect_next(None, 6.0, step_factor=4.0) == 1.5
    assert bisect_next(1.0, 4.0) == 2.0
    assert bisect_next(2.0, 8.0) == 4.0
    for lo, hi, step_factor, name in ((0.0, None, 2.0, "lo"), (2.0, 2.0, 2.0, "hi"),
                                      (2.0, 1.0, 2.0, "hi"), (None, 0.0, 2.0, "hi"),
                                      (None, None, 2.0, "lo or hi"),
                                      (1.0, None, 1.0, "step_factor")):
        with pytest.raises(ValueError, match=name):
            bisect_next(lo, hi, step_factor)


def test_is_converged_needs_both_rates_within_the_tolerance() -> None:
    assert not is_converged(1.0, None, 0.1)
    assert not is_converged(None, 1.0, 0.1)
    assert is_converged(1.0, 1.0625, 0.125)
    assert not is_converged(1.0, 1.5, 0.125)
    with pytest.raises(ValueError, match="rel_tol"):
        is_converged(1.0, 2.0, 0.0)
