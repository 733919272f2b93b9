"""The peer benchmark's report (scripts/bench_vs_vllm.py): the commit and machine, the
markdown tables written into docs/bench_vs_vllm.md, the plots."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("pdserve", "vllm")
DTYPES = ("float32", "bfloat16")
# Lower is better for both latencies; a ratio is pdserve / vLLM.
TARGETS = (  # (workload, figure, bound, is_upper_bound, text)
    ("burst", "output_throughput", 1.2, False, "throughput, 64 at once >= 1.2x vLLM"),
    ("poisson", "tpot_p50_s", 0.9, True, "TPOT p50 at 1 req/s <= 0.9x vLLM"),
    ("poisson", "ttft_p50_s", 1.0, True, "TTFT p50 at 1 req/s <= 1.0x vLLM"),
)
FIGURES = ("output_throughput", "tpot_p50_s", "ttft_p50_s")


def git_commit() -> str:
    """HEAD, read from .git without running git (others commit in this checkout)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head.removeprefix("ref: ")
        if (git / ref).is_file():
            return (git / ref).read_text().strip()[:12]
        packed = (git / "packed-refs").read_text().splitlines()
        return next(line.split()[0][:12] for line in packed if line.endswith(" " + ref))
    except (OSError, StopIteration):
        return "unknown"


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                  if line.startswith("model name")), platform.processor())
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def markdown_report(report: dict[str, Any]) -> str:
    kind = "SMOKE RUN (--quick): not the result" if report["quick"] else "result"
    lines = [f"Run of {report['date']} ({kind}); commit `{report['commit']}`; "
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores; vLLM "
             f"{report['vllm']['vllm_version']} (torch {report['vllm']['torch']}); "
             f"{report['repeats']} repeat(s); took {report['elapsed_s']:.0f} s.", "",
             f"Command: `{report['command']}`", "", "Workloads (a seed per repeat; "
             "`sharegpt-like` adds a generated `--trace` file):", ""]
    lines += [f"- {name}: `{command}`" for name, command in report["workloads"].items()]
    lines.append("")
    if report["quick"]:
        lines += ["Quick run: the burst holds fewer requests (its command above), so the "
                  "throughput target is checked on those, not on 64.", ""]
    for dtype, phase in report["dtypes"].items():
        lines += _dtype_section(dtype, phase)
    if "disagg" in report:
        lines += _disagg_section(report["disagg"])
    return "\n".join(lines) + "\n"


def _dtype_section(dtype: str, phase: dict[str, Any]) -> list[str]:
    if "skipped" in phase:
        return [f"### {dtype}", "", f"Skipped: {phase['skipped']}", ""]
    idle = ", ".join(f"{k} {v:.3f}" for k, v in phase["idle_cores"].items())
    startup = ", ".join(f"{k} {v:.0f} s" for k, v in phase["startup_s"].items())
    lines = [f"### {dtype}", "", f"Idle CPU (cores, 10 s): {idle}. Start-up: {startup}. "
             f"Servers {'up together' if phase['servers_together'] else 'one at a time'}.", "",
             "| workload | repeat | server | output tok/s | TPOT p50 | TTFT p50 | ok | load 1m |",
             "|---|---|---|---|---|---|---|---|"]
    for repeat in phase["repeats"]:
        for workload, results in repeat["workloads"].items():
            for name in SERVERS:
                r = results[name]
                lines.append(f"| {workload} | {repeat['repeat']} | {name} | "
                             f"{r['output_throughput']:.1f} | {_ms(r['tpot_p50_s'])} | "
                             f"{_ms(r['ttft_p50_s'])} | {r['num_ok']}/{r['num_requests']} | "
                             f"{r['load_average_1m']:.2f} |")
    lines += ["", "Median over repeats of the per-repeat ratio pdserve / vLLM:", "",
              "| workload | throughput | TPOT p50 | TTFT p50 |", "|---|---|---|---|"]
    for workload, ratios in phase["median_ratios"].items():
        lines.append(f"| {workload} | " + " | ".join(_x(ratios[f]) for f in FIGURES) + " |")
    lines += ["", "| target | median ratio | met |", "|---|---|---|"]
    for check in phase["targets"]:
        met = "n/a" if check["met"] is None else ("yes" if check["met"] else "no")
        lines.append(f"| {check['target']} | {_x(check['ratio'])} | {met} |")
    return lines + [""]


