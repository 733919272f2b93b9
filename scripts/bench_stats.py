"""What every benchmark reports over its repeats."""

from __future__ import annotations

import statistics


def summarize(runs: list[dict]) -> dict:
    """Median, min and max of every float figure across repeats, plus the repeats."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    summary = {k: {"median": statistics.median(r[k] for r in runs),
                   "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys}
    return {**summary, "repeats": runs}
