"""A trained target/draft model pair, for benchmarks that random weights cannot serve.

Random-weight test models (``pdserve/modelgen.py``) say nothing about quantization loss or
speculative-decoding acceptance: both need a model whose next-token distribution means
something. This trains, in pure torch on the CPU, a small Llama target and a much smaller
draft with the same tokenizer (the repo's byte-level BPE, vocab 512) on the Python standard
library's own source (``engine/train_corpus.py``), and writes each as an HF checkpoint that
``LlamaForCausalLM`` and pdserve's engine both load.

Why these sizes. With 2 threads the CPU trains modelgen's "small" shape (27M parameters) at
about 870 tokens/s: ten minutes would show it 0.5M tokens, 0.02 per parameter, far too few
to learn much. Half its width and two thirds of its depth
(hidden 256, 6 layers, 4 query / 2 KV heads of 64, SwiGLU 704: 4.7M parameters) trains at
about 4,300 tokens/s, so ``TrainSpec``'s defaults (1,000 steps of 8 x 256 tokens) show it
2M tokens in about nine minutes, closer to what a fixed compute budget favours. The draft
(hidden 128, 2 layers, 2 / 1 heads: 0.5M parameters, a ninth of the target) costs a seventh
as much per token and trains on the same batches in about a minute. Both fit the 15-minute
budget with room for a busy machine (measured: docs/quality.md). The context is the
training sequence length (256); the models have never seen a later position.

The model below computes what HF ``LlamaForCausalLM`` computes (float32 RMSNorm, rotate-half
rotary with ``rope_theta`` and no scaling, grouped-query attention, SwiGLU, untied
``lm_head``); its parameter names are HF's, so its state dict is the checkpoint. Training is
float32: bf16 autocast measured slower on this CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from engine.train_corpus import Corpus, build_corpus, save_heldout, tokenizer_digest
from pdserve.bpe import VOCAB_SIZE, build_tokenizer
from pdserve.modelgen import (
    ARCHS,
    ModelShape,
    ensure_built,
    model_config,
    models_home,
    write_json,
    write_tokenizer_files,
)

logger = logging.getLogger(__name__)

PAIR_VERSION = "v1"  # bump when what train_pair writes changes, so caches are rebuilt
TARGET_SHAPE = ModelShape(256, 6, 4, 2, 64, 704, 256)
DRAFT_SHAPE = ModelShape(128, 2, 2, 1, 64, 384, 256)


class ModelPlan(NamedTuple):
    """One model of the pair: its shape and its peak learning rate."""

    shape: ModelShape
    lr: float


# Peak rates from 150-step trials (held-out loss): the target did best at 1e-3 of {5e-4, 1e-3,
# 3e-3, 6e-3}, the draft at 3e-3 of {1e-3, 3e-3}.
PAIR_PLANS = {"target": ModelPlan(TARGET_SHAPE, 1e-3), "draft": ModelPlan(DRAFT_SHAPE, 3e-3)}
ARCH = ARCHS["llama"]
INIT_STD = 0.02
RMS_NORM_EPS = 1e-6  # what model_config writes


@dataclass(frozen=True, slots=True)
class TrainSpec:
    """How both models of a pair are trained; each sees the same batches in the same order."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    min_lr_ratio: float = 0.1  # cosine decay ends at the peak rate times this
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    max_corpus_bytes: int = 6_000_000
    heldout_every: int = 20  # every 20th file of the corpus is held out
    eval_tokens: int = 65_536  # held-out tokens the final loss is taken on
    num_threads: int = 2

    def __post_init__(self) -> None:
        minimums = {"steps": 1, "batch_size": 1, "seq_len": 2, "warmup_steps": 0, "seed": 0,
                    "max_corpus_bytes": 1, "heldout_every": 2, "num_threads": 1}
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be "
                                 f">= {minimum}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} is invalid: must be in [0, 1]")
        if self.eval_tokens < self.seq_len:
            raise ValueError(f"eval_tokens={self.eval_tokens} is invalid: must be >= "
                             f"seq_len={self.seq_len}")


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions; ``[B, S, hidden]``."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.num_heads, self.num_kv_heads = shape.num_heads, shape.num_kv_heads
        self.head_dim = shape.head_dim
        hidden, q_dim = shape.hidden_size, shape.num_heads * shape.head_dim
        kv_dim = shape.num_kv_heads * shape.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)  # [B, H, S, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's ``model.*``: embedding, layers, final norm."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB_SIZE, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size)


