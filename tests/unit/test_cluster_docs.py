"""The operator's files agree with the code: the example config loads, the launcher files
parse, and every `pdserve serve` flag docs/cluster.md names exists (and every one is named,
with the config keys it sets and their default)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
from pathlib import Path

import yaml

from pdserve.cli import build_parser, config_flags
from pdserve.config import ClusterConfig, DecodeConfig, PrefillConfig, RouterConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "scripts" / "cluster.example.yaml"
RAY_CLUSTER = ROOT / "scripts" / "ray-cluster.yaml"
LAUNCH = ROOT / "scripts" / "launch-cluster.sh"
DOC = ROOT / "docs" / "cluster.md"

_FLAG = re.compile(r"--[a-z][a-z0-9-]*")
_KEY = re.compile(r"`([a-z_.]+)`")
# the arguments after `pdserve serve` (or the launch script's `head`), up to ' or `
_SERVE_ARGS = re.compile(r"(?:pdserve serve|launch-cluster\.sh head)([^'`\n]*)")


def _field_names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def _serve_flags() -> set[str]:
    commands = next(action for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return {flag for action in serve._actions for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"}


def _doc_flags() -> tuple[set[str], set[str]]:
    """Flags in the flags table's first column, and flags given to `pdserve serve` in
    commands (backslash-continued lines joined)."""
    text = DOC.read_text(encoding="utf-8")
    table = {flag for line in text.splitlines() if line.startswith("| `--")
             for flag in _FLAG.findall(line.split("|")[1])}
    joined = text.replace("\\\n", " ")
    commands = {flag for match in _SERVE_ARGS.finditer(joined)
                for flag in _FLAG.findall(match.group(1))}
    return table, commands


def _table_rows() -> dict[str, list[str]]:
    """The flags table by flag: its cells after the first (config keys, default, meaning)."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `--"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[_FLAG.findall(cells[0])[0]] = cells[1:]
    return rows


def test_example_config_loads_and_holds_every_default():
    config = ClusterConfig.from_yaml(EXAMPLE)  # refuses an unknown key, names a bad value
    assert config == ClusterConfig(model_dir=config.model_dir)


def test_example_config_lists_every_field():
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert set(data) == _field_names(ClusterConfig)
    for section, cls in (("decode", DecodeConfig), ("prefill", PrefillConfig),
                         ("router", RouterConfig)):
        assert set(data[section]) == _field_names(cls), section


def test_ray_cluster_config_has_launcher_keys():
    data = yaml.safe_load(RAY_CLUSTER.read_text(encoding="utf-8"))
    for key in ("cluster_name", "provider", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in data, key
    assert data["provider"]["type"] == "local"
    assert {"head_ip", "worker_ips"} <= set(data["provider"])
    assert any("ray start --head" in c for c in data["head_start_ray_commands"])
    assert any("ray start --address" in c for c in data["worker_start_ray_commands"])


def test_launch_script_parses_and_needs_a_role():
    assert os.access(LAUNCH, os.X_OK)
    subprocess.run(["bash", "-n", str(LAUNCH)], check=True)
    for args in ([], ["nonsense"], ["worker"]):
        result = subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True,
                                env={"PATH": "/usr/bin:/bin", "RAY_BIN": "false",
                                     "PDSERVE_BIN": "false"})
        assert result.returncode != 0, args
        assert result.stderr.startswith("usage: "), (args, result.stderr)


def test_doc_flags_exist_in_the_cli():
    flags = _serve_flags()
    table, commands = _doc_flags()
    assert table and commands
    assert table <= flags, table - flags
    assert commands <= flags, commands - flags


def test_doc_table_covers_every_cli_flag():
    table, _ = _doc_flags()
    assert _serve_flags() <= table, _serve_flags() - table


def test_doc_table_names_the_keys_each_flag_sets_and_their_default():
    rows = _table_rows()
    flags = config_flags()
    for flag, (keys, default, _) in rows.items():
        assert tuple(_KEY.findall(keys)) == (flags[flag].paths if flag in flags else ()), flag
        spec = flags[flag].spec if flag in flags else None
        if spec is not None and spec.has_default:
            value = getattr(spec.default, "value", spec.default)  # an Enum as in YAML
            assert default.strip("`") == str(value), flag
