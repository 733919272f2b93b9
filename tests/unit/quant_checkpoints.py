"""Quantized copies of the tiny test checkpoints, written by hand to the published layouts.

- ``compressed-tensors`` float-quantized: each layer linear's ``weight`` in float8_e4m3fn with
  ``weight_scale`` (``[N, 1]`` per channel, ``[1]`` per tensor, ``[ceil(N/b0), ceil(K/b1)]``
  per block), ``input_scale`` ``[1]`` for static activations, and the ``quantization_config``
  llm-compressor writes (``config_groups``, ``ignore: [lm_head]``, status ``compressed``).
- ``fp8`` (block-wise, DeepSeek-V3 style): ``weight`` float8_e4m3fn and ``weight_scale_inv``
  ``[ceil(N/b0), ceil(K/b1)]`` (the dequantization scale, despite its name).

HF transformers reads both (compressed-tensors through that package; block fp8 dequantized on a
CPU), which makes it the oracle for what these checkpoints mean.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def _block_scales(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, columns = weight.shape
    out = torch.empty(-(-rows // block[0]), -(-columns // block[1]))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            out[i, j] = tile.abs().max() / FP8_MAX
    return out


def _expand(scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0],
                                                                               : shape[1]]


def quantize_fp8(weight: torch.Tensor, strategy: str,
                 block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, its scale in the checkpoint's shape) for one strategy."""
    weight = weight.float()
    if strategy == "channel":
        scale = weight.abs().amax(dim=1, keepdim=True) / FP8_MAX
        full = scale
    elif strategy == "tensor":
        scale = (weight.abs().max() / FP8_MAX).reshape(1)
        full = scale
    else:
        scale = _block_scales(weight, block)
        full = _expand(scale, block, weight.shape)
    values = (weight / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, scale


def _copy_model(source: Path, target: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    tensors = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    return tensors, config


def _static_input_scale(name: str) -> torch.Tensor:
    # Different for q, k and v of one layer, so the fused layer must treat them apart.
    return torch.tensor([(3.0 + LINEARS.index(name.split(".")[-2]) % 3) / FP8_MAX])


def write_compressed_tensors(source: Path, target: Path, strategy: str = "channel",
                             activations: str = "dynamic",
                             block: tuple[int, int] = (32, 32)) -> Path:
    """``source`` (a full-precision checkpoint) as compressed-tensors fp8 in ``target``."""
    tensors, config = _copy_model(source, target)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not _is_linear(name):
            out[name] = tensor.contiguous()
            continue
        values, scale = quantize_fp8(tensor, strategy, block)
        prefix = name.removesuffix("weight")
        out[name] = values
        out[prefix + "weight_scale"] = scale.contiguous()
        if activations == "static":
            out[prefix + "input_scale"] = _static_input_scale(name)
    save_file(out, str(target / "model.safetensors"))
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
               "strategy": strategy, "group_size": None, "observer": "minmax"}
    if strategy == "block":
        weights["block_structure"] = list(block)
    input_args = {
        "dynamic": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                    "strategy": "token", "observer": None},
        "static": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": "tensor", "observer": "minmax"},
        "none": None,
    }[activations]
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": input_args,
                                      "output_activations": None}},
    }
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return target


def write_fp8_block(source: Path, target: Path, block: tuple[int, int] = (32, 32)) -> Path:
    """``source`` as a block-wise fp8 checkpoint (``quant_method: fp8``) in ``target``."""
    tensors, config = _copy_model(source, target)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if _is_linear(name):
            values, scale = quantize_fp8(tensor, "block", block)
            out[name] = values
            out[name.removesuffix("weight") + "weight_scale_inv"] = scale.contiguous()
        else:
            out[name] = tensor.contiguous()
    save_file(out, str(target / "model.safetensors"))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "fmt": "e4m3", "weight_block_size": list(block)}
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return target


def edit_tensors(model_dir: Path, edit) -> None:
    """Rewrite ``model_dir``'s tensors through ``edit(dict) -> dict`` (bad-input tests)."""
    path = model_dir / "model.safetensors"
    save_file(edit(load_file(str(path))), str(path))