class TrainableLlama(nn.Module):
    """A Llama decoder whose state dict carries HF ``LlamaForCausalLM`` tensor names."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.model = Decoder(shape)
        self.lm_head = nn.Linear(shape.hidden_size, VOCAB_SIZE, bias=False)
        exponents = torch.arange(0, shape.head_dim, 2, dtype=torch.int64).float() / shape.head_dim
        inv_freq = 1.0 / (ARCH.rope_theta ** exponents)  # [D/2], as HF computes it
        freqs = torch.arange(shape.max_position_embeddings).float()[:, None] * inv_freq[None]
        table = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", table.cos(), persistent=False)
        self.register_buffer("sin", table.sin(), persistent=False)
        residual_std = INIT_STD / math.sqrt(2 * shape.num_layers)
        for name, parameter in self.named_parameters():
            if parameter.dim() == 2:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) \
                    else INIT_STD
                nn.init.normal_(parameter, std=std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids ``[B, S]`` -> logits ``[B, S, vocab]`` (float32)."""
        length = input_ids.shape[1]
        cos, sin = self.cos[:length], self.sin[:length]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x)).float()


@dataclass(frozen=True, slots=True)
class TrainResult:
    """One trained model and how its training went."""

    model: TrainableLlama
    losses: list[float]  # train loss (nats/token) of every step
    heldout_loss: float  # nats/token over ``heldout_tokens``
    heldout_tokens: int
    wall_s: float


def lr_at(step: int, peak_lr: float, spec: TrainSpec) -> float:
    """Linear warmup to ``peak_lr``, then cosine decay to ``peak_lr * min_lr_ratio``."""
    if step < spec.warmup_steps:
        return peak_lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak_lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cosine)


def batch_starts(num_tokens: int, spec: TrainSpec) -> torch.Tensor:
    """Window start offsets ``[steps, batch]``, from ``seed`` alone: both models of a pair
    see the same windows in the same order."""
    if num_tokens <= spec.seq_len + 1:
        raise ValueError(f"the train stream has {num_tokens} tokens, too few for "
                         f"seq_len={spec.seq_len}: raise max_corpus_bytes")
    generator = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, num_tokens - spec.seq_len - 1, (spec.steps, spec.batch_size),
                         generator=generator)


def train_model(plan: ModelPlan, corpus: Corpus, spec: TrainSpec, name: str) -> TrainResult:
    """Train one model from ``seed`` with AdamW; ``name`` labels the progress log."""
    if not plan.lr > 0:
        raise ValueError(f"{name}: lr={plan.lr!r} is invalid: must be > 0")
    torch.manual_seed(spec.seed)
    model = TrainableLlama(plan.shape)
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": spec.weight_decay},
         {"params": others, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.95))
    stream = torch.from_numpy(corpus.train.token_ids)
    offsets = torch.arange(spec.seq_len + 1)
    losses: list[float] = []
    began = time.perf_counter()
    for step, starts in enumerate(batch_starts(len(stream), spec)):
        windows = stream[starts[:, None] + offsets]  # [B, S + 1]
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, plan.lr, spec)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == spec.steps - 1:
            logger.info("%s step %d/%d loss %.3f (%.0f s)", name, step + 1, spec.steps,
                        losses[-1], time.perf_counter() - began)
    wall_s = time.perf_counter() - began
    heldout_loss, heldout_tokens = evaluate(model, corpus.heldout.token_ids, spec)
    logger.info("%s held-out loss %.3f over %d tokens", name, heldout_loss, heldout_tokens)
    return TrainResult(model, losses, heldout_loss, heldout_tokens, wall_s)


