"""Deterministic tiny HF-format checkpoints, so that everything runs with no download.

The same call writes byte-identical files on every machine and in every process: weights come
from numpy's PCG64 seeded per tensor name (not torch, whose CPU and CUDA generators differ), the
tokenizer is a byte-level BPE learned here by a fixed loop (the tokenizers trainer breaks ties
differently across processes), and every JSON file is written with sorted keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from pdserve.bpe import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tokenizer,
)

MODEL_VERSION = "v1"  # bump when the bytes written here change, so caches are rebuilt
SEED = 2  # see "Why these scales"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Why these scales (measured with HF transformers fp32, greedy, 48 steps, both archs and sizes).
# At the usual init (std 0.02) logits are almost flat, so a different fp32 summation order flips
# the argmax and parity tests flake; and when the current token dominates the residual stream,
# greedy decoding loops on one token.
# - The final norm weight carries the logit scale, about LOGIT_STD per logit: the top-1 gap is
#   then ~7 on the median step and >= 0.5 on ~95% of steps, while fp32 and fp64 logits differ
#   by ~2e-4. Its random signs matter for the tied (qwen2) model: with all-positive weights a
#   token's own logit row is its embedding, it scores highest, and greedy output is one token
#   repeated.
# - Every sublayer writes back about twice what the embedding holds (RESIDUAL_GAIN), so the
#   prediction depends on the context (a KV-cache bug changes the tokens) and loops are rare.
# - QK_GAIN makes attention selective rather than a flat mean: at 1.0 some prompts loop, at 2.0
#   the fp32 error of the 9-layer model grows four-fold (sharper softmax, more chaotic network).
# - Qwen2 q/k/v biases stay small (BIAS_STD): at 0.5 the v bias adds the same vector to every
#   position, a few "hub" tokens win everywhere, and outputs collapse onto them.
# - Layer norm weights are drawn in NORM_RANGE rather than left at 1, so an engine that forgets
#   one gives different tokens.
# The gap between the top two logits of a random readout has no floor, only a density near zero
# (about 3 / LOGIT_STD per unit); SEED is, of seeds 1-16, the one whose sample prompts
# (tests/conftest.py) keep the widest minimum gap on all four models.
EMBED_STD = 1.0
QK_GAIN = 1.5
RESIDUAL_GAIN = 2.0
LOGIT_STD = 30.0
BIAS_STD = 0.1
NORM_RANGE = (0.5, 1.5)

@dataclass(frozen=True)
class ModelShape:
    """The sizes of one model; every count is per layer unless named otherwise."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported HF architectures."""

    architecture: str
    model_type: str
    is_tied: bool
    has_qkv_bias: bool
    rope_theta: float


SIZES = {
    "tiny": ModelShape(64, 2, 4, 2, 16, 128, 1024),
    "small": ModelShape(512, 9, 8, 4, 64, 1408, 4096),
}
ARCHS = {
    "llama": ArchSpec("LlamaForCausalLM", "llama", False, False, 10000.0),
    "qwen2": ArchSpec("Qwen2ForCausalLM", "qwen2", True, True, 1000000.0),
}
# A small original length, so llama3 scaling changes some frequencies of even the tiny model.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# config.json keys that fix tensor shapes: overriding them would write an unloadable checkpoint.
SHAPE_KEYS = frozenset(
    "hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim"
    " intermediate_size vocab_size tie_word_embeddings attention_bias".split()
)


