"""CPU kernels in C++ (no torch headers), built on first use and called through ctypes.

- ``paged_attention.cpp``: attention that reads KV blocks in place (engine/attention).
- ``small_gemm.cpp``: linear layers for a few rows (decode), at memory bandwidth, and the
  int8 / fp8 weight GEMMs, dequantization and fp8 activation rounding (engine/quantization.py).
- ``elementwise.cpp``: RMSNorm, rotary and SiLU x up, one pass each (engine/ops.py).

The library is built with the system's C++ compiler (a few seconds) into
``$PDSERVE_HOME/kernels`` (default ``~/.cache/pdserve``), keyed by a digest of the sources,
the flags, the compiler and this CPU's flags (it is built for this CPU: ``-march=native``).
Its OpenMP runtime is the one torch already loaded (the same soname), so it shares torch's
threads rather than starting its own. ``load()`` raises ``KernelUnavailable`` where there is
no compiler or the build fails; callers fall back to plain torch and say so.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in (
    "paged_attention.cpp", "small_gemm.cpp", "elementwise.cpp"))
HEADERS = (Path(__file__).with_name("common.h"),)
COMPILER_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
                  "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
                  "-fno-signed-zeros")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: KernelUnavailable | None = None


class KernelUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here (no compiler, or the build failed)."""


def _cache_dir() -> Path:
    home = os.environ.get("PDSERVE_HOME") or Path.home() / ".cache" / "pdserve"
    return Path(home) / "kernels"


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelUnavailable("no C++ compiler (g++ or $CXX) to build the CPU kernels")
    return compiler


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def library_path() -> Path:
    """Where the library built from these sources, compiler and CPU lives (built or not)."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=False).stdout
    digest = hashlib.sha256()
    for part in (*(path.read_bytes() for path in SOURCES + HEADERS),
                 " ".join(COMPILER_FLAGS).encode(), version.encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    return _cache_dir() / f"pdserve_cpu_kernels-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library unless this exact build is cached; returns its path."""
    target = library_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: another process never loads a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        command = [_compiler(), *COMPILER_FLAGS, "-o", str(partial), *map(str, SOURCES)]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelUnavailable(f"building the CPU kernels failed:\n{result.stderr}")
        os.replace(partial, target)
        logger.info("built the CPU kernels in %.1f s, cached at %s",
                    time.perf_counter() - started, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _declare(library: ctypes.CDLL) -> None:
    pointer, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    attention = library.pdserve_paged_attention
    attention.argtypes = [i32, i32, pointer, pointer, pointer, pointer, pointer, pointer,
                          pointer, i64, pointer, i64, i32, i32, i32, i32, ctypes.c_float, i32]
    attention.restype = i32
    gemm = library.pdserve_small_gemm
    gemm.argtypes = [i32, i32, pointer, pointer, pointer, i64, i64, i64, i32]
    gemm.restype = i32
    quant = library.pdserve_quant_gemm
    quant.argtypes = [i32, i32, pointer, pointer, pointer, i64, pointer, i64, i64, i64, i32]
    quant.restype = i32
    library.pdserve_dequantize.argtypes = [i32, i32, pointer, pointer, i64, pointer, i64, i64,
                                           i32]
    library.pdserve_dequantize.restype = None
    library.pdserve_fp8_quant_dequant.argtypes = [i32, pointer, pointer, i64, i64, pointer, i64]
    library.pdserve_fp8_quant_dequant.restype = None
    library.pdserve_rms_norm.argtypes = [i32, pointer, pointer, pointer, i64, i64, i64,
                                         ctypes.c_float]
    library.pdserve_rms_norm.restype = None
    library.pdserve_rotary.argtypes = [i32, pointer, i64, i64, i64, i64, pointer, pointer,
                                       pointer]
    library.pdserve_rotary.restype = None
    library.pdserve_silu_mul.argtypes = [i32, pointer, pointer, i64, i64]
    library.pdserve_silu_mul.restype = None


def load() -> ctypes.CDLL:
    """The kernel library, built on first use; raises ``KernelUnavailable`` (every time, once
    it has failed: a process does not retry a build that failed)."""
    global _library, _failure
    with _lock:
        if _failure is not None:
            raise _failure
        if _library is None:
            try:
                library = ctypes.CDLL(str(build()))
            except (KernelUnavailable, OSError) as error:
                _failure = (error if isinstance(error, KernelUnavailable)
                            else KernelUnavailable(f"loading the CPU kernels failed: {error}"))
                raise _failure from None
            _declare(library)
            _library = library
        return _library


def library_or_none() -> ctypes.CDLL | None:
    """The library, or None where it cannot be built (logged once, with the reason)."""
    try:
        return load()
    except KernelUnavailable as error:
        if not getattr(library_or_none, "warned", False):
            library_or_none.warned = True
            logger.warning("CPU kernels unavailable, plain torch runs instead: %s", error)
        return None