@torch.no_grad()
def evaluate(model: TrainableLlama, token_ids: np.ndarray, spec: TrainSpec) -> tuple[float, int]:
    """Mean next-token loss (nats) over non-overlapping windows of ``seq_len`` tokens of
    the first ``eval_tokens``; the first token of each window is context only."""
    num_windows = min(spec.eval_tokens, len(token_ids)) // spec.seq_len
    if num_windows == 0:
        raise ValueError(f"the held-out stream has {len(token_ids)} tokens, fewer than "
                         f"seq_len={spec.seq_len}: raise max_corpus_bytes")
    windows = torch.from_numpy(token_ids[: num_windows * spec.seq_len].copy())
    windows = windows.view(num_windows, spec.seq_len)
    total = 0.0
    for batch in windows.split(spec.batch_size):
        logits = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                       reduction="sum"))
    num_predicted = num_windows * (spec.seq_len - 1)
    return total / num_predicted, num_predicted


def write_checkpoint(out: Path, result: TrainResult, plan: ModelPlan, corpus: Corpus,
                     spec: TrainSpec) -> None:
    """An HF checkpoint directory, with training.json and the held-out tokens beside it."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tensors = {name: tensor.detach().contiguous() for name, tensor
               in result.model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(out, tokenizer, plan.shape.max_position_embeddings)
    write_json(out / "config.json", {**model_config(plan.shape, ARCH, tokenizer),
                                     "rope_scaling": None})
    save_heldout(out, corpus.heldout, tokenizer_digest(out / "tokenizer.json"))
    write_json(out / "training.json", training_record(result, plan, corpus, spec))


def training_record(result: TrainResult, plan: ModelPlan, corpus: Corpus,
                    spec: TrainSpec) -> dict[str, Any]:
    """What training.json says: the corpus, the recipe, the losses and the size."""
    tail = result.losses[-min(20, len(result.losses)):]
    return {
        "corpus": corpus.describe(spec.max_corpus_bytes, spec.heldout_every),
        "spec": dataclasses.asdict(spec),
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "seq_len": spec.seq_len,
        "lr": plan.lr,
        "seed": spec.seed,
        "shape": dataclasses.asdict(plan.shape),
        "num_parameters": sum(p.numel() for p in result.model.parameters()),
        "train_tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
        "wall_time_s": round(result.wall_s, 1),
        "first_train_loss": result.losses[0],
        "final_train_loss": sum(tail) / len(tail),  # mean of the last 20 steps
        "heldout_loss": result.heldout_loss,
        "heldout_perplexity": math.exp(result.heldout_loss),
        "heldout_eval_tokens": result.heldout_tokens,
        "loss_unit": "nats/token",
        "torch_version": torch.__version__,
        "machine": platform.machine(),
    }


def train_pair(out_dir: str | Path, spec: TrainSpec = TrainSpec(), *,
               plans: Mapping[str, ModelPlan] = PAIR_PLANS) -> tuple[Path, Path]:
    """Train the target and the draft of ``plans`` (their context becomes ``seq_len``) and
    write ``out_dir/target`` and ``out_dir/draft``."""
    out = Path(out_dir)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(spec.num_threads)
    try:
        corpus = build_corpus(build_tokenizer(), spec.max_corpus_bytes, spec.heldout_every)
        logger.info("corpus: %s", corpus.describe(spec.max_corpus_bytes, spec.heldout_every))
        for name in ("target", "draft"):
            shape = dataclasses.replace(plans[name].shape, max_position_embeddings=spec.seq_len)
            plan = plans[name]._replace(shape=shape)
            result = train_model(plan, corpus, spec, name)
            write_checkpoint(out / name, result, plan, corpus, spec)
    finally:
        torch.set_num_threads(previous_threads)
    return out / "target", out / "draft"


def trained_pair_dir(spec: TrainSpec = TrainSpec()) -> Path:
    """Where ensure_trained_pair caches this spec's pair: ``trained-v1`` for the defaults,
    with each field that differs appended (``trained-v1-steps300-seed1``)."""
    default = TrainSpec()
    changed = [f"{field.name.replace('_', '')}{getattr(spec, field.name)}"
               for field in dataclasses.fields(spec)
               if getattr(spec, field.name) != getattr(default, field.name)]
    return models_home() / "-".join([f"trained-{PAIR_VERSION}", *changed])


def ensure_trained_pair(spec: TrainSpec = TrainSpec()) -> tuple[Path, Path]:
    """(target_dir, draft_dir), trained once into the pdserve home and cached."""
    final = ensure_built(trained_pair_dir(spec), lambda staging: train_pair(staging, spec))
    return final / "target", final / "draft"
