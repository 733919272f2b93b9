"""Reading an HF safetensors checkpoint (one file or sharded with an index) into the model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.model import CausalLM

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{model_dir} holds no *.safetensors file (nor model.safetensors.index.json)")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the index but missing")
    return files


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name)


def load_weights(model: CausalLM, model_dir: str | Path) -> None:
    """Fill every parameter from the checkpoint; a missing or unknown tensor is an error."""
    model_dir = Path(model_dir)
    expected = model.expected_tensor_names()
    seen: set[str] = set()
    for name, tensor in iter_tensors(model_dir):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if not model.load_tensor(name, tensor):
            scheme = model.quant.describe() if model.quant else "no quantization_config"
            raise ValueError(f"{model_dir}: checkpoint tensor {name!r} is not part of a "
                             f"{model.config.architecture} model ({scheme})")
        seen.add(name)
    missing = sorted(expected - seen) + model.missing_quantized_tensors()
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks tensors {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
