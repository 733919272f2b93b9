from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer

from bench import plots
from bench.plots import (
    ecdf,
    plot_goodput_bars,
    plot_latency_cdfs,
    plot_rate_sweep,
    plot_slo_scale,
    tpot_s,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(ok: bool = True, ttft_s: float | None = 0.25, e2e_s: float | None = 1.0,
           num_output_tokens: int = 4, itl_s: tuple[float, ...] = (0.25, 0.25, 0.25),
           error: str = "") -> dict:
    return {"ok": ok, "error": error, "num_prompt_tokens": 16,
            "num_output_tokens": num_output_tokens, "start_s": 0.0, "ttft_s": ttft_s,
            "e2e_s": e2e_s, "itl_s": list(itl_s)}


def summary(attainment: float | None, ttft_p99_s: float | None,
            tpot_p99_s: float | None) -> dict:
    return {"slo": {"attainment": attainment, "goodput": 1.0},
            "ttft": {"p99": ttft_p99_s}, "tpot": {"p99": tpot_p99_s}, "e2e": {"p99": None}}


@pytest.fixture
def closed_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every figure the module closes, so a test can look at what was drawn."""
    figures = []
    real_close = plt.close

    def close(fig) -> None:
        figures.append(fig)
        real_close(fig)

    monkeypatch.setattr(plots.plt, "close", close)
    return figures


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000, len(data)
    assert plt.get_fignums() == []


def line_data(ax, label: str) -> tuple[list[float], list[float]]:
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return list(line.get_xdata()), list(line.get_ydata())


def test_ecdf_sorts_and_steps_by_one_over_n():
    assert ecdf([3.0, 1.0, 2.0, 2.0]) == ([1.0, 2.0, 2.0, 3.0], [0.25, 0.5, 0.75, 1.0])
    assert ecdf(iter([5.0])) == ([5.0], [1.0])
    assert ecdf([]) == ([], [])


def test_tpot_needs_a_successful_record_with_two_tokens():
    assert tpot_s(record(ttft_s=0.25, e2e_s=1.0, num_output_tokens=4)) == 0.25
    assert tpot_s(record(num_output_tokens=1)) is None
    assert tpot_s(record(ok=False, error="timeout")) is None
    assert tpot_s(record(ttft_s=None)) is None
    assert tpot_s(record(e2e_s=None)) is None


def test_latency_cdfs(tmp_path: Path, closed_figures: list):
    runs = {
        "never": [record(), record(ttft_s=0.5, e2e_s=2.0, itl_s=(0.5,)),
                  record(ok=False, ttft_s=None, e2e_s=None, itl_s=(), error="HTTP 503")],
        "always": [record(ttft_s=0.125, e2e_s=0.125, num_output_tokens=1, itl_s=())],
        "conditional": [],
    }
    path = tmp_path / "new" / "dir" / "cdfs.png"
    assert plot_latency_cdfs(runs, path, slo_ttft_s=0.3, slo_tpot_s=0.1, title="t") == path
    assert_png(path)

    (fig,) = closed_figures
    ttft_ax, tpot_ax, itl_ax, e2e_ax = fig.axes
    never, always = "never (2 ok / 3 total)", "always (1 ok / 1 total)"
    assert [t.get_text() for t in ttft_ax.get_legend().get_texts()] == [
        never, always, "SLO 300 ms"]
    assert line_data(ttft_ax, never) == ([250.0, 500.0], [0.5, 1.0])
    assert line_data(ttft_ax, always) == ([125.0], [1.0])
    assert line_data(tpot_ax, never) == ([250.0, 500.0], [0.5, 1.0])
    assert [line.get_label() for line in tpot_ax.get_lines()] == [never, "SLO 100 ms"]
    assert line_data(itl_ax, never) == ([250.0, 250.0, 250.0, 500.0], [0.25, 0.5, 0.75, 1.0])
    assert line_data(e2e_ax, always) == ([125.0], [1.0])
    assert [line.get_label() for line in e2e_ax.get_lines()] == [never, always]
    assert fig.get_suptitle() == "t"


@pytest.mark.parametrize("runs", [{}, {"never": [], "always": []},
                                  {"never": [record(ok=False, ttft_s=None, e2e_s=None)]}])
def test_latency_cdfs_with_nothing_to_plot(tmp_path: Path, runs: dict):
    with pytest.raises(ValueError, match="runs"):
        plot_latency_cdfs(runs, tmp_path / "cdfs.png")
    assert plt.get_fignums() == []
    assert not (tmp_path / "cdfs.png").exists()


def test_rate_sweep_sorts_points_and_skips_missing_values(tmp_path: Path, closed_figures: list):
    sweeps = {
        "never": [  # in bisection order
            {"rate": 4.0, "summary": summary(0.5, 2.0, 0.25)},
            {"rate": 1.0, "summary": summary(1.0, 0.5, None)},
            {"rate": 2.0, "summary": summary(0.75, None, 0.125)},
        ],
        "always": [{"rate": 3.0, "summary": summary(None, 1.0, 0.5)}],
        "conditional": [],
    }
    path = tmp_path / "sweep.png"
    assert plot_rate_sweep(sweeps, path) == path
    assert_png(path)

    (fig,) = closed_figures
    attainment_ax, ttft_ax, tpot_ax = fig.axes
    assert line_data(attainment_ax, "never") == ([1.0, 2.0, 4.0], [1.0, 0.75, 0.5])
    assert [line.get_label() for line in attainment_ax.get_lines()] == ["never", "90%"]
    assert line_data(attainment_ax, "90%")[1] == [0.9, 0.9]
    assert line_data(ttft_ax, "never") == ([1.0, 4.0], [500.0, 2000.0])
    assert line_data(ttft_ax, "always") == ([3.0], [1000.0])
    assert line_data(tpot_ax, "never") == ([2.0, 4.0], [125.0, 250.0])
    assert line_data(tpot_ax, "always") == ([3.0], [500.0])


def test_rate_sweep_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="sweeps"):
        plot_rate_sweep({"never": []}, tmp_path / "sweep.png")
    with pytest.raises(KeyError):
        plot_rate_sweep({"never": [{"summary": summary(1.0, 1.0, 1.0)}]}, tmp_path / "s.png")
    assert plt.get_fignums() == []


def test_slo_scale(tmp_path: Path, closed_figures: list):
    curves = {"never": [(2.0, 0.875), (0.5, 0.25), (1.0, 0.5)], "always": [(1.0, 1.0)],
              "conditional": []}
    path = tmp_path / "scale.png"
    assert plot_slo_scale(curves, path, title="SLO scale") == path
    assert_png(path)

    (fig,) = closed_figures
    (ax,) = fig.axes
    assert line_data(ax, "never") == ([0.5, 1.0, 2.0], [0.25, 0.5, 0.875])
    assert line_data(ax, "always") == ([1.0], [1.0])
    assert line_data(ax, "90%")[1] == [0.9, 0.9]


def test_slo_scale_with_nothing_to_plot(tmp_path: Path):
    with pytest.raises(ValueError, match="curves"):
        plot_slo_scale({}, tmp_path / "scale.png")
    assert plt.get_fignums() == []


def test_goodput_bars(tmp_path: Path, closed_figures: list):
    goodputs = {"never": [3.0, 1.0, 2.0], "always": [4.0], "conditional": []}
    path = tmp_path / "goodput.png"
    assert plot_goodput_bars(goodputs, path, ylabel="goodput (tok/s)") == path
    assert_png(path)

    (fig,) = closed_figures
    (ax,) = fig.axes
    assert [bar.get_height() for bar in ax.patches] == [2.0, 4.0]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["never", "always"]
    assert ax.get_ylabel() == "goodput (tok/s)"
    dots = [c.get_offsets().tolist() for c in ax.collections if isinstance(c, PathCollection)]
    assert dots == [[[-0.15, 3.0], [0.0, 1.0], [pytest.approx(0.15), 2.0]], [[1.0, 4.0]]]
    spans = [container.lines[2][0].get_segments()[0].tolist() for container in ax.containers
             if isinstance(container, ErrorbarContainer)]
    assert spans == [[[0.0, 1.0], [0.0, 3.0]], [[1.0, 4.0], [1.0, 4.0]]]  # min..max


def test_goodput_bars_with_nothing_to_plot(tmp_path: Path):
    with pytest.raises(ValueError, match="goodputs"):
        plot_goodput_bars({"never": []}, tmp_path / "goodput.png")
    assert plt.get_fignums() == []
