"""`pdserve serve`: flags over --config over defaults, refusals, and the real command end to
end (its own local Ray cluster, HTTP, SIGTERM)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from pdserve.choices import DisaggMode
from pdserve.cli import build_parser, cluster_config


def _config(*argv: str):
    return cluster_config(build_parser().parse_args(["serve", *argv]))


def test_flags_override_the_config_file(tmp_path, tiny_llama_dir):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"model_dir: {tiny_llama_dir}\nkv_transfer_dtype: auto\n"
                    "decode: {num_workers: 2, max_local_prefill_tokens: 100}\n"
                    "router: {port: 9000, max_queue: 5}\n")
    config = _config("--config", str(path), "--decode-workers", "3", "--port", "9100",
                     "--kv-cache-dtype", "fp8", "--kv-transfer-dtype", "fp8",
                     "--disagg-mode", "always", "--prefill-tp", "2", "--address", "auto",
                     "--kv-weight", "0", "--host", "0.0.0.0")
    assert (config.decode.num_workers, config.decode.max_local_prefill_tokens) == (3, 100)
    assert (config.router.port, config.router.max_queue, config.router.host) == \
        (9100, 5, "0.0.0.0")
    assert (config.decode.kv_cache_dtype, config.prefill.kv_cache_dtype) == ("fp8", "fp8")
    assert (config.kv_transfer_dtype, config.decode.disagg_mode) == ("fp8", DisaggMode.ALWAYS)
    assert (config.prefill.tensor_parallel_size, config.address) == (2, "auto")
    assert config.router.kv_weight == 0
    assert _config("--model", str(tiny_llama_dir)).router.port == 8000


def test_bad_values_are_refused_naming_them(tmp_path, tiny_llama_dir, capsys):
    with pytest.raises(ValueError, match=r"^prefill.kv_cache_dtype: 'fp8' is invalid, must be "
                                         r"'auto' when kv_transfer_dtype is 'auto'"):
        _config("--model", str(tiny_llama_dir), "--kv-cache-dtype", "fp8",
                "--kv-transfer-dtype", "auto")
    for argv in (["--port", "70000"], ["--decode-workers", "0"], ["--disagg-mode", "sometimes"],
                 ["--address", "nowhere"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["serve", *argv])
        assert exit_info.value.code == 2
        assert f"argument {argv[0]}: {argv[1]!r} is invalid, must be " in capsys.readouterr().err


def test_pdserve_serve_answers_http_then_drains_on_sigterm(tiny_llama_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "serve", "--model", str(tiny_llama_dir),
         "--port", str(port), "--max-local-prefill-tokens", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True)
    try:
        lines = []
        for line in process.stdout:  # blocks until the banner: the server is up
            lines.append(line)
            if "metrics:" in line:
                break
        assert any(f"http://127.0.0.1:{port}" in line for line in lines), lines
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            assert http.get("/health").status_code == 200
            response = http.post("/v1/completions", json={
                "model": tiny_llama_dir.name, "prompt": "Once upon a time " * 8,
                "max_tokens": 4})
            assert response.status_code == 200
            assert response.json()["usage"]["completion_tokens"] == 4
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
        assert "shutting the cluster down" in process.stdout.read()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
