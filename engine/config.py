"""Model and engine configuration: frozen dataclasses, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.checkpoint_files import read_json
from pdserve.choices import (
    ATTENTION_BACKENDS,
    DEVICES,
    KV_CACHE_DTYPES,
    MODEL_DTYPES,
    QUANTIZATIONS,
    check_fields,
    setting,
)

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters; ``rope_type`` is ``default``, ``linear`` or ``llama3``."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from an HF ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    torch_dtype: str
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        model_dir = Path(model_dir)
        raw = read_json(model_dir / "config.json")
        architecture = (raw.get("architectures") or [None])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{model_dir / 'config.json'}: architectures={raw.get('architectures')!r} is not "
                f"supported; pdserve runs {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size"):
            if key not in raw:
                raise ValueError(f"{model_dir / 'config.json'}: field {key!r} is missing")
        num_heads = raw["num_attention_heads"]
        eos = _eos_token_ids(model_dir, raw)
        use_sliding = raw.get("use_sliding_window", True) and raw.get("sliding_window")
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope=_rope_config(raw, model_dir),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=architecture == "Qwen2ForCausalLM" or raw.get("attention_bias", False),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            sliding_window=int(use_sliding) if use_sliding else None,
            eos_token_ids=eos,
            bos_token_id=raw.get("bos_token_id"),
        )


def _rope_config(raw: dict[str, Any], model_dir: Path) -> RopeConfig:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(
            f"{model_dir / 'config.json'}: rope_scaling.rope_type={rope_type!r} is not supported "
            "(default, linear, llama3)"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _eos_token_ids(model_dir: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    # generation_config.json wins: Llama-3-Instruct stops on <|eot_id|> only through it.
    eos: Any = raw.get("eos_token_id")
    generation_path = model_dir / "generation_config.json"
    if generation_path.is_file():
        eos = read_json(generation_path).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Options of one engine instance (one tensor-parallel group).

    Checked like the cluster config, by ``check_fields`` against the same tables
    (``pdserve/choices.py``); an error names the bare field, in the engine API's form:
    ``block_size=0 is invalid: must be >= 1``.
    """

    block_size: int = setting(16, minimum=1)
    num_blocks: int | None = setting(None, minimum=1)
    kv_cache_memory_fraction: float = setting(0.1, exclusive_minimum=0, maximum=1)
    max_num_batched_tokens: int = setting(2048, minimum=1)
    max_num_seqs: int = setting(64, minimum=1)
    max_model_len: int | None = setting(None, minimum=1)
    kv_cache_dtype: str = setting("auto", choices=KV_CACHE_DTYPES)
    enable_prefix_caching: bool = setting(True)
    dtype: str = setting("auto", choices=MODEL_DTYPES)
    device: str | None = setting(None, choices=DEVICES)  # None: cuda if present, else cpu
    tensor_parallel_size: int = setting(1, minimum=1)
    num_threads: int | None = setting(None, minimum=1)
    seed: int = setting(0, minimum=0)
    attention_backend: str = setting("auto", choices=ATTENTION_BACKENDS)
    enforce_eager: bool = setting(False)  # CUDA: run decode without CUDA graphs
    quantization: str = setting("auto", choices=QUANTIZATIONS)  # weights; pdserve/quant_config

    def __post_init__(self) -> None:
        check_fields(self, message="{name}={value!r} is invalid: must be {expected}")
