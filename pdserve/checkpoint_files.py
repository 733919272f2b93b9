"""Reading a checkpoint directory's JSON files, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: a model directory needs it") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing file, bad JSON or a non-object is named."""
    try:
        content = json.loads(read_bytes(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content