def tensor_shapes(shape: ModelShape, arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint holds, in the order it is written."""
    hidden, q_dim = shape.hidden_size, shape.num_heads * shape.head_dim
    kv_dim, inter = shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB_SIZE, hidden)}
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        for proj, out_dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            shapes[f"{prefix}.self_attn.{proj}.weight"] = (out_dim, hidden)
            if arch.has_qkv_bias:
                shapes[f"{prefix}.self_attn.{proj}.bias"] = (out_dim,)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (hidden, q_dim)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not arch.is_tied:
        shapes["lm_head.weight"] = (VOCAB_SIZE, hidden)
    return shapes


def parameter_count(size: str = "tiny", arch: str = "llama") -> int:
    """Number of weights in the model create_model writes for this size and arch."""
    shapes = tensor_shapes(_shape(size), _arch(arch))
    return sum(int(np.prod(dims)) for dims in shapes.values())


def make_tensor(name: str, dims: tuple[int, ...], shape: ModelShape) -> np.ndarray:
    """One weight, seeded by its own name so that no tensor depends on the others."""
    name_seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([SEED, name_seed])
    if name.endswith("layernorm.weight"):
        return rng.uniform(*NORM_RANGE, size=dims).astype(np.float32)
    if name == "model.norm.weight":
        signs = rng.choice(np.array([-1.0, 1.0]), size=dims)
        gain = LOGIT_STD / (EMBED_STD * np.sqrt(shape.hidden_size))
        return (signs * rng.uniform(*NORM_RANGE, size=dims) * gain).astype(np.float32)
    return (rng.standard_normal(dims, dtype=np.float32) * _std(name, dims)).astype(np.float32)


def _std(name: str, dims: tuple[int, ...]) -> float:
    fan_in = dims[-1]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return EMBED_STD
    if name.endswith(".bias"):
        return BIAS_STD
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        return QK_GAIN / np.sqrt(fan_in)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return RESIDUAL_GAIN * EMBED_STD / np.sqrt(fan_in)
    return 1.0 / np.sqrt(fan_in)


def model_config(shape: ModelShape, arch: ArchSpec, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json in the classic transformers 4.x form (top-level rope_theta/rope_scaling)."""
    config: dict[str, Any] = {
        "architectures": [arch.architecture],
        "model_type": arch.model_type,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.token_to_id(BOS_TOKEN),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": arch.rope_theta,
        "tie_word_embeddings": arch.is_tied,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    if arch.model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False, rope_scaling=LLAMA3_ROPE_SCALING)
    else:
        # Like real Qwen2.5 configs: a window is given but switched off, which engines must honour.
        config.update(
            use_sliding_window=False,
            sliding_window=shape.max_position_embeddings,
            max_window_layers=shape.num_layers,
            rope_scaling=None,
        )
    return config


def tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json as HF writes it; add_bos_token agrees with the post-processor."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {
        str(tokenizer.token_to_id(token)): {"content": token, **flags, "special": True}
        for token in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def create_model(
    out_dir: str | Path,
    size: str = "tiny",
    arch: str = "llama",
    *,
    num_shards: int = 1,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write an HF-format checkpoint into out_dir (new or empty) and return its path."""
    shape, spec = _shape(size), _arch(arch)
    overrides = dict(config_overrides or {})
    if bad_keys := sorted(SHAPE_KEYS & overrides.keys()):
        raise ValueError(f"config_overrides may not change tensor shapes: {bad_keys}")
    shapes = tensor_shapes(shape, spec)
    if not 1 <= num_shards <= len(shapes):
        raise ValueError(f"num_shards must be in [1, {len(shapes)}], got {num_shards}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out_dir {str(out)!r} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tensors = {name: make_tensor(name, dims, shape) for name, dims in shapes.items()}
    _write_weights(out, tensors, num_shards)
    write_tokenizer_files(out, tokenizer, shape.max_position_embeddings)
    write_json(out / "config.json", {**model_config(shape, spec, tokenizer), **overrides})
    return out


def write_tokenizer_files(out: Path, tokenizer: Tokenizer, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json, as every checkpoint pdserve builds carries them."""
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    write_json(out / "tokenizer_config.json", tokenizer_config(tokenizer, max_length))
    write_json(out / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN})
    eos_ids = [tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(IM_END_TOKEN)]
    generation = {"bos_token_id": tokenizer.token_to_id(BOS_TOKEN), "eos_token_id": eos_ids}
    write_json(out / "generation_config.json", generation)


def _write_weights(out: Path, tensors: dict[str, np.ndarray], num_shards: int) -> None:
    if num_shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for index, shard_names in enumerate(np.array_split(np.arange(len(names)), num_shards)):
        filename = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {names[i]: tensors[names[i]] for i in shard_names}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total_size = sum(tensor.nbytes for tensor in tensors.values())
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    write_json(out / "model.safetensors.index.json", index_json)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """JSON with sorted keys and a final newline, so the bytes never depend on dict order."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _shape(size: str) -> ModelShape:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


def _arch(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


def default_model_dir(size: str = "tiny", arch: str = "llama") -> Path:
    """Where the default model of this size and arch is cached ($PDSERVE_HOME or ~/.cache)."""
    _shape(size)
    _arch(arch)
    return models_home() / f"{arch}-{size}-{MODEL_VERSION}"


def models_home() -> Path:
    """Where built models are cached: $PDSERVE_HOME/models, else ~/.cache/pdserve/models."""
    home = os.environ.get("PDSERVE_HOME") or Path.home() / ".cache" / "pdserve"
    return Path(home) / "models"


def ensure_default_model(size: str = "tiny", arch: str = "llama") -> Path:
    """Create the default model if it is not cached yet; return its directory."""
    return ensure_built(default_model_dir(size, arch), lambda out: create_model(out, size, arch))


def ensure_built(final: Path, build: Callable[[Path], object]) -> Path:
    """``build(staging)`` into a temp dir beside ``final``, renamed to ``final``; nothing
    is built when ``final`` exists. Returns ``final``."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # A model is written whole into a temp dir and renamed, so a crash never leaves half a model
    # and a concurrent creator either wins the rename or finds the finished directory.
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(staging)
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
