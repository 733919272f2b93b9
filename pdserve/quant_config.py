"""Which weight quantization a model runs with: the requested method and the checkpoint's own.

Pure Python (no torch): the launcher resolves it once for the fingerprint and refuses a bad
checkpoint before any worker starts; every rank resolves the same scheme to build its layers
(``engine/quantization.py``).

``quantization`` (the config field) is one of
- ``auto``: the checkpoint's ``quantization_config`` if its ``config.json`` has one, else none;
- ``none``: full precision (a quantized checkpoint is then refused);
- ``int8``: weight-only int8, symmetric per output channel, quantized on load;
- ``fp8``: e4m3 weights per output channel, activations quantized per token (W8A8),
  quantized on load; or the checkpoint's own fp8 when it is already quantized.

Checkpoints loaded as published:
- ``compressed-tensors``, ``float-quantized`` format, 8-bit float weights by ``channel``,
  ``tensor`` or ``block`` (``weight_scale``), with input activations quantized dynamically
  per ``token``, statically per ``tensor`` (``input_scale``), or not at all;
- ``fp8`` with ``weight_block_size`` (``weight_scale_inv``, DeepSeek-V3 / Qwen3 FP8 style),
  weights only: transformers itself dequantizes these on a CPU, and so does pdserve.
Anything else is refused, naming what it found and what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.checkpoint_files import read_json
from pdserve.choices import QUANTIZATIONS

SUPPORTED_CHECKPOINTS = ("compressed-tensors (float-quantized fp8: channel, tensor or block "
                         "weights; token-dynamic, tensor-static or no activation quantization), "
                         "fp8 (block-wise weight_scale_inv)")
# The layer linears the engine quantizes; embedding, lm_head and norms stay full precision.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """How the layer linears hold and apply their weights.

    ``weights`` is ``int8`` or ``fp8``; ``strategy`` ``channel`` (a scale per output row),
    ``tensor`` (one per tensor) or ``block`` (one per ``block`` = (rows, columns) tile);
    ``activations`` ``none`` (weight-only), ``dynamic`` (fp8 per token, at run time) or
    ``static`` (fp8 with the checkpoint's per-tensor ``input_scale``). ``source`` is
    ``on-load`` or the checkpoint's ``quant_method``; ``scale_name`` the checkpoint tensor
    suffix of the weight scales.
    """

    weights: str
    strategy: str
    activations: str
    source: str
    block: tuple[int, int] | None = None
    scale_name: str = "weight_scale"

    @property
    def prequantized(self) -> bool:
        return self.source != "on-load"

    @property
    def fingerprint(self) -> str:
        """What peers must agree on: the weights' format, not where they came from."""
        strategy = (f"block{self.block[0]}x{self.block[1]}" if self.block else self.strategy)
        return f"{self.weights}-{strategy}-act-{self.activations}"

    def describe(self) -> str:
        activations = {"none": "weight-only", "dynamic": "activations fp8 per token (dynamic)",
                       "static": "activations fp8 per tensor (static input_scale)"}
        origin = ("quantized on load" if self.source == "on-load"
                  else f"loaded as published ({self.source})")
        strategy = (f"per {self.block[0]}x{self.block[1]} block" if self.block
                    else f"per {self.strategy}")
        return (f"{self.weights} weights {strategy}, {activations[self.activations]}, "
                f"{origin}; embedding, lm_head and norms stay in the compute dtype")


def weights_fingerprint(scheme: QuantScheme | None) -> str:
    return "none" if scheme is None else scheme.fingerprint


def resolve_scheme(quantization: str, model_dir: str | Path) -> QuantScheme | None:
    """The scheme for ``quantization`` on the checkpoint in ``model_dir`` (None: full
    precision); ValueError naming the field for anything unsupported."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is invalid: must be one of "
                         f"{list(QUANTIZATIONS)}")
    config_path = Path(model_dir) / "config.json"
    published = read_json(config_path).get("quantization_config")
    if published is None:
        if quantization == "int8":
            return QuantScheme("int8", "channel", "none", "on-load")
        if quantization == "fp8":
            return QuantScheme("fp8", "channel", "dynamic", "on-load")
        return None
    if not isinstance(published, dict):
        raise ValueError(f"{config_path}: quantization_config must be an object")
    scheme = _published_scheme(published, config_path)
    if quantization in ("none", "int8"):
        raise ValueError(
            f"quantization={quantization!r} is invalid for {model_dir}: the checkpoint is "
            f"already quantized ({scheme.weights}, quant_method={scheme.source!r}); use "
            f"'auto' or '{scheme.weights}'")
    return scheme


def _published_scheme(raw: dict[str, Any], config_path: Path) -> QuantScheme:
    method = raw.get("quant_method")
    where = f"{config_path}: quantization_config"
    if method == "compressed-tensors":
        return _compressed_tensors(raw, where)
    if method == "fp8":
        return _fp8_block(raw, where)
    raise ValueError(f"{where}.quant_method={method!r} is not supported; pdserve loads "
                     f"{SUPPORTED_CHECKPOINTS}")


def _check_ignored(ignored: Any, where: str, field: str) -> None:
    for name in ignored or ():
        leaf = str(name).removeprefix("re:").rstrip("$").rsplit(".", 1)[-1]
        if leaf in LINEAR_NAMES or any(linear in str(name) for linear in LINEAR_NAMES):
            raise ValueError(f"{where}.{field} lists {name!r}: pdserve quantizes every layer "
                             f"linear alike and cannot leave some in full precision")


def _compressed_tensors(raw: dict[str, Any], where: str) -> QuantScheme:
    fmt = raw.get("format")
    if fmt != "float-quantized":
        raise ValueError(f"{where}.format={fmt!r} is not supported; pdserve loads "
                         f"compressed-tensors 'float-quantized' (fp8)")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}.config_groups is missing or empty")
    schemes = [_ct_group(name, group, f"{where}.config_groups.{name}")
               for name, group in groups.items()]
    if len(set(schemes)) != 1:
        raise ValueError(f"{where}.config_groups: groups with different schemes are not "
                         f"supported (found {len(set(schemes))})")
    _check_ignored(raw.get("ignore"), where, "ignore")
    return schemes[0]


def _ct_group(name: str, group: Any, where: str) -> QuantScheme:
    if not isinstance(group, dict):
        raise ValueError(f"{where} must be an object")
    targets = group.get("targets") or []
    if "Linear" not in targets:
        raise ValueError(f"{where}.targets={targets!r} is not supported: must include 'Linear'")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"{where}.weights is missing")
    _check_fp8_args(weights, f"{where}.weights")
    strategy = weights.get("strategy")
    block = None
    if strategy == "block":
        block = _block(weights.get("block_structure"), f"{where}.weights.block_structure")
    elif strategy not in ("channel", "tensor"):
        raise ValueError(f"{where}.weights.strategy={strategy!r} is not supported "
                         f"(channel, tensor, block)")
    if weights.get("dynamic"):
        raise ValueError(f"{where}.weights.dynamic=true is not supported: weights must carry "
                         f"their scales")
    activations = group.get("input_activations")
    if activations is None:
        mode = "none"
    else:
        _check_fp8_args(activations, f"{where}.input_activations")
        kind = (activations.get("strategy"), bool(activations.get("dynamic")))
        modes = {("token", True): "dynamic", ("tensor", False): "static"}
        if kind not in modes:
            raise ValueError(f"{where}.input_activations: strategy={kind[0]!r} with "
                             f"dynamic={kind[1]} is not supported (token dynamic, or tensor "
                             f"static)")
        mode = modes[kind]
    if group.get("output_activations") is not None:
        raise ValueError(f"{where}.output_activations is not supported")
    return QuantScheme("fp8", strategy, mode, "compressed-tensors", block)


def _check_fp8_args(args: dict[str, Any], where: str) -> None:
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise ValueError(f"{where}: type={args.get('type')!r} num_bits={args.get('num_bits')!r} "
                         f"is not supported: pdserve loads 8-bit float (fp8) compressed-tensors")
    if args.get("symmetric") is False:
        raise ValueError(f"{where}.symmetric=false is not supported")


def _block(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"{where}={value!r} is invalid: must be [rows, columns], positive ints")
    return int(value[0]), int(value[1])


def _fp8_block(raw: dict[str, Any], where: str) -> QuantScheme:
    if raw.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{where}.fmt={raw.get('fmt')!r} is not supported (e4m3)")
    if raw.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{where}.activation_scheme={raw.get('activation_scheme')!r} is not "
                         f"supported (dynamic)")
    if raw.get("weight_block_size") is None:
        raise ValueError(f"{where}.weight_block_size is missing: pdserve loads block-wise fp8")
    block = _block(raw.get("weight_block_size"), f"{where}.weight_block_size")
    _check_ignored(raw.get("modules_to_not_convert"), where, "modules_to_not_convert")
    # Activations stay in the compute dtype: what transformers computes for this format on a
    # CPU (it dequantizes the weights), so its logits are the oracle here.
    return QuantScheme("fp8", "block", "none", "fp8", block, "weight_scale_inv")
