"""What every benchmark reports: figures over repeats, the commit, the machine."""

from __future__ import annotations

import platform
import statistics
import subprocess
from pathlib import Path


def summarize(runs: list[dict]) -> dict:
    """Median, min and max of every float figure across repeats, plus the repeats."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    summary = {k: {"median": statistics.median(r[k] for r in runs),
                   "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys}
    return {**summary, "repeats": runs}


def git_commit(*code_dirs: str) -> str:
    """HEAD of this checkout, "+dirty" when ``code_dirs`` have uncommitted edits."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *code_dirs],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), platform.processor())
