"""The worker-rank processes of this benchmark run, read from /proc: CPU and memory."""

from __future__ import annotations

import os
import time
from pathlib import Path

IDLE_SAMPLE_S = 2.0


def worker_pids() -> list[int]:
    """This run's worker-rank processes: the ``ray::WorkerRank`` descendants of this one
    (other Ray sessions on the machine have their own)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    return sorted(pid for pid in mine if _cmdline(pid).startswith("ray::WorkerRank"))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def _cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def idle_footprint() -> dict:
    """Cores the idle worker processes keep busy, and each one's resident memory."""
    pids = worker_pids()
    before = sum(_cpu_s(pid) for pid in pids)
    time.sleep(IDLE_SAMPLE_S)
    cores = (sum(_cpu_s(pid) for pid in pids) - before) / IDLE_SAMPLE_S
    rss_mib = [int(Path(f"/proc/{pid}/statm").read_text().split()[1])
               * os.sysconf("SC_PAGE_SIZE") / 2**20 for pid in pids]
    return {"idle_cores": cores, "worker_rss_mib": rss_mib}
