"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Tensor-parallel: q/k/v and gate/up are column-parallel, o and down row-parallel; the
embedding, final norm and output layer are replicated on every rank, so every rank ends
with the same hidden states and the same logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.linear import linear
from engine.ops import rms_norm, rotate_qk_, silu_mul
from engine.parallel import TensorParallel, check_head_split, local_kv_heads
from engine.quantization import column_parallel, row_parallel
from engine.rotary import RotaryEmbedding
from pdserve.quant_config import QuantScheme


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, in float32; ``[..., size]`` in and out."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """One layer's self-attention over this rank's heads: fused q/k/v (column-parallel),
    rotary, paged attention, ``o_proj`` (row-parallel, all-reduced); ``[T, hidden]`` in
    and out."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, rotary: RotaryEmbedding,
                 dtype: torch.dtype, quant: QuantScheme | None):
        super().__init__()
        head_dim = config.head_dim
        self.num_heads = config.num_heads // tp.size
        first_kv, self.num_kv_heads = local_kv_heads(config.num_kv_heads, tp)
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        q_rows = self.num_heads * head_dim
        kv_shard = (first_kv * head_dim, self.num_kv_heads * head_dim)
        self.qkv = column_parallel(
            config.hidden_size,
            {"q": (tp.rank * q_rows, q_rows), "k": kv_shard, "v": kv_shard},
            config.qkv_bias, dtype, quant)
        self.o_proj = row_parallel(config.num_heads * head_dim, config.hidden_size, tp, dtype,
                                   quant)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cache: KVCache, layer: int,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = rotate_qk_(self.qkv(x), positions, self.num_heads, self.num_kv_heads,
                             self.head_dim, self.rotary.cos, self.rotary.sin)
        out = paged_attention(q, k, v, cache, layer, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward over this rank's slice of ``intermediate_size``: fused gate/up
    (column-parallel), ``down_proj`` (row-parallel, all-reduced); ``[T, hidden]`` in and out."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                 quant: QuantScheme | None):
        super().__init__()
        if config.intermediate_size % tp.size:
            raise ValueError(f"tensor_parallel_size={tp.size} does not divide "
                             f"intermediate_size={config.intermediate_size}")
        rows = config.intermediate_size // tp.size
        shard = (tp.rank * rows, rows)
        self.gate_up = column_parallel(
            config.hidden_size, {"gate": shard, "up": shard}, False, dtype, quant)
        self.down_proj = row_parallel(config.intermediate_size, config.hidden_size, tp, dtype,
                                      quant)
        self.local_size = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up(x)))


class DecoderLayer(nn.Module):
    """One pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``;
    ``[T, hidden]`` in and out."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, rotary: RotaryEmbedding,
                 dtype: torch.dtype, quant: QuantScheme | None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, tp, rotary, dtype, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, tp, dtype, quant)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cache: KVCache, layer: int,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), cache, layer, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


_LAYER_TENSOR = re.compile(
    r"model\.layers\.(\d+)\.(.+)\.(weight|bias|weight_scale|weight_scale_inv|input_scale)")
# Checkpoint module -> (this model's module, the shard of it the tensor fills).
_LINEARS = {
    "self_attn.q_proj": ("self_attn.qkv", "q"),
    "self_attn.k_proj": ("self_attn.qkv", "k"),
    "self_attn.v_proj": ("self_attn.qkv", "v"),
    "self_attn.o_proj": ("self_attn.o_proj", None),
    "mlp.gate_proj": ("mlp.gate_up", "gate"),
    "mlp.up_proj": ("mlp.gate_up", "up"),
    "mlp.down_proj": ("mlp.down_proj", None),
}


class CausalLM(nn.Module):
    """The whole decoder: token ids in, hidden states out; logits only where asked."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                 max_positions: int, quant: QuantScheme | None = None):
        super().__init__()
        check_head_split(config.num_heads, config.num_kv_heads, tp.size)
        self.config = config
        self.quant = quant
        rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions)
        self.embed_tokens = nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, tp, rotary, dtype, quant) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (self.embed_tokens if config.tie_word_embeddings else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype), requires_grad=False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                meta: AttentionMetadata,
                after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions ``[T]`` -> hidden ``[T, hidden]``.

        ``after_layer(index)`` runs once each layer's KV is in the pool: the prefill side
        streams that layer out while the next one computes.
        """
        x = self.embed_tokens[input_ids]
        for index, layer in enumerate(self.layers):
            x = layer(positions, x, cache, index, meta)
            if after_layer is not None:
                after_layer(index)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[S, hidden]`` -> float32 logits ``[S, vocab]``."""
        return linear(self.norm(hidden), self.lm_head).float()

    def expected_tensor_names(self) -> set[str]:
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.config.tie_word_embeddings:
            names.add("lm_head.weight")
        suffixes = ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                    "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                    "post_attention_layernorm.weight"]
        if self.config.qkv_bias:
            suffixes += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        for index in range(self.config.num_layers):
            names.update(f"model.layers.{index}.{suffix}" for suffix in suffixes)
        return names

    def load_tensor(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor (HF name) into its place; False if the name is unknown."""
        with torch.no_grad():
            if name == "model.embed_tokens.weight":
                self.embed_tokens.copy_(tensor)
            elif name == "lm_head.weight":
                if not self.config.tie_word_embeddings:  # a tied checkpoint may still carry it
                    self.lm_head.copy_(tensor)
            elif name == "model.norm.weight":
                self.norm.weight.copy_(tensor)
            else:
                return self._load_layer_tensor(name, tensor)
        return True

    def _load_layer_tensor(self, name: str, tensor: torch.Tensor) -> bool:
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None or int(match[1]) >= len(self.layers):
            return False
        layer, module, param = self.layers[int(match[1])], match[2], match[3]
        if module in _LINEARS:
            path, shard = _LINEARS[module]
            try:
                return layer.get_submodule(path).load(shard, param, tensor)
            except ValueError as error:
                raise ValueError(f"checkpoint tensor {name!r}: {error}") from None
        if param == "weight" and module in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, module).weight.copy_(tensor)
            return True
        return False

    def missing_quantized_tensors(self) -> list[str]:
        """Scales (and weights) a quantized model still lacks after loading (HF names)."""
        missing = []
        for index, layer in enumerate(self.layers):
            for module, (path, shard) in _LINEARS.items():
                missing += [f"model.layers.{index}.{module}.{param}"
                            for param in layer.get_submodule(path).missing(shard)]
        return missing
