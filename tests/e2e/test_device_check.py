"""The device check's CPU smoke run (scripts/device_check.sh --cpu), as CI runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_device_check_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "device_check.json"
    result = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh"), "--cpu", "--out",
                             str(out)], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    parity = report["parity"]["float32"]
    assert parity["sequences_identical"] == parity["sequences"] == 3
    assert report["parity"]["bfloat16"]["min_cosine"] > 0.99
    speed = report["speed"]
    for figure in ("decode_batch_1", "decode_batch_32"):
        assert speed[figure]["step_s"] > 0 and speed[figure]["floor_s"] > 0
    assert speed["prefill"]["flop_s"] > 0 and speed["prefill"]["gemm_peak_flop_s"] > 0
    quantization = report["quantization"]
    assert quantization["fp8"]["quantization"] == "fp8"
    assert quantization["decode_batch_1_fp8_over_float32"] > 0
    assert quantization["scaled_mm_vs_emulated_max_rel_error"] < 0.01
    assert "skipped" in report["nixl"]
