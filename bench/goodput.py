"""The goodput search: the highest request rate at which enough requests meet both SLOs.

Goodput (DistServe; DESIGN.md, "Measuring") is the highest rate whose SLO attainment is at
least a threshold, 90% by default. A search probes rates: from a start rate it doubles until a
probe fails, halves until one passes, then bisects the bracket geometrically. Several arms
(say, cluster configurations) are searched side by side, one probe each per step with their
order rotated, so that drift of the machine hits every arm alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

Arm = TypeVar("Arm", bound=Hashable)


class Probe(NamedTuple):
    """One probed rate (requests/s) and the share of its requests that met both SLOs."""

    rate: float
    attainment: float


class GoodputResult(NamedTuple):
    """What one arm's search found: its goodput (0.0 when no probe passed) and its probes,
    in the order they ran."""

    goodput: float
    probes: tuple[Probe, ...]


@dataclass(frozen=True, slots=True)
class GoodputSearch:
    """How to search: the first rate, how many steps (at most one probe per arm each), and
    when an arm stops early.

    A rate below ``min_rate`` is never probed: an arm that fails even at the floor stops with
    goodput 0. With ``rel_tol``, an arm stops once its bracket is that tight (``is_converged``).
    """

    start_rate: float
    num_steps: int
    min_rate: float = 0.0
    threshold: float = 0.9
    step_factor: float = 2.0
    rel_tol: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_rate) and self.start_rate > 0):
            raise ValueError(f"start_rate must be finite and > 0, got {self.start_rate!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if not (math.isfinite(self.min_rate) and self.min_rate >= 0):
            raise ValueError(f"min_rate must be finite and >= 0, got {self.min_rate!r}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not (math.isfinite(self.step_factor) and self.step_factor > 1):
            raise ValueError(f"step_factor must be finite and > 1, got {self.step_factor!r}")
        if self.rel_tol is not None and not self.rel_tol > 0:
            raise ValueError(f"rel_tol must be > 0, got {self.rel_tol!r}")


def search_goodput(attainment_at: Mapping[Arm, Callable[[float], float]], search: GoodputSearch,
                   on_probe: Callable[[Arm, Probe, float], None] | None = None,
                   ) -> dict[Arm, GoodputResult]:
    """Each arm's goodput, probing ``attainment_at[arm](rate)``; arms are probed in turn, the
    order rotated by one at each step.

    ``on_probe(arm, probe, next_rate)`` is called after every probe, e.g. to report progress.
    """
    if not attainment_at:
        raise ValueError("attainment_at holds no arm to search")
    arms = list(attainment_at)
    brackets = {arm: _Bracket(search.start_rate) for arm in arms}
    for step in range(search.num_steps):
        shift = step % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            bracket = brackets[arm]
            if not bracket.is_open(search):
                continue
            probe = Probe(bracket.next_rate, attainment_at[arm](bracket.next_rate))
            bracket.record(probe, search)
            if on_probe is not None:
                on_probe(arm, probe, bracket.next_rate)
    return {arm: GoodputResult(max_passing_rate(bracket.probes, search.threshold) or 0.0,
                               tuple(bracket.probes)) for arm, bracket in brackets.items()}


@dataclass(slots=True)
class _Bracket:
    next_rate: float
    passing: float | None = None  # the highest rate known to pass
    failing: float | None = None  # the lowest rate known to fail
    probes: list[Probe] = field(default_factory=list)

    def is_open(self, search: GoodputSearch) -> bool:
        if self.next_rate < search.min_rate:
            return False
        return search.rel_tol is None or not is_converged(self.passing, self.failing,
                                                          search.rel_tol)

    def record(self, probe: Probe, search: GoodputSearch) -> None:
        self.probes.append(probe)
        if probe.attainment >= search.threshold:
            self.passing = probe.rate
        else:
            self.failing = probe.rate
        self.next_rate = bisect_next(self.passing, self.failing, search.step_factor)


def max_passing_rate(points: Iterable[tuple[float, float | None]],
                     threshold: float = 0.9) -> float | None:
    """Goodput of a sweep: the highest rate of (rate, attainment) points whose attainment is
    >= threshold; None when none passes."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    return max((rate for rate, fraction in points if fraction is not None
                and fraction >= threshold), default=None)


def bisect_next(lo: float | None, hi: float | None, step_factor: float = 2.0) -> float:
    """The next rate to try in a goodput search.

    ``lo`` is the highest rate known to pass (None while none has), ``hi`` the lowest known to
    fail (likewise). Until one fails the rate grows by ``step_factor``, and until one passes it
    shrinks by it; then the search probes the geometric midpoint sqrt(lo * hi), which halves
    log(hi / lo) at each step: rates span orders of magnitude, so bisecting their logarithm
    converges evenly at every scale.
    """
    if not (math.isfinite(step_factor) and step_factor > 1):
        raise ValueError(f"step_factor must be finite and > 1, got {step_factor!r}")
    if lo is not None and not (math.isfinite(lo) and lo > 0):
        raise ValueError(f"lo must be finite and > 0, got {lo!r}")
    if hi is None:
        if lo is None:
            raise ValueError("give lo or hi: a search goes on from a probed rate")
        return lo * step_factor
    if not (math.isfinite(hi) and hi > 0 and (lo is None or hi > lo)):
        raise ValueError(f"hi must be finite, > 0 and > lo={lo!r}, got {hi!r}")
    return hi / step_factor if lo is None else math.sqrt(lo * hi)


def is_converged(lo: float | None, hi: float | None, rel_tol: float) -> bool:
    """Whether a goodput search may stop: both a passing and a failing rate are known, and
    hi <= lo * (1 + rel_tol)."""
    if not rel_tol > 0:
        raise ValueError(f"rel_tol must be > 0, got {rel_tol!r}")
    return lo is not None and hi is not None and hi <= lo * (1 + rel_tol)