def _disagg_section(disagg: dict[str, Any]) -> list[str]:
    if "failed" in disagg:
        return ["### Disaggregated (1 prefill + 1 decode)", "", f"Failed: {disagg['failed']}",
                ""]
    lines = ["### Disaggregated (1 prefill + 1 decode), float32", "",
             "| server | repeat | ITL p50 / p99 / max alone | with 1024-token prompts at 1/s "
             "| long TTFT p50 | long ok | idle cores |", "|---|---|---|---|---|---|---|"]
    for name, runs in disagg["runs"].items():
        for repeat, run in enumerate(runs):
            alone, mixed = run["itl_alone"], run["itl_with_long_prompts"]
            lines.append(f"| {name} | {repeat} | " + " / ".join(map(_ms, alone.values()))
                         + " | " + " / ".join(map(_ms, mixed.values()))
                         + f" | {_ms(run['long_ttft_p50_s'])} | {run['long_ok']} | "
                         + ", ".join(f"{k} {v:.3f}" for k, v in run["idle_cores"].items())
                         + " |")
    return lines + [""]


RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def write_markdown(path: Path, table: str) -> None:
    """Replace the generated block of ``path`` (between the markers), keeping the rest."""
    text = path.read_text() if path.is_file() else "# pdserve against vLLM\n"
    if RESULTS_START not in text:
        text += f"\n## Results\n\n{RESULTS_START}\n{RESULTS_END}\n"
    head, rest = text.split(RESULTS_START, 1)
    tail = rest.split(RESULTS_END, 1)[1] if RESULTS_END in rest else "\n"
    path.write_text(f"{head}{RESULTS_START}\n{table}{RESULTS_END}{tail}")


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return []
    phases = {d: p for d, p in report["dtypes"].items() if "repeats" in p}
    if not phases:
        return []
    path = directory / "vs_vllm_ratios.png"
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(13, 4), layout="constrained")
    for ax, figure in zip(axes, FIGURES, strict=True):
        _ratio_panel(ax, phases, figure)
    fig.suptitle("pdserve / vLLM per repeat (bar: median)"
                 + (" - SMOKE RUN" if report["quick"] else ""))
    directory.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path, *_cdf_plots(phases, directory)]


def _ratio_panel(ax: Any, phases: dict[str, Any], figure: str) -> None:
    workloads = list(next(iter(phases.values()))["median_ratios"])
    width = 0.8 / len(phases)
    for index, (dtype, phase) in enumerate(phases.items()):
        xs = [w + index * width for w in range(len(workloads))]
        medians = [phase["median_ratios"][w][figure] or 0.0 for w in workloads]
        ax.bar(xs, medians, width=width, alpha=0.6, label=dtype, color=f"C{index}")
        for x, workload in zip(xs, workloads, strict=True):
            values = [r["workloads"][workload]["ratio"][figure] for r in phase["repeats"]]
            ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
    num_dtypes = len(phases)
    for workload, target_figure, bound, _, _ in TARGETS:
        if target_figure == figure and workload in workloads:
            x = workloads.index(workload)
            ax.hlines(bound, x - width / 2, x + (num_dtypes - 0.5) * width, colors="red",
                      linestyles="--", label=f"target {bound:g}x")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([w + (num_dtypes - 1) * width / 2 for w in range(len(workloads))], workloads)
    ax.set_title({"output_throughput": "output tok/s (higher better)",
                  "tpot_p50_s": "TPOT p50 (lower better)",
                  "ttft_p50_s": "TTFT p50 (lower better)"}[figure])
    ax.set_ylabel("pdserve / vLLM")
    ax.legend(fontsize="small")


def _cdf_plots(phases: dict[str, Any], directory: Path) -> list[Path]:
    """Latency CDFs of the last repeat's burst, both servers, through the project's plots."""
    sys.path.insert(0, str(ROOT))
    from bench import plots

    paths = []
    for dtype, phase in phases.items():
        last = phase["repeats"][-1]["workloads"].get("burst")
        if last is None:
            continue
        runs = {name: json.loads(Path(last[name]["bench_json"]).read_text())["runs"][0]
                ["records"] for name in SERVERS}
        paths.append(plots.plot_latency_cdfs(
            runs, directory / f"vs_vllm_burst_cdf_{dtype}.png",
            title=f"burst, {dtype}, last repeat: pdserve vs vLLM"))
    return paths
