"""Server processes for the peer benchmark (scripts/bench_vs_vllm.py): each started in its
own session and stopped with its whole process tree (Ray's workers ``setsid`` out of the
server's group, so the tree is snapshotted from /proc), plus the CPU time of a tree."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on


def descendants(root_pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of ``root_pid`` and every process below it; the start time tells a
    reused pid apart."""
    parents: dict[int, int] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields:
            parents[int(entry.name)], starts[int(entry.name)] = int(fields[1]), int(fields[19])
    tree, frontier = {root_pid}, {root_pid}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return {(pid, starts[pid]) for pid in tree if pid in starts}


def cpu_seconds(processes: set[tuple[int, int]]) -> float:
    """utime + stime of these processes (children that exited are not counted)."""
    total = 0
    for pid, start in processes:
        fields = _stat_fields(pid)
        if fields and int(fields[19]) == start:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _alive(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return {(pid, start) for pid, start in processes
            if (fields := _stat_fields(pid)) and int(fields[19]) == start and fields[0] != "Z"}


@dataclass(slots=True)
class Server:
    """One server process (and what it spawns): its command, environment, log and URL."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    tree: set[tuple[int, int]] = field(default_factory=set)
    startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        print(f"[{self.name}] starting: {' '.join(self.argv)}  (log: {self.log_path})",
              flush=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        _STARTED.append(self)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds from start until /v1/models answers; RuntimeError if the process exits."""
        assert self.process is not None, f"{self.name} was never started"
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            if self.process.poll() is not None:
                raise ServerExited(self.name, self.process.returncode, self.log_tail())
            if _answers(f"{self.url}/v1/models"):
                self.tree = descendants(self.process.pid)
                self.startup_s = time.monotonic() - began
                print(f"[{self.name}] ready in {self.startup_s:.1f} s", flush=True)
                return self.startup_s
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} did not answer {self.url}/v1/models within "
                           f"{timeout_s:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        """SIGTERM to the server (it shuts its own children down), then SIGKILL to whatever of
        its tree is left after the grace period."""
        if self.process is None:
            return
        tree = self.tree | descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while _alive(tree) and time.monotonic() < deadline:
            tree |= {p for pid, _ in _alive(tree) for p in descendants(pid)}
            time.sleep(0.5)
        for pid, _ in _alive(tree):
            print(f"[{self.name}] killing leftover process {pid}", flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.process = None
        _STARTED.remove(self)

    def log_tail(self, num_lines: int = 15) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])


class ServerExited(RuntimeError):
    """A server exited before it answered: for pdserve, often a setting it refuses."""

    def __init__(self, name: str, returncode: int, log_tail: str):
        super().__init__(f"{name} exited with status {returncode} before it answered; its "
                         f"log ends:\n{log_tail}")
        self.name = name


_STARTED: list[Server] = []


def stop_all() -> None:
    for server in list(_STARTED):
        server.stop()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False
