"""When to send each request: Poisson or gamma arrivals at a mean rate, or a trace's own times.

Offsets are seconds from the run's start. Gaps between requests follow
Gamma(shape=burstiness, scale=1 / (rate * burstiness)), whose mean is 1 / rate whatever the
burstiness: 1 is a Poisson process, below 1 burstier, above 1 more even. ``rate = math.inf``
sends everything at once.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from bench.workloads import BenchRequest


class ScheduledRequest(NamedTuple):
    """A request and when to send it."""

    offset_s: float
    request: BenchRequest


def poisson_arrivals(num: int, rate: float, seed: int) -> list[float]:
    """``num`` offsets of a Poisson process: cumulative exponential gaps, the first at the
    first gap."""
    return gamma_arrivals(num, rate, 1.0, seed)


def gamma_arrivals(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """``num`` offsets with gamma-distributed gaps of mean 1 / rate (all 0 when rate is inf)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be an integer >= 0, got {num!r}")
    _check_rate(rate)
    _check_burstiness(burstiness)
    if math.isinf(rate):
        return [0.0] * num
    return list(itertools.islice(_offsets(rate, burstiness, random.Random(seed)), num))


def arrivals_until(duration_s: float, rate: float, burstiness: float, seed: int) -> list[float]:
    """The offsets below ``duration_s``: a prefix of ``gamma_arrivals`` for the same seed.
    The caller draws as many requests as there are offsets."""
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be finite and > 0, got {duration_s!r}")
    _check_rate(rate)
    if math.isinf(rate):
        raise ValueError("rate must be finite for a run of fixed duration: an infinite rate "
                         "would send unboundedly many requests; give a number of requests")
    _check_burstiness(burstiness)
    offsets = _offsets(rate, burstiness, random.Random(seed))
    return list(itertools.takewhile(lambda offset_s: offset_s < duration_s, offsets))


def schedule(requests: Sequence[BenchRequest], rate: float, burstiness: float,
             seed: int) -> list[ScheduledRequest]:
    """Every request with its offset, sorted by offset (ties keep the requests' order).

    A request with ``arrival_s`` (a trace) keeps it; the others take gamma offsets in turn.
    """
    untimed = sum(request.arrival_s is None for request in requests)
    offsets = iter(gamma_arrivals(untimed, rate, burstiness, seed))
    scheduled = [ScheduledRequest(next(offsets) if request.arrival_s is None
                                  else request.arrival_s, request)
                 for request in requests]
    scheduled.sort(key=lambda item: item.offset_s)
    return scheduled


def _check_rate(rate: float) -> None:
    if not rate > 0:  # also refuses NaN
        raise ValueError(f"rate must be > 0 requests/s (math.inf: all at once), got {rate!r}")


def _check_burstiness(burstiness: float) -> None:
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise ValueError(f"burstiness must be finite and > 0 (1: Poisson), got {burstiness!r}")


def _offsets(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    offset_s = 0.0
    while True:
        if burstiness == 1.0:  # the same draws as poisson_arrivals, so the two agree exactly
            offset_s += rng.expovariate(rate)
        else:
            offset_s += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        yield offset_s
