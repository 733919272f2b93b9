"""What a benchmark run measured: per-request records, latency percentiles, SLO attainment and
goodput (DESIGN.md, "Measuring").

TTFT is from sending to the first token; TPOT is per request, (e2e - TTFT) / (output tokens - 1);
ITL pools every gap between successive streamed tokens. A run's goodput is its requests meeting
both SLOs per second; the goodput of a sweep of rates, the highest rate at which at least 90%
of requests meet both (DistServe), is searched for by bench.goodput.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_ERROR_KINDS = 10


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request's outcome. ``start_s`` is from the run's start; the other times are from
    when the request was sent, None when it never got there."""

    ok: bool
    error: str  # "" when ok
    num_prompt_tokens: int
    num_output_tokens: int
    start_s: float
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: tuple[float, ...] = ()  # gaps between successive streamed token events

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "num_prompt_tokens": self.num_prompt_tokens,
                "num_output_tokens": self.num_output_tokens, "start_s": self.start_s,
                "ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "itl_s": list(self.itl_s)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestRecord:
        try:
            return cls(ok=bool(data["ok"]), error=str(data["error"]),
                       num_prompt_tokens=int(data["num_prompt_tokens"]),
                       num_output_tokens=int(data["num_output_tokens"]),
                       start_s=float(data["start_s"]), ttft_s=_optional_float(data["ttft_s"]),
                       e2e_s=_optional_float(data["e2e_s"]),
                       itl_s=tuple(float(gap) for gap in data["itl_s"]))
        except KeyError as error:
            raise ValueError(f"a request record lacks the field {error.args[0]!r}") from None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 <= q <= 100) of ascending values, None when there are none.

    numpy's default (method="linear"): the value at virtual index (n - 1) * q / 100, linearly
    interpolated between the two closest ranks, from the nearer one as numpy does.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * (q / 100)
    below = math.floor(position)
    above = min(below + 1, len(sorted_values) - 1)
    fraction = position - below
    low, high = sorted_values[below], sorted_values[above]
    if fraction >= 0.5:
        return float(high - (high - low) * (1 - fraction))
    return float(low + (high - low) * fraction)


def tpot_s(record: RequestRecord) -> float | None:
    """Time per output token after the first; None unless ok with >= 2 output tokens."""
    if (not record.ok or record.num_output_tokens < 2 or record.ttft_s is None
            or record.e2e_s is None):
        return None
    return (record.e2e_s - record.ttft_s) / (record.num_output_tokens - 1)


def meets_slo(record: RequestRecord, slo_ttft_s: float, slo_tpot_s: float) -> bool:
    """Ok, TTFT within its SLO, and TPOT within its SLO (or undefined: one output token)."""
    if not record.ok or record.ttft_s is None or record.ttft_s > slo_ttft_s:
        return False
    if record.num_output_tokens < 2:
        return True
    tpot = tpot_s(record)
    return tpot is not None and tpot <= slo_tpot_s


def attainment(records: Sequence[RequestRecord], slo_ttft_s: float,
               slo_tpot_s: float) -> float | None:
    """The fraction of requests meeting both SLOs (errors are misses); None without requests."""
    _check_slos(slo_ttft_s, slo_tpot_s)
    if not records:
        return None
    return _num_meeting(records, slo_ttft_s, slo_tpot_s) / len(records)


def attainment_vs_scale(records: Sequence[RequestRecord], slo_ttft_s: float, slo_tpot_s: float,
                        scales: Iterable[float]) -> list[tuple[float, float | None]]:
    """(scale, attainment with both SLOs multiplied by scale) for each scale: how tight an SLO
    the run could meet."""
    _check_slos(slo_ttft_s, slo_tpot_s)
    curve = []
    for scale in scales:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"each scale must be finite and > 0, got {scale!r}")
        curve.append((scale, attainment(records, slo_ttft_s * scale, slo_tpot_s * scale)))
    return curve


def summarize(records: Sequence[RequestRecord], duration_s: float,
              slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict[str, Any]:
    """A run's counts, throughputs (per second of ``duration_s``, ok requests only) and latency
    distributions in seconds; with both SLOs, their attainment and goodput.

    input_throughput is None when a request's prompt length is unknown (-1).
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be finite and > 0, got {duration_s!r}")
    if (slo_ttft_s is None) != (slo_tpot_s is None):
        raise ValueError(f"give both slo_ttft_s and slo_tpot_s or neither, got "
                         f"slo_ttft_s={slo_ttft_s!r}, slo_tpot_s={slo_tpot_s!r}")
    if slo_ttft_s is not None and slo_tpot_s is not None:
        _check_slos(slo_ttft_s, slo_tpot_s)
    ok = [record for record in records if record.ok]
    is_input_known = all(record.num_prompt_tokens >= 0 for record in ok)
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_errors": len(records) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": sum(record.num_output_tokens for record in ok) / duration_s,
        "input_throughput": (sum(record.num_prompt_tokens for record in ok) / duration_s
                             if is_input_known else None),
        "ttft": _distribution([record.ttft_s for record in ok if record.ttft_s is not None]),
        "tpot": _distribution([tpot for tpot in map(tpot_s, ok) if tpot is not None]),
        "itl": _distribution([gap for record in ok for gap in record.itl_s]),
        "e2e": _distribution([record.e2e_s for record in ok if record.e2e_s is not None]),
        "errors": _error_counts(records),
    }
    if slo_ttft_s is not None and slo_tpot_s is not None:
        num_meeting = _num_meeting(records, slo_ttft_s, slo_tpot_s)
        summary["slo"] = {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s,
                          "attainment": num_meeting / len(records) if records else None,
                          "goodput": num_meeting / duration_s}
    return summary


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_slos(slo_ttft_s: float, slo_tpot_s: float) -> None:
    for name, value in (("slo_ttft_s", slo_ttft_s), ("slo_tpot_s", slo_tpot_s)):
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{name} must be > 0 seconds, got {value!r}")


def _num_meeting(records: Iterable[RequestRecord], slo_ttft_s: float, slo_tpot_s: float) -> int:
    return sum(meets_slo(record, slo_ttft_s, slo_tpot_s) for record in records)


def _distribution(values: list[float]) -> dict[str, float | None]:
    values.sort()
    return {"mean": math.fsum(values) / len(values) if values else None,
            "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def _error_counts(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Error message -> count, for the first MAX_ERROR_KINDS distinct messages."""
    counts: dict[str, int] = {}
    for record in records:
        if record.ok:
            continue
        if record.error in counts:
            counts[record.error] += 1
        elif len(counts) < MAX_ERROR_KINDS:
            counts[record.error] = 1
    return counts
