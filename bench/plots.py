"""PNG plots of benchmark results: latency CDFs, rate sweeps, SLO-scale curves, goodput bars.

Inputs are the JSON-ready dicts and lists that the benchmark writes, so this module depends on
nothing else in the project. It switches matplotlib to the Agg backend when imported, so only
code that plots should import it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from bench import stats  # noqa: E402

ATTAINMENT_TARGET = 0.9


def ecdf(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF of `values`: sorted values and, for the i-th of n, the fraction i/n."""
    xs = sorted(values)
    num_values = len(xs)
    return xs, [(i + 1) / num_values for i in range(num_values)]


def tpot_s(record: dict[str, Any]) -> float | None:
    """Mean time per output token after the first, or None when the record does not have one."""
    return stats.tpot_s(stats.RequestRecord.from_dict(record))


def plot_latency_cdfs(
    runs: dict[str, list[dict[str, Any]]],
    path: str | Path,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    title: str = "",
) -> Path:
    """TTFT, TPOT, ITL and end-to-end CDFs, one line per run; failed requests are left out."""
    if not any(runs.values()):
        raise ValueError(f"runs holds no request records to plot (labels: {list(runs)})")
    panels: list[tuple[str, float | None, dict[str, list[float]]]] = [
        ("TTFT", slo_ttft_s, {}), ("TPOT", slo_tpot_s, {}), ("ITL", None, {}),
        ("end-to-end latency", None, {}),
    ]
    for label, records in runs.items():
        ok = [r for r in records if r["ok"]]
        samples_s = (
            [r["ttft_s"] for r in ok if r["ttft_s"] is not None],
            [t for t in map(tpot_s, ok) if t is not None],
            [gap for r in ok for gap in r["itl_s"]],
            [r["e2e_s"] for r in ok if r["e2e_s"] is not None],
        )
        legend = f"{label} ({len(ok)} ok / {len(records)} total)"
        for (_, _, lines), values_s in zip(panels, samples_s, strict=True):
            lines[legend] = values_s
    if not any(values for _, _, lines in panels for values in lines.values()):
        raise ValueError(f"runs holds no successful request to plot (labels: {list(runs)})")

    colors = _colors(panels[0][2])
    with _figure(path, title, (12, 8), nrows=2, ncols=2) as axes:
        for ax, (name, slo_s, lines) in zip(axes.flat, panels, strict=True):
            for legend, values_s in lines.items():
                if values_s:
                    xs, ys = ecdf(v * 1000 for v in values_s)
                    ax.step(xs, ys, where="post", color=colors[legend], label=legend)
            if slo_s is not None:
                ax.axvline(slo_s * 1000, color="black", linestyle="--",
                           label=f"SLO {slo_s * 1000:g} ms")
            ax.set_ylim(0, 1.02)
            _style(ax, name, f"{name} (ms)", "fraction of requests")
    return Path(path)


def plot_rate_sweep(sweeps: dict[str, list[dict[str, Any]]], path: str | Path,
                    title: str = "") -> Path:
    """SLO attainment, p99 TTFT and p99 TPOT against request rate, one line per sweep."""
    if not any(sweeps.values()):
        raise ValueError(f"sweeps holds no points to plot (labels: {list(sweeps)})")
    colors = _colors(sweeps)
    metrics = (("slo", "attainment", 1.0), ("ttft", "p99", 1000.0), ("tpot", "p99", 1000.0))
    with _figure(path, title, (15, 4.5), ncols=3) as axes:
        for ax, (section, key, scale) in zip(axes, metrics, strict=True):
            for label, points in sweeps.items():
                xy = [(p["rate"], _field(p["summary"], section, key)) for p in points]
                _plot_points(ax, [(x, y * scale) for x, y in xy if y is not None],
                             colors[label], label)
        axes[0].axhline(ATTAINMENT_TARGET, color="gray", linestyle="--", label="90%")
        axes[0].set_ylim(0, 1.05)
        _style(axes[0], "SLO attainment", "request rate (req/s)", "attainment")
        _style(axes[1], "p99 TTFT", "request rate (req/s)", "p99 TTFT (ms)")
        _style(axes[2], "p99 TPOT", "request rate (req/s)", "p99 TPOT (ms)")
    return Path(path)


def plot_slo_scale(curves: dict[str, list[tuple[float, float]]], path: str | Path,
                   title: str = "", ylabel: str = "SLO attainment") -> Path:
    """SLO attainment (or, with ``ylabel``, another figure such as goodput) against the
    factor the SLOs were scaled by, one line per label."""
    if not any(curves.values()):
        raise ValueError(f"curves holds no points to plot (labels: {list(curves)})")
    colors = _colors(curves)
    is_attainment = ylabel == "SLO attainment"
    with _figure(path, title, (7, 4.5)) as ax:
        for label, points in curves.items():
            _plot_points(ax, points, colors[label], label)
        if is_attainment:
            ax.axhline(ATTAINMENT_TARGET, color="gray", linestyle="--", label="90%")
            ax.set_ylim(0, 1.05)
        _style(ax, "", "SLO scale", ylabel)
    return Path(path)


def plot_goodput_bars(goodputs: dict[str, list[float]], path: str | Path, title: str = "",
                      ylabel: str = "goodput (req/s)") -> Path:
    """Per label a bar at the median of the repeats, a min..max error bar and each repeat's dot."""
    present = {label: values for label, values in goodputs.items() if values}
    if not present:
        raise ValueError(f"goodputs holds no values to plot (labels: {list(goodputs)})")
    colors = _colors(present)
    with _figure(path, title, (max(4.0, 1.4 * len(present) + 2), 4.5)) as ax:
        for x, (label, values) in enumerate(present.items()):
            median = statistics.median(values)
            ax.bar(x, median, width=0.6, color=colors[label], alpha=0.6)
            ax.errorbar(x, median, yerr=[[median - min(values)], [max(values) - median]],
                        color="black", capsize=6)
            ax.scatter(_spread(x, len(values)), values, color="black", s=14, zorder=3)
        ax.set_xticks(range(len(present)), list(present))
        _style(ax, "", "", ylabel)
    return Path(path)


def _field(summary: dict[str, Any], section: str, key: str) -> float | None:
    return (summary.get(section) or {}).get(key)


def _plot_points(ax: Axes, points: Iterable[tuple[float, float]], color: str, label: str) -> None:
    # Sorted by x: bisection searches visit rates out of order.
    points = sorted(points)
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=color,
                label=label)


def _colors(labels: Iterable[str]) -> dict[str, str]:
    # Fixed per label so a run keeps its colour on every panel, even one it has no data on.
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def _spread(x: float, num_points: int) -> Sequence[float]:
    # Repeats with equal values would hide each other at a single x.
    if num_points == 1:
        return [x]
    return [x - 0.15 + 0.3 * i / (num_points - 1) for i in range(num_points)]


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    elif not ax.has_data():
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


@contextmanager
def _figure(path: str | Path, title: str, figsize: tuple[float, float], nrows: int = 1,
            ncols: int = 1) -> Iterator[Any]:
    """Yields the axes of a new figure, saves it to `path` on success, and always closes it."""
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, layout="constrained")
    try:
        yield axes
        if title:
            fig.suptitle(title)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
